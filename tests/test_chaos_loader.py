"""Experiment loading: safe YAML/JSON, precise errors (file, path, expectation), a stable content hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chaos.loader import MAX_BYTES, ExperimentError, experiment_hash, load_experiment, parse_experiment

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "experiments"


def _doc() -> dict:
    return {
        "title": "latency",
        "description": "d",
        "tags": ["uplink"],
        "steady-state-hypothesis": {
            "title": "ok",
            "probes": [
                {
                    "type": "probe",
                    "name": "backlog",
                    "tolerance": {"type": "range", "range": [0, 10]},
                    "provider": {"type": "python", "module": "chaos.probes", "func": "uplink_backlog"},
                }
            ],
        },
        "method": [
            {
                "type": "action",
                "name": "slow",
                "provider": {
                    "type": "python",
                    "module": "chaos.actions",
                    "func": "slow_uplink",
                    "arguments": {"latency_ms": 100},
                },
                "pauses": {"after": 5},
            },
            {"ref": "backlog"},
        ],
        "rollbacks": [
            {
                "type": "action",
                "name": "restore",
                "provider": {"type": "python", "module": "chaos.actions", "func": "restore_uplink"},
            }
        ],
    }


def _errors(doc: object, source: str = "exp.json") -> str:
    with pytest.raises(ExperimentError) as info:
        parse_experiment(json.dumps(doc), source)
    return info.value.message


def test_yaml_and_json_of_the_same_experiment_have_the_same_hash(tmp_path: Path) -> None:
    doc = _doc()
    j = tmp_path / "e.json"
    j.write_text(json.dumps(doc, indent=4))
    y = tmp_path / "e.yaml"
    y.write_text(yaml.safe_dump(doc, sort_keys=False))
    a, b = load_experiment(j), load_experiment(y)
    assert a.hash == b.hash
    assert a.hash.startswith("sha256:") and len(a.hash) == 7 + 64
    assert (a.format, b.format) == ("json", "yaml")
    # reordering keys does not change the hash; changing a value does
    reordered = dict(reversed(list(doc.items())))
    assert experiment_hash(reordered) == a.hash
    doc["method"][0]["provider"]["arguments"]["latency_ms"] = 101
    assert experiment_hash(doc) != a.hash


def test_every_example_loads_except_the_invalid_one() -> None:
    files = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".json", ".yaml", ".yml"))
    assert len(files) >= 8
    invalid = []
    for p in files:
        try:
            exp = load_experiment(p)
            assert exp.title
        except ExperimentError:
            invalid.append(p.name)
    assert invalid == ["typo-provider.yaml"]


def test_error_names_file_path_and_expectation() -> None:
    doc = _doc()
    del doc["method"][0]["provider"]["module"]
    msg = _errors(doc, "bad.json")
    assert "bad.json: method[0].provider.module: expected a non-empty string" in msg


def test_misspelt_key_is_an_error_not_ignored(tmp_path: Path) -> None:
    msg = _errors(
        {**_doc(), "method": [{"type": "action", "name": "x", "provder": {"type": "python"}}]}, "typo.json"
    )
    assert "typo.json: method[0].provder: expected an activity key" in msg
    assert "method[0].provider: expected a provider mapping" in msg
    msg = _errors({**_doc(), "rollback": []})
    assert "rollback: expected a known experiment key" in msg


def test_structural_rules() -> None:
    doc = _doc()
    doc["steady-state-hypothesis"]["probes"][0].pop("tolerance")
    assert "steady-state-hypothesis.probes[0].tolerance: expected a tolerance" in _errors(doc)
    doc = _doc()
    doc["method"].append({"ref": "nope"})
    assert "method[2].ref: expected the name of an activity defined in the experiment" in _errors(doc)
    doc = _doc()
    doc["method"][0]["type"] = "attack"
    assert "method[0].type: expected 'probe' or 'action', got str \"attack\"" in _errors(doc)
    doc = _doc()
    doc["method"][0]["pauses"] = {"after": "forever"}
    assert "method[0].pauses.after: expected seconds (>= 0) or a ${variable}" in _errors(doc)
    assert "method: expected a non-empty list of activities" in _errors({"title": "t", "method": []})
    assert "<document>: expected a mapping" in _errors([1, 2])
    doc = _doc()
    doc["steady-state-hypothesis"]["probes"][0]["type"] = "action"
    assert "steady-state-hypothesis.probes[0].type: expected 'probe'" in _errors(doc)


def test_invalid_yaml_reports_the_line() -> None:
    with pytest.raises(ExperimentError) as info:
        parse_experiment("title: a\nmethod: [\n  - x: : y\n", "broken.yaml")
    assert "broken.yaml" in info.value.message
    assert "not valid YAML at line" in info.value.message


def test_invalid_json_reports_the_line() -> None:
    with pytest.raises(ExperimentError) as info:
        parse_experiment('{"title": "a",\n "method": [}', "broken.json")
    assert "not valid JSON at line 2" in info.value.message


def test_yaml_python_tags_are_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"title: !!python/object/apply:os.system ['touch {marker}']\nmethod: []\n"
    with pytest.raises(ExperimentError):
        parse_experiment(text, "evil.yaml")
    assert not marker.exists()


def test_non_json_yaml_values_are_refused() -> None:
    text = (
        "title: t\nmethod:\n  - type: action\n    name: a\n    provider: {type: python, module: m, func: f}\n"
    )
    text += "    when: 2026-01-01\n"
    with pytest.raises(ExperimentError) as info:
        parse_experiment(text, "dates.yaml")
    assert "method[0].when: expected a JSON value" in info.value.message


def test_size_and_alias_bombs_are_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_BYTES + 1))
    with pytest.raises(ExperimentError) as info:
        load_experiment(big)
    assert "at most" in info.value.message
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    lines.append("title: bomb\nmethod: []")
    with pytest.raises(ExperimentError) as info:
        parse_experiment("\n".join(lines), "bomb.yaml")
    assert "at most" in info.value.message and "values" in info.value.message


def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError) as info:
        load_experiment(tmp_path / "missing.yaml")
    assert info.value.exit_code == 2
    assert "cannot read it" in info.value.message


def test_activity_count_is_bounded() -> None:
    from chaos.loader import MAX_ACTIVITIES

    act = {
        "type": "probe",
        "name": "p",
        "provider": {"type": "python", "module": "chaos.probes", "func": "x"},
    }
    doc = {"title": "many", "description": "d", "method": [act] * (MAX_ACTIVITIES + 1)}
    assert f"expected at most {MAX_ACTIVITIES} activities" in _errors(doc)


def test_a_referenced_name_must_be_unique() -> None:
    doc = _doc()
    doc["rollbacks"].append(
        {
            "type": "probe",
            "name": "backlog",
            "provider": {"type": "process", "path": "/bin/rm", "arguments": ["-rf", "/"]},
        }
    )
    msg = _errors(doc)
    assert "rollbacks[1].name: expected a unique name ('backlog' is referenced and defined at" in msg
