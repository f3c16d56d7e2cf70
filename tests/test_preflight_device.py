"""Dynamic pre-flight against a real device state directory (real slot manager, real chaos action)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chaos.actions import corrupt_standby_slot
from chaos.devicestate import read_device_state
from chaos.faults import FaultRegistry
from chaos.loader import load_experiment
from chaos.preflight import Preflight
from deployment.sample_models import linear_classifier
from deployment.slots import SlotManager
from sre_core.audit import AuditLog
from sre_core.paths import StatePaths
from tests.deploy_helpers import make_artifact

REPO = Path(__file__).resolve().parent.parent
DRILL = REPO / "experiments" / "rollback-drill.yaml"


@pytest.fixture
def device(state: StatePaths) -> StatePaths:
    """Module ``classifier``: v2 active, v1 verified standby."""
    mgr = SlotManager(state, AuditLog(state.audit_log))
    for version, seed in (("1", 1), ("2", 2)):
        art = make_artifact(
            state.cas, "classifier", version, linear_classifier(seed=seed), filename="model.onnx"
        )
        mgr.install(art)
        mgr.flip("classifier")
        mgr.commit("classifier")
    return state


def _rules(state: StatePaths) -> set[str]:
    pf = Preflight()
    report = pf.static(load_experiment(DRILL))
    return {f.rule for f in pf.dynamic(report, read_device_state(state))}


def test_snapshot_of_a_real_device(device: StatePaths, clock) -> None:
    snap = read_device_state(device, clock)
    slot = snap.modules["classifier"]
    assert (slot.active_version, slot.standby_version, slot.standby_verified, slot.phase) == (
        "2",
        "1",
        True,
        "idle",
    )
    assert not snap.safe_mode and not snap.canary_in_progress
    assert snap.now == clock.now()
    assert snap.disk_free_mb is not None and snap.disk_free_mb > 0
    assert snap.mem_available_mb is not None and snap.cpu_load is not None
    json.dumps(snap.model_dump(mode="json"))
    assert "active-without-standby" not in _rules(device)


def test_corrupted_standby_is_no_verified_standby(device: StatePaths) -> None:
    """After the real corrupt_standby_slot action, the rollback drill must escalate; after undo, not."""
    corrupt_standby_slot("classifier", nbytes=32, configuration={"state_dir": str(device.root)})
    assert read_device_state(device).modules["classifier"].standby_verified is False
    assert "active-without-standby" in _rules(device)
    report = FaultRegistry(device.root).clear()
    assert report.ok
    assert read_device_state(device).modules["classifier"].standby_verified is True
    assert "active-without-standby" not in _rules(device)


def test_safe_mode_and_an_unreadable_record(device: StatePaths) -> None:
    (device.root / "safemode.json").write_text(json.dumps({"active": True, "reason": "expired"}))
    assert read_device_state(device).safe_mode
    assert "safe-mode" in _rules(device)
    (device.root / "safemode.json").write_text("{not json")
    assert read_device_state(device).safe_mode  # fail closed


def test_empty_state_has_no_modules_so_no_verified_standby(state: StatePaths) -> None:
    snap = read_device_state(state)
    assert snap.modules == {} and not snap.safe_mode
    assert "active-without-standby" in _rules(state)


def test_pipeline_escalates_with_packet_audit_and_telemetry(state: StatePaths, clock, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from chaos.pipeline import escalations_dir, guarded_run
    from chaos.preflight import DeviceState, SlotState
    from sre_core.telemetry import MemorySink

    device = DeviceState(
        now=datetime(2026, 1, 5, 12, tzinfo=UTC),
        modules={"classifier": SlotState(standby_verified=True)},
        disk_free_mb=10_000,
        cpu_load=0.1,
        mem_available_mb=4096,
    )
    sink = MemorySink()
    out = guarded_run(
        REPO / "experiments" / "uplink-blackout-5min.yaml", state, clock=clock, device=device, telemetry=sink
    )
    assert not out.ran and out.preflight.verdict == "escalate"
    assert out.packet_path is not None and out.packet_path.parent == escalations_dir(state)
    stored = json.loads(out.packet_path.read_text())
    assert stored["experiment_hash"] == out.preflight.experiment_hash
    assert [e[0] for e in sink.events] == ["chaos.escalated"]
    assert sink.records[0][0] == "escalations"
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: x\nmethod: 3\n")
    out = guarded_run(bad, state, clock=clock, device=device, telemetry=sink)
    assert out.preflight.verdict == "reject" and out.packet_path is not None
    assert out.packet_path.name.startswith("invalid-")
    events = [json.loads(line)["event"] for line in state.audit_log.read_text().splitlines()]
    assert events == ["chaos.preflight", "chaos.escalated", "chaos.preflight", "chaos.escalated"]
