"""Disk reserve exhausted: non-essential work stops (one pure decision), essential work goes on.

How it broke: telemetry's ``stop_nonessential`` was read only by the CLI, so below the disk reserve the
daemon went on starting chaos experiments and rendering digests. Now every job of the assembly passes
one gate: below the reserve (or with essential telemetry over its share) the non-essential ones skip
with a logged reason and an audit entry, and the daemon's status says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from sre_agent.config import AgentSettings
from sre_agent.provision import provision
from sre_agent.workload import ESSENTIAL_JOBS, NONESSENTIAL_JOBS, DiskState, decide
from sre_core.audit import AuditLog
from sre_core.paths import StatePaths

MB = 1024 * 1024


def test_the_decision_stops_only_nonessential_work() -> None:
    ok = decide(DiskState(free_bytes=900 * MB, total_bytes=1000 * MB, reserve_bytes=256 * MB))
    assert not ok.stop_nonessential and all(ok.may_run(j) for j in [*NONESSENTIAL_JOBS, *ESSENTIAL_JOBS])
    low = decide(DiskState(free_bytes=100 * MB, total_bytes=1000 * MB, reserve_bytes=256 * MB))
    assert low.stop_nonessential and "100 MB < reserve 256 MB" in low.reason
    assert not low.may_run("chaos") and not low.may_run("digest")
    assert all(low.may_run(j) for j in ESSENTIAL_JOBS)  # pulls, uplink, SLOs, escalations go on
    pct = decide(DiskState(500 * MB, 1000 * MB, 0, reserve_pct=60.0))
    assert pct.stop_nonessential and "50.0% < reserve 60%" in pct.reason
    full = decide(DiskState(900 * MB, 1000 * MB, 0, essential_full=True))
    assert full.stop_nonessential and "essential telemetry" in full.reason


def test_an_assembled_daemon_below_its_disk_reserve_skips_chaos_and_the_digest(tmp_path: Path) -> None:
    from sre_agent.wiring import assemble
    from sre_core.clock import SystemClock

    paths = StatePaths(tmp_path / "dev")
    provision(paths)
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    free_mb = shutil.disk_usage(paths.root).free / MB
    (paths.policies / "verification.yaml").write_text(
        yaml.safe_dump({"reserves": {"min_free_disk_mb": free_mb + 1024, "min_free_disk_pct": 0.0}})
    )
    settings = AgentSettings.model_validate(
        {
            "state_dir": str(paths.root),
            "llm": {"enabled": False},
            "serving": {"enabled": False},
            "chaos": {"experiments_dir": str(experiments)},
        }
    )
    # an experiment the schedule would pre-flight (and audit) on every tick if the gate let it
    shipped = Path(__file__).resolve().parent.parent / "experiments" / "standby-corruption.yaml"
    (experiments / shipped.name).write_text(shipped.read_text())
    asm = assemble(settings, paths, SystemClock())
    assert asm.work is not None
    daemon = asm.daemon(heartbeat_s=3600)
    daemon.start()
    try:
        assert "reserve" in asm.job("chaos").func()["skipped"]  # type: ignore[index]
        assert "reserve" in asm.job("chaos").func()["skipped"]  # type: ignore[index]
        assert "reserve" in asm.job("digest").func()["skipped"]  # type: ignore[index]
        assert isinstance(asm.job("slo").func(), list)  # essential work goes on
        assert asm.job("escalations").func() == 0
        status = asm.work.status()
        assert status["stop_nonessential"] and set(status["stopped_jobs"]) == {"chaos", "digest"}
        assert status["skipped"] == {"chaos": 2, "digest": 1}
    finally:
        daemon.stop("test over")
    events = [(r.event, r.data) for r in AuditLog(paths.audit_log).records()]
    names = [e for e, _ in events]
    assert names.count("work.nonessential_stopped") == 1 and "chaos.preflight" not in names
    skipped = sorted(d["job"] for e, d in events if e == "job.skipped")
    assert skipped == ["chaos", "digest"]  # once per job per stop period, not per tick
    assert not any(s.failures for s in daemon.stats.values())
