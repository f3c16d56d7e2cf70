"""Follow-through in the daemon's responder, with the daemon's real handlers on real slots.

How each promise could break, and the test that catches it:
- the model picks a milder action that cannot help ("quarantine" a version that serves): the corrupted
  version keeps serving -> the active version must be rolled back to the verified last-known-good and
  marked bad, whatever the advisor chose;
- an action fails and nothing else happens -> an alert and an escalation must follow;
- two different SLO breaches (checks, experiments, slots) share a fingerprint and the second is dropped;
- an incident is never closed by the code that resolves it;
- an operator-approved safe mode is left on the next reconcile because no serial was recorded at entry;
- the daemon dies mid-action and the action runs again after the restart (a second rollback would flip
  back onto the corrupted version).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deployment.reconcile import Reconciler
from deployment.safemode import read_safe_mode
from deployment.sample_models import linear_classifier
from deployment.slots import SlotManager
from policies.triage import Action, default_triage_policy
from sre_agent.actions import ActionExecutor
from sre_agent.config import AgentSettings
from sre_agent.escalations import EscalationStatus, EscalationStore, escalations_dir
from sre_agent.handlers import DaemonHandlers
from sre_agent.incidents import Incident, IncidentSignal, IncidentTracker, incident_from_event
from sre_agent.provision import provision
from sre_agent.respond import Responder, build_responder, incidents_file
from sre_agent.services.responder import IncidentTee, ResponderService
from sre_agent.triage import Advice, TriageEngine
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from tests.deploy_helpers import StaticSource, make_artifact


def _device(tmp_path: Path) -> tuple[StatePaths, FakeClock, AuditLog, StaticSource, Reconciler]:
    """A device that installed clf 1.0, then promoted 2.0 (1.0 is the verified last-known-good)."""
    paths = StatePaths(tmp_path / "dev")
    provision(paths)
    clock = FakeClock()
    audit = AuditLog(paths.audit_log, clock)
    cas = tmp_path / "cas"
    src = StaticSource(clock, [make_artifact(cas, "clf", "1.0", linear_classifier(seed=1))])
    rec = Reconciler(paths, src, clock, audit=audit)
    rec.run_once()
    src.set([make_artifact(cas, "clf", "2.0", linear_classifier(seed=2))], serial=2)
    rec.run_once()
    assert SlotManager(paths, audit, clock).status("clf").active.version == "2.0"  # type: ignore[union-attr]
    return paths, clock, audit, src, rec


def _corrupt_active(paths: StatePaths, audit: AuditLog, clock: FakeClock) -> None:
    view = SlotManager(paths, audit, clock).status("clf").active
    assert view is not None
    raw = bytearray(view.artifact_path.read_bytes())
    raw[100:116] = b"\xff" * 16  # 16 bytes overwritten in the active model
    view.artifact_path.write_bytes(bytes(raw))


def _integrity_event(tee: IncidentTee, active_ok: bool, standby_ok: bool) -> None:
    """The event the verification runner emits for a failed integrity.slots run."""
    tee.event(
        "incident",
        "verification check integrity.slots fail: corrupted slot(s): clf/active",
        severity="critical",
        attrs={
            "source": "verification",
            "incident_kind": "verification_failure",
            "check": "integrity.slots",
            "modules": ["clf"],
            "facts": {"check": "integrity.slots", "status": "fail", "category": "integrity", "corrupted": 1},
            "dedup_key": "verification:integrity.slots",
            "evidence": {"clf/active": {"ok": active_ok}, "clf/standby": {"ok": standby_ok}},
        },
    )


def _wait(svc: ResponderService) -> None:
    assert svc.drain(30), "the responder did not finish"


def test_corrupted_active_after_promotion_rolls_back_to_lkg_even_when_the_model_picks_quarantine(
    tmp_path: Path,
) -> None:
    paths, clock, audit, _src, _rec = _device(tmp_path)
    _corrupt_active(paths, audit, clock)
    sink = MemorySink()
    slots = SlotManager(paths, audit, clock)
    handlers = DaemonHandlers(paths, clock, audit, sink, lambda: slots).table()

    def picks_quarantine(_inc: object, _m: object) -> Advice:  # the local model's (milder) choice
        return Advice(choice="quarantine", summary="block the bad version")

    def factory() -> Responder:
        store = EscalationStore(escalations_dir(paths), audit, clock)
        return Responder(
            TriageEngine(default_triage_policy()),
            ActionExecutor(handlers, audit=audit, telemetry=sink),
            store,
            IncidentTracker(clock),
            audit,
            advisor=picks_quarantine,
            telemetry=sink,
            store_path=incidents_file(paths),
        )

    svc = ResponderService(paths, clock, factory, lambda: slots)
    tee = IncidentTee(lambda: sink, svc.submit, svc.resolved)
    svc.start()
    try:
        _integrity_event(tee, active_ok=False, standby_ok=True)
        _wait(svc)
        st = SlotManager(paths, audit, clock).status("clf")
        assert st.active is not None and st.active.version == "1.0"  # the last-known-good serves
        assert any(b["version"] == "2.0" for b in st.bad.values())  # the corrupted version is marked bad
        (opened,) = [r.data for r in audit.records() if r.event == "incident.opened"]
        assert opened["facts"]["since_flip_s"] >= 0 and opened["facts"]["standby_committed"] is True
        acts = [r.data for r in audit.records() if r.event == "triage.action"]
        assert acts and all(a["ok"] for a in acts), acts
        # the rollback resolved it: the incident is closed by the code that resolved it
        assert svc.responder is not None and svc.responder.tracker.open_incidents() == []
        (closed,) = [r.data for r in audit.records() if r.event == "incident.closed"]
        assert "1.0" in closed["why"]
    finally:
        svc.stop()


def test_an_incident_stays_open_until_its_producer_resolves_it(tmp_path: Path) -> None:
    """Drift is only alerted on: the incident stays open (however long) until the verification runner
    says the check passes again; then it closes, and a new failure later is a new incident."""
    paths = StatePaths(tmp_path / "dev")
    provision(paths)
    clock = FakeClock()
    audit = AuditLog(paths.audit_log, clock)
    sink = MemorySink()
    settings = AgentSettings.model_validate({"state_dir": str(paths.root), "llm": {"enabled": False}})
    svc = ResponderService(
        paths, clock, lambda: build_responder(paths, settings, clock=clock, audit=audit), lambda: None
    )
    tee = IncidentTee(lambda: sink, svc.submit, svc.resolved)
    attrs = {
        "source": "verification", "incident_kind": "verification_failure", "check": "drift.inputs",
        "modules": ["clf"], "facts": {"check": "drift.inputs", "psi": 0.4},
        "dedup_key": "verification:drift.inputs",
    }  # fmt: skip
    svc.start()
    try:
        tee.event("incident", "verification check drift.inputs fail", severity="warning", attrs=attrs)
        _wait(svc)
        clock.advance(timedelta(hours=12))  # long unseen: still open (nothing resolved it)
        tee.event("incident", "verification check drift.inputs fail", severity="warning", attrs=attrs)
        _wait(svc)
        assert svc.responder is not None and len(svc.responder.tracker.open_incidents()) == 1
        tee.event(
            "incident_resolved",
            "verification check drift.inputs passes again",
            attrs={
                "source": "verification",
                "check": "drift.inputs",
                "dedup_key": "verification:drift.inputs",
            },
        )
        _wait(svc)
        assert svc.responder.tracker.open_incidents() == []
    finally:
        svc.stop()
    (closed,) = [r.data for r in audit.records() if r.event == "incident.closed"]
    assert "passes again" in closed["why"]


def test_a_failed_action_raises_an_alert_and_an_escalation(tmp_path: Path) -> None:
    paths, clock, audit, _src, _rec = _device(tmp_path)
    sink = MemorySink()
    settings = AgentSettings.model_validate({"state_dir": str(paths.root), "llm": {"enabled": False}})
    slots = SlotManager(paths, audit, clock)

    def broken_rollback(_inc: object) -> str:
        raise RuntimeError("the slot lock is held by a stuck install")

    svc = ResponderService(
        paths,
        clock,
        lambda: build_responder(
            paths,
            settings,
            clock=clock,
            audit=audit,
            handlers={Action.ROLLBACK: broken_rollback},
            telemetry=sink,
        ),
        lambda: slots,
    )
    tee = IncidentTee(lambda: sink, svc.submit, svc.resolved)
    svc.start()
    try:
        _integrity_event(tee, active_ok=False, standby_ok=True)
        _wait(svc)
    finally:
        svc.stop()
    acts = [(r.data["action"], r.data["ok"]) for r in audit.records() if r.event == "triage.action"]
    assert ("rollback", False) in acts and ("alert", True) in acts
    assert any(e[0] == "incident.alert" for e in sink.events)
    (esc,) = EscalationStore(escalations_dir(paths), audit, clock).select(EscalationStatus.OPEN)
    assert esc.proposed_action == "safe_mode"  # the next allowed action; safe mode always needs a human

    # What the operator sees: `sre-agent status` (JSON and table) shows the incident and the escalation.
    exe = Path(sys.executable).parent / "sre-agent"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRE_AGENT_")}
    doc = json.loads(
        subprocess.run(
            [str(exe), "status", "--json", "--state", str(paths.root)],
            env=env, capture_output=True, text=True, timeout=120, check=True,
        ).stdout
    )  # fmt: skip
    (inc,) = doc["open_incidents"]
    assert inc["kind"] == "verification_failure" and inc["failed"] == ["rollback"]
    assert inc["escalation"] == esc.id and [p["id"] for p in doc["pending_escalations"]] == [esc.id]
    assert doc["failing_checks"] and "integrity.slots" in doc["failing_checks"][0]
    table = subprocess.run(
        [str(exe), "status", "--state", str(paths.root)],
        env=env | {"COLUMNS": "200"}, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "open incidents" in table and esc.id in table and "integrity.slots" in table


def test_fingerprints_tell_slos_experiments_checks_and_slots_apart() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def fp(kind: str, facts: dict[str, object], source: str) -> str:
        attrs = {"source": source, "incident_kind": kind, "modules": ["clf"], "facts": facts}
        inc = incident_from_event("x", "warning", attrs, now)
        assert inc is not None
        return inc.fingerprint

    assert fp("slo_burn", {"slo": "sync.since_last_ack_s"}, "slo") != fp(
        "slo_burn", {"slo": "policy.age_s"}, "slo"
    )
    chaos_a = fp("chaos_deviation", {"experiment": "a.yaml"}, "chaos")
    assert chaos_a != fp("chaos_deviation", {"experiment": "b.yaml"}, "chaos")
    slots_a = fp("verification_failure", {"check": "integrity.slots", "slot": "active"}, "verification")
    assert slots_a != fp(
        "verification_failure", {"check": "integrity.slots", "slot": "standby"}, "verification"
    )
    # the same SLO breach again is the same problem
    assert fp("slo_burn", {"slo": "policy.age_s", "value": 1.0}, "slo") == fp(
        "slo_burn", {"slo": "policy.age_s", "value": 2.0}, "slo"
    )


def test_operator_safe_mode_holds_across_reconciles_until_exit_or_a_newer_serial(tmp_path: Path) -> None:
    paths, clock, audit, src, rec = _device(tmp_path)
    slots = SlotManager(paths, audit, clock)
    handlers = DaemonHandlers(paths, clock, audit, MemorySink(), lambda: slots)
    inc = incident_from_event(
        "probes keep failing",
        "critical",
        {"source": "probe", "incident_kind": "probe_failure", "modules": ["clf"]},
        clock.now(),
    )
    assert inc is not None
    handlers.safe_mode(inc)  # an approved escalation executes the daemon's safe-mode handler
    assert read_safe_mode(paths).serial_at_entry == 2
    for _ in range(3):
        clock.advance(timedelta(seconds=30))
        rec.run_once()
        assert read_safe_mode(paths).active, "safe mode was left by a reconcile with the same serial"
    src.set(list(src.arts.values()), serial=3)  # a signed desired state with a higher serial
    rec.run_once()
    assert not read_safe_mode(paths).active


class _Crash(BaseException):
    """Stands for kill -9 inside a handler: nothing after it runs (not even the executor's bookkeeping)."""


@pytest.mark.parametrize("when", ["before the flip", "after the flip", "before, then start-up fallback"])
def test_an_action_interrupted_by_a_crash_is_finished_once_after_restart(tmp_path: Path, when: str) -> None:
    """The daemon dies in the middle of a rollback (before or after the flip). On restart the responder
    finishes the interrupted action once through the same idempotent handler: the device rolls back
    exactly once (a second flip would serve the corrupted bytes again) and the incident is closed."""
    paths, clock, audit, _src, _rec = _device(tmp_path)
    _corrupt_active(paths, audit, clock)
    slots = SlotManager(paths, audit, clock)
    settings = AgentSettings.model_validate({"state_dir": str(paths.root), "llm": {"enabled": False}})
    real = DaemonHandlers(paths, clock, audit, MemorySink(), lambda: slots).table()

    def dying_rollback(inc: Incident) -> str:
        if when == "after the flip":
            real[Action.ROLLBACK](inc)
        raise _Crash

    first = ResponderService(
        paths,
        clock,
        lambda: build_responder(
            paths, settings, clock=clock, audit=audit, handlers={Action.ROLLBACK: dying_rollback}
        ),
        lambda: slots,
    )
    first.start()
    with pytest.raises(_Crash):
        first.handle(_signal(slots))
    first._stop.set()
    assert json.loads(incidents_file(paths).read_text())["incidents"][0]["acting"] == "rollback"
    if when == "before, then start-up fallback":  # the slot manager found the active corrupt on start
        slots.rollback("clf", reason="active slot failed its re-hash", mark_bad=False)

    again = ResponderService(
        paths,
        clock,
        lambda: build_responder(paths, settings, clock=clock, audit=audit, handlers=real),
        lambda: slots,
    )
    again.start()  # resumes the interrupted rollback before anything new
    again.stop()
    events = [r.event for r in audit.records()]
    assert events.count("slot.rolled_back") == 1, events
    assert "incident.interrupted_action" in events and "incident.resumed" in events
    st = slots.status("clf")
    assert st.active is not None and st.active.version == "1.0"
    assert any(b["version"] == "2.0" for b in st.bad.values())  # blocked, whoever moved off it
    assert again.responder is not None and again.responder.tracker.open_incidents() == []


def _signal(slots: SlotManager) -> IncidentSignal:
    from sre_agent.incidents import IncidentSignal

    sig = IncidentSignal.from_event(
        "verification check integrity.slots fail",
        "critical",
        {
            "source": "verification",
            "incident_kind": "verification_failure",
            "check": "integrity.slots",
            "modules": ["clf"],
            "facts": {"check": "integrity.slots"},
            "dedup_key": "verification:integrity.slots",
            "evidence": {"clf/active": {"ok": False}, "clf/standby": {"ok": True}},
        },
        datetime.now(UTC),
    )
    assert sig is not None
    return sig


@dataclass
class _Store:
    """The telemetry store's two figures the sync SLOs read (a one-method seam each)."""

    acked_us: int

    def pending(self) -> list[object]:
        return []

    def last_ack_us(self) -> int:
        return self.acked_us


@dataclass
class _Telemetry:
    store: _Store


def test_an_slo_burning_after_a_flip_carries_its_facts_and_closes_when_met(tmp_path: Path) -> None:
    """The SLO job's incident names the SLO, its burn rate and the versions; the responder adds the time
    since the flip; the same job resolves it once the SLO is met again."""
    from sre_agent.jobs import SloJob

    paths, clock, audit, _src, _rec = _device(tmp_path)
    slots = SlotManager(paths, audit, clock)
    settings = AgentSettings.model_validate({"state_dir": str(paths.root), "llm": {"enabled": False}})
    sink = MemorySink()
    svc = ResponderService(
        paths,
        clock,
        lambda: build_responder(paths, settings, clock=clock, audit=audit),
        lambda: slots,
        sink=sink,
    )
    tel = _Telemetry(_Store(int(clock.now().timestamp() * 1e6)))
    job = SloJob(paths, clock, tel, sink, lambda: slots, svc.report, svc.resolve)  # type: ignore[arg-type]
    svc.start()
    try:
        clock.advance(timedelta(days=3))  # no upload acknowledged for three days: the sync SLO burns
        job()
        _wait(svc)
        (opened,) = [r.data for r in audit.records() if r.event == "incident.opened"]
        facts = opened["facts"]
        assert opened["kind"] == "slo_burn" and facts["slo"] == "sync.since_last_ack_s"
        assert facts["burn_rate"] > 1 and facts["versions"] == "clf=2.0" and facts["since_flip_s"] >= 0
        tel.store.acked_us = int(clock.now().timestamp() * 1e6)  # the hub acknowledges an upload
        job()
        _wait(svc)
        assert svc.responder is not None and svc.responder.tracker.open_incidents() == []
    finally:
        svc.stop()
    assert any(r.event == "incident.closed" and "met again" in r.data["why"] for r in audit.records())


@pytest.mark.parametrize("check", ["drift.inputs", "integrity.slots"])
def test_on_start_an_incident_about_a_version_that_no_longer_serves_is_closed(
    tmp_path: Path, check: str
) -> None:
    """The daemon died after opening an incident; on restart the slot manager's own fallback (or an
    operator) had already moved the module off that version: the incident does not stay open forever,
    and a version whose bytes were found corrupt is blocked (else the next reconcile installs it again)."""
    paths, clock, audit, _src, _rec = _device(tmp_path)
    slots = SlotManager(paths, audit, clock)
    settings = AgentSettings.model_validate({"state_dir": str(paths.root), "llm": {"enabled": False}})

    handlers = DaemonHandlers(paths, clock, audit, MemorySink(), lambda: slots).table()

    def service() -> ResponderService:
        return ResponderService(
            paths,
            clock,
            lambda: build_responder(paths, settings, clock=clock, audit=audit, handlers=handlers),
            lambda: slots,
        )

    first = service()
    first.start()
    first.responder.executor.handlers.clear()  # type: ignore[union-attr]  # killed before acting
    tee = IncidentTee(MemorySink, first.submit, first.resolved)
    tee.event(
        "incident",
        f"verification check {check} fail",
        attrs={"source": "verification", "check": check, "modules": ["clf"]},
    )
    _wait(first)
    first.stop()
    assert first.responder is not None and first.responder.tracker.open_incidents()[0].version == "2.0"
    slots.rollback("clf", reason="operator", actor="operator", mark_bad=False)
    again = service()
    again.start()
    again.stop()
    assert again.responder is not None and again.responder.tracker.open_incidents() == []
    assert any(r.event == "incident.closed" and "no longer serves" in r.data["why"] for r in audit.records())
    blocked = any(b["version"] == "2.0" for b in slots.status("clf").bad.values())
    assert blocked is (check == "integrity.slots")


def _reactions(audit: AuditLog, since: int) -> list[str]:
    """What the responder did about one occurrence (audit records after index ``since``): an alert, an
    escalation created, or the occurrence joined to an escalation an operator still has."""
    out = []
    for r in list(audit.records())[since:]:
        if r.event == "triage.action" and r.data.get("action") == "alert" and r.data.get("ok"):
            out.append("alert")
        elif r.event == "escalation.created":
            out.append("escalated")
        elif r.event == "incident.recurred" and r.data.get("escalation"):
            out.append("joined " + str(r.data["escalation"]))
    return out


def test_a_fault_that_recurs_after_its_incident_closed_is_acted_on_every_time(tmp_path: Path) -> None:
    """How it broke: the standby slot's bytes are corrupted, the check fails (an alert), the bytes are
    restored, the check passes (closed), then the same corruption again: every later occurrence within
    the cooldown was dropped as "suppressed" (1 reaction for 10 faults). Each occurrence must now be
    alerted on, and a fault that keeps coming back goes to a human once (later occurrences join it)."""
    paths, clock, audit, _src, _rec = _device(tmp_path)
    sink = MemorySink()
    slots = SlotManager(paths, audit, clock)
    settings = AgentSettings.model_validate({"state_dir": str(paths.root), "llm": {"enabled": False}})
    handlers = DaemonHandlers(paths, clock, audit, sink, lambda: slots).table()
    svc = ResponderService(
        paths,
        clock,
        lambda: build_responder(paths, settings, clock=clock, audit=audit, handlers=handlers),
        lambda: slots,
    )
    tee = IncidentTee(lambda: sink, svc.submit, svc.resolved)
    resolved = {
        "source": "verification",
        "check": "integrity.slots",
        "dedup_key": "verification:integrity.slots",
    }
    per_occurrence: list[list[str]] = []
    svc.start()
    try:
        for _ in range(6):
            mark = len(list(audit.records()))
            _integrity_event(tee, active_ok=True, standby_ok=False)  # the standby corrupted again
            _wait(svc)
            tee.event("incident_resolved", "integrity.slots passes again", attrs=resolved)  # restored
            _wait(svc)
            per_occurrence.append(_reactions(audit, mark))
            clock.advance(timedelta(minutes=2))
    finally:
        svc.stop()
    assert all(per_occurrence), per_occurrence  # every occurrence handled or escalated
    assert [r[0] for r in per_occurrence[:3]] == ["alert"] * 3, per_occurrence
    assert "escalated" in per_occurrence[3], per_occurrence  # the 4th within the hour: flapping
    (esc,) = EscalationStore(escalations_dir(paths), audit, clock).select(EscalationStatus.OPEN)
    assert all(f"joined {esc.id}" in r for r in per_occurrence[4:]), per_occurrence
    recurred = [r.data for r in audit.records() if r.event == "incident.recurred"]
    assert [r["occurrences"] for r in recurred] == [2, 3, 4, 5, 6]
    st = slots.status("clf")
    assert st.active is not None and st.active.version == "2.0" and not st.bad  # nothing rolled back


def test_a_fault_that_follows_every_version_escalates_instead_of_rolling_back_forever(
    tmp_path: Path,
) -> None:
    """How it breaks: something keeps corrupting whatever version is active; each new version is another
    fingerprint, so each corruption is "new" and is rolled back, forever. After ``MAX_FAMILY_FIXES``
    fixes for the same problem within the window the next one waits for a human (with an alert)."""
    from sre_agent.respond import MAX_FAMILY_FIXES

    paths, clock, audit, src, rec = _device(tmp_path)
    sink = MemorySink()
    slots = SlotManager(paths, audit, clock)
    settings = AgentSettings.model_validate({"state_dir": str(paths.root), "llm": {"enabled": False}})
    handlers = DaemonHandlers(paths, clock, audit, sink, lambda: slots).table()
    svc = ResponderService(
        paths,
        clock,
        lambda: build_responder(paths, settings, clock=clock, audit=audit, handlers=handlers),
        lambda: slots,
    )
    tee = IncidentTee(lambda: sink, svc.submit, svc.resolved)
    cas = tmp_path / "cas"
    svc.start()
    try:
        for i in range(MAX_FAMILY_FIXES + 1):
            if i:  # the hub releases a fix; the device installs and promotes it
                version = f"{3 + i}.0"
                src.set([make_artifact(cas, "clf", version, linear_classifier(seed=3 + i))], serial=2 + i)
                rec.run_once()
                assert slots.status("clf").active.version == version  # type: ignore[union-attr]
            _corrupt_active(paths, audit, clock)
            _integrity_event(tee, active_ok=False, standby_ok=True)
            _wait(svc)
            clock.advance(timedelta(minutes=5))
    finally:
        svc.stop()
    events = [r.event for r in audit.records()]
    assert events.count("slot.rolled_back") == MAX_FAMILY_FIXES, events
    (esc,) = EscalationStore(escalations_dir(paths), audit, clock).select(EscalationStatus.OPEN)
    assert esc.proposed_action == "rollback"  # the fix the rule would have run, for a human to approve
    last = [r.data for r in audit.records() if r.event == "triage.decision"][-1]
    assert last["verdict"] == "escalate" and any("flapping" in why for why in last["reasons"]), last
    assert last["execute_now"] == ["alert"]
