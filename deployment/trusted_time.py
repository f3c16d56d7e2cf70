"""Trusted time: the maximum of the system clock and the newest signed time the device has seen.

Public API::

    TrustedTime(path, clock)         a Clock (now/monotonic/sleep) that never goes below its high-water mark
        .now() -> datetime           max(clock.now(), high water)
        .observe(signed_time, source) -> datetime   raise the mark (persisted atomically) and return now()
        .checkpoint() -> datetime    also ratchet the mark up to the system clock (persisted)
        .clock_behind() -> bool      the system clock is behind the mark (RTC reset or wound back)
        .admit(signed_time, source, tolerance) -> datetime   observe() a signed time, refusing one
                                     beyond :func:`signed_time_bound` (raises FutureSignedTimeError)
        .high_water -> datetime | None
        .discard_unbacked(tolerance, held_issued, held_expires) -> dict | None   drop a poisoned mark
    signed_time_bound(system_now, high_water, tolerance) -> datetime   pure: the latest admissible time
    unbacked_mark(record, system_now, tolerance, held_issued, held_expires) -> str | None   pure
    FutureSignedTimeError(SreError)  a signed time is too far ahead of the device clock (refused)

The mark lives in ``<state>/clock.json`` and only moves forward, so winding the system clock back (a bad
RTC, an attacker) revives no expired desired state or metadata. Signed times come from the hub: the
timestamp role's signing time and the desired state's ``issued``. Every expiry decision also
checkpoints the system clock into the mark (at most one write per ``checkpoint_granularity``), so a
state seen expired stays expired when the clock is later wound back. The cost: a system clock that once
jumped far ahead keeps trusted time there until an operator removes ``clock.json``.

Signed times are bounded: a hub's online timestamp key (or a channel key) signs whatever time it likes,
so a signed time beyond the device clock plus a policy tolerance (:func:`signed_time_bound`) is refused
(and the pull with it), never admitted; one inside the tolerance is admitted as clock skew but raises
the mark no further than the system clock, unless that clock is known wrong (behind the mark by more
than the tolerance: an RTC reset). A stolen online key can then withhold updates, not move the fleet's
clocks into safe mode.

A mark written before the bound existed may already be poisoned (a far-future signed time admitted as
it came). :func:`unbacked_mark` recognises one without weakening the rollback protection: the mark is
beyond the device clock plus the tolerance *now*, it was already that far ahead of the device clock
*when it was written* (only an unbounded signed time does that: a checkpoint or a bounded admission
writes at most the device clock), no held verified desired state says the device clock is behind
(issued beyond it: an RTC reset, where the mark is needed), and no held desired state is still valid at
the mark. Such a mark is replaced (at start, by :meth:`TrustedTime.discard_unbacked`, audited) with the
device clock it was written at or the held desired state's issue time, whichever is later. A clock wound
back after a good mark never matches: that mark agreed with the device clock when it was written.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from sre_core.atomic import atomic_write_json
from sre_core.clock import Clock
from sre_core.errors import SreError

__all__ = ["FutureSignedTimeError", "TrustedTime", "signed_time_bound", "unbacked_mark"]


class FutureSignedTimeError(SreError):
    """A signed time lies beyond the device clock plus the tolerance: it is refused, not admitted."""


def signed_time_bound(system_now: datetime, high_water: datetime | None, tolerance: timedelta) -> datetime:
    """The latest signed time a device may admit. Pure.

    Normally the system clock plus ``tolerance``. When the system clock is behind the high-water mark by
    more than the tolerance, the clock is known wrong (an RTC reset, a clock wound back: a signed time
    admitted under this rule is never that far ahead), so the mark plus the tolerance bounds instead:
    trusted time then catches up by at most one tolerance per admitted time, never by decades at once.
    """
    if high_water is not None and high_water - system_now > tolerance:
        return high_water + tolerance
    return system_now + tolerance


def unbacked_mark(
    record: dict[str, object],
    system_now: datetime,
    tolerance: timedelta,
    held_issued: datetime | None,
    held_expires: datetime | None,
) -> str | None:
    """Why a stored ``clock.json`` record is a poisoned mark to discard (None: keep it). Pure.

    See the module docstring for the four conditions; each one that fails keeps the mark.
    """
    try:
        high = datetime.fromisoformat(str(record["high_water"]))
        written_at = datetime.fromisoformat(str(record["system_clock_at_update"]))
    except (KeyError, ValueError):
        return None  # no evidence of how it was written: keep it
    if high.tzinfo is None or written_at.tzinfo is None or high <= system_now + tolerance:
        return None
    if high - written_at <= tolerance:
        return None  # it agreed with the device clock when written: the clock went back since (rollback)
    if held_issued is not None and held_issued > system_now + tolerance:
        return None  # a verified desired state says the device clock is behind: the mark is needed
    if held_expires is not None and high < held_expires:
        return None  # the held desired state is still valid at the mark: it expires nothing held
    return (
        f"the stored trusted time {high.isoformat()} (from {record.get('source') or 'unknown'}) was "
        f"{high - written_at} ahead of the device clock when written and no held signed document is "
        f"valid at it: a far-future signed time admitted before signed times were bounded"
    )


class TrustedTime:
    """A monotone wall clock anchored to signed times. Thread-compatible (one writer per state dir).

    Raises:
        SreError: ``clock.json`` exists but is unreadable (someone edited it by hand).
    """

    def __init__(
        self, path: Path, clock: Clock, checkpoint_granularity: timedelta = timedelta(minutes=1)
    ) -> None:
        self.path = Path(path)
        # a chaos fault clock (chaos.faults.SkewedClock) never moves trusted time: read the clock under it
        self.clock: Clock = getattr(clock, "unskewed", clock)
        self.granularity = checkpoint_granularity
        self._high: datetime | None = None
        self._source = ""
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                high = datetime.fromisoformat(data["high_water"])
                self._source = str(data.get("source", ""))
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise self._corrupt(str(exc)) from exc
            if high.tzinfo is None:
                raise self._corrupt("high_water has no timezone")
            self._high = high

    def _corrupt(self, why: str) -> SreError:
        return SreError(
            f"read trusted time {self.path}",
            f"the file is not a valid high-water record ({why})",
            "restore it from backup, or delete it only after checking the system clock is right",
        )

    @property
    def high_water(self) -> datetime | None:
        """Newest signed time seen (None before the first pull)."""
        return self._high

    @property
    def source(self) -> str:
        return self._source

    def now(self) -> datetime:
        """Trusted now: never earlier than the newest signed time seen."""
        sys_now = self.clock.now()
        if self._high is not None and self._high > sys_now:
            return self._high
        return sys_now

    def monotonic(self) -> float:
        return self.clock.monotonic()

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(seconds)

    def clock_behind(self) -> bool:
        """True when the system clock is behind the signed high-water mark (RTC reset or wound back)."""
        return self._high is not None and self.clock.now() < self._high

    def checkpoint(self) -> datetime:
        """Ratchet the mark up to the system clock (when it moved on by the granularity). Returns now."""
        sys_now = self.clock.now()
        if self._high is None or sys_now - self._high >= self.granularity:
            self._write(sys_now, "system-clock")
        return self.now()

    def observe(self, signed_time: datetime, source: str) -> datetime:
        """Raise the high-water mark to a signed time (only ever forwards). Returns :meth:`now`."""
        if signed_time.tzinfo is None:
            raise ValueError("signed_time must be timezone-aware")
        if self._high is None or signed_time > self._high:
            self._write(signed_time, source)
        return self.now()

    def bound(self, tolerance: timedelta) -> datetime:
        """The latest signed time :meth:`admit` accepts now (see :func:`signed_time_bound`)."""
        return signed_time_bound(self.clock.now(), self._high, tolerance)

    def admit(self, signed_time: datetime, source: str, tolerance: timedelta) -> datetime:
        """:meth:`observe` a signed time unless it lies beyond :meth:`bound`. Returns :meth:`now`.

        While the system clock is sane (not behind the mark by more than the tolerance), an admitted
        signed time raises the mark only up to the system clock: a time inside the tolerance is clock
        skew, tolerated, but it may not move trusted time ahead (a stolen online key could otherwise
        expire a short-lived desired state early). Only a clock known wrong lets signed time lead.

        Raises:
            FutureSignedTimeError: the signed time is too far ahead; the mark is unchanged.
        """
        if signed_time.tzinfo is None:
            raise ValueError("signed_time must be timezone-aware")
        limit = self.bound(tolerance)
        if signed_time > limit:
            raise FutureSignedTimeError(
                f"accept the {source} signing time {signed_time.isoformat()}",
                f"it is beyond the device clock plus the tolerance ({limit.isoformat()}); a signing key or "
                "the hub's clock is wrong",
                "nothing was installed and trusted time is unchanged; the hub must re-sign with a correct "
                "clock (rotate the key if it was stolen); raise trust.yaml max_signed_time_ahead_s only "
                "if this device's clock is known to lag",
            )
        sys_now = self.clock.now()
        if self._high is not None and self._high - sys_now > tolerance:
            return self.observe(signed_time, source)  # the clock is known wrong: signed time leads
        return self.observe(min(signed_time, sys_now), source)

    def discard_unbacked(
        self, tolerance: timedelta, held_issued: datetime | None, held_expires: datetime | None
    ) -> dict[str, str] | None:
        """Replace a poisoned mark (:func:`unbacked_mark`) with a bounded one. Returns what changed (for
        the audit entry), or None when the mark is kept."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict):
            return None
        why = unbacked_mark(record, self.clock.now(), tolerance, held_issued, held_expires)
        if why is None or self._high is None:
            return None
        floor = datetime.fromisoformat(str(record["system_clock_at_update"]))
        if held_issued is not None and held_issued > floor:
            floor = held_issued
        discarded = self._high
        atomic_write_json(
            self.path,
            {
                "high_water": floor.isoformat(),
                "source": "recovered",
                "system_clock_at_update": self.clock.now().isoformat(),
                "discarded": discarded.isoformat(),
            },
        )
        self._high, self._source = floor, "recovered"
        return {"discarded": discarded.isoformat(), "now_high_water": floor.isoformat(), "why": why}

    def _write(self, when: datetime, source: str) -> None:
        if self._high is None or when > self._high:
            atomic_write_json(
                self.path,
                {
                    "high_water": when.isoformat(),
                    "source": source,
                    "system_clock_at_update": self.clock.now().isoformat(),
                },
            )
            self._high = when
            self._source = source
