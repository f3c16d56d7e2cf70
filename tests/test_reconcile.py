"""Reconcile: desired vs installed, constraints, probes, automatic rollback, canary seam, outcomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from deployment.lifecycle import Phase
from deployment.reconcile import Reconciler, in_maintenance_window, parse_window, read_last_reconcile
from deployment.slots import SlotManager, SlotView
from policies.deployment import DeploymentPolicy
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock
from sre_core.errors import InputError
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from tests.deploy_helpers import StaticSource, make_artifact


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    d = tmp_path / "probes"
    d.mkdir()
    # A probe an application would ship: the model file must not contain the word BAD.
    p = d / "model-ok"
    p.write_text('#!/bin/sh\n! grep -q BAD "$SRE_ARTIFACT_PATH"\n')
    p.chmod(0o755)
    return d


def policy(probe_dir: Path, **kw: Any) -> DeploymentPolicy:
    return DeploymentPolicy.model_validate({"probes": {"exec_allowlist": [f"{probe_dir}/"]}, **kw})


def art(tmp_path: Path, probe_dir: Path, module: str, version: str, data: bytes, **kw: Any):  # type: ignore[no-untyped-def]
    probes = [{"kind": "exec", "argv": [str(probe_dir / "model-ok")], "attempts": 1}]
    return make_artifact(tmp_path / "cas", module, version, data, probes=probes, **kw)


def served(state: StatePaths, module: str) -> bytes:
    return (state.module(module) / "current" / "model.onnx").read_bytes()


def test_file_mode_commit_then_failed_probe_rolls_back(
    state: StatePaths, clock: FakeClock, tmp_path: Path, probe_dir: Path
) -> None:
    v1 = art(tmp_path, probe_dir, "clf", "1.0", b"good one")
    src = StaticSource(clock, [v1])
    sink = MemorySink()
    rec = Reconciler(state, src, clock, policy(probe_dir), telemetry=sink)
    r1 = rec.run_once()
    assert [o.result for o in r1.outcomes] == ["committed"] and r1.ok
    assert served(state, "clf") == b"good one"
    v2 = art(tmp_path, probe_dir, "clf", "2.0", b"BAD model")
    src.set([v2], serial=2)
    r2 = rec.run_once()
    (o,) = r2.outcomes
    assert o.result == "rolled_back" and o.previous == "1.0" and "exec probe failed" in o.reason
    assert served(state, "clf") == b"good one"
    st = rec.slots.status("clf")
    assert st.active is not None and st.active.version == "1.0" and v2.sha256 in st.bad
    # The next pass refuses the bad digest instead of installing it again.
    r3 = rec.run_once()
    assert [o.result for o in r3.outcomes] == ["refused"]
    assert served(state, "clf") == b"good one"
    audit = AuditLog(state.audit_log)
    names = [r.event for r in audit.records()]
    for step in (
        "reconcile.pulled",
        "slot.installed",
        "slot.flipped",
        "probe.completed",
        "slot.rolled_back",
        "reconcile.refused",
    ):
        assert step in names
    assert audit.verify()[1] is None
    assert any(e[2] == "error" and "rolled back" in e[1] for e in sink.events)
    last = read_last_reconcile(state)
    assert last["report"]["outcomes"][0]["result"] == "refused" and last["last_sync"] == r3.started


def test_unchanged_desired_state_is_a_noop(
    state: StatePaths, clock: FakeClock, tmp_path: Path, probe_dir: Path
) -> None:
    src = StaticSource(clock, [art(tmp_path, probe_dir, "clf", "1.0", b"one")])
    rec = Reconciler(state, src, clock, policy(probe_dir))
    rec.run_once()
    flips = sum(r.event == "slot.flipped" for r in AuditLog(state.audit_log).records())
    assert [o.result for o in rec.run_once().outcomes] == ["noop"]
    assert sum(r.event == "slot.flipped" for r in AuditLog(state.audit_log).records()) == flips


def test_probe_not_on_allowlist_is_refused_before_flip(
    state: StatePaths, clock: FakeClock, tmp_path: Path, probe_dir: Path
) -> None:
    v1 = art(tmp_path, probe_dir, "clf", "1.0", b"one")
    src = StaticSource(clock, [v1])
    rec = Reconciler(state, src, clock, policy(probe_dir))
    rec.run_once()
    evil = make_artifact(tmp_path / "cas", "clf", "2.0", b"two",
                         probes=[{"kind": "exec", "argv": ["/bin/sh", "-c", "reboot"]}])  # fmt: skip
    src.set([evil], serial=2)
    (o,) = rec.run_once().outcomes
    assert o.result == "refused" and "allowlist" in o.reason
    assert served(state, "clf") == b"one"
    assert not any(r.event == "slot.flipped" and r.data.get("version") == "2.0"
                   for r in AuditLog(state.audit_log).records())  # fmt: skip


def test_maintenance_window_in_device_local_time(state: StatePaths, tmp_path: Path, probe_dir: Path) -> None:
    # 2026-01-05 is a Monday. 01:30 UTC is 02:30 in Berlin (inside 02:00-04:00 local), 01:30 in UTC (outside).
    clock = FakeClock(datetime(2026, 1, 5, 0, 30, tzinfo=UTC))
    v1 = art(
        tmp_path,
        probe_dir,
        "clf",
        "1.0",
        b"one",
        constraints={"maintenance_windows": ["Mon-Fri 02:00-04:00"]},
    )
    src = StaticSource(clock, [v1])
    berlin = Reconciler(state, src, clock, policy(probe_dir), local_tz=ZoneInfo("Europe/Berlin"))
    (o,) = berlin.run_once().outcomes
    assert o.result == "blocked" and "maintenance" in o.reason
    clock.advance(timedelta(hours=1))
    assert [o.result for o in berlin.run_once().outcomes] == ["committed"]


def test_dependencies_agent_version_and_disk(
    state: StatePaths, clock: FakeClock, tmp_path: Path, probe_dir: Path
) -> None:
    feat = art(tmp_path, probe_dir, "features", "2.0", b"feat")
    clf = art(tmp_path, probe_dir, "clf", "1.0", b"clf", constraints={"depends_on": {"features": "2.0"}})
    src = StaticSource(clock, [clf, feat])
    rec = Reconciler(state, src, clock, policy(probe_dir))
    out = {o.module: o.result for o in rec.run_once().outcomes}
    assert out == {"features": "committed", "clf": "committed"}
    # A dependency that fails its probe blocks the dependent module in the same pass.
    feat3 = art(tmp_path, probe_dir, "features", "3.0", b"BAD feat")
    clf2 = art(tmp_path, probe_dir, "clf", "2.0", b"clf2", constraints={"depends_on": {"features": "3.0"}})
    src.set([clf2, feat3], serial=2)
    out2 = {o.module: (o.result, o.reason) for o in rec.run_once().outcomes}
    assert (
        out2["features"][0] == "rolled_back"
        and out2["clf"][0] == "blocked"
        and "features >= 3.0" in out2["clf"][1]
    )
    # Minimum agent version and disk headroom.
    newer = art(tmp_path, probe_dir, "clf", "3.0", b"clf3", constraints={"min_agent_version": "9.1"})
    src.set([newer], serial=3)
    (o,) = Reconciler(state, src, clock, policy(probe_dir), agent_version="0.9").run_once().outcomes
    assert o.result == "blocked" and "agent >= 9.1" in o.reason
    big = art(tmp_path, probe_dir, "clf", "4.0", b"x" * 2048)
    src.set([big], serial=4)
    tight = Reconciler(
        state, src, clock, policy(probe_dir, min_free_disk_mb=64), disk_free=lambda p: 64 * 2**20 + 1000
    )
    (o,) = tight.run_once().outcomes
    assert o.result == "blocked" and "disk" in o.reason
    assert served(state, "clf") == b"clf"


def test_missing_artifact_is_reported(
    state: StatePaths, clock: FakeClock, tmp_path: Path, probe_dir: Path
) -> None:
    v1 = art(tmp_path, probe_dir, "clf", "1.0", b"one")
    src = StaticSource(clock, [v1])
    src.arts = {}
    (o,) = Reconciler(state, src, clock, policy(probe_dir)).run_once().outcomes
    assert o.result == "missing"


class RecordingDriver:
    def __init__(self) -> None:
        self.started: list[tuple[str, SlotView]] = []

    def start(self, module: str, standby: SlotView, slots: SlotManager) -> None:
        self.started.append((module, standby))


def test_managed_mode_hands_standby_to_canary_driver(
    state: StatePaths, clock: FakeClock, tmp_path: Path, probe_dir: Path
) -> None:
    v1 = art(tmp_path, probe_dir, "clf", "1.0", b"one")
    src = StaticSource(clock, [v1])
    driver = RecordingDriver()
    rec = Reconciler(state, src, clock, policy(probe_dir), canary=driver)
    rec.run_once()  # file mode: swapped directly
    v2 = art(tmp_path, probe_dir, "clf", "2.0", b"two", mode="managed")
    src.set([v2], serial=2)
    (o,) = rec.run_once().outcomes
    assert o.result == "canary" and driver.started[0][0] == "clf" and driver.started[0][1].version == "2.0"
    assert rec.slots.status("clf").phase is Phase.CANARY and served(state, "clf") == b"one"
    assert [o.result for o in rec.run_once().outcomes] == ["canary"]  # not restarted while running
    rec.slots.promote_canary("clf", evidence={"verdict": "pass"})
    assert served(state, "clf") == b"two"
    assert [o.result for o in rec.run_once().outcomes] == ["noop"]


def test_parse_and_match_windows() -> None:
    mon = datetime(2026, 1, 5, 3, 0)  # Monday
    assert in_maintenance_window([], mon)
    assert in_maintenance_window(["Mon-Fri 02:00-04:00"], mon)
    assert not in_maintenance_window(["Mon-Fri 02:00-04:00"], mon.replace(hour=4))
    assert not in_maintenance_window(["Sat,Sun 00:00-24:00"], mon)
    assert in_maintenance_window(["* 00:00-24:00"], mon.replace(hour=23, minute=59))
    # Wrapping past midnight: Sunday 22:00 to Monday 02:00 belongs to the Sunday window.
    assert in_maintenance_window(["Sun 22:00-02:00"], mon.replace(hour=1))
    assert not in_maintenance_window(["Sun 22:00-02:00"], mon.replace(hour=23))
    assert in_maintenance_window(["Fri-Mon 10:00-11:00"], mon.replace(hour=10))  # range across the week end
    days, *_ = parse_window("Fri-Mon 10:00-11:00")
    assert days == {4, 5, 6, 0}
    for bad in ("Mon 2-4", "Xyz 01:00-02:00", "Mon 25:00-26:00", ""):
        with pytest.raises(InputError):
            parse_window(bad)
