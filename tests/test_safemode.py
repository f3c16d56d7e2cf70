"""Safe mode: a month offline on a fake clock, flapping, operator entry, offline expiry, the decision."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from deployment.artifacts import TrustStatus
from deployment.reconcile import Reconciler
from deployment.safemode import SafeModeState, decide, is_safe_mode, read_safe_mode
from policies.deployment import DeploymentPolicy, FlappingRule
from sre_agent.provision import provision
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from tests.deploy_helpers import StaticSource, desired_state, make_artifact


def served(state: StatePaths) -> bytes:
    return (state.module("clf") / "current" / "model.onnx").read_bytes()


@pytest.fixture
def device(state: StatePaths, clock: FakeClock, tmp_path: Path) -> StatePaths:
    factory = tmp_path / "model.onnx"
    factory.write_bytes(b"factory safe model")
    provision(state, safe_modules=[f"clf={factory}"], clock=clock)
    return state


def test_a_month_offline_keeps_version_until_expiry_then_safe_mode_then_recovers(
    device: StatePaths, clock: FakeClock, tmp_path: Path
) -> None:
    wall = time.monotonic()
    v1 = make_artifact(tmp_path / "cas", "clf", "1.0", b"version one")
    src = StaticSource(clock, [v1], valid=timedelta(days=30))
    expires = src.desired.expires
    sink = MemorySink()
    rec = Reconciler(device, src, clock, telemetry=sink)
    assert [o.result for o in rec.run_once().outcomes] == ["committed"]
    src.online = False  # the link goes away for a month
    entered_at = None
    while clock.now() < expires + timedelta(days=2):
        step = min(timedelta(hours=6), expires - clock.now()) if clock.now() < expires else timedelta(hours=6)
        clock.advance(step)
        report = rec.run_once()
        if report.safe_mode and entered_at is None:
            entered_at = clock.now()
        if clock.now() < expires:
            assert not report.safe_mode and served(device) == b"version one"
            assert report.trust == TrustStatus.STALE.value
    assert entered_at == expires  # exactly at expiry, by trusted time, not at the next 6-hour pass
    assert is_safe_mode(device) and read_safe_mode(device).reason == "expired"
    assert served(device) == b"factory safe model"
    assert any(sev == "critical" for _k, _m, sev, _a in sink.events)  # alerts raised while in safe mode
    # A fresh signed desired state arrives: leave safe mode and converge.
    v2 = make_artifact(tmp_path / "cas", "clf", "2.0", b"version two")
    src.online = True
    src.set([v2], serial=2)
    report = rec.run_once()
    assert not report.safe_mode and report.safe_mode_changed and report.safe_mode_changed.startswith("left")
    assert [o.result for o in report.outcomes] == ["committed"] and served(device) == b"version two"
    events = [r.event for r in AuditLog(device.audit_log).records()]
    assert events.count("safe_mode.entered") == 1 and events.count("safe_mode.left") == 1
    assert AuditLog(device.audit_log).verify()[1] is None
    assert (
        time.monotonic() - wall < 60
    )  # a month of 6-hourly passes in seconds (generous bound, not a benchmark)


def test_no_installs_while_in_safe_mode(device: StatePaths, clock: FakeClock, tmp_path: Path) -> None:
    v1 = make_artifact(tmp_path / "cas", "clf", "1.0", b"one")
    src = StaticSource(clock, [v1], valid=timedelta(hours=1))
    rec = Reconciler(device, src, clock)
    rec.run_once()
    clock.advance(timedelta(hours=2))
    assert rec.run_once().safe_mode
    # Same (expired) desired state with a newer artifact, as a replay would bring: still nothing installed.
    src.arts = {"clf": make_artifact(tmp_path / "cas", "clf", "9.0", b"nine")}
    report = rec.run_once()
    assert report.safe_mode and [o.result for o in report.outcomes] == ["safe_mode"]
    assert served(device) == b"factory safe model"


def test_flapping_rollbacks_enter_safe_mode(device: StatePaths, clock: FakeClock, tmp_path: Path) -> None:
    probe = tmp_path / "probes" / "ok"
    probe.parent.mkdir()
    probe.write_text('#!/bin/sh\n! grep -q BAD "$SRE_ARTIFACT_PATH"\n')
    probe.chmod(0o755)
    pol = DeploymentPolicy.model_validate(
        {"probes": {"exec_allowlist": [str(probe)]}, "flapping": {"max_rollbacks": 3, "window_s": 3600}}
    )
    probes = [{"kind": "exec", "argv": [str(probe)], "attempts": 1}]
    src = StaticSource(clock, [make_artifact(tmp_path / "cas", "clf", "1.0", b"one", probes=probes)])
    rec = Reconciler(device, src, clock, pol)
    rec.run_once()
    for n in range(3):
        bad = make_artifact(tmp_path / "cas", "clf", f"2.{n}", f"BAD {n}".encode(), probes=probes)
        src.set([bad], serial=2 + n)
        clock.advance(600)
        assert [o.result for o in rec.run_once().outcomes] == ["rolled_back"]
    assert not is_safe_mode(device)
    clock.advance(60)
    report = rec.run_once()  # the next pass sees 3 rollbacks within the hour
    assert report.safe_mode and read_safe_mode(device).reason == "flapping"
    assert served(device) == b"factory safe model"
    # The same desired state again does not end it; a newer one does.
    assert rec.run_once().safe_mode
    src.set([make_artifact(tmp_path / "cas", "clf", "3.0", b"three", probes=probes)], serial=10)
    report = rec.run_once()
    assert not report.safe_mode and served(device) == b"three"


def test_offline_source_failure_still_enforces_expiry(
    device: StatePaths, clock: FakeClock, tmp_path: Path
) -> None:
    src = StaticSource(
        clock, [make_artifact(tmp_path / "cas", "clf", "1.0", b"one")], valid=timedelta(days=2)
    )
    rec = Reconciler(device, src, clock)
    rec.run_once()

    def down() -> None:
        raise ConnectionError("no route to hub")

    offline = Reconciler(device, down, clock)  # type: ignore[arg-type]
    clock.advance(timedelta(days=1))
    r = offline.run_once()
    assert not r.safe_mode and r.trust == "stale" and not r.online
    clock.advance(timedelta(days=1))
    assert offline.run_once().safe_mode
    # Winding the system clock back does not revive the expired state.
    clock.set(clock.now() - timedelta(days=10))
    r = offline.run_once()
    assert r.safe_mode and r.trust == "expired"
    assert "reconcile.pull_failed" in [x.event for x in AuditLog(device.audit_log).records()]


def test_decide_is_pure_and_precise(clock: FakeClock, tmp_path: Path) -> None:
    arts = [make_artifact(tmp_path / "cas", "clf", "1.0", b"one")]
    d1 = desired_state(clock.now(), arts, serial=5, valid=timedelta(days=1))
    rule = FlappingRule(max_rollbacks=2, window_s=100)
    off = SafeModeState()
    assert decide(off, TrustStatus.STALE, d1, d1.expires - timedelta(microseconds=1), rule).action == "stay"
    assert decide(off, TrustStatus.STALE, d1, d1.expires, rule).action == "enter"
    marks = [(clock.now() - timedelta(seconds=s)).isoformat() for s in (10, 50)]
    assert (
        decide(SafeModeState(rollbacks=marks), TrustStatus.FRESH, d1, clock.now(), rule).reason == "flapping"
    )
    old = [(clock.now() - timedelta(seconds=s)).isoformat() for s in (10, 500)]
    assert decide(SafeModeState(rollbacks=old), TrustStatus.FRESH, d1, clock.now(), rule).action == "stay"
    op = SafeModeState(active=True, reason="operator", serial_at_entry=5)
    assert decide(op, TrustStatus.FRESH, d1, clock.now(), rule).action == "stay"
    d6 = desired_state(clock.now(), arts, serial=6)
    assert decide(op, TrustStatus.FRESH, d6, clock.now(), rule).action == "leave"
    assert decide(op, TrustStatus.STALE, d6, clock.now(), rule).action == "stay"  # not fresh: keep safe


def test_operator_safe_mode_and_unreadable_record(
    device: StatePaths, clock: FakeClock, tmp_path: Path
) -> None:
    src = StaticSource(clock, [make_artifact(tmp_path / "cas", "clf", "1.0", b"one")])
    rec = Reconciler(device, src, clock)
    rec.run_once()
    rec.safe.enter("operator", "maintenance", actor="operator", desired=src.desired)
    assert rec.run_once().safe_mode and served(device) == b"factory safe model"
    rec.safe.exit("done", actor="operator")
    assert served(device) == b"one"
    (device.root / "safemode.json").write_text("{not json")
    assert is_safe_mode(device)  # fail safe: chaos and canaries stay off
