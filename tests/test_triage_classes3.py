"""Classes of incident the third independent corpus (``benchmarks/triage_holdout3``) found the rules wrong on.

Each test is written from the class with its own incidents (not copies of the corpus cases) and failed on
the rules before the change it covers:
- a candidate the device already blocked (the canary aborted it, a reconcile rolled it back; its version
  is marked bad) was quarantined again, a no-op, even on thin evidence; what is left is telling a person.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from policies.triage import Action, default_triage_policy
from sre_agent.incidents import Evidence, Incident, IncidentKind, Severity, SlotStatus
from sre_agent.triage import TriageEngine, device_facts, unavailable_actions

SERVING = "7.2.0"
LKG = {
    "active_version": SERVING,
    "standby_version": "7.1.4",
    "standby_verified": True,
    "last_known_good": "7.1.4",
}
CANDIDATE_IN_STANDBY = {"active_version": SERVING, "standby_version": "7.3.0", "standby_verified": False}


@pytest.fixture(scope="module")
def engine() -> TriageEngine:
    return TriageEngine(default_triage_policy())


def _inc(
    kind: IncidentKind, facts: dict[str, Any], slot: dict[str, Any], version: str | None = SERVING
) -> Incident:
    return Incident(
        id="inc-c3",
        kind=kind,
        module="segmenter",
        version=version,
        severity=Severity.CRITICAL,
        opened_at=datetime(2026, 6, 1, tzinfo=UTC),
        facts=facts,
        evidence=Evidence(slot=SlotStatus(**slot)),
    )


# --- a candidate the device already blocked ------------------------------------------------------------

BLOCKED_BY = [
    {"bad_versions": "7.0.9, 7.3.0"},
    {"standby_bad": True},
    {"bad_versions": "7.3.0", "standby_bad": True},
]
ABORTS = [
    (IncidentKind.CANARY_ABORT, {"gate": "error_rate", "samples": 5000}),
    (IncidentKind.CANARY_ABORT, {"gate": "latency", "samples": 9}),
    (IncidentKind.CANARY_ABORT, {"gate": "divergence", "samples": 700}),
    (IncidentKind.CANARY_ABORT, {}),  # refused before any gate ran
    (IncidentKind.PROBE_FAILURE, {"rolled_back": True, "slot": "standby"}),
]


@pytest.mark.parametrize("blocked", BLOCKED_BY)
@pytest.mark.parametrize(("kind", "facts"), ABORTS)
def test_a_candidate_already_blocked_is_told_not_quarantined_again(
    engine: TriageEngine, blocked: dict[str, Any], kind: IncidentKind, facts: dict[str, Any]
) -> None:
    base = {**facts, "version": "7.3.0", "active_serving": True, "chaos_active": False}
    inc = _inc(kind, {**base, **blocked}, CANDIDATE_IN_STANDBY, version="7.3.0")
    assert device_facts(inc).version_blocked
    assert Action.QUARANTINE in unavailable_actions(inc)
    d = engine.decide(inc)
    assert (d.action, d.verdict) == (Action.ALERT, "execute"), d.rule
    assert Action.QUARANTINE not in d.allowed
    # the same abort of a candidate nothing blocked yet is still blocked by the rules
    fresh = _inc(kind, base, CANDIDATE_IN_STANDBY, version="7.3.0")
    assert not device_facts(fresh).version_blocked
    assert engine.decide(fresh).action == Action.QUARANTINE


@pytest.mark.parametrize("targets", ["cpu", "memory", "serving"])
def test_an_experiment_changes_nothing_for_a_canary_that_is_over(engine: TriageEngine, targets: str) -> None:
    facts = {"gate": "latency", "samples": 80, "version": "7.3.0", "bad_versions": "7.3.0"}
    running = {**facts, "chaos_active": True, "chaos_targets": targets}
    inc = _inc(IncidentKind.CANARY_ABORT, running, CANDIDATE_IN_STANDBY, version="7.3.0")
    assert (engine.decide(inc).action, engine.decide(inc).verdict) == (Action.ALERT, "execute")


def test_a_blocked_version_that_serves_is_still_quarantined_by_rolling_back(engine: TriageEngine) -> None:
    """Quarantining the version that serves is a rollback: a bad mark on it is no reason to skip it."""
    facts = {"slot": "active", "consecutive_failures": 5, "active_serving": False, "bad_versions": SERVING}
    inc = _inc(IncidentKind.PROBE_FAILURE, facts, LKG)
    assert not device_facts(inc).version_blocked
    assert engine.decide(inc).action == Action.ROLLBACK


def test_a_blocked_candidate_with_the_model_down_still_outranks(engine: TriageEngine) -> None:
    facts = {"version": "7.3.0", "bad_versions": "7.3.0", "rolled_back": True, "active_serving": False}
    inc = _inc(IncidentKind.PROBE_FAILURE, facts, CANDIDATE_IN_STANDBY, version="7.3.0")
    d = engine.decide(inc)
    assert (d.action, d.verdict) == (Action.SAFE_MODE, "escalate")
