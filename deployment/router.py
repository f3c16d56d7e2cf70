"""Routes inference requests between the active model version and a canary, and keeps the evidence.

Hand-written because no library does this in-process at the cost we need (a few microseconds per
request): the routing table is one immutable :class:`Routing` value that is replaced, never mutated, so
every request reads one consistent table and a flip (canary -> active) is a single reference assignment.
A request that started on the old table finishes on the session it picked; both sessions stay loaded, so
a flip or a cut-off loses no request.

Evidence for the canary controller is kept per *version* (not per slot role, which changes at the flip):
request and error counts and a latency histogram with fixed log-spaced buckets, plus divergence counts
from mirrored requests (a sample of requests run on both versions and compared). The controller takes a
:meth:`Router.snapshot` at the start of a step and judges ``now - start``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import numpy as np

from deployment.sessions import ModelSession
from sre_core.errors import SreError
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = [
    "LATENCY_EDGES",
    "Answer",
    "Divergence",
    "InferenceError",
    "LatencyHistogram",
    "Router",
    "Routing",
    "Snapshot",
    "VersionStats",
]

Divergence = Literal["top1", "relative_error"]

# Bucket upper edges in seconds: 2 us .. ~60 s, each 5 % wider than the last (~355 buckets); anything
# above the last edge lands in an overflow bucket whose upper edge is infinity.
LATENCY_EDGES: tuple[float, ...] = tuple(
    2e-6 * 1.05**i for i in range(int(math.log(3e7) / math.log(1.05)) + 1)
)


class InferenceError(SreError):
    """The model failed on this request (the slot that answered could not produce an output)."""


@dataclass
class LatencyHistogram:
    """Counts per bucket of :data:`LATENCY_EDGES` (plus one overflow bucket)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES) + 1))

    @property
    def n(self) -> int:
        return sum(self.counts)

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_EDGES, seconds)] += 1

    def minus(self, other: LatencyHistogram) -> LatencyHistogram:
        return LatencyHistogram([a - b for a, b in zip(self.counts, other.counts, strict=True)])

    @staticmethod
    def lower_edge(i: int) -> float:
        return 0.0 if i == 0 else LATENCY_EDGES[i - 1]

    @staticmethod
    def upper_edge(i: int) -> float:
        return LATENCY_EDGES[i] if i < len(LATENCY_EDGES) else math.inf

    def bucket_of_rank(self, k: int) -> int:
        """Index of the bucket holding the k-th smallest sample (1-based)."""
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= k:
                return i
        raise ValueError(f"rank {k} exceeds {seen} samples")

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding the q-quantile (nan when empty)."""
        n = self.n
        if n == 0:
            return math.nan
        return self.upper_edge(self.bucket_of_rank(max(1, math.ceil(q * n))))

    def count_above(self, threshold: float, *, strict_lower: bool) -> int:
        """Samples certainly above ``threshold`` (``strict_lower``: bucket lower edge >= threshold) or
        possibly above it (bucket upper edge > threshold)."""
        total = 0
        for i, c in enumerate(self.counts):
            if not c:
                continue
            edge = self.lower_edge(i) if strict_lower else self.upper_edge(i)
            if (edge >= threshold) if strict_lower else (edge > threshold):
                total += c
        return total


@dataclass
class VersionStats:
    """What one model version did: executions, failures, latency of ``session.run``."""

    requests: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def copy(self) -> VersionStats:
        return VersionStats(self.requests, self.errors, LatencyHistogram(list(self.latency.counts)))

    def minus(self, other: VersionStats) -> VersionStats:
        return VersionStats(
            self.requests - other.requests, self.errors - other.errors, self.latency.minus(other.latency)
        )


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the router's counters at one instant."""

    versions: dict[str, VersionStats]
    pairs: dict[str, tuple[int, int]]  # canary version -> (mirrored rows compared, rows that diverged)

    def stats(self, version: str) -> VersionStats:
        return self.versions.get(version, VersionStats())

    def pair_counts(self, version: str) -> tuple[int, int]:
        return self.pairs.get(version, (0, 0))

    def minus(self, earlier: Snapshot) -> Snapshot:
        """Counters accumulated since ``earlier``."""
        versions = {v: s.minus(earlier.stats(v)) for v, s in self.versions.items()}
        pairs = {}
        for v, (n, d) in self.pairs.items():
            n0, d0 = earlier.pair_counts(v)
            pairs[v] = (n - n0, d - d0)
        return Snapshot(versions, pairs)


@dataclass(frozen=True)
class Routing:
    """The routing table: replaced as a whole, never mutated.

    Args:
        active: the version answering requests.
        canary: the candidate (loaded next to the active one), if a canary runs.
        weight: share of requests (0..1) the canary answers.
        mirror_share: share of requests (0..1) also run on the other version to measure divergence.
        divergence: how mirrored outputs are compared.
        relative_tolerance: regressors: a pair diverges when its relative error exceeds this.
        standby: the last-known-good version, kept loaded after a flip for an instant rollback.
        fallback: a canary failure is answered by the active version (the error still counts).
    """

    active: ModelSession
    canary: ModelSession | None = None
    weight: float = 0.0
    mirror_share: float = 0.0
    divergence: Divergence = "top1"
    relative_tolerance: float = 0.05
    standby: ModelSession | None = None
    fallback: bool = True


class Answer(NamedTuple):
    """The outputs and the version that produced them."""

    outputs: dict[str, np.ndarray]
    version: str


def _diverged(a: np.ndarray, b: np.ndarray, how: Divergence, tol: float) -> tuple[int, int]:
    """(rows compared, rows that diverged) between canary output ``a`` and incumbent output ``b``."""
    if a.shape != b.shape:
        rows = b.shape[0] if b.ndim else 1
        return rows, rows
    if a.ndim < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if how == "top1":
        return a2.shape[0], int(np.count_nonzero(a2.argmax(axis=1) != b2.argmax(axis=1)))
    num = np.linalg.norm((a2 - b2).astype(np.float64), axis=1)
    den = np.maximum(np.linalg.norm(b2.astype(np.float64), axis=1), 1e-12)
    return a2.shape[0], int(np.count_nonzero(num / den > tol))


class Router:
    """Weighted routing between the active version and a canary, with mirrored comparison.

    Args:
        name: the model (module) name, used in telemetry labels.
        active: the version to serve.
        sink: where :meth:`flush_telemetry` writes.
        seed: seeds the mirror sampler (tests reproduce a run exactly).
        timer: the latency timer (``time.perf_counter``); a seam for tests, not a wall clock.
        preprocess: applied to every request's inputs before routing (the agent plugs the chaos
            input-noise fault in here; this package cannot import ``chaos``).
    """

    def __init__(
        self,
        name: str,
        active: ModelSession,
        sink: TelemetrySink | None = None,
        seed: int | None = None,
        timer: Callable[[], float] = time.perf_counter,
        preprocess: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        self.name = name
        self.preprocess = preprocess
        self.sink: TelemetrySink = sink or NullSink()
        self._routing = Routing(active=active)
        self._counter = itertools.count()
        self._rng = random.Random(seed)
        self._timer = timer
        self._lock = threading.Lock()  # guards the counters below, never held across session.run
        self._stats: dict[str, VersionStats] = {}
        self._pairs: dict[str, list[int]] = {}
        self.typical_s = 0.0  # moving average of session.run time (the server offloads slow models)
        self._swap_lock = threading.Lock()  # serialises writers of the routing table

    # -- the routing table ---------------------------------------------------------------------
    @property
    def routing(self) -> Routing:
        return self._routing

    def _swap(self, change: Callable[[Routing], Routing]) -> Routing:
        with self._swap_lock:
            new = change(self._routing)
            self._routing = new  # one reference assignment: readers see the old or the new table
            return new

    def start_canary(
        self,
        candidate: ModelSession,
        *,
        mirror_share: float,
        divergence: Divergence = "top1",
        relative_tolerance: float = 0.05,
        fallback: bool = True,
    ) -> None:
        """Load ``candidate`` next to the active version at weight 0 (mirroring starts at once)."""
        if candidate.version == self._routing.active.version:
            raise ValueError(f"{candidate.version} is already the active version")
        self._swap(
            lambda r: replace(
                r,
                canary=candidate,
                weight=0.0,
                mirror_share=mirror_share,
                divergence=divergence,
                relative_tolerance=relative_tolerance,
                fallback=fallback,
            )
        )

    def set_weight(self, weight: float) -> None:
        """Give the canary ``weight`` (0..1) of the requests."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError("weight must be within 0..1")
        self._swap(lambda r: replace(r, weight=weight if r.canary is not None else 0.0))

    def cut_canary(self) -> ModelSession | None:
        """Weight 0 and no mirroring, at once: the next request is answered by the active version.

        Returns the canary session that was removed (None when no canary ran).
        """
        old = self._routing.canary
        self._swap(lambda r: replace(r, canary=None, weight=0.0, mirror_share=0.0))
        return old

    def promote(self) -> ModelSession:
        """The flip: the canary becomes active, the previous active the loaded last-known-good standby.

        Returns the new active session. Raises RuntimeError when no canary is loaded.
        """

        def change(r: Routing) -> Routing:
            if r.canary is None:
                raise RuntimeError("no canary to promote")
            return replace(r, active=r.canary, canary=None, weight=0.0, mirror_share=0.0, standby=r.active)

        return self._swap(change).active

    def rollback(self) -> ModelSession:
        """Make the loaded standby active again (the previous active becomes standby)."""

        def change(r: Routing) -> Routing:
            if r.standby is None:
                raise RuntimeError("no standby version is loaded")
            return replace(r, active=r.standby, standby=r.active, canary=None, weight=0.0, mirror_share=0.0)

        return self._swap(change).active

    def replace_active(self, session: ModelSession) -> None:
        """Serve ``session`` directly (plain swap, no canary); the old active becomes standby."""
        self._swap(lambda r: replace(r, active=session, standby=r.active, canary=None, weight=0.0))

    # -- serving -------------------------------------------------------------------------------
    def _run(self, session: ModelSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        timer = self._timer
        t0 = timer()
        try:
            out = session.run(feeds)
        except Exception:  # the model failed on this input: count it, the caller decides
            out = None
        dt = timer() - t0
        with self._lock:
            st = self._stats.get(session.version)
            if st is None:
                st = self._stats[session.version] = VersionStats()
            st.requests += 1
            if out is None:
                st.errors += 1
            else:  # latency of answers only: a fast failure must not make a version look quick
                st.latency.counts[bisect.bisect_left(LATENCY_EDGES, dt)] += 1
                self.typical_s += 0.05 * (dt - self.typical_s)
        return out

    def infer(self, feeds: Mapping[str, np.ndarray], pin: str | None = None) -> Answer:
        """Answer one request (``pin``: this loaded version must answer, bypassing the weights).

        Raises:
            InferenceError: the version that had to answer failed.
            LookupError: ``pin`` names no loaded version.
        """
        r = self._routing  # read once: this request uses one consistent table throughout
        if self.preprocess is not None:
            feeds = self.preprocess(feeds)
        if pin is not None:
            return self._pinned(r, feeds, pin)
        canary = r.canary
        if canary is None:  # the steady state: one version, no canary
            out = self._run(r.active, feeds)
            if out is None:
                raise InferenceError(f"inference on {self.name} {r.active.version}", "the model failed")
            return Answer(out, r.active.version)
        n = next(self._counter)
        to_canary = math.floor((n + 1) * r.weight) > math.floor(n * r.weight)
        mirrored = r.mirror_share > 0.0 and self._rng.random() < r.mirror_share
        if mirrored:
            # Random order: whichever runs second finds caches warm, so a fixed order would bias latency.
            if self._rng.random() < 0.5:
                c_out = self._run(canary, feeds)
                a_out = self._run(r.active, feeds)
            else:
                a_out = self._run(r.active, feeds)
                c_out = self._run(canary, feeds)
            if c_out is not None and a_out is not None:
                self._compare(canary.version, c_out, a_out, canary.primary_output, r)
            if to_canary and c_out is not None:
                return Answer(c_out, canary.version)
            if a_out is not None:
                return Answer(a_out, r.active.version)
            raise InferenceError(f"inference on {self.name} {r.active.version}", "the model failed")
        if to_canary:
            out = self._run(canary, feeds)
            if out is not None:
                return Answer(out, canary.version)
            if not r.fallback:
                raise InferenceError(f"inference on {self.name} {canary.version}", "the canary failed")
        out = self._run(r.active, feeds)
        if out is None:
            raise InferenceError(f"inference on {self.name} {r.active.version}", "the model failed")
        return Answer(out, r.active.version)

    def _pinned(self, r: Routing, feeds: Mapping[str, np.ndarray], pin: str) -> Answer:
        for s in (r.active, r.canary, r.standby):
            if s is not None and s.version == pin:
                out = self._run(s, feeds)
                if out is None:
                    raise InferenceError(f"inference on {self.name} {pin}", "the model failed")
                return Answer(out, pin)
        raise LookupError(f"{self.name} has no loaded version {pin!r}")

    def _compare(
        self,
        version: str,
        c_out: dict[str, np.ndarray],
        a_out: dict[str, np.ndarray],
        output: str,
        r: Routing,
    ) -> None:
        a, b = c_out.get(output), a_out.get(output)
        if a is None or b is None:
            rows, bad = 1, 1
        else:
            rows, bad = _diverged(a, b, r.divergence, r.relative_tolerance)
        with self._lock:
            p = self._pairs.setdefault(version, [0, 0])
            p[0] += rows
            p[1] += bad

    # -- evidence and telemetry ----------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A consistent copy of every counter."""
        with self._lock:
            return Snapshot(
                {v: s.copy() for v, s in self._stats.items()},
                {v: (p[0], p[1]) for v, p in self._pairs.items()},
            )

    def flush_telemetry(self, since: Snapshot | None = None) -> Snapshot:
        """Write per-version request/error counts, latency quantiles and the histogram to the sink.

        ``since``: the snapshot of the previous flush (counts are deltas from it). Returns the new one.
        """
        now = self.snapshot()
        delta = now.minus(since) if since is not None else now
        r = self._routing
        roles = {r.active.version: "active"}
        if r.canary is not None:
            roles[r.canary.version] = "canary"
        if r.standby is not None:
            roles.setdefault(r.standby.version, "standby")
        for version, st in delta.versions.items():
            if st.requests == 0:
                continue
            labels = {"model": self.name, "version": version, "slot": roles.get(version, "retired")}
            self.sink.metric("serving.requests", float(st.requests), labels)
            self.sink.metric("serving.errors", float(st.errors), labels)
            for q in (0.5, 0.95, 0.99):
                self.sink.metric(f"serving.latency_p{round(q * 100)}_s", st.latency.quantile(q), labels)
            nz = {str(i): c for i, c in enumerate(st.latency.counts) if c}
            self.sink.record("serving_latency_histogram", {**labels, "edges": "LATENCY_EDGES", "counts": nz})
        for version, (pairs, bad) in delta.pairs.items():
            if pairs:
                labels = {"model": self.name, "version": version}
                self.sink.metric("serving.mirrored_pairs", float(pairs), labels)
                self.sink.metric("serving.diverged_pairs", float(bad), labels)
        return now
