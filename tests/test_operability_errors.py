"""Errors that used to mislead: each cause gets its own advice, no traceback for an expected condition."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from _trust_support import HubEnv, make_env

from deployment.pull import PullError
from sre_agent.provision import pin_root


@pytest.fixture
def env(tmp_path: Path) -> Iterator[HubEnv]:
    e = make_env(tmp_path)
    try:
        yield e
    finally:
        e.server.stop()


def _refusal(env: HubEnv) -> PullError:
    with pytest.raises(PullError) as info:
        env.puller().pull()
    return info.value


def test_expiry_advice_is_to_re_sign(env: HubEnv) -> None:
    env.artifact("1.0.0")
    env.puller().pull()
    env.clock.advance(timedelta(days=2))
    err = _refusal(env)
    assert "ExpiredMetadataError" in err.why
    assert "sre-hub timestamp" in err.fix and "pinned" not in err.fix


def test_replayed_metadata_advice_is_about_the_source_not_expiry(env: HubEnv) -> None:
    env.artifact("1.0.0")
    old_ts = (env.repo.metadata_dir / "timestamp.json").read_bytes()
    env.artifact("1.1.0")
    env.puller().pull()
    (env.repo.metadata_dir / "timestamp.json").write_bytes(old_ts)
    err = _refusal(env)
    assert "older metadata than this device already trusts" in err.fix
    assert "expir" not in err.fix


def test_wrong_pinned_root_advice_is_to_re_provision(env: HubEnv, tmp_path: Path) -> None:
    other = make_env(tmp_path / "other-hub")
    other.server.stop()
    env.artifact("1.0.0")
    shutil.rmtree(env.paths.tuf, ignore_errors=True)  # a device provisioned against the other hub
    pin_root(env.paths, other.repo.metadata_dir / "1.root.json")
    err = _refusal(env)
    assert "UnsignedMetadataError" in err.why
    assert "sre-agent init --root" in err.fix and "expir" not in err.fix


def test_bundle_export_counts_the_targets_it_copied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hub.cli
    from deployment.sample_models import linear_classifier

    repo, model = tmp_path / "hub", tmp_path / "m.onnx"
    model.write_bytes(linear_classifier(seed=0))
    common = ["--repo", str(repo), "--channel", "stable", "--module", "clf", "--version"]
    assert hub.cli.main(["init", "--repo", str(repo), "--channel", "stable"]) == 0
    capsys.readouterr()
    bad = ["publish", "--repo", str(repo), "--channel", "stable", "--module", "Bad Name", "--version", "1"]
    assert hub.cli.main([*bad, str(model)]) == 2
    err = capsys.readouterr().err
    assert "name = 'Bad Name': String should match pattern" in err
    assert "pydantic.dev" not in err and "type=" not in err  # no raw pydantic dump
    for v in ("1.0.0", "2.0.0"):
        assert hub.cli.main(["publish", *common, v, str(model)]) == 0
    assert hub.cli.main(["release", *common, "2.0.0"]) == 0
    capsys.readouterr()
    out = tmp_path / "bundle"
    assert (
        hub.cli.main(["bundle", "export", "--repo", str(repo), "--channel", "stable", str(out), "--json"])
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    copied = list((out / "targets" / "stable").iterdir())
    assert info["targets"] == len(copied) == 2  # the desired state and 2.0.0, not 1.0.0
    # and the device's pull from it says where it came from, not "(online)"
    import sre_agent.cli

    state = tmp_path / "dev"
    assert (
        sre_agent.cli.main(["init", "--state", str(state), "--root", str(repo / "metadata" / "1.root.json")])
        == 0
    )
    capsys.readouterr()
    rc = sre_agent.cli.main(["pull", "--state", str(state), "--from", str(out), "--channel", "stable"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"from bundle {out}" in text and "(online)" not in text


def _ro_bind(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, check=False)
    if r.returncode != 0:
        return False
    r = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, check=False)
    if r.returncode != 0:
        subprocess.run(["umount", str(path)], check=False)
        return False
    return True


def test_read_only_state_directory_is_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sre_agent.cli

    state = tmp_path / "dev"
    assert sre_agent.cli.main(["init", "--state", str(state)]) == 0
    capsys.readouterr()
    if not _ro_bind(state):
        pytest.skip("needs root and bind mounts to make a read-only filesystem")
    try:
        monkeypatch.setenv("SRE_AGENT_LLM__ENABLED", "false")
        rc = sre_agent.cli.main(["run", "--state", str(state), "--duration", "1"])
        err = capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(state)], check=False)
    assert rc == 1
    assert "read-only filesystem" in err and "Traceback" not in err and ".tmp" not in err
    assert err.count("error:") == 1


def test_triage_explain_says_why_a_labelled_case_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sre_agent.cli

    case = Path(__file__).parent / "triage_cases" / "ca-divergence.yaml"
    assert sre_agent.cli.main(["triage", "explain", str(case)]) == 0
    assert "label: agrees" in capsys.readouterr().out
    bad = tmp_path / "case.yaml"
    bad.write_text(case.read_text().replace("action: quarantine", "action: rollback", 1))
    assert sre_agent.cli.main(["triage", "explain", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "DISAGREES: expected rollback, the policy decides quarantine" in out
