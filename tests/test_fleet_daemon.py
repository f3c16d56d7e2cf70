"""The daemon's pull-reconcile job reports to the hub's fleet API, so rollout gates see real devices."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from _trust_support import make_env

from deployment.manifest import ModuleManifest
from hub.fleet_api import fleet_routes
from hub.fleetdb import FleetDB
from hub.rollouts import ReportStore, RolloutService, RolloutSpec
from hub.server import build_hub_app
from sre_agent.config import AgentSettings
from sre_agent.provision import provision
from sre_core.http_server import ServerThread
from sre_core.identity import load_identity


def test_daemon_job_reports_and_a_rollout_completes_on_it(tmp_path: Path) -> None:
    from sre_agent.wiring import build_daemon

    env = make_env(tmp_path)
    env.server.stop()
    repo, clock, paths = env.repo, env.clock, env.paths
    svc = RolloutService(repo, clock=clock)
    server = ServerThread(build_hub_app(repo.dir, fleet_routes(repo.dir, svc, clock))).start()
    try:
        provision(paths, hub=server.url, clock=clock)  # the device now reaches the hub with the fleet API
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
        daemon = build_daemon(settings, paths, clock, heartbeat_s=3600)
        job = next(j for j in daemon.jobs if j.name == "pull-reconcile")
        out = job.func()
        assert "report_error" not in out, out  # type: ignore[operator]
        # The single device (the whole 100 % wave) installed 2.0 and reported it: the rollout completed.
        assert [o["result"] for o in out["reconcile"]["outcomes"]] == ["committed"]  # type: ignore[index]
        assert svc.current("stable").state == "completed"  # type: ignore[union-attr]
        rep = ReportStore(svc.fleet_dir).all()[ident.device_id]
        assert rep["modules"]["clf"]["version"] == "2.0" and rep["ledger"]["clf@2.0"]["committed_at"]
    finally:
        server.stop()


def test_reconcile_once_reports_to_the_hub(tmp_path: Path) -> None:
    """Devices driven by `sre-agent reconcile --once` report too (gates and the halt rule see them)."""
    from sre_agent.cli import main as agent_main
    from sre_core.clock import SystemClock

    env = make_env(tmp_path)
    env.server.stop()
    repo, clock, paths = env.repo, env.clock, env.paths
    clock.advance(datetime.now(UTC) - clock.now())  # the CLI runs on system time: bring the hub there
    f = tmp_path / "clf-1.0.bin"
    f.write_bytes(b"1.0" * 64)
    repo.publish("stable", f, ModuleManifest(name="clf", version="1.0", mode="file", filename="m.bin"))
    repo.release("stable", "clf", "1.0")  # re-signs the channel's metadata at the new time
    svc = RolloutService(repo, clock=clock)
    # the device signs with its own (system) clock: the hub checks freshness against the same
    server = ServerThread(build_hub_app(repo.dir, fleet_routes(repo.dir, svc, SystemClock()))).start()
    try:
        provision(paths, hub=server.url, clock=clock)
        ident = load_identity(paths)
        FleetDB(svc.fleet_dir, clock).enroll(ident.device_id, ident.public_pem)
        assert ident.device_id not in ReportStore(svc.fleet_dir).all()
        rc = agent_main(["reconcile", "--once", "--state", str(paths.root), "--from", server.url, "--json"])
        assert rc in (0, 1)
        rep = ReportStore(svc.fleet_dir).all()[ident.device_id]
        assert rep["channel"] == "stable"
    finally:
        server.stop()
