"""The CLI's exit codes and the basic commands, run as real console scripts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRE_AGENT_")}
    env.update(extra)
    return env


def test_help_and_version(run_cli) -> None:
    r = run_cli("sre-agent", "--help", env=_env())
    assert r.returncode == 0
    assert "init" in r.stdout and "config" in r.stdout
    r = run_cli("sre-agent", "version", "--json", env=_env())
    assert r.returncode == 0
    assert json.loads(r.stdout)["sre_agent"]
    r = run_cli("sre-hub", "--help", env=_env())
    assert r.returncode == 0 and "version" in r.stdout
    r = run_cli("sre-hub", "version", env=_env())
    assert r.returncode == 0 and r.stdout.startswith("sre-hub ")


def test_bad_usage_exits_2(run_cli) -> None:
    assert run_cli("sre-agent", "no-such-command", env=_env()).returncode == 2
    assert run_cli("sre-agent", "version", "--no-such-flag", env=_env()).returncode == 2
    assert run_cli("sre-hub", "no-such-command", env=_env()).returncode == 2


def test_init_creates_layout_and_identity_once(run_cli, tmp_path: Path) -> None:
    st = tmp_path / "dev"
    r = run_cli("sre-agent", "init", "--state", str(st), "--json", env=_env())
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["identity_created"] is True
    key = st / "identity" / "device_ed25519.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for d in ("trust", "tuf", "cas", "modules", "safe"):
        assert (st / d).is_dir()
    r2 = run_cli("sre-agent", "init", "--state", str(st), "--json", env=_env())
    assert r2.returncode == 0
    out2 = json.loads(r2.stdout)
    assert out2["identity_created"] is False
    assert out2["device_id"] == out["device_id"]
    # Provisioning is audited.
    assert "identity.created" in (st / "audit.jsonl").read_text()


def test_config_validate_exit_codes(run_cli, tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[serving]\nport = 8080\n")
    r = run_cli("sre-agent", "config", "validate", "--config", str(good), env=_env())
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[serving]\nport = 'eighty'\n")
    r = run_cli("sre-agent", "config", "validate", "--config", str(bad), env=_env())
    assert r.returncode == 2
    assert "serving.port" in r.stderr and "eighty" in r.stderr
    r = run_cli("sre-agent", "config", "show", "--json", "--config", str(good), env=_env())
    assert r.returncode == 0
    assert json.loads(r.stdout)["serving"]["port"] == 8080
    r = run_cli(
        "sre-agent", "config", "show", "--json", "--config", str(good), env=_env(SRE_AGENT_SERVING__PORT="81")
    )
    assert json.loads(r.stdout)["serving"]["port"] == 81


def test_init_with_bad_root_exits_2(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "root.json"
    bad.write_text('{"signed": {"_type": "targets"}}')
    r = run_cli("sre-agent", "init", "--state", str(tmp_path / "s"), "--root", str(bad), env=_env())
    assert r.returncode == 2
    assert "not TUF root metadata" in r.stderr


def test_failure_exits_1(run_cli, tmp_path: Path) -> None:
    # A state directory that cannot be created (a file is in the way) is a failure, not bad input.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("sre-agent", "init", "--state", str(blocker / "sub"), env=_env())
    assert r.returncode == 1
    assert "error:" in r.stderr
