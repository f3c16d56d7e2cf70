"""Policies are easy to author: every kind can be checked and shown from the CLI, a partial file overlays
the shipped default, and errors name the path, the value and the expected form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.base import load_document
from policies.deployment import DeploymentPolicy, load_deployment_policy
from policies.kinds import KINDS
from sre_agent.cli import main
from sre_core.errors import InputError


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_seven_kinds() -> None:
    assert sorted(k.name for k in KINDS) == [
        "chaos", "deployment", "operators", "telemetry", "triage", "trust", "verification",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", [k.name for k in KINDS])
def test_every_kind_shows_and_its_default_checks(
    kind: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, out, err = _run(capsys, "policy", "show", kind, "--default", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["kind"] == kind and doc["source"] == "default" and doc["policy"]
    rc, out, _ = _run(capsys, "policy", "show", kind, "--state", str(tmp_path))
    assert rc == 0 and out.startswith(f"# {kind} policy") and "None" not in out
    f = tmp_path / f"{kind}.yaml"
    f.write_text("{}\n")  # an empty file is the default
    rc, _, err = _run(capsys, "policy", "check", str(f))
    assert rc == 0, err


def test_partial_file_overlays_the_default(tmp_path: Path) -> None:
    f = tmp_path / "deployment.yaml"
    f.write_text("flapping:\n  max_rollbacks: 5\ncanary_steps: [10, 100]\n")
    p = load_deployment_policy(f)
    default = load_deployment_policy(None)
    assert p.flapping.max_rollbacks == 5
    assert p.flapping.window_s == default.flapping.window_s  # the rest of the section kept
    assert p.canary_steps == [10, 100]  # lists replace
    assert p.probes == default.probes


def test_named_maps_replace_rather_than_merge(tmp_path: Path) -> None:
    """An SRE who lists a smaller chaos catalogue means "only these": omitted activities are not kept."""
    from policies.chaos import ChaosPolicy, default_chaos_policy

    key, spec = next((k, v) for k, v in default_chaos_policy().activities.items() if not v.restored_by)
    f = tmp_path / "chaos.yaml"
    f.write_text(json.dumps({"activities": {key: json.loads(spec.model_dump_json())}}))
    assert list(load_document(ChaosPolicy, f).activities) == [key]


def test_installed_partial_policy_is_what_show_prints(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "deployment.yaml").write_text("min_free_disk_mb: 512\n")
    rc, out, _ = _run(capsys, "policy", "show", "deployment", "--state", str(tmp_path), "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["policy"]["min_free_disk_mb"] == 512 and doc["policy"]["max_resumes"] == 3
    assert "over the default" in doc["source"]


def test_errors_name_path_value_and_expected_form(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "deployment.yaml"
    f.write_text("flapping:\n  max_rollbacks: many\nmin_free_disk: 5\n")
    rc, _, err = _run(capsys, "policy", "check", str(f))
    assert rc == 2
    assert f'{f}: flapping.max_rollbacks = "many": Input should be a valid integer' in err
    assert "min_free_disk = 5: unknown key; did you mean 'min_free_disk_mb'?" in err
    with pytest.raises(InputError, match="not a mapping"):
        f.write_text("- a\n- b\n")
        load_document(DeploymentPolicy, f)


def test_unknown_kind_lists_the_kinds(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "mystery.yaml"
    f.write_text("{}\n")
    rc, _, err = _run(capsys, "policy", "check", str(f))
    assert rc == 2 and "chaos, deployment, operators" in err
    rc, _, err = _run(capsys, "policy", "check", str(f), "--kind", "triage")
    assert rc == 0, err
