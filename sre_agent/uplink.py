"""Store-and-forward upload of sealed telemetry batches (and attestations) to the hub.

At-least-once with idempotent ids: a batch leaves the outbox only when the hub acknowledges it (200
"stored" or "duplicate"), so a crash anywhere re-sends at most the batch in flight, which the hub then
recognises by its content-derived id. Nothing gives up by time: a batch is kept until acknowledged or
evicted by the local byte budget (counted). A flush tries while the link answers; transient failures
back off with jitter and honour ``Retry-After``; after ``max_attempts`` consecutive failures the flush
ends and the next one (scheduled) carries on. 401/403 mean the hub refuses this device: the flush stops
and the batches stay.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import httpx

from sre_agent.telemetry.store import BatchInfo, Store
from sre_core.clock import Clock
from sre_core.identity import DeviceIdentity
from sre_core.signing import sign_request

__all__ = ["ATTEST_PATH", "BATCH_PATH", "FlushReport", "RetryPolicy", "Uplink", "parse_retry_after"]

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
    link_down: bool = False

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
            "link_down": self.link_down,
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
        hub_url: hub base URL.
        clock: for signature ``created`` and backoff sleeps.
        client: an httpx client (default: one with a 30 s timeout).
        bandwidth_bps: optional cap on upload bytes per second.
        retry: backoff policy.
        rng: jitter source.
    """

    def __init__(
        self,
        store: Store,
        identity: DeviceIdentity,
        hub_url: str,
        clock: Clock,
        client: httpx.Client | None = None,
        bandwidth_bps: float | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.identity = identity
        self.hub_url = hub_url.rstrip("/")
        self.clock = clock
        self.client = client or httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        self._throttle = _Throttle(bandwidth_bps, time.sleep) if bandwidth_bps else None

    def close(self) -> None:
        self.client.close()

    def _url(self, b: BatchInfo) -> str:
        path = BATCH_PATH if b.kind == "batch" else ATTEST_PATH
        return f"{self.hub_url}{path}{b.batch_id}"

    def send(self, b: BatchInfo, payload: bytes) -> httpx.Response:
        """One signed POST of one outbox entry (raises httpx.TransportError on link failure)."""
        url = self._url(b)
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
            batches = [x for x in self.store.pending() if x.batch_id not in report.rejected]
            if not batches:
                break
            for b in batches:
                if done >= max_batches:
                    break
                outcome = self._deliver(b, max_attempts, report)
                if outcome == "ok":
                    done += 1
                elif outcome != "rejected":
                    stop = True
                    break
        report.pending_after = len(self.store.pending())
        return report

    def _deliver(self, b: BatchInfo, max_attempts: int, report: FlushReport) -> str:
        """Upload one entry, retrying transient failures. Returns ok, rejected, refused or link_down."""
        payload = self.store.payload(b.batch_id)
        for attempt in range(max_attempts):
            retry_after: float | None = None
            try:
                resp = self.send(b, payload)
                status = resp.status_code
                retry_after = parse_retry_after(resp.headers.get("retry-after"), self.clock.now().timestamp())
            except httpx.TransportError:
                status = 0
            if status == 200:
                body = resp.json()
                dup = body.get("status") == "duplicate"
                (report.duplicates if dup else report.uploaded).append(b.batch_id)
                self.store.ack(b.batch_id)
                report.rows += b.rows
                report.bytes += b.bytes
                return "ok"
            if status in (401, 403):
                report.refused = f"{status} {resp.text[:200]}"
                self.store.defer(b.batch_id, _us(self.clock) + int(self.retry.max_s * 1e6))
                return "refused"
            if status in (400, 413, 422):
                # The hub will never take this entry; keep it (nothing is dropped silently) and move on.
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


def _us(clock: Clock) -> int:
    return int(clock.now().timestamp() * 1_000_000)
