"""Store-and-forward upload of sealed telemetry batches (and attestations) to the hub.

At-least-once with idempotent ids: a batch leaves the outbox only when the hub acknowledges it (200
"stored" or "duplicate"), so a crash anywhere re-sends at most the batch in flight, which the hub then
recognises by its content-derived id. Nothing gives up by time: a batch is kept until acknowledged or
evicted by the local byte budget (counted). A flush tries while the link answers; transient failures
back off with jitter and honour ``Retry-After``; after ``max_attempts`` consecutive failures the flush
ends and the next one (scheduled) carries on. 401/403 mean the hub refuses this device: the flush stops
and the batches stay.

Several hubs (a regional hub first, the root as fallback): each entry goes to the first hub that takes
it, in configured order, starting from the hub that took the previous entry of this flush. A hub that
cannot be reached, answers 5xx/429, refuses or rejects passes the entry on to the next one; an entry is
refused or rejected only when every hub refused or rejected it, and one attempt has failed only when no
hub took it. The same batch id goes to every hub, so an entry a regional hub stored but whose answer
was lost, then sent to the root, lands once at the root (the root deduplicates by id, and the regional
hub's forwarded copy answers "duplicate").

Receipts (red-team U3): with ``receipt_root`` (the device's trusted TUF root), a telemetry batch leaves
the outbox only on a 200 that carries the root hub's signed receipt for this device and batch id
(:mod:`sre_core.receipts`), which no tier in between can forge. A 200 without one (a regional hub's
"queued", or a tier that answers "stored" and drops the batch) *hands the batch off*: it stays in the
outbox, is not sent again in this flush, and is re-sent ``recheck_s`` later (then every ``recheck_s``)
until a receipt comes back: a regional hub that forwarded it answers the re-send with the root's receipt,
one that dropped it stores it again, the root lands it or answers "duplicate" (with a receipt). Batch ids
stay the idempotency key, so a re-send never lands twice. Attestations (newest-wins state, re-sent with
every change) still leave on any 200.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from sre_agent.telemetry.store import BatchInfo, Store
from sre_core.clock import Clock
from sre_core.identity import DeviceIdentity
from sre_core.paths import StatePaths
from sre_core.receipts import trusted_root, verify_receipt
from sre_core.signing import sign_request

__all__ = [
    "ATTEST_PATH",
    "BATCH_PATH",
    "FlushReport",
    "RetryPolicy",
    "Uplink",
    "parse_retry_after",
    "receipt_root",
]

BATCH_PATH = "/v1/telemetry/batches/"
ATTEST_PATH = "/v1/telemetry/attestations/"
CHUNK = 16 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; ``Retry-After`` is honoured up to ``max_retry_after_s``."""

    base_s: float = 1.0
    factor: float = 2.0
    max_s: float = 300.0
    jitter: float = 0.5
    max_retry_after_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.factor < 1 or self.max_s < self.base_s or not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy needs base_s > 0, factor >= 1, max_s >= base_s, 0 <= jitter <= 1")

    def delay(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 0)."""
        d = min(self.max_s, self.base_s * self.factor ** min(attempt, 64))
        d *= 1 - self.jitter * rng.random()
        if retry_after_s is not None:
            d = max(d, min(retry_after_s, self.max_retry_after_s))
        return d


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        return max(0.0, parsedate_to_datetime(v).timestamp() - now_s)
    except (TypeError, ValueError):
        return None


@dataclass
class FlushReport:
    """What one flush did."""

    uploaded: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    failures: int = 0
    refused: str | None = None
    rejected: list[str] = field(default_factory=list)
    pending_after: int = 0
    handed: list[str] = field(default_factory=list)  # taken without the root's receipt: kept, re-sent later
    link_down: bool = False
    by_hub: Counter[str] = field(default_factory=Counter)  # entries acknowledged, per hub URL

    def to_dict(self) -> dict[str, object]:
        return {
            "uploaded": len(self.uploaded),
            "duplicates": len(self.duplicates),
            "rows": self.rows,
            "bytes": self.bytes,
            "failures": self.failures,
            "refused": self.refused,
            "rejected": self.rejected,
            "pending_after": self.pending_after,
            "handed": len(self.handed),
            "link_down": self.link_down,
            "by_hub": dict(self.by_hub),
        }


class _Throttle:
    """A byte-rate cap on the request body (token bucket over real time)."""

    def __init__(self, bytes_per_s: float, sleep: Callable[[float], None]) -> None:
        self.rate = bytes_per_s
        self.sleep = sleep

    def stream(self, data: bytes) -> Iterator[bytes]:
        start = time.monotonic()
        sent = 0
        for i in range(0, len(data), CHUNK):
            chunk = data[i : i + CHUNK]
            due = start + (sent + len(chunk)) / self.rate
            wait = due - time.monotonic()
            if wait > 0:
                self.sleep(wait)
            sent += len(chunk)
            yield chunk


class Uplink:
    """Seals and uploads the outbox.

    Args:
        store: the telemetry store.
        identity: the device key (signs every request).
        hub_url: hub base URL, or several in order of preference (a regional hub first).
        clock: for signature ``created`` and backoff sleeps.
        client: an httpx client (default: one with a 30 s timeout).
        bandwidth_bps: optional cap on upload bytes per second.
        retry: backoff policy.
        rng: jitter source.
        receipt_root: the device's trusted root.json (a path, or a function giving the newest one, see
            :func:`sre_core.receipts.trusted_root`): batches then leave only on the root's receipt.
        recheck_s: how long a batch handed off without a receipt waits before it is re-sent.
    """

    def __init__(
        self,
        store: Store,
        identity: DeviceIdentity,
        hub_url: str | Sequence[str],
        clock: Clock,
        client: httpx.Client | None = None,
        bandwidth_bps: float | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        receipt_root: Path | Callable[[], Path] | None = None,
        recheck_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.identity = identity
        urls = [hub_url] if isinstance(hub_url, str) else list(hub_url)
        if not urls:
            raise ValueError("Uplink needs at least one hub URL")
        self.hub_urls = [u.rstrip("/") for u in urls]
        self.hub_url = self.hub_urls[0]
        self._current = 0  # the hub that took the last entry
        self.clock = clock
        self.client = client or httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        self._throttle = _Throttle(bandwidth_bps, time.sleep) if bandwidth_bps else None
        self.receipt_root = receipt_root
        self.recheck_s = recheck_s

    def close(self) -> None:
        self.client.close()

    def _url(self, b: BatchInfo, hub: str | None = None) -> str:
        path = BATCH_PATH if b.kind == "batch" else ATTEST_PATH
        return f"{hub or self.hub_url}{path}{b.batch_id}"

    def send(self, b: BatchInfo, payload: bytes, hub: str | None = None) -> httpx.Response:
        """One signed POST of one outbox entry to ``hub`` (default: the first); raises
        httpx.TransportError on link failure."""
        url = self._url(b, hub)
        headers = sign_request(
            "POST",
            url,
            payload,
            self.identity.private_key,
            self.identity.device_id,
            int(self.clock.now().timestamp()),
            secrets.token_hex(16),
            {"content-type": "application/octet-stream", "content-length": str(len(payload))},
        )
        content = self._throttle.stream(payload) if self._throttle else payload
        return self.client.post(url, content=content, headers=headers)

    def flush(self, max_attempts: int = 5, max_batches: int = 100_000, seal: bool = True) -> FlushReport:
        """Seal what is pending and upload in priority order until done, refused or the link fails.

        Bounded: at most ``max_batches`` uploads and ``max_attempts`` consecutive failures.
        """
        report = FlushReport()
        done = 0
        stop = False
        while not stop and done < max_batches:
            if seal:
                self.store.seal()
            now_us = _us(self.clock)
            waiting = (
                {k for k, due in self.store.handed().items() if due > now_us} if self.receipt_root else set()
            )
            skip = {*report.rejected, *report.handed, *waiting}
            batches = [x for x in self.store.pending() if x.batch_id not in skip]
            if not batches:
                break
            for b in batches:
                if done >= max_batches:
                    break
                outcome = self._deliver(b, max_attempts, report)
                if outcome in ("ok", "handed"):
                    done += 1
                elif outcome != "rejected":
                    stop = True
                    break
        report.pending_after = len(self.store.pending())
        return report

    def _receipted(self, b: BatchInfo, body: Any) -> bool:
        root = self.receipt_root() if callable(self.receipt_root) else self.receipt_root
        receipt = body.get("receipt") if isinstance(body, dict) else None
        return root is not None and verify_receipt(root, receipt, self.identity.device_id, b.batch_id)

    def _order(self) -> list[int]:
        """Hubs to try: the one that took the last entry, then the others in configured order."""
        return [self._current, *(k for k in range(len(self.hub_urls)) if k != self._current)]

    def _deliver(self, b: BatchInfo, max_attempts: int, report: FlushReport) -> str:
        """Upload one entry, retrying transient failures. Returns ok, rejected, refused or link_down."""
        payload = self.store.payload(b.batch_id)
        for attempt in range(max_attempts):
            retry_after: float | None = None
            answers: list[tuple[int, str]] = []
            for k in self._order():
                try:
                    resp = self.send(b, payload, self.hub_urls[k])
                    status = resp.status_code
                    after = parse_retry_after(resp.headers.get("retry-after"), self.clock.now().timestamp())
                    if after is not None:
                        retry_after = after if retry_after is None else min(retry_after, after)
                except httpx.TransportError:
                    status = 0
                if status == 200:
                    body = resp.json()
                    if self.receipt_root is not None and b.kind == "batch" and not self._receipted(b, body):
                        # taken, but only the root's signed receipt says the root holds it: keep it
                        self.store.hand_off(b.batch_id, _us(self.clock) + int(self.recheck_s * 1e6))
                        report.handed.append(b.batch_id)
                        self._current = k
                        return "handed"
                    dup = body.get("status") == "duplicate"
                    (report.duplicates if dup else report.uploaded).append(b.batch_id)
                    self.store.ack(b.batch_id)
                    report.rows += b.rows
                    report.bytes += b.bytes
                    report.by_hub[self.hub_urls[k]] += 1
                    self._current = k
                    return "ok"
                answers.append((status, resp.text[:200] if status else ""))
            statuses = {st for st, _ in answers}
            if statuses <= {401, 403}:
                st, text = answers[0]
                report.refused = f"{st} {text}"
                self.store.defer(b.batch_id, _us(self.clock) + int(self.retry.max_s * 1e6))
                return "refused"
            if statuses <= {400, 401, 403, 413, 422}:
                # No hub will ever take this entry; keep it (nothing is dropped silently) and move on.
                report.rejected.append(b.batch_id)
                self.store.defer(b.batch_id, _us(self.clock) + int(self.retry.max_s * 1e6))
                return "rejected"
            report.failures += 1
            delay = self.retry.delay(attempt, retry_after, self.rng)
            self.store.defer(b.batch_id, _us(self.clock) + int(delay * 1e6))
            if attempt + 1 < max_attempts:
                self.clock.sleep(delay)
        report.link_down = True
        return "link_down"


def receipt_root(paths: StatePaths) -> Callable[[], Path] | None:
    """The device's trusted root for receipts (its newest), None on a device with no trust anchor (it
    pulls nothing either; its uploads then leave on any 200, as before receipts)."""
    if not paths.root_json.is_file():
        return None
    return lambda: trusted_root(paths)


def _us(clock: Clock) -> int:
    return int(clock.now().timestamp() * 1_000_000)
