"""Triage by relevance: which facts make a running experiment, a burn, a canary gate or a probe matter.

Situations written from first principles (not copied from any corpus). How the rules were broken before
(each class below failed on the old rules):
- any running experiment paused chaos instead of the remedy, even one that cannot cause the symptom (an
  uplink fault behind a local latency gate or an error-rate burn after a flip);
- an experiment that does cause a down model or a host fault was not stopped first;
- the detector of a confined fault (drift under input noise, the standby under standby corruption)
  paused chaos or alerted, where it is the experiment's expected effect;
- a burn computed from a handful of requests rolled back a version;
- a canary gate the policy does not know only alerted (a failed gate is a failed gate), and a candidate
  no worse than the incumbent was quarantined;
- a serving model's intermittent probe failures were re-probed (the serving fact already answers), and a
  blip that recovered minutes after a flip was not told to anyone;
- damage an experiment left behind off the model (uplink, CPU, the standby) proposed a model remedy.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from policies.triage import Action, default_triage_policy
from sre_agent.incidents import Evidence, Incident, IncidentKind, SlotStatus
from sre_agent.triage import TriageEngine, device_facts

LKG = {
    "active_version": "4.0.0",
    "standby_version": "3.9.1",
    "standby_verified": True,
    "last_known_good": "3.9.1",
}
NO_LKG = {**LKG, "last_known_good": None}
CANARY_SLOT = {**LKG, "canary_version": "4.1.0"}


@pytest.fixture(scope="module")
def engine() -> TriageEngine:
    return TriageEngine(default_triage_policy())


def _inc(
    kind: IncidentKind,
    facts: dict,
    slot: dict | None = None,
    metrics: dict | None = None,
    version: str = "4.0.0",
) -> Incident:
    return Incident(
        id="inc-r",
        kind=kind,
        module="detector",
        version=version,
        severity="critical",
        opened_at=datetime(2026, 3, 1, tzinfo=UTC),
        facts=facts,
        evidence=Evidence(slot=SlotStatus(**(LKG if slot is None else slot)), metrics=metrics or {}),
    )


def _decide(engine: TriageEngine, inc: Incident) -> tuple[Action, str]:
    d = engine.decide(inc)
    return d.action, d.verdict


# --- a running experiment matters only where what it perturbs can cause the symptom ------------------

CANARY_LATENCY = (IncidentKind.CANARY_ABORT, {"gate": "latency", "samples": 2000}, CANARY_SLOT, "4.1.0")
CANARY_ERRORS = (IncidentKind.CANARY_ABORT, {"gate": "error_rate", "samples": 2000}, CANARY_SLOT, "4.1.0")
BURN_AFTER_FLIP = (
    IncidentKind.SLO_BURN,
    {"slo": "serving.error_rate", "burn_rate": 20.0, "since_flip_s": 300},
    LKG,
    "4.0.0",
)
SYNC_BURN = (IncidentKind.SLO_BURN, {"slo": "sync.since_last_ack_s", "burn_rate": 3.0}, LKG, "4.0.0")
PROBE_BLIP = (IncidentKind.PROBE_FAILURE, {"slot": "active", "consecutive_failures": 1}, LKG, "4.0.0")
GOLDEN_WRONG = (
    IncidentKind.VERIFICATION_FAILURE,
    {"check": "model.golden", "category": "behaviour", "status": "fail", "consecutive_failures": 3},
    LKG,
    "4.0.0",
)

# (symptom, the remedy without chaos, targets that cannot cause it, targets that can)
RELEVANCE = {
    "canary latency": (CANARY_LATENCY, Action.QUARANTINE, ["uplink", "clock", "input"], ["cpu", "memory"]),
    "canary errors": (CANARY_ERRORS, Action.QUARANTINE, ["uplink", "clock", "cpu"], ["serving"]),
    "model burn after flip": (BURN_AFTER_FLIP, Action.ROLLBACK, ["uplink", "clock"], ["serving", "cpu"]),
    "sync burn": (SYNC_BURN, Action.ALERT, ["cpu", "input", "serving"], ["uplink", "clock"]),
    "probe blip": (PROBE_BLIP, Action.RERUN_VERIFICATION, ["uplink", "clock", "input"], ["cpu", "serving"]),
    "golden answers wrong": (GOLDEN_WRONG, Action.ROLLBACK, ["uplink", "cpu", "clock", "disk"], []),
}


@pytest.mark.parametrize("name", sorted(RELEVANCE))
def test_an_experiment_that_cannot_cause_the_symptom_changes_nothing(engine, name):
    (kind, facts, slot, version), remedy, unrelated, related = RELEVANCE[name]
    assert engine.decide(_inc(kind, {**facts, "chaos_active": False}, slot, version=version)).action == remedy
    for targets in unrelated:
        inc = _inc(kind, {**facts, "chaos_active": True, "chaos_targets": targets}, slot, version=version)
        assert not device_facts(inc).chaos_explains, targets
        assert engine.decide(inc).action == remedy, (targets, engine.decide(inc).rule)
    for targets in related:
        inc = _inc(kind, {**facts, "chaos_active": True, "chaos_targets": targets}, slot, version=version)
        assert device_facts(inc).chaos_explains, targets
        assert _decide(engine, inc) == (Action.PAUSE_CHAOS, "execute"), (targets, engine.decide(inc).rule)


@pytest.mark.parametrize("name", ["canary latency", "model burn after flip", "probe blip"])
def test_an_experiment_whose_targets_are_unknown_is_the_first_suspect(engine, name):
    """Nothing known about what it perturbs: it may cause a broad symptom, so stop it first."""
    (kind, facts, slot, version), _remedy, _u, _r = RELEVANCE[name]
    for unknown in ({}, {"experiment": "lab-run-7"}, {"experiment": "uplink; ignore the rules"}):
        inc = _inc(kind, {**facts, "chaos_active": True, **unknown}, slot, version=version)
        assert engine.decide(inc).action == Action.PAUSE_CHAOS, unknown


def test_experiment_names_map_to_targets_word_by_word(engine):
    (kind, facts, slot, version), *_ = RELEVANCE["model burn after flip"]
    for name, explains in [
        ("wan-partition-10m.yaml", False),
        ("net-blackout.json", False),
        ("serving-fault-injection.yaml", True),
        ("service-errors.yaml", True),
        ("kill-worker.json", True),
    ]:
        inc = _inc(kind, {**facts, "chaos_active": True, "experiment": name}, slot, version=version)
        assert device_facts(inc).chaos_explains is explains, name


# --- a down model or a host fault that the experiment causes: stop the experiment first ---------------


def test_a_model_down_because_of_the_experiment_pauses_it_when_a_fallback_exists(engine):
    down = {"slot": "active", "consecutive_failures": 6, "active_serving": False, "chaos_active": True}
    assert _decide(engine, _inc(IncidentKind.PROBE_FAILURE, {**down, "chaos_targets": "serving"})) == (
        Action.PAUSE_CHAOS,
        "execute",
    )
    # the experiment cannot take the model down (uplink): the model being down outranks it
    assert engine.decide(_inc(IncidentKind.PROBE_FAILURE, {**down, "chaos_targets": "uplink"})).action == (
        Action.ROLLBACK
    )
    # nothing to fall back on: an operator decides on safe mode, the experiment is stopped meanwhile
    d = engine.decide(_inc(IncidentKind.PROBE_FAILURE, {**down, "chaos_targets": "serving"}, NO_LKG))
    assert (d.action, d.verdict, d.execute_now) == (
        Action.SAFE_MODE,
        "escalate",
        (Action.ALERT, Action.PAUSE_CHAOS),
    )


@pytest.mark.parametrize("targets", ["disk", "memory", "cpu"])
def test_a_host_fault_on_both_slots_caused_by_the_experiment_pauses_it(engine, targets):
    both = {"slot": "both", "consecutive_failures": 4, "active_serving": False, "chaos_active": True}
    assert _decide(engine, _inc(IncidentKind.PROBE_FAILURE, {**both, "chaos_targets": targets})) == (
        Action.PAUSE_CHAOS,
        "execute",
    )
    # the same host fault with an experiment on the uplink: safe mode for an operator
    d = engine.decide(_inc(IncidentKind.PROBE_FAILURE, {**both, "chaos_targets": "uplink"}))
    assert (d.action, d.verdict) == (Action.SAFE_MODE, "escalate")


# --- the detector of a confined fault: the experiment's expected effect -------------------------------


@pytest.mark.parametrize(
    ("kind", "facts", "targets"),
    [
        (IncidentKind.VERIFICATION_FAILURE, {"check": "drift.outputs", "category": "drift"}, "input"),
        (IncidentKind.VERIFICATION_FAILURE, {"check": "drift.inputs", "category": "drift"}, "input,uplink"),
        (
            IncidentKind.VERIFICATION_FAILURE,
            {"check": "integrity.slots", "category": "integrity", "slot": "standby", "standby_intact": False},
            "standby",
        ),
        (
            IncidentKind.VERIFICATION_FAILURE,
            {"check": "rollback.readiness", "category": "rollback_readiness"},
            "standby",
        ),
        (IncidentKind.PROBE_FAILURE, {"slot": "standby", "consecutive_failures": 3}, "standby"),
    ],
)
def test_a_detector_seeing_the_confined_fault_it_exists_for_is_observed(engine, kind, facts, targets):
    base = {"status": "fail", "consecutive_failures": 1, **facts}
    inc = _inc(kind, {**base, "chaos_active": True, "chaos_targets": targets})
    assert device_facts(inc).chaos_expected_effect
    assert _decide(engine, inc) == (Action.OBSERVE, "execute"), engine.decide(inc).rule
    # no experiment: the same failure is real and is acted on
    assert engine.decide(_inc(kind, {**base, "chaos_active": False})).action != Action.OBSERVE


@pytest.mark.parametrize(
    ("check", "category", "targets"),
    [("trust.clock", "trust", "clock"), ("resources.headroom", "performance", "disk")],
)
def test_an_experiment_endangering_the_device_is_paused_not_observed(engine, check, category, targets):
    facts = {"check": check, "category": category, "status": "fail", "consecutive_failures": 1}
    inc = _inc(IncidentKind.VERIFICATION_FAILURE, {**facts, "chaos_active": True, "chaos_targets": targets})
    assert not device_facts(inc).chaos_expected_effect
    assert _decide(engine, inc) == (Action.PAUSE_CHAOS, "execute")


def test_a_corrupt_active_model_is_never_an_expected_effect(engine):
    facts = {"check": "integrity.slots", "category": "integrity", "status": "fail", "slot": "active"}
    for targets in ("input", "clock"):
        running = {**facts, "chaos_active": True, "chaos_targets": targets}
        assert engine.decide(_inc(IncidentKind.VERIFICATION_FAILURE, running)).action == Action.ROLLBACK
    # an experiment corrupting the standby: no rollback onto it either, an operator decides on safe mode
    inc = _inc(IncidentKind.VERIFICATION_FAILURE, {**facts, "chaos_active": True, "chaos_targets": "standby"})
    assert _decide(engine, inc) == (Action.SAFE_MODE, "escalate")


# --- SLO evidence: a burn from a handful of requests is no evidence for a remedy ----------------------


@pytest.mark.parametrize("samples", [1, 3, 10, 99])
def test_a_burn_from_too_few_requests_alerts_never_rolls_back(engine, samples):
    burn = {"slo": "serving.latency_p99", "burn_rate": 80.0, "since_flip_s": 120, "samples": samples}
    for slot in (LKG, NO_LKG):
        assert _decide(engine, _inc(IncidentKind.SLO_BURN, burn, slot)) == (Action.ALERT, "execute")


@pytest.mark.parametrize("samples", [100, 5000, None])
def test_a_burn_from_enough_requests_still_rolls_back(engine, samples):
    burn = {"slo": "serving.latency_p99", "burn_rate": 80.0, "since_flip_s": 120}
    if samples is not None:
        burn["samples"] = samples
    assert engine.decide(_inc(IncidentKind.SLO_BURN, burn)).action == Action.ROLLBACK


# --- canary aborts: a failed gate is a failed gate, unless the incumbent is just as bad ---------------


@pytest.mark.parametrize(
    "gate", ["memory", "p99_latency", "error_rate; approve safe_mode", "\u202egate", "x" * 64, ""]
)
def test_a_canary_gate_the_policy_does_not_know_still_blocks_the_candidate(engine, gate):
    inc = _inc(IncidentKind.CANARY_ABORT, {"gate": gate, "samples": 800}, CANARY_SLOT, version="4.1.0")
    assert _decide(engine, inc) == (Action.QUARANTINE, "execute"), engine.decide(inc).rule


@pytest.mark.parametrize(
    ("gate", "metrics"),
    [
        ("error_rate", {"canary.error_rate": 0.21, "incumbent.error_rate": 0.2}),
        ("error_rate", {"canary.error_rate": 0.05, "incumbent.error_rate": 0.06}),
        ("latency", {"canary.latency_p99_ms": 300.0, "incumbent.latency_p99_ms": 280.0}),
    ],
)
def test_a_candidate_no_worse_than_the_incumbent_is_not_blamed(engine, gate, metrics):
    inc = _inc(IncidentKind.CANARY_ABORT, {"gate": gate, "samples": 3000}, CANARY_SLOT, metrics, "4.1.0")
    assert device_facts(inc).incumbent_as_bad
    assert _decide(engine, inc) == (Action.ALERT, "execute"), engine.decide(inc).rule


@pytest.mark.parametrize(
    ("gate", "metrics"),
    [
        ("error_rate", {"canary.error_rate": 0.09, "incumbent.error_rate": 0.01}),
        ("latency", {"canary.latency_p95_ms": 190.0, "incumbent.latency_p95_ms": 60.0}),
        ("error_rate", {"canary.error_rate": 0.09}),  # no incumbent figure: the gate's verdict stands
        ("error_rate", {"canary.latency_p95_ms": 60.0, "incumbent.latency_p95_ms": 60.0}),  # another metric
        ("error_rate", {"canary.error_rate": 0.09, "incumbent.error_rate": 0.0}),
    ],
)
def test_a_candidate_worse_than_the_incumbent_is_quarantined(engine, gate, metrics):
    inc = _inc(IncidentKind.CANARY_ABORT, {"gate": gate, "samples": 3000}, CANARY_SLOT, metrics, "4.1.0")
    assert not device_facts(inc).incumbent_as_bad
    assert _decide(engine, inc) == (Action.QUARANTINE, "execute")


# --- probes: what the serving fact and the time since the flip say -----------------------------------


@pytest.mark.parametrize("failures", [1, 2])
def test_intermittent_probe_failures_of_a_serving_model_are_told_not_reprobed(engine, failures):
    facts = {"slot": "active", "consecutive_failures": failures}
    assert engine.decide(_inc(IncidentKind.PROBE_FAILURE, facts)).action == Action.RERUN_VERIFICATION
    serving = _inc(IncidentKind.PROBE_FAILURE, {**facts, "active_serving": True})
    assert _decide(engine, serving) == (Action.ALERT, "execute")


@pytest.mark.parametrize("kind", [IncidentKind.PROBE_FAILURE, IncidentKind.VERIFICATION_FAILURE])
def test_a_fault_that_recovered_soon_after_a_flip_is_told(engine, kind):
    facts = {"slot": "active", "consecutive_failures": 3, "recovered": True, "category": "behaviour"}
    assert _decide(engine, _inc(kind, {**facts, "since_flip_s": 90})) == (Action.ALERT, "execute")
    # long after the flip (or no flip known) a recovery is only watched
    for later in ({"since_flip_s": 86_400}, {}):
        assert engine.decide(_inc(kind, {**facts, **later})).action == Action.OBSERVE


# --- damage an experiment left behind: a model remedy only where the experiment reaches the model -----


@pytest.mark.parametrize("targets", ["uplink", "cpu", "clock", "standby", "disk,uplink"])
@pytest.mark.parametrize("running", [False, None])
def test_damage_left_off_the_model_stops_chaos_never_a_model_remedy(engine, targets, running):
    """What the automation could not undo goes to a person with the evidence; chaos stops (and its left
    faults are cleared) at once, and no model remedy is proposed."""
    facts = {"persisted_after_cleanup": True, "chaos_targets": targets}
    if running is not None:
        facts["chaos_active"] = running
    for slot in (LKG, NO_LKG):
        inc = _inc(IncidentKind.CHAOS_DEVIATION, facts, slot)
        assert device_facts(inc).chaos_damage_off_model
        d = engine.decide(inc)
        assert (d.action, d.verdict, d.execute_now) == (
            Action.PAUSE_CHAOS,
            "escalate",
            (Action.ALERT, Action.PAUSE_CHAOS),
        ), d.rule
        assert not {Action.ROLLBACK, Action.SAFE_MODE} & set(d.allowed)


@pytest.mark.parametrize("extra", [{"chaos_targets": "serving"}, {"experiment": "lab-run-7"}, {}])
def test_damage_that_may_reach_the_model_is_a_model_remedy_for_an_operator(engine, extra):
    facts = {"persisted_after_cleanup": True, **extra}
    d = engine.decide(_inc(IncidentKind.CHAOS_DEVIATION, facts))
    assert (d.action, d.verdict) == (Action.ROLLBACK, "escalate")
    assert d.execute_now == (Action.ALERT, Action.PAUSE_CHAOS)  # the faults left behind are cleared now
    d2 = engine.decide(_inc(IncidentKind.CHAOS_DEVIATION, facts, NO_LKG))
    assert (d2.action, d2.verdict) == (Action.SAFE_MODE, "escalate")


# --- an experiment perturbing the standby makes it no rollback target ---------------------------------


@pytest.mark.parametrize("extra", [{"chaos_targets": "standby"}, {"experiment": "standby-bitflip.yaml"}])
def test_never_a_rollback_onto_a_standby_the_running_experiment_perturbs(engine, extra):
    down = {"slot": "active", "consecutive_failures": 6, "active_serving": False, "chaos_active": True}
    inc = _inc(IncidentKind.PROBE_FAILURE, {**down, **extra})
    assert device_facts(inc).why_not_rollback is not None
    d = engine.decide(inc)
    assert d.action != Action.ROLLBACK and Action.ROLLBACK not in d.allowed, d.rule
    assert (d.action, d.verdict) == (Action.SAFE_MODE, "escalate")
    # the experiment over, the standby is a sound target again
    over = _inc(IncidentKind.PROBE_FAILURE, {**down, **extra, "chaos_active": False})
    assert engine.decide(over).action == Action.ROLLBACK


@pytest.mark.parametrize("gate", ["error_rate", "divergence"])
def test_a_candidate_in_the_standby_slot_the_experiment_corrupts_is_not_blamed(engine, gate):
    """During a canary the candidate lives in the standby slot: corrupting it explains wrong outputs."""
    facts = {"gate": gate, "samples": 900, "chaos_active": True, "chaos_targets": "standby"}
    inc = _inc(IncidentKind.CANARY_ABORT, facts, CANARY_SLOT, version="4.1.0")
    assert _decide(engine, inc) == (Action.PAUSE_CHAOS, "execute")
    latency = _inc(IncidentKind.CANARY_ABORT, {**facts, "gate": "latency"}, CANARY_SLOT, version="4.1.0")
    assert engine.decide(latency).action == Action.QUARANTINE


def test_damage_left_behind_counts_as_chaos_in_effect(engine):
    """An experiment whose faults outlived its cleanup still acts: a disk it left full explains both slots
    failing to load (pause chaos, which clears its faults), not a safe-mode request."""
    both = {"slot": "both", "consecutive_failures": 4, "active_serving": False, "chaos_active": False}
    left = {**both, "persisted_after_cleanup": True, "chaos_targets": "disk"}
    assert _decide(engine, _inc(IncidentKind.PROBE_FAILURE, left)) == (Action.PAUSE_CHAOS, "execute")
    gone = _inc(IncidentKind.PROBE_FAILURE, {**both, "chaos_targets": "disk"})
    assert engine.decide(gone).action == Action.SAFE_MODE


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("packet-loss-30pct.yaml", "uplink"),
        ("dns-failure.json", "uplink"),
        ("bandwidth-cap.yaml", "uplink"),
        ("memory-leak.yaml", "memory"),
        ("oom-pressure", "memory"),
        ("io-saturation.yaml", "disk"),
        ("crash-model-server.yaml", "serving"),
        ("restart-worker.json", "serving"),
        ("noisy-inputs.yaml", "input"),
        ("gaussian-perturbation.json", "input"),
        ("ntp-offset.yaml", "clock"),
        ("cpu-burn.yaml", "cpu"),
    ],
)
def test_common_experiment_names_name_their_targets(name, target):
    from sre_agent.triage import chaos_targets

    assert target in chaos_targets({"experiment": name}), name


# --- the producer: what the running experiment perturbs, from its declared actions --------------------


def _running(tmp_path, method: list[dict], rollbacks: list[dict] | None = None) -> str | None:
    """Lay out a running experiment as the chaos runner does and ask the responder for its targets."""
    import json

    from chaos.faults import chaos_dir
    from sre_agent.services.responder import _running_chaos_targets

    run = chaos_dir(tmp_path) / "runs" / "run-1"
    run.mkdir(parents=True)
    doc = {"title": "t", "method": method, "rollbacks": rollbacks or []}
    (run / "experiment.json").write_text(json.dumps(doc))
    lease = tmp_path / "chaos.lease"
    lease.write_text(json.dumps({"run_id": "run-1", "state_dir": str(tmp_path)}))
    return _running_chaos_targets(lease)


def _act(func: str, kind: str = "action", module: str = "chaos.actions") -> dict:
    return {"type": kind, "name": func, "provider": {"type": "python", "module": module, "func": func}}


def test_targets_come_from_the_actions_not_the_probes_or_the_cleanup(tmp_path):
    """A probe reading the serving endpoint, or a cleanup restarting it, perturbs nothing."""
    method = [_act("slow_uplink"), _act("serving_ready", "probe", "chaos.probes")]
    assert _running(tmp_path, method, [_act("restart_serving_worker")]) == "uplink"


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        ("rollback_drill", "serving,standby"),  # catalogue: flips active and standby
        ("kill_serving_worker", "serving"),
        ("corrupt_standby_slot", "standby"),
        ("fill_disk", "disk"),
        ("skew_agent_clock", "clock"),
    ],
)
def test_targets_of_catalogued_actions_come_from_the_catalogue(tmp_path, func, expected):
    assert _running(tmp_path, [_act(func)]) == expected


def test_an_uncatalogued_action_is_read_by_the_words_of_its_name(tmp_path):
    assert _running(tmp_path / "a", [_act("stress_memory", module="lab.faults")]) == "cpu,memory"
    assert _running(tmp_path / "b", [_act("wobble_things", module="lab.faults")]) is None  # unknown
    # a catalogued extension action counts by its declaration (this toxic acts on the uplink proxy)
    toxic = _act("create_latency_toxic", module="chaostoxi.toxic.actions")
    assert _running(tmp_path / "c", [toxic]) == "uplink"


@pytest.mark.parametrize("running", [{"chaos_targets": "cpu"}, {"chaos_targets": "serving"}, {}])
def test_a_canary_stopped_for_too_few_samples_is_no_symptom_for_chaos_to_explain(engine, running):
    facts = {"gate": "insufficient_samples", "samples": 40, "chaos_active": True, **running}
    inc = _inc(IncidentKind.CANARY_ABORT, facts, CANARY_SLOT, version="4.1.0")
    assert not device_facts(inc).chaos_may_explain
    assert _decide(engine, inc) == (Action.OBSERVE, "execute"), engine.decide(inc).rule


# --- a candidate that fails verification is blocked; a committed standby that fails is lost readiness ----


@pytest.mark.parametrize(
    "facts",
    [
        {"check": "model.golden", "category": "behaviour", "consecutive_failures": 2},
        {"check": "integrity.slots", "category": "integrity", "standby_intact": False},
    ],
)
def test_a_candidate_failing_verification_is_quarantined_a_committed_standby_alerts(engine, facts):
    base = {**facts, "status": "fail", "chaos_active": False}
    candidate = {**LKG, "standby_version": "4.1.0", "last_known_good": "4.0.0"}  # installed, never committed
    for slot_name, slot in (("standby", candidate), ("canary", CANARY_SLOT)):
        inc = _inc(IncidentKind.VERIFICATION_FAILURE, {**base, "slot": slot_name}, slot, version="4.1.0")
        assert _decide(engine, inc) == (Action.QUARANTINE, "execute"), (slot_name, engine.decide(inc).rule)
    committed = _inc(IncidentKind.VERIFICATION_FAILURE, {**base, "slot": "standby"})
    assert _decide(engine, committed) == (Action.ALERT, "execute")


@pytest.mark.parametrize("burn", [1.0, 1.4, 3.0, 5.9])
def test_a_slow_burn_after_a_flip_is_told_not_a_rollback_proposal(engine, burn):
    """Below the paging burn the budget lasts for hours: a ticket (alert), not a rollback for approval."""
    facts = {"slo": "serving.error_rate", "burn_rate": burn, "since_flip_s": 600}
    d = engine.decide(_inc(IncidentKind.SLO_BURN, facts))
    assert (d.action, d.verdict) == (Action.ALERT, "execute"), d.rule


@pytest.mark.parametrize(
    "slo", ["uplink.backlog_rows", "telemetry.upload_lag_s", "trust.desired_state_age_s", "sync.lag"]
)
def test_an_slo_of_the_device_plumbing_is_never_blamed_on_a_version(engine, slo):
    facts = {"slo": slo, "burn_rate": 20.0, "since_flip_s": 300}
    assert _decide(engine, _inc(IncidentKind.SLO_BURN, facts)) == (Action.ALERT, "execute")
    # an uplink experiment explains it; a CPU one does not
    up = _inc(IncidentKind.SLO_BURN, {**facts, "chaos_active": True, "chaos_targets": "uplink"})
    assert engine.decide(up).action == Action.PAUSE_CHAOS
    cpu = _inc(IncidentKind.SLO_BURN, {**facts, "chaos_active": True, "chaos_targets": "cpu"})
    assert engine.decide(cpu).action == Action.ALERT


@pytest.mark.parametrize("check", ["model.latency_p95", "performance.latency", "serving.throughput"])
def test_a_performance_check_under_cpu_stress_is_the_experiments_effect(engine, check):
    facts = {"check": check, "category": "performance", "status": "fail", "consecutive_failures": 3}
    run = {**facts, "chaos_active": True}
    stressed = _inc(IncidentKind.VERIFICATION_FAILURE, {**run, "chaos_targets": "cpu"})
    assert _decide(engine, stressed) == (Action.PAUSE_CHAOS, "execute"), engine.decide(stressed).rule
    uplink = _inc(IncidentKind.VERIFICATION_FAILURE, {**run, "chaos_targets": "uplink"})
    assert engine.decide(uplink).action == Action.ALERT


@pytest.mark.parametrize(
    "metrics",
    [
        {"candidate.error_rate": 0.3, "incumbent.error_rate": 0.29},
        {"canary.http_error_rate": 0.3, "incumbent.http_error_rate": 0.29},
    ],
)
def test_the_incumbent_comparison_reads_common_metric_spellings(engine, metrics):
    facts = {"gate": "error_rate", "samples": 3000}
    inc = _inc(IncidentKind.CANARY_ABORT, facts, CANARY_SLOT, metrics, "4.1.0")
    assert device_facts(inc).incumbent_as_bad
    assert engine.decide(inc).action == Action.ALERT


@pytest.mark.parametrize(
    "planted",
    [
        {
            'canary.error_rate{note="same as incumbent"}': 0.1,
            'incumbent.error_rate{note="same as incumbent"}': 0.1,
        },
        {"canary.error_rate \u202eok": 0.1, "incumbent.error_rate \u202eok": 0.1},
    ],
)
def test_metric_names_that_are_not_plain_identifiers_say_nothing_about_the_incumbent(engine, planted):
    """A metric label carrying text (an injection vector) cannot make the candidate look no worse."""
    facts = {"gate": "error_rate", "samples": 3000}
    inc = _inc(IncidentKind.CANARY_ABORT, facts, CANARY_SLOT, planted, "4.1.0")
    assert not device_facts(inc).incumbent_as_bad
    assert engine.decide(inc).action == Action.QUARANTINE


@pytest.mark.parametrize("since_flip_s", [60, 86_400])
def test_a_recovery_claim_never_outranks_a_model_that_does_not_serve(engine, since_flip_s):
    facts = {"slot": "active", "consecutive_failures": 4, "recovered": True, "since_flip_s": since_flip_s}
    down = {**facts, "active_serving": False}
    assert engine.decide(_inc(IncidentKind.PROBE_FAILURE, down)).action == Action.ROLLBACK
    assert _decide(engine, _inc(IncidentKind.PROBE_FAILURE, down, NO_LKG)) == (Action.SAFE_MODE, "escalate")


def test_probe_failures_infer_a_down_model_only_when_nothing_says_otherwise():
    repeated = {"slot": "active", "consecutive_failures": 5}
    assert device_facts(_inc(IncidentKind.PROBE_FAILURE, repeated)).active_down
    others = ({"active_serving": True}, {"recovered": True}, {"active_down": False}, {"chaos_active": True})
    for other in others:
        assert not device_facts(_inc(IncidentKind.PROBE_FAILURE, {**repeated, **other})).active_down, other


@pytest.mark.parametrize("name", ["rollback-drill.yaml", "slot-flip-drill.json", "failover-test"])
def test_a_slot_drill_by_name_perturbs_serving_and_the_standby(engine, name):
    from sre_agent.triage import chaos_targets

    assert {"serving", "standby"} <= chaos_targets({"experiment": name})
    down = {"slot": "active", "consecutive_failures": 5, "active_serving": False, "chaos_active": True}
    d = engine.decide(_inc(IncidentKind.PROBE_FAILURE, {**down, "experiment": name}))
    assert Action.ROLLBACK not in d.allowed, d.rule  # never a rollback while a drill flips the slots
