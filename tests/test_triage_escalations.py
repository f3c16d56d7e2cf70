"""Escalations and signed operator approvals: only a valid, live, bound approval is ever executed."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest

from policies.approvals import (
    ApprovalError,
    OperatorRoster,
    generate_operator_key,
    load_approval,
    public_key_b64,
    sign_approval,
)
from policies.triage import Action, default_triage_policy
from sre_agent.actions import ActionExecutor
from sre_agent.escalations import EscalationEvent, EscalationStatus, EscalationStore, next_status
from sre_agent.incidents import Incident
from sre_agent.triage import TriageEngine
from sre_agent.triage_eval import load_cases
from sre_core.audit import AuditLog
from sre_core.errors import InputError, SreError

CASES = Path(__file__).parent / "triage_cases"


class World:
    def __init__(self, tmp_path: Path, clock) -> None:
        self.clock = clock
        self.audit = AuditLog(tmp_path / "audit.jsonl", clock)
        self.store = EscalationStore(tmp_path / "escalations", self.audit, clock, device_id="dev-1")
        self.alice = generate_operator_key()
        self.mallory = generate_operator_key()
        self.roster = OperatorRoster(
            version=1,
            max_ttl_s=7200,
            operators=[{"id": "alice", "public_key": public_key_b64(self.alice.public_key())}],
        )
        self.ran: list[tuple[str, str]] = []
        self.executor = ActionExecutor(
            {
                Action.SAFE_MODE: lambda inc: self.ran.append(("safe_mode", inc.id)) or "safe mode on",
                Action.ALERT: lambda inc: self.ran.append(("alert", inc.id)) or "alerted",
                Action.RERUN_VERIFICATION: lambda inc: self.ran.append(("rerun", inc.id)) or "rerun",
            },
            audit=self.audit,
        )
        cases = {c.name: c for c in load_cases(CASES)}
        self.incident = cases["pf-active-nolkg"].incident
        decision = TriageEngine(default_triage_policy()).decide(self.incident)
        assert decision.escalated
        self.esc = self.store.create(self.incident, decision)

    def sign(
        self,
        key=None,
        *,
        operator="alice",
        decision="approve",
        action="safe_mode",
        ttl=3600,
        esc=None,
        hash_=None,
    ):
        esc = esc or self.esc
        return sign_approval(
            key or self.alice,
            operator=operator,
            escalation_id=esc.id,
            escalation_hash=hash_ or esc.content_hash,
            decision=decision,
            action=action,
            now=self.clock.now(),
            ttl=timedelta(seconds=ttl),
        )

    def events(self) -> list[str]:
        return [r.event for r in self.audit.records()]


@pytest.fixture
def world(tmp_path, clock) -> World:
    return World(tmp_path, clock)


def test_escalation_holds_full_context_and_a_stable_hash(world):
    esc = world.store.get(world.esc.id)
    c = esc.content
    assert c["what"] and c["why"] and c["device_id"] == "dev-1"
    assert c["proposed_action"] == "safe_mode" and "safe_mode" in c["allowed"]
    assert c["device_state"]["slot"]["standby_verified"] is False
    assert c["incident"]["evidence"]["slot"]["active_version"] == "2.0.0"
    assert c["decision"]["verdict"] == "escalate" and c["llm_summary"]
    assert esc.id == "esc-" + esc.content_hash[:16]
    assert esc.status == EscalationStatus.OPEN


def test_valid_approval_is_verified_then_executed_once(world):
    approved = world.store.decide(world.sign(), world.roster)
    assert approved.status == EscalationStatus.APPROVED
    done = world.store.execute_approved(world.executor, world.roster)
    assert [e.status for e, _ in done] == [EscalationStatus.EXECUTED]
    assert world.ran == [("safe_mode", world.incident.id)]
    assert world.store.execute_approved(world.executor, world.roster) == []
    assert world.ran == [("safe_mode", world.incident.id)]
    ev = world.events()
    assert ev.index("escalation.approve") < ev.index("triage.action") < ev.index("escalation.executed")
    assert world.audit.verify()[1] is None


def test_rejected_escalation_is_never_executed(world):
    rejected = world.store.decide(world.sign(decision="reject", action=None), world.roster)
    assert rejected.status == EscalationStatus.REJECTED
    assert world.store.execute_approved(world.executor, world.roster) == []
    # a later approval cannot revive it
    with pytest.raises(InputError):
        world.store.decide(world.sign(), world.roster)
    assert world.store.execute_approved(world.executor, world.roster) == []
    assert world.ran == []
    assert "escalation.reject" in world.events()


def test_expired_approval_is_refused_and_never_executed(world):
    approval = world.sign(ttl=600)
    world.clock.advance(601)
    with pytest.raises(ApprovalError, match="expired"):
        world.store.decide(approval, world.roster)
    assert world.store.get(world.esc.id).status == EscalationStatus.OPEN
    assert world.store.execute_approved(world.executor, world.roster) == []
    assert world.ran == []
    assert "escalation.approval_refused" in world.events()


def test_approval_that_lapses_before_execution_is_not_executed(world):
    world.store.decide(world.sign(ttl=600), world.roster)
    world.clock.advance(900)
    done = world.store.execute_approved(world.executor, world.roster)
    assert [e.status for e, r in done] == [EscalationStatus.EXPIRED] and done[0][1] is None
    assert world.ran == []
    assert "escalation.execution_refused" in world.events()


def test_forged_signature_is_refused(world):
    forged = world.sign(world.mallory)  # mallory signs, claiming to be alice
    with pytest.raises(ApprovalError, match="key the policy does not list"):
        world.store.decide(forged, world.roster)
    # same key id as alice's, signature bytes from mallory
    good = world.sign()
    bad_sig = world.mallory.sign(good.signed_bytes())
    tampered = good.model_copy(update={"signature": base64.b64encode(bad_sig).decode()})
    with pytest.raises(ApprovalError, match="does not verify"):
        world.store.decide(tampered, world.roster)
    # a valid signature with an altered field
    altered = good.model_copy(update={"expires_at": good.expires_at + timedelta(days=1)})
    with pytest.raises(ApprovalError, match="does not verify"):
        world.store.decide(altered, world.roster)
    garbage = good.model_copy(update={"signature": "!!!not base64"})
    with pytest.raises(ApprovalError):
        world.store.decide(garbage, world.roster)
    assert world.store.get(world.esc.id).status == EscalationStatus.OPEN
    assert world.store.execute_approved(world.executor, world.roster) == []
    assert world.ran == []
    assert world.events().count("escalation.approval_refused") == 4


def test_unknown_operator_and_unlisted_action_are_refused(world):
    with pytest.raises(ApprovalError, match="not listed"):
        world.store.decide(world.sign(world.mallory, operator="mallory"), world.roster)
    with pytest.raises(ApprovalError, match="not allowed"):
        world.store.decide(world.sign(action="rollback"), world.roster)  # not in this rule's allowed set
    with pytest.raises(ApprovalError, match="longer than"):
        world.store.decide(world.sign(ttl=3 * 3600), world.roster)
    limited = OperatorRoster(
        version=1,
        operators=[
            {"id": "alice", "public_key": public_key_b64(world.alice.public_key()), "may_approve": ["alert"]}
        ],
    )
    with pytest.raises(ApprovalError, match="may not approve"):
        world.store.decide(world.sign(), limited)
    assert world.ran == []


def test_approval_is_bound_to_the_content_hash(world):
    with pytest.raises(ApprovalError, match="different escalation content"):
        world.store.decide(world.sign(hash_="0" * 64), world.roster)
    # editing the stored content breaks the file's own hash: it is refused outright
    path = world.store.directory / f"{world.esc.id}.json"
    doc = json.loads(path.read_text())
    doc["content"]["proposed_action"] = "rollback"
    path.write_text(json.dumps(doc))
    with pytest.raises(SreError, match="does not match its hash"):
        world.store.get(world.esc.id)
    with pytest.raises(SreError):
        world.store.decide(world.sign(), world.roster)
    assert world.ran == []


def test_operator_removed_from_policy_before_execution_blocks_it(world):
    world.store.decide(world.sign(), world.roster)
    empty = OperatorRoster(version=1, operators=[])
    done = world.store.execute_approved(world.executor, empty)
    assert done[0][0].status == EscalationStatus.EXPIRED and world.ran == []


def test_open_escalation_expires(world):
    world.clock.advance(timedelta(hours=25))
    expired = world.store.expire_due()
    assert [e.status for e in expired] == [EscalationStatus.EXPIRED]
    with pytest.raises(InputError):
        world.store.decide(world.sign(), world.roster)


def test_lifecycle_table_refuses_unknown_transitions():
    assert next_status(EscalationStatus.OPEN, EscalationEvent.APPROVE) == EscalationStatus.APPROVED
    for status in (EscalationStatus.REJECTED, EscalationStatus.EXECUTED, EscalationStatus.EXPIRED):
        with pytest.raises(InputError):
            next_status(status, EscalationEvent.APPROVE)


def test_approval_documents_round_trip_and_garbage_is_refused(world):
    a = world.sign()
    assert load_approval(a.model_dump_json()) == a
    with pytest.raises(ApprovalError):
        load_approval(b"{not json")
    with pytest.raises(ApprovalError):
        load_approval(json.dumps({**json.loads(a.model_dump_json()), "extra": 1}))


def test_daemon_wiring_escalates_then_executes_after_signed_approval(tmp_path, state, clock):
    """build_responder + process_escalations: the daemon's path from incident to approved action."""
    import yaml

    from sre_agent.config import load_settings
    from sre_agent.respond import build_responder

    settings = load_settings(env={"SRE_AGENT_LLM__ENABLED": "false"}, state_dir=state.root)
    audit = AuditLog(state.audit_log, clock)
    ran: list[str] = []
    responder = build_responder(
        state,
        settings,
        clock=clock,
        audit=audit,
        handlers={Action.SAFE_MODE: lambda inc: ran.append(inc.id) or "safe mode on"},
        device_id="dev-9",
    )
    assert responder.advisor is None
    incident = {c.name: c for c in load_cases(CASES)}["pf-active-nolkg"].incident
    out = responder.handle(incident)
    assert out.escalation is not None and ran == []
    roster_path = state.policies / "operators.yaml"
    # no operator policy yet: an approval cannot even be verified, nothing runs
    assert responder.process_escalations(roster_path) == []
    alice = generate_operator_key()
    roster_path.write_text(
        yaml.safe_dump(
            {"version": 1, "operators": [{"id": "alice", "public_key": public_key_b64(alice.public_key())}]}
        )
    )
    from policies.approvals import load_roster

    esc = out.escalation
    approval = sign_approval(
        alice,
        operator="alice",
        escalation_id=esc.id,
        escalation_hash=esc.content_hash,
        decision="approve",
        action="safe_mode",
        now=clock.now(),
        ttl=timedelta(minutes=30),
    )
    responder.escalations.decide(approval, load_roster(roster_path))
    done = responder.process_escalations(roster_path)
    assert [e.status for e, _ in done] == [EscalationStatus.EXECUTED] and ran == [incident.id]
    assert responder.process_escalations(roster_path) == [] and ran == [incident.id]
    assert esc.content["device_id"] == "dev-9"
    assert audit.verify()[1] is None


def test_escalations_are_mirrored_into_the_duckdb_telemetry_store(tmp_path, state, clock):
    """The escalation store writes through the telemetry sink seam into the real `escalations` table."""
    from policies.telemetry import load_telemetry_policy
    from sre_agent.telemetry import Store, TelemetryWriter

    store_db = Store(state.telemetry_db, load_telemetry_policy(), clock, "dev-1")
    writer = TelemetryWriter(store_db)
    try:
        audit = AuditLog(state.audit_log, clock)
        escs = EscalationStore(tmp_path / "esc", audit, clock, device_id="dev-1", telemetry=writer)
        incident = {c.name: c for c in load_cases(CASES)}["pf-active-nolkg"].incident
        esc = escs.create(incident, TriageEngine(default_triage_policy()).decide(incident))
        alice = generate_operator_key()
        roster = OperatorRoster(
            version=1, operators=[{"id": "alice", "public_key": public_key_b64(alice.public_key())}]
        )
        escs.decide(
            sign_approval(
                alice,
                operator="alice",
                escalation_id=esc.id,
                escalation_hash=esc.content_hash,
                decision="reject",
                now=clock.now(),
                ttl=timedelta(minutes=5),
            ),
            roster,
        )
        writer.flush()
        rows = store_db.query("SELECT body FROM escalations ORDER BY seq").to_pylist()
    finally:
        store_db.close()
    bodies = [json.loads(r["body"]) for r in rows]
    assert [b["status"] for b in bodies] == ["open", "rejected"]
    assert {b["id"] for b in bodies} == {esc.id}
    doc = json.loads(bodies[-1]["document"])
    assert doc["content_hash"] == esc.content_hash and doc["approval"]["operator"] == "alice"


def test_finished_escalations_are_pruned_open_ones_kept(world, tmp_path):
    world.store.decide(world.sign(decision="reject", action=None), world.roster)
    other = _on_model({c.name: c for c in load_cases(CASES)}["cd-persisted-lkg"].incident)
    still_open = world.store.create(other, TriageEngine(default_triage_policy()).decide(other))
    world.clock.advance(timedelta(days=2))
    assert world.store.prune(timedelta(days=7)) == []
    world.clock.advance(timedelta(days=6))
    assert world.store.prune(timedelta(days=7)) == [world.esc.id]
    assert [e.id for e in world.store.select()] == [still_open.id]
    assert "escalation.pruned" in world.events()


def _on_model(inc: Incident) -> Incident:
    """The incident with damage left by an experiment that reaches the served model (a model remedy)."""
    return inc.model_copy(update={"facts": {**inc.facts, "experiment": "kill-serving"}})


def _mild_escalation(world):
    """An escalation that proposes a rollback while safe_mode is among its allowed actions."""
    case = {c.name: c for c in load_cases(CASES)}["cd-persisted-lkg"]
    inc = _on_model(case.incident).model_copy(update={"id": "inc-host", "module": "detector"})
    decision = TriageEngine(default_triage_policy()).decide(inc)
    assert decision.escalated and decision.action == Action.ROLLBACK and Action.SAFE_MODE in decision.allowed
    return world.store.create(inc, decision)


def test_an_approval_more_severe_than_proposed_is_refused_and_audited(world):
    esc = _mild_escalation(world)
    with pytest.raises(ApprovalError, match="more severe than the proposed 'rollback'") as ei:
        world.store.decide(world.sign(esc=esc, action="safe_mode"), world.roster)
    assert "approve 'rollback' or a milder" in ei.value.message
    assert world.store.get(esc.id).status == EscalationStatus.OPEN
    refused = [r for r in world.audit.records() if r.event == "escalation.approval_refused"]
    assert refused and refused[-1].data["id"] == esc.id and "more severe" in refused[-1].data["why"]
    # a validly signed but more severe approval planted straight into the file is refused at execution too
    path = world.store.directory / f"{esc.id}.json"
    doc = json.loads(path.read_text())
    planted = world.sign(esc=esc, action="safe_mode")
    path.write_text(
        json.dumps({**doc, "status": "approved", "approval": json.loads(planted.model_dump_json())})
    )
    done = world.store.execute_approved(world.executor, world.roster)
    assert [e.status for e, _ in done] == [EscalationStatus.EXPIRED] and world.ran == []
    assert any(r.event == "escalation.execution_refused" for r in world.audit.records())


def test_an_approval_of_the_proposed_action_on_the_milder_escalation_runs(world):
    esc = _mild_escalation(world)
    world.store.decide(world.sign(esc=esc, action="alert"), world.roster)
    done = world.store.execute_approved(world.executor, world.roster)
    assert [e.status for e, _ in done] == [EscalationStatus.EXECUTED] and world.ran == [("alert", "inc-host")]


def test_a_milder_allowed_action_may_be_approved(world):
    world.store.decide(world.sign(action="rerun_verification"), world.roster)
    done = world.store.execute_approved(world.executor, world.roster)
    assert [e.status for e, _ in done] == [EscalationStatus.EXECUTED]
    assert world.ran == [("rerun", world.incident.id)]


def _edit_status(world, esc_id: str, status: str) -> None:
    path = world.store.directory / f"{esc_id}.json"
    doc = json.loads(path.read_text())
    doc["status"] = status
    path.write_text(json.dumps(doc))


def test_executed_escalation_is_not_replayed_after_its_status_is_edited(world):
    world.store.decide(world.sign(), world.roster)
    world.store.execute_approved(world.executor, world.roster)
    assert world.ran == [("safe_mode", world.incident.id)]
    # an attacker (or a restored backup) sets the file back to "approved": the ledger says executed
    _edit_status(world, world.esc.id, "approved")
    done = world.store.execute_approved(world.executor, world.roster)
    assert world.ran == [("safe_mode", world.incident.id)]
    assert [e.status for e, _ in done] == [EscalationStatus.EXECUTED]
    assert "escalation.replay_refused" in world.events()
    # set back to "open", a fresh valid approval is refused too (re-approval of an executed escalation)
    _edit_status(world, world.esc.id, "open")
    with pytest.raises(InputError, match=r"audit trail records escalation\.executed"):
        world.store.decide(world.sign(), world.roster)
    assert world.store.execute_approved(world.executor, world.roster) == []
    assert world.ran == [("safe_mode", world.incident.id)]
    assert world.audit.verify()[1] is None


def test_an_execution_interrupted_after_it_started_is_never_repeated(world):
    world.store.decide(world.sign(), world.roster)
    # the agent wrote its intent and stopped before recording the result (kill -9 mid-action)
    world.audit.append("escalation.execution_started", id=world.esc.id, action="safe_mode")
    done = world.store.execute_approved(world.executor, world.roster)
    assert world.ran == [] and [e.status for e, _ in done] == [EscalationStatus.FAILED]


def test_a_broken_audit_chain_blocks_approvals_and_execution(world):
    world.store.decide(world.sign(), world.roster)
    lines = world.audit.path.read_text().splitlines()
    first = json.loads(lines[0])
    first["actor"] = "someone-else"
    world.audit.path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(SreError, match="audit trail is broken"):
        world.store.execute_approved(world.executor, world.roster)
    assert world.ran == []
