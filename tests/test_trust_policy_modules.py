"""Signed policy modules take effect on a running daemon, and a broken one is refused or rolled back.

How to break it: publish a `kind: policy` module at the hub. Before, it was pulled, verified and
slotted, but the daemon kept reading the files provisioning left in `<state>/policies`: the hub's
desired state did not win for policy, and the policy-age SLO measured the desired state instead.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from deployment.policy_modules import active_policy_issued
from hub.repository import HubRepository
from hub.server import build_hub_app
from sre_agent.services.chaos import ChaosSchedule
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock
from sre_core.http_server import ServerThread
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.mark.slow
def test_policy_module_changes_the_running_daemon_and_bad_ones_are_refused(
    tmp_path: Path, run_cli: Run
) -> None:
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=SystemClock())
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    try:
        state = tmp_path / "dev"
        root = repo.metadata_dir / "1.root.json"
        r = run_cli("sre-agent", "init", "--state", str(state), "--root", str(root), "--hub", server.url,
                    "--channel", "stable")  # fmt: skip
        assert r.returncode == 0, r.stderr
        paths = StatePaths(state)
        # The daemon's chaos job, built once as a running daemon builds it; it reads policy per tick.
        from sre_agent.cli._common import settings_for

        clock = SystemClock()
        chaos = ChaosSchedule(paths, settings_for(state), clock, AuditLog(paths.audit_log, clock), NullSink(),
                              lambda: None, lambda: None, lambda: None)  # fmt: skip
        factory_rate = chaos.policy().guardrails.max_error_rate

        def publish(version: str, doc: str, manifest: str = "mode: file\n") -> int:
            f = tmp_path / version / "chaos.yaml"
            f.parent.mkdir()
            f.write_text(doc)
            m = tmp_path / version / "m.yaml"
            m.write_text(manifest)
            common = ("--repo", str(repo.dir), "--channel", "stable", "--module", "agent-policy")
            r = run_cli("sre-hub", "publish", *common, "--version", version, "--kind", "policy",
                        "--manifest", str(m), str(f))  # fmt: skip
            assert r.returncode == 0, r.stderr
            r = run_cli("sre-hub", "release", *common, "--version", version)
            assert r.returncode == 0, r.stderr
            r = run_cli("sre-agent", "reconcile", "--state", str(state), "--once", "--json")
            out = json.loads(r.stdout)
            assert [o["version"] for o in out["outcomes"]] == [version], out
            return r.returncode

        assert publish("1", "guardrails:\n  max_error_rate: 0.01\n") == 0
        assert chaos.policy().guardrails.max_error_rate == 0.01 != factory_rate  # no restart
        good = (state / "policies" / "chaos.yaml").read_bytes()
        issued = json.loads((state / "reconcile.json").read_text())["desired"]["issued"]
        assert active_policy_issued(paths) == datetime.fromisoformat(issued)  # the policy-age SLO's input

        # Invalid against the agent's own model: refused before install, nothing changes.
        assert publish("2", "guardrails:\n  max_error_rate: 7\n") == 1
        assert chaos.policy().guardrails.max_error_rate == 0.01
        assert (state / "policies" / "chaos.yaml").read_bytes() == good

        # Valid, but its probe fails: in effect while probed, then rolled back to the previous policy.
        probe = "mode: file\nprobes:\n  - {kind: file, path: never-ready, attempts: 1, timeout_s: 1}\n"
        assert publish("3", "guardrails:\n  max_error_rate: 0.02\n", probe) == 1
        assert chaos.policy().guardrails.max_error_rate == 0.01
        assert (state / "policies" / "chaos.yaml").read_bytes() == good
        events = [json.loads(x)["event"] for x in (state / "audit.jsonl").read_text().splitlines()]
        assert {"policy.activated", "policy.refused", "policy.restored"} <= set(events)
        st = json.loads(run_cli("sre-agent", "status", "--state", str(state), "--json").stdout)
        (mod,) = st["modules"]
        assert mod["active"]["version"] == "1" and len(mod["bad"]) == 2
    finally:
        server.stop()


def test_a_crash_between_activation_and_commit_restores_the_committed_policy(tmp_path: Path) -> None:
    """kill -9 after a policy was activated but before its probes committed it: on restart the slot
    goes back to the committed version and so do the files the daemon reads."""
    from deploy_helpers import StaticSource, make_artifact

    from deployment.policy_modules import PolicyActivator, slot_documents
    from deployment.reconcile import Reconciler
    from sre_core.clock import FakeClock

    paths = StatePaths(tmp_path / "dev")
    paths.create()
    (paths.policies / "chaos.yaml").write_text("guardrails: {max_error_rate: 0.04}\n")  # factory
    clock = FakeClock()
    v1 = make_artifact(tmp_path / "cas", "pol", "1", b"guardrails: {max_error_rate: 0.01}\n",
                       kind="policy", filename="chaos.yaml")  # fmt: skip
    rec = Reconciler(paths, StaticSource(clock, [v1]), clock)
    assert [o.result for o in rec.run_once().outcomes] == ["committed"]
    v1_bytes = (paths.policies / "chaos.yaml").read_bytes()
    # The interrupted pass: v2 installed, flipped and activated, then the process dies.
    v2 = make_artifact(tmp_path / "cas", "pol", "2", b"guardrails: {max_error_rate: 0.02}\n",
                       kind="policy", filename="chaos.yaml")  # fmt: skip
    view = rec.slots.install(v2)
    rec.slots.flip("pol")
    PolicyActivator(paths, rec.audit, clock).activate("pol", "2", v2.sha256, slot_documents(view.path), None)
    assert b"0.02" in (paths.policies / "chaos.yaml").read_bytes()
    restarted = Reconciler(paths, StaticSource(clock, [v1]), clock)
    restarted.recover()
    assert (paths.policies / "chaos.yaml").read_bytes() == v1_bytes
    assert restarted.slots.status("pol").active.version == "1"  # type: ignore[union-attr]
    # The provisioned document was kept at the first activation (what a rollback past v1 restores).
    assert b"0.04" in (paths.policies / ".factory" / "chaos.yaml").read_bytes()
