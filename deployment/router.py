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

Latency evidence is *paired*: a mirrored request runs on both versions back to back, the order
alternating from pair to pair, and the router keeps the per-request ratio ``t_canary / t_incumbent``
(:class:`PairStats`). Both runs see the same input, batch size, load and cache state within microseconds
of each other, so the comparison is like with like whatever the canary's traffic share (an unpaired
comparison of a 1 % canary against the 99 % incumbent measures cache warmth, not the model). The first
``warmup_pairs`` mirrored requests after a canary starts or changes weight are run but not counted.

Only routed traffic is evidence: a request pinned to a version (``.../versions/V/infer``) is answered
and shows in telemetry, but never counts for the canary verdict; pinning to the canary is refused unless
the canary was started with ``allow_pin=True`` (a policy option, off by default), so a client cannot
steer the verdict.

Error evidence is *discordant*: during a canary every failure (an exception, or NaN/Inf outputs) of one
version is checked against the other version on the same input, and a failure both have counts for
neither (:meth:`VersionStats.evidence`). The canary's slots are shuffled within exact-share blocks by an
injectable RNG, so a client cannot aim at them.
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
from fractions import Fraction
from typing import Literal, NamedTuple

import numpy as np

from deployment.sessions import ModelSession
from sre_core.errors import SreError
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = [
    "LATENCY_EDGES",
    "RATIO_EDGES",
    "Answer",
    "Divergence",
    "InferenceError",
    "LatencyHistogram",
    "PairStats",
    "PinRefusedError",
    "RatioHistogram",
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


# Ratio buckets (t_canary / t_incumbent of one paired request): 1/64 .. 64, each 2 % wider than the last.
RATIO_EDGES: tuple[float, ...] = tuple(
    2.0 ** (-6) * 1.02**i for i in range(int(math.log(4096) / math.log(1.02)) + 1)
)


SHARE_BLOCK = 100
"""Largest block of routed requests within which the canary's share is exact (positions shuffled)."""
MIN_SHARE_BLOCK = 20
"""Smallest such block: short blocks would let a client infer the last slots of a block."""
PAIR_EVERY = 4
"""One mirrored request in this many is timed as a latency pair (the others only compare outputs)."""
CANARY_WARM_RUNS = 3
INCUMBENT_WARM_RUNS = 1
"""Untimed runs before each side of a latency pair (the incumbent serves nearly every request)."""


class InferenceError(SreError):
    """The model failed on this request (the slot that answered could not produce an output)."""


class PinRefusedError(LookupError):
    """A request pinned to the canary version while pinning to a canary is not allowed by policy."""


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
    """What one model version did: executions, failures, latency of ``session.run``.

    ``shared``: failures on inputs the other version (canary or incumbent) also failed on. They are
    real errors for telemetry but no evidence about either version: :meth:`evidence` drops them from
    both the requests and the errors, so a client sending inputs that fail everywhere can neither
    inflate the canary's error rate nor the incumbent's baseline.
    """

    requests: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    shared: int = 0

    def copy(self) -> VersionStats:
        return VersionStats(
            self.requests, self.errors, LatencyHistogram(list(self.latency.counts)), self.shared
        )

    def minus(self, other: VersionStats) -> VersionStats:
        return VersionStats(
            self.requests - other.requests,
            self.errors - other.errors,
            self.latency.minus(other.latency),
            self.shared - other.shared,
        )

    def evidence(self) -> VersionStats:
        """Requests and errors on discordant evidence only: shared failures count for neither side."""
        return VersionStats(self.requests - self.shared, self.errors - self.shared, self.latency)


@dataclass
class RatioHistogram:
    """Counts per bucket of :data:`RATIO_EDGES` (plus one overflow bucket)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(RATIO_EDGES) + 1))

    @property
    def n(self) -> int:
        return sum(self.counts)

    def add(self, ratio: float) -> None:
        self.counts[bisect.bisect_left(RATIO_EDGES, ratio)] += 1

    def minus(self, other: RatioHistogram) -> RatioHistogram:
        return RatioHistogram([a - b for a, b in zip(self.counts, other.counts, strict=True)])

    @staticmethod
    def lower_edge(i: int) -> float:
        return 0.0 if i == 0 else RATIO_EDGES[i - 1]

    @staticmethod
    def upper_edge(i: int) -> float:
        return RATIO_EDGES[i] if i < len(RATIO_EDGES) else math.inf

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding the q-quantile (nan when empty)."""
        n = self.n
        if n == 0:
            return math.nan
        k, seen = max(1, math.ceil(q * n)), 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= k:
                return self.upper_edge(i)
        return math.inf

    def count_above(self, threshold: float, *, certainly: bool) -> int:
        """Ratios certainly above ``threshold`` (bucket lower edge >= it) or possibly above it (upper
        edge > it)."""
        total = 0
        for i, c in enumerate(self.counts):
            if c and ((self.lower_edge(i) >= threshold) if certainly else (self.upper_edge(i) > threshold)):
                total += c
        return total


@dataclass
class PairStats:
    """Paired latency evidence of one canary version against the incumbent it ran next to.

    ``ratio``: per-request ``t_canary / t_incumbent``; ``canary``/``incumbent``: the per-row latency
    (request time divided by its batch size) of each side of the same pairs.
    """

    ratio: RatioHistogram = field(default_factory=RatioHistogram)
    canary: LatencyHistogram = field(default_factory=LatencyHistogram)
    incumbent: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def n(self) -> int:
        return self.ratio.n

    def copy(self) -> PairStats:
        return PairStats(
            RatioHistogram(list(self.ratio.counts)),
            LatencyHistogram(list(self.canary.counts)),
            LatencyHistogram(list(self.incumbent.counts)),
        )

    def minus(self, other: PairStats) -> PairStats:
        return PairStats(
            self.ratio.minus(other.ratio),
            self.canary.minus(other.canary),
            self.incumbent.minus(other.incumbent),
        )


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the router's counters at one instant.

    ``versions`` counts routed traffic only (the canary's evidence); ``pinned`` counts requests pinned
    to a version (telemetry only); ``paired`` holds the paired latency evidence per canary version.
    """

    versions: dict[str, VersionStats]
    pairs: dict[str, tuple[int, int]]  # canary version -> (mirrored rows compared, rows that diverged)
    paired: dict[str, PairStats] = field(default_factory=dict)
    pinned: dict[str, VersionStats] = field(default_factory=dict)

    def stats(self, version: str) -> VersionStats:
        return self.versions.get(version, VersionStats())

    def pair_counts(self, version: str) -> tuple[int, int]:
        return self.pairs.get(version, (0, 0))

    def paired_stats(self, version: str) -> PairStats:
        return self.paired.get(version, PairStats())

    def served(self, version: str) -> VersionStats:
        """Everything ``version`` answered, routed and pinned (for telemetry)."""
        routed, pinned = self.stats(version), self.pinned.get(version)
        if pinned is None:
            return routed
        return VersionStats(
            routed.requests + pinned.requests,
            routed.errors + pinned.errors,
            LatencyHistogram(
                [a + b for a, b in zip(routed.latency.counts, pinned.latency.counts, strict=True)]
            ),
            routed.shared + pinned.shared,
        )

    def minus(self, earlier: Snapshot) -> Snapshot:
        """Counters accumulated since ``earlier``."""
        versions = {v: s.minus(earlier.stats(v)) for v, s in self.versions.items()}
        pairs = {}
        for v, (n, d) in self.pairs.items():
            n0, d0 = earlier.pair_counts(v)
            pairs[v] = (n - n0, d - d0)
        paired = {v: p.minus(earlier.paired_stats(v)) for v, p in self.paired.items()}
        pinned = {v: s.minus(earlier.pinned.get(v, VersionStats())) for v, s in self.pinned.items()}
        return Snapshot(versions, pairs, paired, pinned)


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
        allow_pin: requests may pin the canary version (they are answered, never counted as evidence).
        count_pairs_from: mirrored pairs with a sequence number below this are warm-up, not evidence.
    """

    active: ModelSession
    canary: ModelSession | None = None
    weight: float = 0.0
    mirror_share: float = 0.0
    divergence: Divergence = "top1"
    relative_tolerance: float = 0.05
    standby: ModelSession | None = None
    fallback: bool = True
    allow_pin: bool = False
    count_pairs_from: int = 0


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
        seed: seeds the routing RNG when ``rng`` is not given (tests reproduce a run exactly).
        rng: the routing RNG (the canary's slots and the mirror sample); injected for tests.
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
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.preprocess = preprocess
        self.sink: TelemetrySink = sink or NullSink()
        self._routing = Routing(active=active)
        self._rng = rng if rng is not None else random.Random(seed)
        self._deck_lock = threading.Lock()  # guards the shuffled block of canary slots
        self._deck: list[bool] = []
        self._deck_weight = -1.0
        self._deck_block = 0
        self._timer = timer
        self._lock = threading.Lock()  # guards the counters below, never held across session.run
        self._stats: dict[str, VersionStats] = {}
        self._pinned_stats: dict[str, VersionStats] = {}
        self._pairs: dict[str, list[int]] = {}
        self._paired: dict[str, PairStats] = {}
        self._pair_seq = itertools.count()  # mirrored pairs so far (warm-up and the alternating order)
        self.warmup_pairs = 20
        self.typical_s = 0.0  # moving average of session.run time (the server offloads slow models)
        self._swap_lock = threading.Lock()  # serialises writers of the routing table
        self._flush_lock = threading.Lock()
        self._flush_mark: Snapshot | None = None

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
        allow_pin: bool = False,
    ) -> None:
        """Load ``candidate`` next to the active version at weight 0 (mirroring starts at once).

        ``allow_pin``: requests may pin the canary's version (answered, never evidence).
        """
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
                allow_pin=allow_pin,
                count_pairs_from=self._next_pair() + self.warmup_pairs,
            )
        )

    def _next_pair(self) -> int:
        # Peek without consuming: count() has no peek, so take one and account for it.
        return next(self._pair_seq) + 1

    def set_weight(self, weight: float) -> None:
        """Give the canary ``weight`` (0..1) of the requests; the next ``warmup_pairs`` pairs are
        warm-up (a new share changes how warm the canary's caches are)."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError("weight must be within 0..1")
        start = self._next_pair() + self.warmup_pairs
        self._swap(
            lambda r: replace(r, weight=weight if r.canary is not None else 0.0, count_pairs_from=start)
        )

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

    def drop_standby(self) -> ModelSession | None:
        """Unload the last-known-good standby (memory); a rollback then reloads it from its slot."""
        old = self._routing.standby
        self._swap(lambda r: replace(r, standby=None))
        return old

    def replace_active(self, session: ModelSession) -> None:
        """Serve ``session`` directly (plain swap, no canary); the old active becomes standby."""
        self._swap(lambda r: replace(r, active=session, standby=r.active, canary=None, weight=0.0))

    # -- serving -------------------------------------------------------------------------------
    def _run(
        self, session: ModelSession, feeds: Mapping[str, np.ndarray], routed: bool = True
    ) -> dict[str, np.ndarray] | None:
        return self._timed(session, feeds, routed)[0]

    def _timed(
        self,
        session: ModelSession,
        feeds: Mapping[str, np.ndarray],
        routed: bool = True,
        warm: int = 0,
        finite: bool = False,
    ) -> tuple[dict[str, np.ndarray] | None, float, bool]:
        """Run once, timed and counted: (outputs, seconds, failed).

        ``finite``: outputs holding NaN or Inf count as a failure too (during a canary, where the other
        version decides whether that is this version's fault); the outputs are still returned.
        """
        for _ in range(warm):
            _warm(session, feeds)
        timer = self._timer
        t0 = timer()
        try:
            out: dict[str, np.ndarray] | None = session.run(feeds)
        except Exception:  # the model failed on this input: count it, the caller decides
            out = None
        dt = timer() - t0
        failed = out is None or (finite and not _all_finite(out))
        with self._lock:
            book = self._stats if routed else self._pinned_stats
            st = book.get(session.version)
            if st is None:
                st = book[session.version] = VersionStats()
            st.requests += 1
            if failed:
                st.errors += 1
            if out is not None:  # latency of answers only: a fast failure must not make a version look quick
                st.latency.counts[bisect.bisect_left(LATENCY_EDGES, dt)] += 1
                self.typical_s += 0.05 * (dt - self.typical_s)
        return out, dt, failed

    def _shared(self, *versions: str) -> None:
        """Both versions failed on the same input: evidence for neither (:meth:`VersionStats.evidence`)."""
        with self._lock:
            for v in versions:
                self._stats.setdefault(v, VersionStats()).shared += 1

    def _to_canary(self, weight: float) -> bool:
        """Whether this request goes to the canary: exactly ``weight`` of every block of requests (see
        :func:`_block_size`), at positions shuffled by the injected RNG, so a client watching which
        version answered cannot predict the canary's next slot from the ones it saw."""
        if weight <= 0.0:
            return False
        if weight >= 1.0:
            return True
        with self._deck_lock:
            if self._deck_weight != weight:
                self._deck_weight, self._deck_block, self._deck = weight, 0, []
            if not self._deck:
                k, size = self._deck_block, _block_size(weight)
                hits = math.floor((k + 1) * size * weight) - math.floor(k * size * weight)
                deck = [True] * hits + [False] * (size - hits)
                self._rng.shuffle(deck)
                self._deck, self._deck_block = deck, k + 1
            return self._deck.pop()

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
        # During a canary every failure (an exception, or NaN/Inf outputs) of one version is checked
        # against the other version on the same input: a failure only the canary has is a canary error,
        # one only the incumbent has is an incumbent error, one both have counts for neither. So inputs
        # that fail everywhere, sent at the canary's slots or flooded at the incumbent, move no verdict.
        to_canary = self._to_canary(r.weight)
        mirrored = r.mirror_share > 0.0 and self._rng.random() < r.mirror_share
        if mirrored:
            # The same request on both versions back to back, the order alternating pair by pair:
            # whichever runs second finds the input warm, so each side goes second equally often.
            # Every PAIR_EVERY-th mirrored request is a latency pair: each side is timed right after
            # untimed runs of its own on the same input, so both are measured in their steady state.
            # A canary on a small share is otherwise cold: an identical 6 MB model measured 1.85x the
            # incumbent with no warm run, 1.2-1.4x after one, 1.02-1.04x after three (docs/canary.md).
            seq = next(self._pair_seq)
            timed = seq % PAIR_EVERY == 0
            c_warm, a_warm = (CANARY_WARM_RUNS, INCUMBENT_WARM_RUNS) if timed else (0, 0)
            if (seq // PAIR_EVERY) % 2:
                c_out, c_dt, c_bad = self._timed(canary, feeds, warm=c_warm, finite=True)
                a_out, a_dt, a_bad = self._timed(r.active, feeds, warm=a_warm, finite=True)
            else:
                a_out, a_dt, a_bad = self._timed(r.active, feeds, warm=a_warm, finite=True)
                c_out, c_dt, c_bad = self._timed(canary, feeds, warm=c_warm, finite=True)
            if c_bad and a_bad:
                self._shared(canary.version, r.active.version)
            if c_out is not None and a_out is not None and not c_bad and not a_bad:
                self._compare(canary.version, c_out, a_out, canary.primary_output, r)
                if timed and seq >= r.count_pairs_from:
                    self._pair(canary.version, c_dt, a_dt, _rows(feeds))
            if to_canary and c_out is not None and not c_bad:
                return Answer(c_out, canary.version)
            if a_out is not None:
                return Answer(a_out, r.active.version)
            raise InferenceError(f"inference on {self.name} {r.active.version}", "the model failed")
        if to_canary:
            c_out, _, c_bad = self._timed(canary, feeds, finite=True)
            if c_out is not None and not c_bad:
                return Answer(c_out, canary.version)
            # The incumbent runs on every canary failure: the client's fallback (when allowed) and the
            # evidence whether the failure is the canary's own.
            a_out, _, a_bad = self._timed(r.active, feeds, finite=True)
            if a_bad:
                self._shared(canary.version, r.active.version)
            if not r.fallback:
                raise InferenceError(f"inference on {self.name} {canary.version}", "the canary failed")
            if a_out is not None:
                return Answer(a_out, r.active.version)
            raise InferenceError(f"inference on {self.name} {r.active.version}", "the model failed")
        a_out, _, a_bad = self._timed(r.active, feeds, finite=True)
        if a_bad:
            # Evidence only (the incumbent still answers): does the canary fail on this input too?
            _, _, c_bad = self._timed(canary, feeds, finite=True)
            if c_bad:
                self._shared(canary.version, r.active.version)
        if a_out is None:
            raise InferenceError(f"inference on {self.name} {r.active.version}", "the model failed")
        return Answer(a_out, r.active.version)

    def _pinned(self, r: Routing, feeds: Mapping[str, np.ndarray], pin: str) -> Answer:
        if r.canary is not None and r.canary.version == pin and not r.allow_pin:
            raise PinRefusedError(
                f"{self.name} {pin} is being canaried; requests may not pin it (the router picks)"
            )
        for s in (r.active, r.canary, r.standby):
            if s is not None and s.version == pin:
                out = self._run(s, feeds, routed=False)  # answered, never evidence
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

    def _pair(self, version: str, c_dt: float, a_dt: float, rows: int) -> None:
        ratio = c_dt / a_dt if a_dt > 0 else math.inf
        with self._lock:
            p = self._paired.get(version)
            if p is None:
                p = self._paired[version] = PairStats()
            p.ratio.counts[bisect.bisect_left(RATIO_EDGES, ratio)] += 1
            p.canary.counts[bisect.bisect_left(LATENCY_EDGES, c_dt / rows)] += 1
            p.incumbent.counts[bisect.bisect_left(LATENCY_EDGES, a_dt / rows)] += 1

    # -- evidence and telemetry ----------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A consistent copy of every counter."""
        with self._lock:
            return Snapshot(
                {v: s.copy() for v, s in self._stats.items()},
                {v: (p[0], p[1]) for v, p in self._pairs.items()},
                {v: p.copy() for v, p in self._paired.items()},
                {v: s.copy() for v, s in self._pinned_stats.items()},
            )

    def flush(self) -> None:
        """Write everything since the previous :meth:`flush` (one mark shared by every caller, so the
        periodic flusher and the canary driver never count a request twice)."""
        with self._flush_lock:
            self._flush_mark = self.flush_telemetry(self._flush_mark)

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
        for version in sorted(set(delta.versions) | set(delta.pinned)):
            st = delta.served(version)
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
        for version, paired in delta.paired.items():
            if paired.n:
                labels = {"model": self.name, "version": version}
                self.sink.metric("serving.paired_latency_ratio_p50", paired.ratio.quantile(0.5), labels)
        return now


def _rows(feeds: Mapping[str, np.ndarray]) -> int:
    """The batch size of a request: the leading dimension of its first input (1 for scalars)."""
    for v in feeds.values():
        return max(1, int(v.shape[0])) if v.ndim else 1
    return 1


def _block_size(weight: float) -> int:
    """Requests per shuffled block: a multiple of ``weight``'s denominator (at most
    :data:`SHARE_BLOCK`) of at least :data:`MIN_SHARE_BLOCK`, so each block holds a whole number of
    canary slots (0.5: 10 in 20; 0.05: 1 in 20; 0.01: 1 in 100; 0.013: 1 or 2 in 100, exact on average)."""
    denominator = Fraction(weight).limit_denominator(SHARE_BLOCK).denominator
    return denominator * max(1, math.ceil(MIN_SHARE_BLOCK / denominator))


def _all_finite(outputs: Mapping[str, np.ndarray]) -> bool:
    """No NaN or Inf in any floating-point output (other dtypes are always finite)."""
    return all(v.dtype.kind not in "fc" or bool(np.isfinite(v).all()) for v in outputs.values())


def _warm(session: ModelSession, feeds: Mapping[str, np.ndarray]) -> None:
    """Run once, untimed and uncounted, to bring the session's weights into cache."""
    try:
        session.run(feeds)
    except Exception:  # counted by the timed run that follows
        return
