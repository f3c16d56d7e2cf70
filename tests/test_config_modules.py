"""Signed config modules take effect as the signed layer of the agent's configuration.

How to break it: publish a `kind: config` module at the hub. Before, it was pulled, verified, slotted
and committed ("probes passed"), and nothing read it: `config show` kept naming the local file or the
default, and the running daemon never changed. Also: a config the agent's own model rejects, a key
that would cut the device off its hub, a config whose probes fail, a crash between activation and
commit, a second module setting the same key.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployment.config_modules import ConfigActivator, signed_layer
from hub.repository import HubRepository
from hub.server import build_hub_app
from sre_agent.config import LiveConfig, load_settings, signed_layer_check
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock, SystemClock
from sre_core.http_server import ServerThread
from sre_core.paths import StatePaths

Run = Callable[..., subprocess.CompletedProcess[str]]


def _events(state: Path) -> list[str]:
    return [json.loads(x)["event"] for x in (state / "audit.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_config_module_is_the_signed_layer_applied_live_and_bad_ones_are_refused(
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
        (state / "agent.toml").write_text("[uplink]\nbandwidth_kbps = 64.0\n")  # the factory file
        # The running daemon's settings object (every job holds it) and its signed-config job.
        running = load_settings(state_dir=state)
        live = LiveConfig(running)
        assert live()["changed"] and running.uplink.bandwidth_kbps == 64.0

        def publish(version: str, doc: str, manifest: str = "mode: file\n") -> dict[str, Any]:
            f = tmp_path / version / "agent.toml"
            f.parent.mkdir()
            f.write_text(doc)
            m = tmp_path / version / "m.yaml"
            m.write_text(manifest)
            common = ("--repo", str(repo.dir), "--channel", "stable", "--module", "agent-config")
            r = run_cli("sre-hub", "publish", *common, "--version", version, "--kind", "config",
                        "--manifest", str(m), str(f))  # fmt: skip
            assert r.returncode == 0, r.stderr
            r = run_cli("sre-hub", "release", *common, "--version", version)
            assert r.returncode == 0, r.stderr
            r = run_cli("sre-agent", "reconcile", "--state", str(state), "--once", "--json")
            out: dict[str, Any] = json.loads(r.stdout)
            out["rc"] = r.returncode
            return out

        def show() -> dict[str, Any]:
            r = run_cli("sre-agent", "config", "show", "--state", str(state), "--json")
            assert r.returncode == 0, r.stderr
            out: dict[str, Any] = json.loads(r.stdout)
            return out

        out = publish("1", "[uplink]\nbandwidth_kbps = 8.0\n[daemon]\nslo_interval_s = 30.0\n")
        assert out["rc"] == 0, out
        (o,) = out["outcomes"]
        assert o["result"] == "committed" and "next restart: daemon.slo_interval_s" in o["reason"], o
        cfg = show()
        assert cfg["uplink"]["bandwidth_kbps"] == 8.0
        assert cfg["sources"]["uplink.bandwidth_kbps"] == "signed agent-config@1"
        assert cfg["sources"]["daemon.slo_interval_s"] == "signed agent-config@1"
        # No restart: the daemon's job applies the live key in place; the other waits for a restart.
        applied = live()
        assert applied["applied"] == ["uplink.bandwidth_kbps"], applied
        assert applied["restart_required"] == ["daemon.slo_interval_s"]
        assert running.uplink.bandwidth_kbps == 8.0 and running.daemon.slo_interval_s == 60.0
        good = (state / "config" / "signed.json").read_bytes()

        # Invalid for the agent's model, or a key a signed layer may not set: refused before install.
        for version, doc in (("2", "[uplink]\nbandwidth_kbps = -1\n"), ("3", '[hub]\nurl = "http://x"\n')):
            out = publish(version, doc)
            assert out["rc"] == 1
            (o,) = out["outcomes"]
            assert o["result"] == "refused", o
            assert (state / "config" / "signed.json").read_bytes() == good
        assert "greater than 0" in str(publish("4", "[uplink]\nbandwidth_kbps = 0\n")["outcomes"])
        assert show()["sources"]["uplink.bandwidth_kbps"] == "signed agent-config@1"

        # Valid, but its probe fails: in effect while probed, then rolled back to the previous layer.
        probe = "mode: file\nprobes:\n  - {kind: file, path: never-ready, attempts: 1, timeout_s: 1}\n"
        out = publish("5", "[uplink]\nbandwidth_kbps = 16.0\n", probe)
        assert out["rc"] == 1
        (o,) = out["outcomes"]
        assert o["result"] == "rolled_back", o
        assert show()["uplink"]["bandwidth_kbps"] == 8.0
        assert live()["applied"] == []  # the running agent never left 8.0 for good
        assert running.uplink.bandwidth_kbps == 8.0
        assert {"config.activated", "config.refused", "config.restored"} <= set(_events(state))
        st = json.loads(run_cli("sre-agent", "status", "--state", str(state), "--json").stdout)
        (mod,) = st["modules"]
        assert mod["active"]["version"] == "1" and len(mod["bad"]) == 4

        # A good v6, then the operator rolls back: the layer follows the slot back to v1 at once.
        assert publish("6", "[uplink]\nbandwidth_kbps = 4.0\n")["rc"] == 0
        assert show()["sources"]["uplink.bandwidth_kbps"] == "signed agent-config@6"
        r = run_cli("sre-agent", "rollback", "agent-config", "--state", str(state), "--json")
        assert r.returncode == 0, r.stderr
        cfg = show()
        assert cfg["uplink"]["bandwidth_kbps"] == 8.0
        assert cfg["sources"]["uplink.bandwidth_kbps"] == "signed agent-config@1"
    finally:
        server.stop()


def test_a_crash_between_activation_and_commit_restores_the_committed_layer(tmp_path: Path) -> None:
    """kill -9 after a config layer was activated, before its probes committed it: on restart the
    slot goes back to the committed version and so does the signed layer."""
    from deploy_helpers import StaticSource, make_artifact

    from deployment.reconcile import Reconciler

    paths = StatePaths(tmp_path / "dev")
    paths.create()
    clock = FakeClock()
    check = signed_layer_check(paths.root, env={})
    v1 = make_artifact(tmp_path / "cas", "cfg", "1", b"[llm]\ntimeout_s = 5.0\n", kind="config",
                       filename="agent.toml")  # fmt: skip
    rec = Reconciler(paths, StaticSource(clock, [v1]), clock, config_check=check)
    assert [o.result for o in rec.run_once().outcomes] == ["committed"]
    assert load_settings(state_dir=paths.root, env={}).llm.timeout_s == 5.0
    v2 = make_artifact(tmp_path / "cas", "cfg", "2", b"[llm]\ntimeout_s = 9.0\n", kind="config",
                       filename="agent.toml")  # fmt: skip
    view = rec.slots.install(v2)
    rec.slots.flip("cfg")
    ConfigActivator(paths, rec.audit, check, clock).activate(
        "cfg", "2", v2.sha256, {"llm": {"timeout_s": 9.0}}, None
    )
    assert load_settings(state_dir=paths.root, env={}).llm.timeout_s == 9.0
    assert view.version == "2"
    restarted = Reconciler(paths, StaticSource(clock, [v1]), clock, config_check=check)
    restarted.recover()
    assert restarted.slots.status("cfg").active.version == "1"  # type: ignore[union-attr]
    assert load_settings(state_dir=paths.root, env={}).llm.timeout_s == 5.0
    assert signed_layer(paths)[1] == {"llm.timeout_s": "cfg@1"}


def test_two_config_modules_may_not_set_the_same_key_and_no_check_means_not_applied(tmp_path: Path) -> None:
    from deploy_helpers import StaticSource, make_artifact

    from deployment.reconcile import Reconciler

    paths = StatePaths(tmp_path / "dev")
    paths.create()
    clock = FakeClock()
    a = make_artifact(tmp_path / "cas", "cfg-a", "1", b"[llm]\nmax_tokens = 32\n", kind="config",
                      filename="agent.toml")  # fmt: skip
    b = make_artifact(tmp_path / "cas", "cfg-b", "1", b"[llm]\nmax_tokens = 48\n", kind="config",
                      filename="agent.toml")  # fmt: skip
    # A process without the agent's model (no check) refuses, without marking the version bad.
    bare = Reconciler(paths, StaticSource(clock, [a]), clock)
    (o,) = bare.run_once().outcomes
    assert o.result == "refused" and "no configuration model" in o.reason
    assert "cfg-a" not in bare.slots.modules()  # nothing installed, nothing marked bad: retried later
    rec = Reconciler(
        paths, StaticSource(clock, [a, b]), clock, config_check=signed_layer_check(paths.root, env={})
    )
    outcomes = {o.module: o for o in rec.run_once().outcomes}
    assert outcomes["cfg-a"].result == "committed"
    assert outcomes["cfg-b"].result == "refused" and "llm.max_tokens" in outcomes["cfg-b"].reason
    assert load_settings(state_dir=paths.root, env={}).llm.max_tokens == 32
    assert "config.refused" in [r.event for r in AuditLog(paths.audit_log).records()]


def test_the_live_job_touches_only_what_the_signed_layer_sets(tmp_path: Path) -> None:
    """A daemon started with `--config FILE`: its job reloads without the flag, and must not undo the
    file's values; a key the signed layer sets (and later drops) follows the layer."""
    paths = StatePaths(tmp_path / "dev")
    paths.create()
    flag_file = tmp_path / "elsewhere.toml"
    flag_file.write_text("[llm]\ntimeout_s = 7.0\n")
    running = load_settings(config_file=flag_file, state_dir=paths.root, env={})
    live = LiveConfig(running, env={})
    assert live()["applied"] == [] and running.llm.timeout_s == 7.0
    audit = AuditLog(paths.audit_log)
    act = ConfigActivator(paths, audit, signed_layer_check(paths.root, env={}))
    act.activate("cfg", "1", "0" * 64, {"llm": {"max_tokens": 32}}, None)
    assert live()["applied"] == ["llm.max_tokens"] and running.llm.max_tokens == 32
    assert running.llm.timeout_s == 7.0
    act.restore("cfg", None)
    assert live()["applied"] == ["llm.max_tokens"] and running.llm.max_tokens == 64
