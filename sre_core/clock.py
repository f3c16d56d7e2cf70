"""Injectable clocks: read time through a :class:`Clock`, never through global functions.

Wall time (``now``) is always timezone-aware UTC. ``monotonic`` measures durations.
:class:`FakeClock` lets a test simulate a month offline in a second.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock", "utc"]


def utc(ts: float) -> datetime:
    """Turn a POSIX timestamp into an aware UTC datetime."""
    return datetime.fromtimestamp(ts, tz=UTC)


@runtime_checkable
class Clock(Protocol):
    """The time seam."""

    def now(self) -> datetime:
        """Aware UTC wall-clock time."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a fake clock advances instead)."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(tz=UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A controllable clock for tests and simulations. Thread-safe.

    Args:
        start: initial wall time (aware). Defaults to 2026-01-01T00:00:00Z.
    """

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2026, 1, 1, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._now = start
        self._mono = 0.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float | timedelta) -> datetime:
        """Move both clocks forward; returns the new wall time."""
        secs = seconds.total_seconds() if isinstance(seconds, timedelta) else float(seconds)
        if secs < 0:
            raise ValueError("advance() cannot go backwards; use set() to wind the wall clock back")
        with self._lock:
            self._now += timedelta(seconds=secs)
            self._mono += secs
            return self._now

    def set(self, when: datetime) -> None:
        """Set the wall clock (may go backwards, like a bad RTC); the monotonic clock is untouched."""
        if when.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        with self._lock:
            self._now = when

    def __repr__(self) -> str:
        return f"FakeClock({self._now.isoformat()})"
