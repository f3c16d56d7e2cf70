"""The operator commands, as real child processes: status, rollback, safe-mode, slots, audit, reconcile."""

from __future__ import annotations

import json
from pathlib import Path

from deployment.reconcile import Reconciler
from sre_agent.provision import provision
from sre_core.clock import FakeClock
from sre_core.paths import StatePaths
from tests.deploy_helpers import StaticSource, make_artifact


def _device(tmp_path: Path) -> StatePaths:
    state = StatePaths(tmp_path / "dev")
    factory = tmp_path / "model.onnx"
    factory.write_bytes(b"factory")
    provision(state, safe_modules=[f"clf={factory}"])
    clock = FakeClock()
    src = StaticSource(clock, [make_artifact(tmp_path / "cas", "clf", "1.0", b"one")])
    rec = Reconciler(state, src, clock)
    rec.run_once()
    src.set([make_artifact(tmp_path / "cas", "clf", "2.0", b"two")], serial=2)
    rec.run_once()
    return state


def served(state: StatePaths) -> bytes:
    return (state.module("clf") / "current" / "model.onnx").read_bytes()


def test_status_rollback_safe_mode_and_audit(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    state = _device(tmp_path)
    s = str(state.root)
    r = run_cli("sre-agent", "status", "--state", s, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    (m,) = data["modules"]
    assert m["active"]["version"] == "2.0" and m["standby"]["version"] == "1.0" and m["serving"] == "b"
    assert data["safe_mode"]["active"] is False and data["last_sync"] and data["trust"]["serial"] == 2
    table = run_cli("sre-agent", "status", "--state", s)
    assert table.returncode == 0 and "clf" in table.stdout and "2.0" in table.stdout

    r = run_cli("sre-agent", "rollback", "--state", s, "clf", "--reason", "customer complaint")
    assert r.returncode == 0, r.stderr
    assert served(state) == b"one"
    again = run_cli("sre-agent", "rollback", "--state", s, "clf")
    assert again.returncode == 2 and "marked bad" in again.stderr  # standby 2.0 is bad now

    assert run_cli("sre-agent", "safe-mode", "enter", "--state", s, "--reason", "drill").returncode == 0
    assert served(state) == b"factory"
    st = json.loads(run_cli("sre-agent", "status", "--state", s, "--json").stdout)
    assert st["safe_mode"]["active"] and st["safe_mode"]["reason"] == "operator"
    assert run_cli("sre-agent", "safe-mode", "exit", "--state", s).returncode == 0
    assert served(state) == b"one"

    r = run_cli("sre-agent", "audit", "tail", "--state", s, "-n", "50", "--json")
    events = [x["event"] for x in json.loads(r.stdout)["records"]]
    for e in ("operator.rollback", "slot.rolled_back", "operator.safe_mode_enter", "safe_mode.entered",
              "safe_mode.left"):  # fmt: skip
        assert e in events
    ok = run_cli("sre-agent", "audit", "verify", "--state", s)
    assert ok.returncode == 0 and "intact" in ok.stdout

    # Tamper with a slot and with the trail: both are found.
    (state.module("clf") / "a" / "model.onnx").write_bytes(b"0ne")
    bad = run_cli("sre-agent", "slots", "verify", "--state", s, "--json")
    assert bad.returncode == 1 and not json.loads(bad.stdout)["checks"][0]["ok"]
    lines = state.audit_log.read_text().splitlines()
    rec = json.loads(lines[3])
    rec["data"]["note"] = "edited afterwards"
    lines[3] = json.dumps(rec, sort_keys=True)
    state.audit_log.write_text("\n".join(lines) + "\n")
    broken = run_cli("sre-agent", "audit", "verify", "--state", s, "--json")
    assert broken.returncode == 1 and json.loads(broken.stdout)["line"] == 4


def test_reconcile_once_offline_without_hub(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    state = StatePaths(tmp_path / "dev")
    provision(state)
    r = run_cli("sre-agent", "reconcile", "--state", str(state.root), "--once", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["trust"] == "none" and data["outcomes"] == [] and not data["safe_mode"]
    assert run_cli("sre-agent", "reconcile", "--state", str(state.root)).returncode == 2


def test_reconcile_once_pulls_from_a_real_hub(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    from _trust_support import HubEnv

    from hub.repository import HubRepository
    from hub.server import build_hub_app
    from sre_core.http_server import ServerThread

    # The CLI runs on the real clock, so the hub signs relative to it (not to a fake 2026-01-01).
    clock = FakeClock(datetime.now(UTC))
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=clock)
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    paths = StatePaths(tmp_path / "device")
    provision(paths, root=repo.metadata_dir / "1.root.json", hub=server.url, channel="stable", clock=clock)
    env = HubEnv(tmp_path, clock, repo, server, paths)
    try:
        # A managed model is never committed without a canary: with no daemon, the pass refuses it
        # (exit 1, a clear reason) and installs nothing.
        env.artifact("0.9.0")
        s = str(env.paths.root)
        r = run_cli("sre-agent", "reconcile", "--state", s, "--once", "--json")
        assert r.returncode == 1, r.stderr
        (o,) = json.loads(r.stdout)["outcomes"]
        assert o["result"] == "needs_canary" and "sre-agent run" in o["reason"]
        assert not (env.paths.module("clf") / "a").exists() and not (env.paths.module("clf") / "b").exists()
        env.artifact("1.0.0", mode="file")
        r = run_cli("sre-agent", "reconcile", "--state", s, "--once", "--json")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["trust"] == "fresh" and data["online"]
        assert [(o["module"], o["result"], o["version"]) for o in data["outcomes"]] == [
            ("clf", "committed", "1.0.0")
        ]
        st = json.loads(run_cli("sre-agent", "status", "--state", s, "--json").stdout)
        assert st["modules"][0]["active"]["version"] == "1.0.0" and st["trust"]["trust"] == "fresh"
        assert run_cli("sre-agent", "audit", "verify", "--state", s).returncode == 0
    finally:
        env.server.stop()
