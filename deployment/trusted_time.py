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
    signed_time_bound(system_now, high_water, tolerance, written_at=None) -> datetime   pure: the latest
                                     admissible time
    carried_mark(high_water, written_at, system_now) -> datetime | None   pure: the mark moved on by
                                     the device's elapsed time (None when unknown)
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
the mark no further than the system clock. A clock known wrong (behind the mark by more than the
tolerance: an RTC reset, a clock wound back) is replaced by :func:`carried_mark`, the mark moved on by
the time the clock ran since it was written: the bound and the raise use it, and a signed time leads
only while that elapsed time is unknown (the clock went back since the last write), one tolerance at
most, once. A stolen online key can then withhold updates, not move the fleet's clocks into safe mode,
nor walk a device with a wrong clock forward a tolerance per pull.

How to break it, and the tests that try (tests/test_trust_signed_time.py, test_trust_clock_poison.py,
test_trust_redteam.py): a time just inside or exactly at the tolerance, every pull, against a desired
state expiring in 6 h; a clock rolled back inside and beyond the tolerance after expiry; a stolen key
signing at the bound every pull on a device whose RTC reset to 1970; a wound-back clock cut off for
longer than the tolerance; a far-future time; an honest pull under a wound-back clock, then a restart.
Left open: a device whose clock went back and that was offline for longer than the tolerance before
its next admitted time refuses the hub until its clock is set right (it keeps what it holds).

A mark written before the bound existed may already be poisoned (a far-future signed time admitted as
it came). :func:`unbacked_mark` recognises one without weakening the rollback protection: the mark is
beyond the device clock plus the tolerance *now*, it was already that far ahead of the device clock
*when it was written* (only an unbounded signed time does that: a checkpoint or a bounded admission
writes at most the device clock), no held verified desired state says the device clock is behind
(issued beyond it: an RTC reset, where the mark is needed), and no held desired state is still valid at
the mark. Such a mark is replaced (before every pull and at the reconcile loop's start, by
:func:`deployment.pull.recover_trusted_time`, audited) with the device clock it was written at or the
held desired state's issue time, whichever is later. A clock wound back after a good mark never matches:
that mark agreed with the device clock when it was written. Every record this code writes carries
``"bounded": true`` and is never treated as poisoned: under a clock known wrong, an admitted signed time
is legitimately ahead of the device clock when written.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from sre_core.atomic import atomic_write_json
from sre_core.clock import Clock
from sre_core.errors import SreError

__all__ = ["FutureSignedTimeError", "TrustedTime", "carried_mark", "signed_time_bound", "unbacked_mark"]


class FutureSignedTimeError(SreError):
    """A signed time lies beyond the device clock plus the tolerance: it is refused, not admitted."""


def signed_time_bound(
    system_now: datetime,
    high_water: datetime | None,
    tolerance: timedelta,
    written_at: datetime | None = None,
) -> datetime:
    """The latest signed time a device may admit. Pure.

    Normally the system clock plus ``tolerance``. When the system clock is behind the high-water mark by
    more than the tolerance, the clock is known wrong (an RTC reset, a clock wound back: a signed time
    admitted under this rule is never that far ahead), so the mark carried forward by the device time
    elapsed since it was written (:func:`carried_mark`; ``written_at`` is the system clock then) plus
    the tolerance bounds instead: never decades at once.
    """
    if high_water is not None and high_water - system_now > tolerance:
        return (carried_mark(high_water, written_at, system_now) or high_water) + tolerance
    return system_now + tolerance


def carried_mark(high_water: datetime, written_at: datetime | None, system_now: datetime) -> datetime | None:
    """The mark moved on by the time the system clock ran since the mark was written. Pure.

    A wrong clock (an RTC reset, a clock wound back) still ticks at the right rate, so this is the
    device's best estimate of the present when its clock's reading is known wrong. None when that
    elapsed time is unknown: no record of the clock at the write, or the clock went back since.
    """
    if written_at is None or system_now < written_at:
        return None
    return high_water + (system_now - written_at)


def unbacked_mark(
    record: dict[str, object],
    system_now: datetime,
    tolerance: timedelta,
    held_issued: datetime | None,
    held_expires: datetime | None,
) -> str | None:
    """Why a stored ``clock.json`` record is a poisoned mark to discard (None: keep it). Pure.

    See the module docstring for the conditions (and the ``bounded`` marker); each one that fails keeps
    the mark.
    """
    if record.get("bounded"):
        return None  # written under the bound (a clock known wrong may lead): not old code's poison
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
        self._written: datetime | None = None  # the system clock when the mark was written
        self._source = ""
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                high = datetime.fromisoformat(data["high_water"])
                self._source = str(data.get("source", ""))
                written = data.get("system_clock_at_update")
                self._written = datetime.fromisoformat(written) if isinstance(written, str) else None
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise self._corrupt(str(exc)) from exc
            if high.tzinfo is None or (self._written is not None and self._written.tzinfo is None):
                raise self._corrupt("high_water or system_clock_at_update has no timezone")
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
        return signed_time_bound(self.clock.now(), self._high, tolerance, self._written)

    def admit(self, signed_time: datetime, source: str, tolerance: timedelta) -> datetime:
        """:meth:`observe` a signed time unless it lies beyond :meth:`bound`. Returns :meth:`now`.

        While the system clock is sane (not behind the mark by more than the tolerance), an admitted
        signed time raises the mark only up to the system clock: a time inside the tolerance is clock
        skew, tolerated, but it may not move trusted time ahead (a stolen online key could otherwise
        expire a short-lived desired state early). A clock known wrong raises it only up to
        :func:`carried_mark` (the mark moved on by the device's elapsed time), so a stolen key cannot
        walk such a device forward one tolerance per pull either; signed time leads only when that
        elapsed time is unknown (the clock went back since the mark was written: an RTC reset at boot),
        by one tolerance at most, and that write re-anchors the carry.

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
        if self._high is not None and self._high - sys_now > tolerance:  # the clock is known wrong
            carried = carried_mark(self._high, self._written, sys_now)
            return self.observe(signed_time if carried is None else min(signed_time, carried), source)
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
        written = self.clock.now()
        atomic_write_json(
            self.path,
            {
                "high_water": floor.isoformat(),
                "source": "recovered",
                "system_clock_at_update": written.isoformat(),
                "discarded": discarded.isoformat(),
                "bounded": True,
            },
        )
        self._high, self._source, self._written = floor, "recovered", written
        return {"discarded": discarded.isoformat(), "now_high_water": floor.isoformat(), "why": why}

    def _write(self, when: datetime, source: str) -> None:
        if self._high is None or when > self._high:
            written = self.clock.now()
            atomic_write_json(
                self.path,
                {
                    "high_water": when.isoformat(),
                    "source": source,
                    "system_clock_at_update": written.isoformat(),
                    "bounded": True,
                },
            )
            self._high, self._source, self._written = when, source, written
