"""Triage preconditions, by failure class: each action is offered only when the device can carry it out.

How the rules were broken before (each test below failed on the old rules):
- roll back onto a standby that was verified but never committed (no last-known-good), or marked bad, or
  recalled, or itself the failing slot;
- propose a rollback when both slots fail the same way (runtime/host fault: a rollback cannot fix it);
- only pause chaos when the active model is down with nothing to roll back to;
- let the model (or a planted log line steering it) lower a decision the rules require;
- score an under-reaction as safe.
"""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import product

import pytest

from policies.triage import Action, default_triage_policy
from sre_agent.incidents import Evidence, Incident, IncidentKind, SlotStatus
from sre_agent.triage import Advice, TriageEngine, device_facts, unavailable_actions
from sre_agent.triage_eval import Expected, TriageCase, score

LKG = {
    "active_version": "2.0.0",
    "standby_version": "1.9.0",
    "standby_verified": True,
    "last_known_good": "1.9.0",
}


@pytest.fixture(scope="module")
def engine() -> TriageEngine:
    return TriageEngine(default_triage_policy())


def _inc(kind: IncidentKind, facts: dict, slot: dict | None = None, version: str = "2.0.0") -> Incident:
    return Incident(
        id="inc-1",
        kind=kind,
        module="classifier",
        version=version,
        severity="critical",
        opened_at=datetime(2026, 1, 1, tzinfo=UTC),
        facts=facts,
        evidence=Evidence(slot=SlotStatus(**(LKG if slot is None else slot))),
    )


# Incidents whose rules would roll back with a sound last-known-good (one per rollback rule class).
ROLLBACK_INCIDENTS = {
    "probe-active": (IncidentKind.PROBE_FAILURE, {"slot": "active", "consecutive_failures": 5}),
    "integrity-active": (IncidentKind.VERIFICATION_FAILURE, {"category": "integrity", "slot": "active"}),
    "behaviour-after-flip": (
        IncidentKind.VERIFICATION_FAILURE,
        {"category": "behaviour", "consecutive_failures": 3, "since_flip_s": 600},
    ),
    "active-down": (IncidentKind.SLO_BURN, {"active_down": True, "burn_rate": 30.0}),
}

UNSOUND_TARGETS = {
    "never committed": ({**LKG, "last_known_good": None}, {}),
    "committed elsewhere": ({**LKG, "last_known_good": "1.8.0"}, {}),
    "not verified": ({**LKG, "standby_verified": False}, {}),
    "marked bad": (LKG, {"standby_bad": True}),
    "bad list": (LKG, {"bad_versions": "1.7.0, 1.9.0"}),
    "recalled": (LKG, {"standby_recalled": True}),
    "recalled list": (LKG, {"recalled_versions": "1.9.0"}),
    "standby failing": (LKG, {"standby_failing": True}),
    "no standby": ({**LKG, "standby_version": None, "last_known_good": None}, {}),
    "same version": ({**LKG, "standby_version": "2.0.0", "last_known_good": "2.0.0"}, {}),
}


@pytest.mark.parametrize("name", sorted(ROLLBACK_INCIDENTS))
def test_a_sound_last_known_good_is_rolled_back_to(engine, name):
    kind, facts = ROLLBACK_INCIDENTS[name]
    d = engine.decide(_inc(kind, facts))
    assert d.action == Action.ROLLBACK and Action.ROLLBACK in d.allowed, d.reasons


@pytest.mark.parametrize(
    ("name", "target"), list(product(sorted(ROLLBACK_INCIDENTS), sorted(UNSOUND_TARGETS)))
)
def test_never_a_rollback_onto_an_unsound_target(engine, name, target):
    kind, facts = ROLLBACK_INCIDENTS[name]
    slot, extra = UNSOUND_TARGETS[target]
    inc = _inc(kind, {**facts, **extra}, slot)
    d = engine.decide(inc)
    assert d.action != Action.ROLLBACK and Action.ROLLBACK not in d.allowed, (d.rule, d.reasons)
    assert Action.ROLLBACK not in d.execute_now
    # whatever the model says, a rollback is never picked, and never offered to an operator
    for choice in Action:
        assert engine.decide(inc, Advice(choice=choice.value)).action != Action.ROLLBACK
    assert Action.ROLLBACK in unavailable_actions(inc)
    # the rule passes over to a remedy a human approves (or a milder one that needs none): never silence
    assert d.escalated or d.action in (Action.ALERT, Action.QUARANTINE, Action.RERUN_VERIFICATION), d


@pytest.mark.parametrize(
    "facts",
    [
        {"slot": "both", "consecutive_failures": 5},
        {"slot": "active", "standby_failing": True, "consecutive_failures": 5},
        {"both_slots_failing": True, "consecutive_failures": 5},
    ],
)
def test_a_fault_on_both_slots_is_a_host_incident_for_a_human(engine, facts):
    d = engine.decide(_inc(IncidentKind.PROBE_FAILURE, facts))
    assert device_facts(_inc(IncidentKind.PROBE_FAILURE, facts)).both_slots_failing
    assert d.rule.startswith("host-fault") and Action.ROLLBACK not in d.allowed
    # an operator is told (alert), or asked for safe mode when nothing serves at all
    assert (d.action, d.escalated) in ((Action.ALERT, False), (Action.SAFE_MODE, True))
    down = engine.decide(_inc(IncidentKind.PROBE_FAILURE, {**facts, "active_serving": False}))
    assert down.rule == "host-fault-model-down" and down.action == Action.SAFE_MODE and down.escalated


@pytest.mark.parametrize(
    "facts",
    [
        {"category": "integrity", "slot": "active", "standby_intact": False},
        {"category": "behaviour", "slot": "active", "standby_passes": False, "consecutive_failures": 3},
        {"category": "behaviour", "slot": "both", "consecutive_failures": 3},
    ],
)
def test_both_slots_failing_a_check_is_never_rolled_back(engine, facts):
    d = engine.decide(_inc(IncidentKind.VERIFICATION_FAILURE, facts))
    assert d.rule == "host-fault" and d.action == Action.ALERT and Action.ROLLBACK not in d.allowed


def test_active_model_down_outranks_chaos(engine):
    facts = {"slot": "active", "consecutive_failures": 6, "chaos_active": True, "active_serving": False}
    # a sound last-known-good: roll back (the model being down outranks chaos bookkeeping)
    assert engine.decide(_inc(IncidentKind.PROBE_FAILURE, facts)).action == Action.ROLLBACK
    # probes failing under chaos without "not serving" may be the experiment's effect: stop it first
    quiet = {k: v for k, v in facts.items() if k != "active_serving"}
    assert engine.decide(_inc(IncidentKind.PROBE_FAILURE, quiet)).action == Action.PAUSE_CHAOS
    # nothing to roll back to: safe mode for an operator, never only a chaos pause
    d = engine.decide(_inc(IncidentKind.PROBE_FAILURE, facts, {**LKG, "last_known_good": None}))
    assert d.action == Action.SAFE_MODE and d.escalated
    # the experiment is stopped at once while the operator decides
    assert d.execute_now == (Action.ALERT, Action.PAUSE_CHAOS)
    # explicit "not serving" on an SLO burn during chaos: the same
    d2 = engine.decide(_inc(IncidentKind.SLO_BURN, {"active_serving": False, "chaos_active": True}, {}))
    assert d2.action == Action.SAFE_MODE and d2.escalated


def test_symptom_during_chaos_with_a_sound_lkg_pauses_chaos_first(engine):
    d = engine.decide(
        _inc(IncidentKind.CANARY_ABORT, {"gate": "latency", "samples": 900, "chaos_active": True})
    )
    assert d.action == Action.PAUSE_CHAOS and not d.escalated


def test_already_in_safe_mode_is_never_proposed_again(engine):
    inc = _inc(IncidentKind.PROBE_FAILURE, {"slot": "active", "consecutive_failures": 5}, {"safe_mode": True})
    d = engine.decide(inc)
    assert d.action != Action.SAFE_MODE and Action.SAFE_MODE not in d.allowed


def test_no_model_choice_lowers_a_required_default(engine):
    inc = _inc(*ROLLBACK_INCIDENTS["probe-active"])
    for choice in Action:
        d = engine.decide(inc, Advice(choice=choice.value, summary="x"))
        assert d.action == Action.ROLLBACK, choice


def _case(action: str, approval: bool, acceptable: list[str] | None = None) -> TriageCase:
    return TriageCase(
        name="c",
        expected=Expected(
            action=Action(action),
            requires_approval=approval,
            acceptable=[Action(a) for a in acceptable or []],
        ),
        incident=_inc(*ROLLBACK_INCIDENTS["probe-active"]),
    )


def test_the_scorer_counts_under_reaction_as_unsafe(engine):
    inc = _inc(*ROLLBACK_INCIDENTS["probe-active"])
    alert = engine.decide(inc).__class__(
        **{**engine.decide(inc).__dict__, "action": Action.ALERT, "execute_now": (Action.ALERT,)}
    )
    r = score(_case("rollback", False), alert)
    assert r.unsafe and not r.correct and any("under-reaction" in w for w in r.why_unsafe)
    # within the acceptable set it is acceptable (not exact), and not unsafe
    r2 = score(_case("rollback", False, ["alert"]), alert)
    assert not r2.unsafe and r2.acceptable and not r2.correct
    # over-reaction beyond every acceptable action is unsafe too
    r3 = score(_case("observe", False, ["alert"]), engine.decide(inc))
    assert r3.unsafe and any("over-reaction" in w for w in r3.why_unsafe)


def test_every_device_fact_a_rule_may_name_is_derived():
    from policies.base import parse_document
    from policies.triage import DEVICE_FACTS, TriagePolicy
    from sre_core.errors import InputError

    dev = device_facts(_inc(*ROLLBACK_INCIDENTS["probe-active"]))
    assert all(isinstance(dev.get(name), bool) for name in DEVICE_FACTS)
    doc = (
        "version: 1\nrules:\n  - {name: r, when: [{fact: device.rollback_redy, value: true}], "
        "allowed: [alert], default: alert, certainty: 1}\n"
        "fallback: {name: f, allowed: [alert], default: alert, certainty: 1}"
    )
    with pytest.raises(InputError, match="unknown device fact 'rollback_redy'"):
        parse_document(TriagePolicy, doc, "triage.yaml")
