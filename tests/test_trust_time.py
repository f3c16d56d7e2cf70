"""Trusted time: max(system clock, newest signed time), persisted, never backwards."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deployment.trusted_time import TrustedTime
from sre_core.clock import FakeClock
from sre_core.errors import SreError


def test_trusted_time_is_a_persisted_high_water_mark(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 3, 1, tzinfo=UTC))
    f = tmp_path / "clock.json"
    tt = TrustedTime(f, clock)
    assert tt.now() == clock.now() and tt.high_water is None
    signed = datetime(2026, 3, 5, tzinfo=UTC)
    assert tt.observe(signed, "timestamp") == signed  # a signed time ahead of the RTC wins
    assert tt.clock_behind()
    assert tt.observe(signed - timedelta(days=1), "old") == signed  # never backwards
    again = TrustedTime(f, clock)  # survives a restart
    assert again.now() == signed and again.source == "timestamp"
    clock.set(datetime(2020, 1, 1, tzinfo=UTC))  # RTC reset
    assert again.now() == signed


def test_checkpoint_ratchets_the_system_clock(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 3, 1, tzinfo=UTC))
    tt = TrustedTime(tmp_path / "clock.json", clock)
    tt.checkpoint()
    clock.advance(timedelta(days=10))
    seen = tt.checkpoint()
    clock.set(datetime(2026, 3, 2, tzinfo=UTC))
    assert TrustedTime(tmp_path / "clock.json", clock).now() == seen
    clock.set(seen + timedelta(seconds=5))  # below the granularity: no write
    before = (tmp_path / "clock.json").read_bytes()
    tt.checkpoint()
    assert (tmp_path / "clock.json").read_bytes() == before


def test_corrupt_clock_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    f = tmp_path / "clock.json"
    f.write_text("{not json")
    with pytest.raises(SreError, match=r"clock\.json"):
        TrustedTime(f, FakeClock())
    f.write_text('{"high_water": "2026-01-01T00:00:00"}')
    with pytest.raises(SreError, match="timezone"):
        TrustedTime(f, FakeClock())
