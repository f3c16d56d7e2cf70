"""DORA time to restore: from a release's failure at the hub (here a recall) to the affected device
serving a good version again, measured on a real device reconciling against a real hub."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from _trust_support import make_env

from deployment.manifest import ModuleManifest
from hub.dora import compute_dora
from hub.fleet_api import fleet_routes
from hub.fleetdb import FleetDB
from hub.rollouts import ReportStore, RolloutService, RolloutSpec
from hub.server import build_hub_app
from sre_agent.config import AgentSettings
from sre_agent.provision import provision
from sre_core.http_server import ServerThread
from sre_core.identity import load_identity


def test_time_to_restore_from_a_recall_to_the_device_serving_a_good_version(tmp_path: Path) -> None:
    from sre_agent.wiring import build_daemon

    env = make_env(tmp_path)
    env.server.stop()
    repo, clock, paths = env.repo, env.clock, env.paths
    svc = RolloutService(repo, clock=clock)
    with ServerThread(build_hub_app(repo.dir, fleet_routes(repo.dir, svc, clock))) as server:
        provision(paths, hub=server.url, clock=clock)
        ident = load_identity(paths)
        FleetDB(svc.fleet_dir, clock).enroll(ident.device_id, ident.public_pem)
        for v in ("1.0", "2.0"):
            f = tmp_path / f"clf-{v}.bin"
            f.write_bytes(v.encode() * 64)
            repo.publish("stable", f, ModuleManifest(name="clf", version=v, mode="file", filename="m.bin"))
        repo.release("stable", "clf", "1.0")
        svc.start(
            RolloutSpec(channel="stable", module="clf", version="2.0", waves=[100], soak_s=0, min_devices=1)
        )
        settings = AgentSettings.model_validate(
            {
                "state_dir": str(paths.root), "hub": {"url": server.url, "channel": "stable"},
                "llm": {"enabled": False}, "serving": {"enabled": False},
            }
        )  # fmt: skip
        job = next(
            j
            for j in build_daemon(settings, paths, clock, heartbeat_s=3600).jobs
            if j.name == "pull-reconcile"
        )
        job.func()
        reports = ReportStore(svc.fleet_dir)
        assert reports.all()[ident.device_id]["modules"]["clf"]["version"] == "2.0"
        before = compute_dora(repo, reports)
        assert before.time_to_restore_s["n"] == 0 and before.unrestored_devices == 0

        clock.advance(timedelta(seconds=60))
        svc.recall("stable", "clf", ["2.0"], "1.0", "bad calibration")  # the failure, at the hub
        held = compute_dora(repo, reports)  # the device has not synced since: still on the recalled version
        assert held.unrestored_devices == 1 and held.time_to_restore_s["n"] == 0
        assert next(r for r in held.per_release if r["version"] == "2.0")["time_to_restore_s"] is None
        clock.advance(timedelta(seconds=1))
        job.func()  # the next pass installs 1.0 and reports it
        rep = reports.all()[ident.device_id]
        ledger = rep["ledger"]
        assert rep["modules"]["clf"]["version"] == "1.0", rep
        assert ledger["clf@2.0"]["left_at"] and not ledger["clf@2.0"]["serving"], ledger
        assert ledger["clf@1.0"]["serving"], ledger
        d = compute_dora(repo, reports)
        row = next(r for r in d.per_release if r["version"] == "2.0")
        assert row["hub_failure"] == ["recalled"] and row["unrestored"] == 0
        assert row["time_to_restore_s"] == 1.0, row
        assert d.time_to_restore_s["n"] == 1 and d.time_to_restore_s["max"] == 1.0
        assert d.unrestored_devices == 0


def test_cli_approve_names_the_wave_and_a_second_approval_is_refused(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    """`sre-hub rollout approve --wave N`: a repeated approval of a passed gate opens nothing more."""
    import json

    from hub.repository import HubRepository
    from sre_core.clock import FakeClock, SystemClock

    clock = FakeClock(SystemClock().now().replace(microsecond=0))
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=clock)
    for v in ("1.0", "2.0"):
        f = tmp_path / f"clf-{v}.bin"
        f.write_bytes(v.encode() * 10)
        repo.publish("stable", f, ModuleManifest(name="clf", version=v, mode="file", filename="m.bin"))
    repo.release("stable", "clf", "1.0")
    r = str(repo.dir)
    res = run_cli("sre-hub", "rollout", "start", "--repo", r, "-c", "stable", "-m", "clf", "-v", "2.0",
                  "--waves", "10,50,100", "--gates", "manual,manual", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    approve = ["sre-hub", "rollout", "approve", "--repo", r, "-c", "stable"]
    res = run_cli(*approve, "--wave", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["wave"] == 1
    again = run_cli(*approve, "--wave", "1", "--json")  # a second operator, or a retried click
    assert again.returncode == 2 and "wave 1 is already open" in json.loads(again.stdout)["why"], again
    skip = run_cli(*approve, "--wave", "3")
    assert skip.returncode == 2 and "not the next one" in skip.stderr, skip.stderr
    st = run_cli("sre-hub", "rollout", "status", "--repo", r, "-c", "stable", "--json")
    assert json.loads(st.stdout)["wave"] == 1  # nothing more opened
    assert run_cli(*approve, "--wave", "0").returncode == 2  # below the first gate: a usage error
