"""`sre-agent escalations ...` and `sre-hub escalations|operators ...` as real child processes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from policies.triage import default_triage_policy
from sre_agent.escalations import EscalationStatus, EscalationStore, escalations_dir
from sre_agent.triage import TriageEngine
from sre_agent.triage_eval import load_cases
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock

CASES = {c.name: c for c in load_cases(Path(__file__).parent / "triage_cases")}


def _escalate(state, name: str, module: str, **facts) -> str:
    clock = SystemClock()
    store = EscalationStore(
        escalations_dir(state), AuditLog(state.audit_log, clock), clock, device_id="dev-7"
    )
    inc = CASES[name].incident
    inc = inc.model_copy(update={"module": module, "opened_at": clock.now(), "facts": {**inc.facts, **facts}})
    decision = TriageEngine(default_triage_policy()).decide(inc)
    return store.create(inc, decision).id


@pytest.fixture
def setup(tmp_path, state, run_cli):
    keys = tmp_path / "keys"
    r = run_cli("sre-hub", "operators", "keygen", "--operator", "alice", "--out", str(keys), "--json")
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)["entry"]
    assert (keys / "alice.key.pem").stat().st_mode & 0o777 == 0o600
    roster = {"version": 1, "max_ttl_s": 7200, "operators": [entry]}
    (state.policies / "operators.yaml").write_text(yaml.safe_dump(roster))
    a = _escalate(state, "pf-active-nolkg", "classifier")
    # damage left by an experiment that reaches the served model: a rollback for an operator
    b = _escalate(state, "cd-persisted-lkg", "detector", experiment="kill-serving")
    return keys, a, b


def test_device_list_show_approve_reject(setup, state, run_cli, tmp_path):
    keys, a, b = setup
    r = run_cli("sre-agent", "escalations", "list", "--state", str(state.root), "--json")
    assert r.returncode == 0, r.stderr
    assert {e["id"] for e in json.loads(r.stdout)["escalations"]} == {a, b}

    r = run_cli("sre-agent", "escalations", "show", a, "--state", str(state.root))
    assert r.returncode == 0 and "safe_mode" in r.stdout and "why:" in r.stdout

    # an operator key that is not in the roster: refused, exit 2, nothing changes
    r = run_cli("sre-hub", "operators", "keygen", "--operator", "mallory", "--out", str(keys))
    assert r.returncode == 0
    r = run_cli(
        "sre-agent",
        "escalations",
        "approve",
        a,
        "--state",
        str(state.root),
        "--key",
        str(keys / "mallory.key.pem"),
        "--operator",
        "alice",
    )
    assert r.returncode == 2 and "does not list" in r.stderr

    r = run_cli(
        "sre-agent",
        "escalations",
        "approve",
        a,
        "--state",
        str(state.root),
        "--key",
        str(keys / "alice.key.pem"),
        "--operator",
        "alice",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "approved"

    r = run_cli(
        "sre-agent",
        "escalations",
        "reject",
        b,
        "--state",
        str(state.root),
        "--key",
        str(keys / "alice.key.pem"),
        "--operator",
        "alice",
        "--reason",
        "not now",
    )
    assert r.returncode == 0, r.stderr
    store = EscalationStore(escalations_dir(state), AuditLog(state.audit_log), SystemClock())
    assert store.get(a).status == EscalationStatus.APPROVED
    assert store.get(b).status == EscalationStatus.REJECTED
    events = [x.event for x in AuditLog(state.audit_log).records()]
    assert "escalation.approval_refused" in events and "escalation.reject" in events


def test_hub_reads_uploaded_escalations_signs_and_the_device_applies(setup, state, run_cli, tmp_path):
    keys, a, b = setup
    repo = tmp_path / "hub"
    (repo / "policies").mkdir(parents=True)
    (repo / "policies" / "operators.yaml").write_text((state.policies / "operators.yaml").read_text())
    # what the uplink lands in the lake: rows of the escalations table, body = the row JSON
    store = EscalationStore(escalations_dir(state), AuditLog(state.audit_log), SystemClock())
    rows = [store.get(i).row() for i in (a, b)]
    lake = repo / "fleet" / "lake" / "table=escalations" / "date=2026-01-01"
    lake.mkdir(parents=True)
    tbl = pa.table(
        {
            "seq": [1, 2],
            "ts": pa.array([datetime.now(tz=UTC)] * 2, pa.timestamp("us", tz="UTC")),
            "body": [json.dumps(r, default=str) for r in rows],
            "device_id": ["dev-7", "dev-7"],
        }
    )
    pq.write_table(tbl, lake / ("0" * 40 + ".parquet"))

    r = run_cli("sre-hub", "escalations", "list", "--repo", str(repo), "--json")
    assert r.returncode == 0, r.stderr
    listed = {e["id"]: e for e in json.loads(r.stdout)["escalations"]}
    assert set(listed) == {a, b} and listed[a]["device"] == "dev-7"

    r = run_cli(
        "sre-hub",
        "escalations",
        "approve",
        a,
        "--repo",
        str(repo),
        "--key",
        str(keys / "alice.key.pem"),
        "--operator",
        "alice",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    path = Path(json.loads(r.stdout)["path"])
    assert path.exists()

    # an approval for a different action than allowed is refused at the hub already
    r = run_cli(
        "sre-hub",
        "escalations",
        "approve",
        b,
        "--repo",
        str(repo),
        "--action",
        "quarantine",
        "--key",
        str(keys / "alice.key.pem"),
        "--operator",
        "alice",
    )
    assert r.returncode == 2 and "not allowed" in r.stderr

    # a tampered approval file is refused by the device; the original is accepted
    doc = json.loads(path.read_text())
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**doc, "action": "alert"}))
    r = run_cli("sre-agent", "escalations", "apply", str(forged), "--state", str(state.root))
    assert r.returncode == 2 and "does not verify" in r.stderr
    r = run_cli("sre-agent", "escalations", "apply", str(path), "--state", str(state.root), "--json")
    assert r.returncode == 0, r.stderr
    assert store.get(a).status == EscalationStatus.APPROVED
    assert store.get(a).approval["operator"] == "alice"
    hub_audit = [x.event for x in AuditLog(repo / "escalations" / "audit.jsonl").records()]
    assert hub_audit == ["escalation.approve_signed", "escalation.sign_refused"]  # the refusal is audited


def test_triage_explain_dry_runs_the_policy(run_cli, tmp_path):
    shipped = Path(__file__).parent / "triage_cases" / "cd-injection-persisted.yaml"
    r = run_cli("sre-agent", "triage", "explain", str(shipped), "--json")
    d = json.loads(r.stdout)  # damage a standby-corruption experiment left: off the model, stop chaos
    assert (d["rule"], d["action"], d["verdict"]) == ("chaos-damage-off-model", "pause_chaos", "escalate")
    assert d["execute_now"] == ["alert", "pause_chaos"]  # a person is told; chaos stops meanwhile
    # the case's label (a rollback) is a listed label disagreement (tests/test_triage.py): exit 1, said why
    assert r.returncode == 1 and not d["label"]["agrees"]
    doc = yaml.safe_load(shipped.read_text())
    doc["incident"]["facts"]["experiment"] = "kill-serving"  # damage that may reach the served model
    case = tmp_path / "on-model.yaml"
    case.write_text(yaml.safe_dump(doc, allow_unicode=True))
    r = run_cli("sre-agent", "triage", "explain", str(case), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["rule"] == "chaos-damage-persists-with-lkg" and d["verdict"] == "escalate"
    assert d["action"] == "rollback" and d["execute_now"] == ["alert", "pause_chaos"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: not-a-kind\n")
    r = run_cli("sre-agent", "triage", "explain", str(bad))
    assert r.returncode == 2 and "read incident" in r.stderr


HOSTILE = "\x1b[2J\x1b]0;owned\x07\u202esafe_mode\u202c \x9b31m\u2066x\u2069\u200b"
RAW = ["\x1b", "\x07", "\u202e", "\u202c", "\x9b", "\u2066", "\u2069", "\u200b"]


def _hostile_escalation(state) -> str:
    clock = SystemClock()
    store = EscalationStore(
        escalations_dir(state), AuditLog(state.audit_log, clock), clock, device_id="dev-7"
    )
    base = CASES["pf-active-nolkg"].incident
    inc = base.model_copy(
        update={
            "module": "hostile",
            "title": "probe failed " + HOSTILE,
            "opened_at": clock.now(),
            "evidence": base.evidence.model_copy(update={"logs": ["log " + HOSTILE], "events": []}),
        }
    )
    return store.create(inc, TriageEngine(default_triage_policy()).decide(inc)).id


def test_escalation_text_is_neutralised_in_both_clis_and_reports(setup, state, run_cli, tmp_path):
    """Terminal escapes and bidi controls in a title or log line never reach an operator's terminal."""
    esc_id = _hostile_escalation(state)
    outputs = []
    for args in (["show", esc_id], ["list"]):
        r = run_cli("sre-agent", "escalations", *args, "--state", str(state.root))
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout)
    assert "\\x1b" in outputs[0] and "\\u202e" in outputs[0]  # shown, visibly
    repo = tmp_path / "hub"
    (repo / "policies").mkdir(parents=True)
    for args in (["show", esc_id], ["list"]):
        r = run_cli(
            "sre-hub", "escalations", *args, "--repo", str(repo), "--from", str(escalations_dir(state))
        )
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout)
    assert "\\u202e" in outputs[2]
    from sre_core.svg import html_table  # every HTML report's cells go through it

    outputs.append(html_table(("what",), [(HOSTILE,)]))
    for out in outputs:
        for ch in RAW:
            assert ch not in out, (repr(ch), out[:300])


def test_hub_refuses_to_sign_for_an_executed_or_expired_escalation(setup, state, run_cli, tmp_path):
    keys, a, b = setup
    repo = tmp_path / "hub"
    (repo / "policies").mkdir(parents=True)
    (repo / "policies" / "operators.yaml").write_text((state.policies / "operators.yaml").read_text())
    src = tmp_path / "copied"
    src.mkdir()
    # what a device uploads after it executed a (different) approval: history says executed
    doc = json.loads((escalations_dir(state) / f"{a}.json").read_text())
    doc["status"] = "executed"
    doc["history"].append({"ts": doc["content"]["created_at"], "event": "executed", "actor": "agent"})
    (src / f"{a}.json").write_text(json.dumps(doc))
    # an expired one
    doc_b = json.loads((escalations_dir(state) / f"{b}.json").read_text())
    doc_b["status"] = "expired"
    doc_b["history"].append({"ts": doc_b["content"]["created_at"], "event": "expire", "actor": "agent"})
    (src / f"{b}.json").write_text(json.dumps(doc_b))
    for esc_id, word in ((a, "executed"), (b, "expired")):
        r = run_cli(
            "sre-hub",
            "escalations",
            "approve",
            esc_id,
            "--repo",
            str(repo),
            "--from",
            str(src),
            "--key",
            str(keys / "alice.key.pem"),
            "--operator",
            "alice",
        )
        assert r.returncode == 2 and f"is {word}" in r.stderr, r.stderr
    assert not list((repo / "escalations" / "approvals").glob("*.json"))
    hub_audit = [x.event for x in AuditLog(repo / "escalations" / "audit.jsonl").records()]
    assert hub_audit == ["escalation.sign_refused", "escalation.sign_refused"]
