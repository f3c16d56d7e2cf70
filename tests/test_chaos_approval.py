"""Signed, bounded approvals of escalated experiments (the incident escalations' operator roster).

How it broke: ``--approve sha256:...`` was an unsigned hash on the command line that sanctioned every
finding, including those the SRE guide says can never be approved.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from chaos.approval import sign_chaos_approval
from chaos.loader import load_experiment, parse_experiment
from chaos.pipeline import approval_findings
from chaos.preflight import Preflight
from policies.approvals import generate_operator_key, public_key_b64
from sre_core.clock import FakeClock
from sre_core.paths import StatePaths
from tests.test_preflight import action, healthy, rules, safe_doc

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def roster(state: StatePaths) -> dict[str, object]:
    alice, mallory = generate_operator_key(), generate_operator_key()
    doc = {
        "version": 1,
        "max_ttl_s": 7200,
        "operators": [
            {"id": "alice", "public_key": public_key_b64(alice.public_key())},
            {
                "id": "bob",
                "public_key": public_key_b64(generate_operator_key().public_key()),
                "may_approve": ["rollback"],
            },
        ],
    }
    state.policies.mkdir(parents=True, exist_ok=True)
    (state.policies / "operators.yaml").write_text(yaml.safe_dump(doc))
    return {"alice": alice, "mallory": mallory}


def test_signed_approval_sanctions_that_content_until_it_expires(state: StatePaths, roster: dict) -> None:
    exp = load_experiment(REPO / "experiments" / "uplink-blackout-5min.yaml")
    clock = FakeClock()
    approval = sign_chaos_approval(
        roster["alice"], operator="alice", experiment_hash=exp.hash, now=clock.now(), ttl=timedelta(hours=1)
    )
    approved, extra, who = approval_findings(approval, exp, state, clock)
    assert (approved, extra, who) == (exp.hash, [], "alice")
    res = Preflight().check(exp, healthy(), approved, extra)
    assert res.verdict == "run" and [f.rule for f in res.sanctioned] == ["management-cut"]
    clock.advance(3601)
    approved, extra, _ = approval_findings(approval, exp, state, clock)
    assert (
        approved is None and [f.rule for f in extra] == ["approval-invalid"] and "expired" in extra[0].message
    )
    assert Preflight().check(exp, healthy(), approved, extra).verdict == "escalate"


def test_forged_foreign_or_other_content_approvals_do_not_count(state: StatePaths, roster: dict) -> None:
    exp = load_experiment(REPO / "experiments" / "uplink-blackout-5min.yaml")
    clock = FakeClock()
    ttl = timedelta(hours=1)
    # a key not in the roster, signing as alice
    forged = sign_chaos_approval(
        roster["mallory"], operator="alice", experiment_hash=exp.hash, now=clock.now(), ttl=ttl
    )
    # alice approved other content
    other = parse_experiment(json.dumps({**exp.raw, "description": "edited"}), "x.json")
    stale = sign_chaos_approval(
        roster["alice"], operator="alice", experiment_hash=other.hash, now=clock.now(), ttl=ttl
    )
    # longer than the roster allows
    long = sign_chaos_approval(
        roster["alice"], operator="alice", experiment_hash=exp.hash, now=clock.now(), ttl=timedelta(days=2)
    )
    for approval in (forged, stale, long):
        approved, extra, _ = approval_findings(approval, exp, state, clock)
        assert approved is None and [f.rule for f in extra] == ["approval-invalid"], approval


def test_never_approvable_findings_stay_blocking(state: StatePaths, roster: dict) -> None:
    d = safe_doc()
    d["method"] = [action("kill_serving_worker"), action("cut_uplink", duration_s=120)]
    d["rollbacks"] = [action("restart_serving_worker"), action("clear_faults")]
    exp = parse_experiment(json.dumps(d), "kill.json")
    clock = FakeClock()
    approval = sign_chaos_approval(
        roster["alice"],
        operator="alice",
        experiment_hash=exp.hash,
        now=clock.now(),
        ttl=timedelta(minutes=10),
    )
    approved, extra, _ = approval_findings(approval, exp, state, clock)
    res = Preflight().check(exp, healthy(), approved, extra)
    assert res.verdict == "escalate"
    assert rules(res) == {"agent-target"} and "management-cut" in {f.rule for f in res.sanctioned}
