"""Bounded signed time, the pure desired-state verifier and the python-tuf adapter.

How to break it: sign a timestamp (the hub's online key) or a desired state (a channel key) with an
issue time decades ahead. Before the bound, the device raised trusted time to it, so every held
desired state and every later root looked expired: the fleet entered safe mode and stayed there.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from _trust_support import make_env

from deployment.desired_verifier import (
    DesiredStateError,
    FutureIssuedError,
    HeldFacts,
    verify_desired_state,
)
from deployment.manifest import DesiredState
from deployment.pull import PullError
from deployment.trusted_time import FutureSignedTimeError, TrustedTime, signed_time_bound
from deployment.tuf_adapter import check_private_api
from hub.repository import HubRepository
from sre_core.clock import FakeClock

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def test_bound_is_the_device_clock_plus_tolerance_and_never_ratchets_on_signed_time() -> None:
    assert signed_time_bound(T0, None, DAY) == T0 + DAY
    # A mark pushed up to the bound does not move the bound: the system clock does.
    assert signed_time_bound(T0, T0 + DAY, DAY) == T0 + DAY
    # A clock known wrong (behind the mark by more than the tolerance: an RTC reset) catches up by at
    # most one tolerance per admitted time.
    assert signed_time_bound(T0 - 400 * DAY, T0, DAY) == T0 + DAY


def test_admit_refuses_a_far_future_time_and_keeps_the_mark(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    tt = TrustedTime(tmp_path / "clock.json", clock)
    # Inside the tolerance: admitted as skew, but trusted time does not move ahead of a sane clock
    # (a stolen online key must not expire a short-lived desired state early).
    assert tt.admit(T0 + timedelta(hours=20), "timestamp", DAY) == T0
    before = (tmp_path / "clock.json").read_bytes()
    with pytest.raises(FutureSignedTimeError):
        tt.admit(T0 + 30 * 365 * DAY, "timestamp", DAY)
    assert (tmp_path / "clock.json").read_bytes() == before
    clock.advance(timedelta(hours=2))
    tt.admit(T0 + timedelta(hours=1), "timestamp", DAY)
    assert TrustedTime(tmp_path / "clock.json", clock).now() == T0 + timedelta(hours=2)
    # Clock-rollback protection stays: winding the clock back does not lower trusted time.
    clock.set(T0 - 10 * DAY)
    assert TrustedTime(tmp_path / "clock.json", clock).now() == T0 + timedelta(hours=1)
    # A clock known wrong (an RTC reset, 10 days behind the mark): signed time leads, one tolerance at most.
    assert tt.admit(T0 + timedelta(hours=20), "timestamp", DAY) == T0 + timedelta(hours=20)


def _doc(serial: int, issued: datetime, channel: str = "stable") -> bytes:
    ds = DesiredState(channel=channel, serial=serial, issued=issued, expires=issued + 14 * DAY)
    return ds.model_dump_json().encode()


def test_pure_verifier_refuses_rollback_replay_other_channel_and_future_issue() -> None:
    held = HeldFacts("stable", "anchor", 5, "sha-5")
    limit = T0 + DAY
    ok = verify_desired_state(_doc(6, T0), "sha-6", "stable", "anchor", held, limit)
    assert ok.serial == 6
    cases = [
        (_doc(4, T0), "sha-4", "older than the held serial"),
        (_doc(5, T0), "sha-other", "replayed serial"),
        (_doc(6, T0, channel="beta"), "sha-b", "not stable"),
        (b"{not json", "sha-x", "malformed"),
    ]
    for data, sha, why in cases:
        with pytest.raises(DesiredStateError, match=why):
            verify_desired_state(data, sha, "stable", "anchor", held, limit)
    with pytest.raises(FutureIssuedError, match="beyond the device clock"):
        verify_desired_state(_doc(6, T0 + 3650 * DAY), "sha-6", "stable", "anchor", held, limit)
    # Under another trust anchor (re-provisioned) serials start afresh.
    assert verify_desired_state(_doc(1, T0), "s", "stable", "new-anchor", held, limit).serial == 1


def test_python_tuf_private_members_are_still_there() -> None:
    """Fails loudly when a python-tuf upgrade renames `_persist_file` or `reference_time`."""
    check_private_api()


def test_far_future_timestamp_and_desired_state_are_refused_not_admitted(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        env.artifact("1.0.0", mode="file")
        assert env.puller().pull().desired is not None
        mark = json.loads(env.paths.clock_file.read_text())["high_water"]
        ts_before = (env.paths.tuf / "timestamp.json").read_bytes()

        # The hub's real online timestamp key signs a time 30 years ahead (a wrong hub clock, a thief).
        future = HubRepository(env.repo.dir, clock=FakeClock(env.clock.now() + 30 * 365 * DAY))
        future.timestamp()
        with pytest.raises(PullError) as info:
            env.puller().pull()
        assert info.value.refused and "beyond the device clock" in info.value.why
        assert json.loads(env.paths.clock_file.read_text())["high_water"] == mark
        # Refused before python-tuf persisted it: the cached timestamp is the last good one.
        assert (env.paths.tuf / "timestamp.json").read_bytes() == ts_before
        assert "pull.future_time_refused" in env.audit_events()

        # The hub re-signs with a correct clock: the device takes it, nothing to undo by hand.
        env.repo.timestamp()
        assert env.puller().pull().trust == "fresh"

        # A channel key signs a desired state issued decades ahead: refused the same way.
        future.release("stable", "clf", "1.0.0")
        env.repo.timestamp()
        with pytest.raises(PullError, match="beyond the device clock"):
            env.puller().pull()
        assert (
            json.loads(env.paths.clock_file.read_text())["high_water"]
            < (env.clock.now() + 2 * DAY).isoformat()
        )
    finally:
        env.server.stop()


# --- how to break the bound (each case below is an attempt) ------------------------------------------
HOUR = timedelta(hours=1)


def _short_lived(issued: datetime) -> DesiredState:
    return DesiredState(channel="stable", serial=2, issued=issued, expires=issued + 6 * HOUR)


@pytest.mark.parametrize("ahead", [20 * HOUR, DAY - timedelta(seconds=1), DAY])
def test_a_signed_time_inside_the_tolerance_never_expires_a_desired_state_early(
    tmp_path: Path, ahead: timedelta
) -> None:
    """A stolen online key signs a time just inside (or exactly at) the tolerance, every pull."""
    clock = FakeClock(T0)
    tt = TrustedTime(tmp_path / "clock.json", clock)
    held = _short_lived(T0)
    for _ in range(48):  # a pull every five minutes for four hours
        assert tt.admit(clock.now() + ahead, "timestamp", DAY) == clock.now()
        assert not held.is_expired(tt.now())
        clock.advance(timedelta(minutes=5))
    with pytest.raises(FutureSignedTimeError):  # one second beyond: refused
        tt.admit(clock.now() + DAY + timedelta(seconds=1), "timestamp", DAY)


@pytest.mark.parametrize("back", [20 * HOUR, 10 * DAY])
def test_a_rolled_back_clock_revives_nothing_and_a_stolen_key_gains_nothing(
    tmp_path: Path, back: timedelta
) -> None:
    """The clock is wound back (inside and beyond the tolerance) after a desired state expired."""
    clock = FakeClock(T0)
    tt = TrustedTime(tmp_path / "clock.json", clock)
    held = _short_lived(T0 - 10 * HOUR)
    tt.checkpoint()
    assert held.is_expired(tt.now())
    clock.set(T0 - back)
    again = TrustedTime(tmp_path / "clock.json", clock)
    assert again.now() == T0 and held.is_expired(again.now())
    # Honest signed times (the hub's clock is right) never lower the mark.
    again.admit(T0 - back, "timestamp", DAY)
    assert again.now() >= T0 and held.is_expired(again.now())


def test_a_stolen_key_cannot_walk_a_device_with_a_wrong_clock_forward(tmp_path: Path) -> None:
    """A device whose RTC reset to 1970 at boot (its clock is known wrong: trusted time comes from signed
    times). Before, each pull admitted a time one tolerance beyond the mark and raised the mark to it:
    a stolen key moved such a device a day per pull, into safe mode within the hour."""
    clock = FakeClock(T0)
    tt = TrustedTime(tmp_path / "clock.json", clock)
    tt.checkpoint()
    clock.set(datetime(1970, 1, 1, tzinfo=UTC))  # reboot with a reset RTC
    tt = TrustedTime(tmp_path / "clock.json", clock)
    held = DesiredState(channel="stable", serial=2, issued=T0, expires=T0 + 3 * DAY)
    # The first admission after the clock went back may lead (elapsed time is unknown), one tolerance
    # at most: the honest hub's time a few hours on, here a thief's.
    first = tt.admit(tt.bound(DAY), "timestamp", DAY)
    assert first <= T0 + DAY
    for _ in range(24):  # then a pull every five minutes, each signed at the bound
        clock.advance(timedelta(minutes=5))
        tt.admit(tt.bound(DAY), "timestamp", DAY)
    # From then on trusted time moves only with the device's own elapsed time (two hours).
    assert tt.now() == first + 2 * HOUR and not held.is_expired(tt.now())
    with pytest.raises(FutureSignedTimeError):
        tt.admit(first + 2 * HOUR + DAY + timedelta(seconds=1), "timestamp", DAY)


def test_a_device_with_a_wound_back_clock_follows_the_hub_across_a_long_outage(tmp_path: Path) -> None:
    """The clock was wound back ten days (known wrong) and the device then lost its link for two days,
    longer than the tolerance. Its clock still ticked: honest signed times after the outage are admitted
    (before, the bound stayed at the last mark plus the tolerance and the device refused the hub for
    good), and a thief's time is still refused."""
    clock = FakeClock(T0)
    tt = TrustedTime(tmp_path / "clock.json", clock)
    tt.checkpoint()
    skew = 10 * DAY
    clock.set(T0 - skew)
    tt.admit(T0 + timedelta(minutes=5), "timestamp", DAY)  # the hub, honest
    clock.advance(2 * DAY)  # offline
    true_now = clock.now() + skew
    assert tt.admit(true_now, "timestamp", DAY) == true_now
    with pytest.raises(FutureSignedTimeError):
        tt.admit(true_now + 2 * DAY, "timestamp", DAY)
