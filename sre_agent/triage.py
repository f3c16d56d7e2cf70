"""Triage: the deterministic rules engine and the policy gate. Pure: values in, decision out.

1. :meth:`TriageEngine.match` picks the first policy rule whose conditions hold on the incident's
   structured values *and* whose default action is possible on this device (:func:`device_facts`,
   :func:`unavailable_actions`: a rollback only onto a committed last-known-good that is not bad, not
   recalled, passes its checks and is not itself failing). That fixes the allowed actions (minus the
   impossible ones), the default and the certainty. Log and event text is never read here.
2. An :class:`Advice` (from the local model, or none) may name one action and carry a summary. The choice
   counts only when the policy lets the model choose and it is the default or one of the rule's
   ``model_alternatives`` (milder, possible actions); anything else is ignored and recorded. So the model
   can neither widen the allowed set nor lower a required decision.
3. :meth:`TriageEngine.decide` applies the gate: a rule needing a human, an action policy always gates,
   or a certainty under the action's threshold escalates (proposing the action, running only the policy's
   ``on_escalate`` action meanwhile); otherwise the action executes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from policies.triage import (
    ACTION_RANK,
    DEFAULT_CANARY_PARITY_RATIO,
    DEFAULT_CHAOS_MAX_RUN_S,
    Action,
    Condition,
    TriagePolicy,
    TriageRule,
)
from policies.verification import ResourceReserves
from sre_agent.incidents import FactValue, Incident
from sre_core.textsafe import neutralise

__all__ = [
    "CATALOGUE_TARGETS",
    "Advice",
    "DeviceFacts",
    "RuleMatch",
    "TriageDecision",
    "TriageEngine",
    "chaos_damage_off_model",
    "chaos_expected_effect",
    "chaos_explains",
    "chaos_targets",
    "device_facts",
    "faults_left_behind",
    "incumbent_as_bad",
    "model_note_problem",
    "outlasts_experiment",
    "resolve_fact",
    "symptom_causes",
    "unavailable_actions",
]

_MISSING = object()
MAX_NOTE = 120
"""Longest model note an operator summary carries."""


@dataclass(frozen=True)
class Advice:
    """What an advisor (the local model) said. ``choice`` is untrusted until the gate checks it."""

    choice: str | None
    summary: str = ""
    source: Literal["llm", "rules"] = "llm"
    error: str | None = None
    latency_s: float = 0.0


@dataclass(frozen=True)
class RuleMatch:
    """The matched rule, the conditions that held, and its allowed actions that are possible here."""

    rule: TriageRule
    reasons: tuple[str, ...]
    allowed: tuple[Action, ...] = ()

    @property
    def offered(self) -> tuple[Action, ...]:
        """The rule's allowed actions minus those whose preconditions fail (all of them when unset)."""
        return self.allowed or tuple(self.rule.allowed)


_TRUE_SLOTS = {"both", "all", "active,standby", "standby,active"}


def _flag(facts: dict[str, FactValue], *names: str) -> bool | None:
    """The first of ``names`` that is a boolean fact (strings such as "true" do not count)."""
    for n in names:
        v = facts.get(n)
        if isinstance(v, bool):
            return v
    return None


def _listed(facts: dict[str, FactValue], version: str | None, *names: str) -> bool:
    """Whether ``version`` is named by a fact (one version, or a comma-separated list of them)."""
    if not version:
        return False
    for n in names:
        v = facts.get(n)
        if isinstance(v, str) and version in {p.strip() for p in v.split(",")}:
            return True
    return False


@dataclass(frozen=True)
class DeviceFacts:
    """What the device's structured state says about the remedies, derived once per incident.

    Read only from ``facts`` and the slot status (never from log or event text). Each ``why_not_*`` is
    None when the action is possible, else the reason it is not.
    """

    standby_committed: bool
    standby_bad: bool
    standby_recalled: bool
    standby_failing: bool
    active_failing: bool
    both_slots_failing: bool
    active_down: bool
    chaos_active: bool
    chaos_explains: bool
    chaos_may_explain: bool
    chaos_expected_effect: bool
    chaos_damage_off_model: bool
    incumbent_as_bad: bool
    slo_of_model: bool
    why_not_rollback: str | None
    version_blocked: bool = False

    @property
    def rollback_ready(self) -> bool:
        return self.why_not_rollback is None

    def get(self, name: str) -> FactValue | object:
        """``device.<name>`` for rules: the booleans above plus ``rollback_ready``."""
        if name == "rollback_ready":
            return self.rollback_ready
        if name in {f for f in type(self).__dataclass_fields__ if not f.startswith("why_")}:
            value: bool = getattr(self, name)
            return value
        return _MISSING


def device_facts(
    incident: Incident,
    parity_ratio: float = DEFAULT_CANARY_PARITY_RATIO,
    chaos_max_run_s: float = DEFAULT_CHAOS_MAX_RUN_S,
) -> DeviceFacts:
    """Derive :class:`DeviceFacts` from the incident's facts, slot status and metrics (pure).

    ``parity_ratio`` is the policy's ``canary_parity_ratio`` (see :func:`incumbent_as_bad`);
    ``chaos_max_run_s`` its ``chaos_max_run_s`` (see :func:`outlasts_experiment`).

    Vocabulary read (all optional; the reporters emit what they know):

    - slot status: ``standby_version``, ``standby_verified``, ``last_known_good``, ``active_version``,
      ``canary_version``, ``safe_mode``;
    - ``fact.slot``: the failing slot (``active``, ``standby``, ``canary`` or ``both``);
      ``fact.standby_intact``/``fact.standby_passes`` (false: the standby fails too),
      ``fact.standby_failing``/``fact.both_slots_failing`` (booleans);
    - ``fact.standby_committed`` (boolean; otherwise the standby is committed when it is the
      last-known-good), ``fact.standby_bad``/``fact.standby_recalled`` (booleans) and
      ``fact.bad_versions``/``fact.recalled_versions`` (a version or a comma-separated list);
    - ``fact.active_down``/``fact.active_serving`` (booleans), and a probe failure on the
      active slot seen ``fact.consecutive_failures`` >= 3 times in a row while no experiment runs;
    - ``fact.chaos_active`` (boolean) and ``fact.persisted_after_cleanup`` (the experiment's damage
      outlived its cleanup) unless ``fact.cleanup_ok`` is true (:func:`faults_left_behind`): an
      experiment is *in effect* when either holds; false and no faults left behind make ``pause_chaos``
      impossible;
    - ``fact.chaos_targets`` (what the running experiment perturbs, comma-separated, in the chaos
      catalogue's target words: clock, cpu, memory, disk, uplink, input, serving, standby), else the
      words of ``fact.experiment`` when it is a plain identifier (``clock-skew.yaml``): see
      :func:`chaos_explains` and :func:`symptom_causes`; an experiment in effect on the standby makes it
      no rollback target; :func:`chaos_damage_off_model` for damage left behind;
    - ``fact.gate`` and the metrics ``canary.<m>``/``incumbent.<m>``: see :func:`incumbent_as_bad`;
    - ``fact.slo``: an SLO about the device's sync or policy age is not one a model version moves;
    - ``fact.version`` (else the incident's version): *blocked* when ``fact.bad_versions`` names it, or it
      is the standby marked bad (``fact.standby_bad``), and it does not serve: the canary that aborted it
      or the reconcile that rolled it back already did what a quarantine would (``version_blocked``).
    """
    f = incident.facts
    slot = incident.evidence.slot
    sb = slot.standby_version
    where = f.get("slot")
    where_s = where.strip().lower() if isinstance(where, str) else None

    committed_flag = _flag(f, "standby_committed")
    committed = (
        committed_flag if committed_flag is not None else (sb is not None and slot.last_known_good == sb)
    )
    bad = bool(_flag(f, "standby_bad")) or _listed(f, sb, "bad_versions")
    recalled = bool(_flag(f, "standby_recalled")) or _listed(f, sb, "recalled_versions")
    standby_named = where_s == "standby" or where_s in _TRUE_SLOTS
    standby_failing = (
        standby_named
        or _flag(f, "standby_intact", "standby_passes") is False
        or bool(_flag(f, "standby_failing"))
    )
    both_flag = bool(_flag(f, "both_slots_failing"))
    active_named = where_s in {"active"} or where_s in _TRUE_SLOTS
    active_failing = active_named or (
        where_s is None and incident.kind.value in ("probe_failure", "verification_failure", "slo_burn")
    )
    both = both_flag or where_s in _TRUE_SLOTS or (active_named and standby_failing and not standby_named)
    down_flag = _flag(f, "active_down")
    up_flag = _flag(f, "active_serving")
    failures = f.get("consecutive_failures")
    repeated_probe = (
        incident.kind.value == "probe_failure"
        and where_s in (None, "active")
        and isinstance(failures, int)
        and not isinstance(failures, bool)
        and failures >= 3
    )
    chaos = _flag(f, "chaos_active")
    left_behind = faults_left_behind(f)
    # an experiment acts while it runs, and after its cleanup when its faults outlived it
    in_effect = chaos is True or left_behind
    targets = chaos_targets(f)
    # an age beyond its target by more than the longest run began before any experiment running now
    relevant = in_effect and (left_behind or not outlasts_experiment(incident, chaos_max_run_s))
    # Probes failing again and again mean "down", unless an experiment is injecting faults right now: then
    # they may be its effect, and only an explicit "not serving" from the producer says the model is down.
    # Nor when the producer says the model serves, or the probe has recovered since.
    inferred_down = repeated_probe and down_flag is None and up_flag is None and chaos is not True
    active_down = bool(down_flag) or up_flag is False or (inferred_down and _flag(f, "recovered") is not True)

    why: str | None = None
    if sb is None:
        why = "there is no standby version to roll back to"
    elif in_effect and "standby" in targets:
        why = f"the experiment in effect perturbs the standby {_ident(sb)}"
    elif both:
        why = "the same fault is seen on both slots (a runtime or host fault): a rollback cannot fix it"
    elif standby_failing:
        why = f"the standby {_ident(sb)} is itself failing"
    elif not slot.standby_verified:
        why = f"the standby {_ident(sb)} does not pass its checks (not verified)"
    elif not committed:
        why = f"the standby {_ident(sb)} was never committed (it is not the last-known-good)"
    elif bad:
        why = f"the standby {_ident(sb)} is marked bad"
    elif recalled:
        why = f"the standby {_ident(sb)} is recalled"
    elif sb == slot.active_version:
        why = f"the standby holds the active version {_ident(sb)}"
    elif sb in (slot.canary_version, incident.version) and incident.version != slot.active_version:
        why = f"the standby {_ident(sb)} is the version under suspicion, not a last-known-good"
    return DeviceFacts(
        standby_committed=bool(committed),
        standby_bad=bad,
        standby_recalled=recalled,
        standby_failing=standby_failing,
        active_failing=active_failing,
        both_slots_failing=both,
        active_down=active_down,
        chaos_active=chaos is True,
        chaos_explains=relevant and chaos_explains(incident),
        chaos_may_explain=relevant
        and (chaos_explains(incident) or (not targets and bool(symptom_causes(incident)))),
        chaos_expected_effect=in_effect and chaos_expected_effect(incident),
        chaos_damage_off_model=chaos_damage_off_model(incident),
        incumbent_as_bad=incumbent_as_bad(incident, parity_ratio),
        slo_of_model=incident.kind.value == "slo_burn" and _slo_of_model(f.get("slo")),
        why_not_rollback=why,
        version_blocked=_version_blocked(incident),
    )


def faults_left_behind(facts: dict[str, FactValue]) -> bool:
    """Whether an experiment's faults may still be injected after its run (pure): the damage outlived
    the cleanup (``fact.persisted_after_cleanup``) and the cleanup did not report success
    (``fact.cleanup_ok`` false or unknown). After a cleanup that succeeded nothing is left to clear: the
    damage is the device's own state now, and pausing chaos repairs none of it."""
    return _flag(facts, "persisted_after_cleanup") is True and _flag(facts, "cleanup_ok") is not True


def outlasts_experiment(incident: Incident, max_run_s: float = DEFAULT_CHAOS_MAX_RUN_S) -> bool:
    """Whether an SLO burn measures an age (``fact.slo`` such as ``sync.since_last_ack_s``,
    ``sync.oldest_unacked_age_s``, ``policy.age_s``) that would exceed its target even without the last
    ``max_run_s`` seconds (the longest one experiment runs): an experiment running now cannot explain it,
    whatever it perturbs (pure; ``fact.value`` and ``fact.target`` in seconds)."""
    f = incident.facts
    slo = f.get("slo")
    if incident.kind.value != "slo_burn" or not isinstance(slo, str):
        return False
    leaf = slo.strip().lower().rsplit(".", 1)[-1]
    words = leaf.split("_")
    if not (leaf.endswith("_s") and ("age" in words or words[0] == "since")):
        return False
    value, target = _number(f.get("value")), _number(f.get("target"))
    if value is None or target is None or not (math.isfinite(value) and math.isfinite(target)):
        return False
    return value - max_run_s > target


def _version_blocked(incident: Incident) -> bool:
    """Whether the incident's version is already blocked on the device and does not serve (pure)."""
    f, slot = incident.facts, incident.evidence.slot
    named = f.get("version")
    version = named if isinstance(named, str) and named else incident.version
    if not version or version == slot.active_version:
        return False  # quarantining the version that serves is a rollback, not a no-op
    return _listed(f, version, "bad_versions") or (
        version == slot.standby_version and _flag(f, "standby_bad") is True
    )


_SLOT_DRILL = frozenset({"drill", "flip", "failover"})
"""A drill that flips the slots (``rollback_drill``) perturbs both what serves and the standby."""

TARGET_WORDS: dict[str, frozenset[str]] = {
    "clock": frozenset({"clock", "time", "ntp", "rtc", "skew"}),
    "cpu": frozenset({"cpu", "stress", "load"}),
    "memory": frozenset({"memory", "mem", "oom", "ram", "leak"}),
    "disk": frozenset({"disk", "fill", "ballast", "storage", "io", "iops", "inode"}),
    "uplink": frozenset({"uplink", "network", "net", "wan", "link", "partition", "blackout", "toxiproxy"})
    | frozenset({"packet", "loss", "dns", "bandwidth", "peer", "wifi", "lte", "cellular", "satellite"}),
    "input": frozenset({"input", "inputs", "noise", "noisy", "gaussian", "perturb", "perturbation"}),
    "serving": frozenset({"serving", "service", "server", "worker", "process", "kill", "crash", "sigkill"})
    | _SLOT_DRILL,
    "standby": frozenset({"standby"}) | _SLOT_DRILL,
}
"""Words naming what an experiment perturbs, by the chaos catalogue's targets (``chaos.yaml``)."""

CATALOGUE_TARGETS: dict[str, str] = {
    "uplink": "uplink",
    "link": "uplink",
    "input": "input",
    "standby": "standby",
    "canary": "standby",  # the canary candidate lives in the standby slot
    "active": "serving",
    "agent": "serving",
    "serving": "serving",
    "disk": "disk",
    "cpu": "cpu",
    "clock": "clock",
}
"""The chaos catalogue's activity ``targets`` and ``impact`` words (``policies/chaos.py``) in the words
:func:`chaos_targets` reads (``slots`` and ``none`` name no target of their own)."""

_ALL_TARGETS = frozenset(TARGET_WORDS)
_STARVED = frozenset({"cpu", "memory", "serving"})
"""What a check needs to run at all: an experiment starving or killing it explains an error or timeout."""

_CHECK_CAUSES: tuple[tuple[str, frozenset[str]], ...] = (
    ("trust.", frozenset({"clock"})),  # the clock, and every horizon and expiry measured with it
    ("resources.", frozenset({"disk", "memory", "cpu"})),
    ("drift.", frozenset({"input"})),
    ("rollback.", frozenset({"standby"})),  # rollback readiness: the standby slot
)
"""What a failing check measures (by check-name prefix): an experiment perturbing that explains it."""

_CATEGORY_CAUSES: dict[str, frozenset[str]] = {
    "trust": frozenset({"clock"}),
    "performance": frozenset({"cpu", "memory", "disk", "serving"}),  # latency, throughput, headroom
    "drift": frozenset({"input"}),
    "rollback_readiness": frozenset({"standby"}),
}
"""The same by the check's category, for check names without a known prefix (``model.latency_p95``)."""

_GATE_CAUSES: dict[str, frozenset[str]] = {
    "latency": frozenset({"cpu", "memory", "serving"}),
    "error_rate": frozenset({"serving", "memory", "disk", "standby"}),
    "divergence": frozenset({"input", "standby"}),
}
"""What can make a canary gate fail (the gates ``deployment/canary.py`` emits); another gate: anything.
During a canary the candidate sits in the standby slot: corrupting the standby corrupts its answers."""

_SERVING_PATH = frozenset({"serving", "cpu", "memory", "disk"})
"""What a fault must reach to fail a probe or burn an SLO of the served model (local inference)."""

_MODEL_SLO_CAUSES = _SERVING_PATH | {"input"}
_DEVICE_SLO_CAUSES = frozenset({"uplink", "clock", "disk"})
"""The device's plumbing (sync, policy and desired-state age, telemetry upload, uplink backlog) moves with
its uplink, its clock and its disk, never with inference."""

CONFINED_TARGETS = frozenset({"input", "standby"})
"""Faults confined by design: noise on a bounded share of inputs, or the standby slot (it serves nothing).
A check failing that measures exactly such a fault is the detector working: the experiment's expected
effect, watched, not a reason to stop the experiment or touch the model."""

_REACHES_MODEL = frozenset({"serving"})
"""Targets whose damage, left behind after cleanup, may sit in the served model's path (a model remedy
may help); damage elsewhere (uplink, clock, CPU, memory, disk, inputs, the standby) is not fixed by
rolling the model back or by safe mode, but by stopping chaos and clearing its faults (``pause_chaos``)."""

_NOT_MODEL_SLOS = frozenset({"sync", "policy", "trust", "uplink", "telemetry", "upload"})
"""SLO subjects no model version moves: the device's sync and policy age (``sre_agent/slo.py``), its
desired-state age, its uplink and telemetry upload (the first word of ``fact.slo``)."""

KNOWN_GATES = frozenset({*_GATE_CAUSES, "insufficient_samples"})
"""Gates the canary emits; ``insufficient_samples`` is its "too few samples" verdict, not a failure."""


def chaos_targets(facts: dict[str, FactValue]) -> frozenset[str]:
    """What the running experiment perturbs: ``fact.chaos_targets``, else the words of an
    identifier-shaped ``fact.experiment`` mapped through :data:`TARGET_WORDS` (free text counts for
    nothing: a name that is not a plain identifier perturbs nothing known). Empty: unknown."""
    declared = facts.get("chaos_targets")
    if isinstance(declared, str):
        return frozenset(p.strip().lower() for p in declared.split(",") if p.strip()) & set(TARGET_WORDS)
    name = facts.get("experiment")
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        return frozenset()
    words = set(_WORD.findall(name.lower().removesuffix(".yaml").removesuffix(".json")))
    return frozenset(t for t, vocab in TARGET_WORDS.items() if words & vocab)


def _slot_named(facts: dict[str, FactValue]) -> str | None:
    where = facts.get("slot")
    return where.strip().lower() if isinstance(where, str) else None


def symptom_causes(incident: Incident) -> frozenset[str]:
    """The experiment targets that can cause this incident's symptom (pure; from its facts only).

    - a verification check that could not run (error, timeout): what starves or kills it (CPU, memory,
      serving); one that failed: what it measures (trust checks: the clock; resource headroom:
      the resources its measurements show beyond the default reserves, else disk, memory, CPU; drift:
      inputs; rollback readiness or any check on the standby slot: the standby);
      a wrong answer from the active model (golden vectors, integrity) is caused by no experiment;
    - a canary abort: by gate (latency: CPU, memory, serving; error rate: serving, memory, disk, the
      standby; divergence: inputs, the standby); a gate the canary does not emit: anything; too few
      samples: nothing (no failure to explain);
    - a probe failure: on the standby, the standby; otherwise the serving path (serving, CPU, memory,
      disk; on the canary slot also the standby it lives in), never the uplink or the clock;
    - an SLO burn: the device's sync or policy age: the uplink or the clock; a model SLO: the serving
      path or the inputs;
    - a chaos deviation: the experiment itself (anything).
    """
    f = incident.facts
    kind = incident.kind.value
    slot = _slot_named(f)
    on_standby = slot == "standby"
    if kind == "verification_failure":
        if f.get("status") in ("error", "timeout"):
            return _STARVED
        check, category = f.get("check"), f.get("category")
        causes: set[str] = {"standby"} if on_standby else set()
        if isinstance(check, str):
            for prefix, dims in _CHECK_CAUSES:
                if check.startswith(prefix):
                    causes |= _breached(f) or dims if prefix == "resources." else dims
        if isinstance(category, str) and not (isinstance(check, str) and check.startswith("resources.")):
            causes |= _CATEGORY_CAUSES.get(category, frozenset())
        return frozenset(causes)
    if kind == "canary_abort":
        gate = f.get("gate")
        if gate == "insufficient_samples":
            return frozenset()  # nothing failed: the canary ran out of requests, not of health
        return _GATE_CAUSES.get(gate, _ALL_TARGETS) if isinstance(gate, str) else _ALL_TARGETS
    if kind == "probe_failure":
        if on_standby:
            return frozenset({"standby"})
        return _SERVING_PATH | {"standby"} if slot == "canary" else _SERVING_PATH
    if kind == "slo_burn":
        return _MODEL_SLO_CAUSES if _slo_of_model(f.get("slo")) else _DEVICE_SLO_CAUSES
    return _ALL_TARGETS


_RESERVES = ResourceReserves()
_HEADROOM: tuple[tuple[str, str, float, bool], ...] = (
    ("disk_free_mb", "disk", _RESERVES.min_free_disk_mb, True),
    ("disk_free_pct", "disk", _RESERVES.min_free_disk_pct, True),
    ("memory_available_mb", "memory", _RESERVES.min_available_memory_mb, True),
    ("load_per_cpu", "cpu", _RESERVES.max_load_per_cpu, False),
)
"""The resource headroom check's measurements, what each measures, the policy's default reserve, and
whether the measurement must stay at or above it (``verification/builtin/resources.py``)."""


def _breached(facts: dict[str, FactValue]) -> frozenset[str]:
    """Which resources a headroom failure's own measurements show beyond the default reserves (disk,
    memory, cpu); empty when none is (no measurements, or a device with stricter reserves): then any of
    them may be the one. A CPU stressor does not explain a memory shortage."""
    out = set()
    for key, resource, reserve, floor in _HEADROOM:
        value = _number(facts.get(key))
        if value is not None and ((value < reserve) if floor else (value > reserve)):
            out.add(resource)
    return frozenset(out)


def chaos_explains(incident: Incident) -> bool:
    """Whether what the running experiment is known to perturb can cause the symptom (pure).

    A clock check under clock skew, disk headroom under disk fill, a canary latency gate under CPU
    stress; never an uplink fault behind local inference, nor any experiment behind wrong answers. The
    experiment's targets must be known (:func:`chaos_targets`); whether one runs at all is the caller's
    ``fact.chaos_active`` (see ``chaos_may_explain`` for unknown targets).
    """
    return bool(chaos_targets(incident.facts) & symptom_causes(incident))


def chaos_expected_effect(incident: Incident) -> bool:
    """Whether a verification or probe failure is only the detector of a confined fault the running
    experiment injects (:data:`CONFINED_TARGETS`): drift under input noise, the standby under standby
    corruption (pure). Never a model SLO or a canary gate (users see those), and never a wrong answer
    of the active slot (no experiment causes one, :func:`symptom_causes`)."""
    if incident.kind.value not in ("verification_failure", "probe_failure"):
        return False
    f = incident.facts
    if f.get("status") in ("error", "timeout"):
        return False
    if incident.kind.value == "probe_failure" and _slot_named(f) != "standby":
        return False  # a probe of the active or canary slot fails what users are served
    explaining = chaos_targets(f) & symptom_causes(incident)
    return bool(explaining) and explaining <= CONFINED_TARGETS


def chaos_damage_off_model(incident: Incident) -> bool:
    """Whether a chaos deviation whose damage persisted after cleanup came from an experiment whose
    known targets stay off the served model (:data:`_REACHES_MODEL`): a rollback or safe mode cannot
    repair it; stopping chaos and clearing its faults can (pure)."""
    if (
        incident.kind.value != "chaos_deviation"
        or _flag(incident.facts, "persisted_after_cleanup") is not True
    ):
        return False
    targets = chaos_targets(incident.facts)
    return bool(targets) and not targets & _REACHES_MODEL


def incumbent_as_bad(incident: Incident, parity_ratio: float = DEFAULT_CANARY_PARITY_RATIO) -> bool:
    """Whether a canary abort's own figures show the incumbent failing as badly as the candidate (pure).

    Reads the metrics ``canary.<m>`` (or ``candidate.<m>``) and ``incumbent.<m>`` of the failed gate
    (``<m>`` a plain lower-case identifier containing the gate's name, e.g. ``latency_p95_ms`` for
    ``latency``; a label carrying text is ignored). True only when at least
    one such pair exists and in every pair the candidate is within ``parity_ratio`` times the incumbent: then
    the candidate is not what is wrong (a host or traffic fault both versions see). No pair, a missing
    or non-finite figure, or any pair where the candidate is worse: False (the gate's verdict stands).
    """
    if incident.kind.value != "canary_abort":
        return False
    gate = incident.facts.get("gate")
    if not isinstance(gate, str) or gate not in _GATE_CAUSES:
        return False
    metrics = incident.evidence.metrics
    pairs = []
    for name, cand in metrics.items():
        head, _, metric = name.partition(".")
        if head not in ("canary", "candidate") or gate not in metric or not _METRIC.fullmatch(metric):
            continue  # a label carrying text (braces, spaces, controls) is evidence for people, not a figure
        inc = metrics.get(f"incumbent.{metric}")
        if inc is None or not (math.isfinite(cand) and math.isfinite(inc)):
            return False
        pairs.append((cand, inc))
    return bool(pairs) and all(inc > 0 and cand <= inc * parity_ratio for cand, inc in pairs)


def _slo_of_model(slo: FactValue | None) -> bool:
    """Whether an SLO measures what the served model does (unknown names count as the model's)."""
    if not isinstance(slo, str):
        return True
    return slo.strip().lower().split(".")[0] not in _NOT_MODEL_SLOS


def unavailable_actions(incident: Incident, facts: DeviceFacts | None = None) -> dict[Action, str]:
    """Actions whose preconditions fail on this device, with the reason (pure)."""
    dev = facts or device_facts(incident)
    out: dict[Action, str] = {}
    if dev.why_not_rollback is not None:
        out[Action.ROLLBACK] = dev.why_not_rollback
    if incident.evidence.slot.safe_mode:
        out[Action.SAFE_MODE] = "the module is already in safe mode"
    if dev.version_blocked:
        version = incident.facts.get("version") or incident.version
        out[Action.QUARANTINE] = f"{_ident(version)} is already blocked (marked bad) and does not serve"
    if _flag(incident.facts, "chaos_active") is False and not faults_left_behind(incident.facts):
        # pausing also clears faults an experiment left behind after its cleanup (the handler's guard)
        out[Action.PAUSE_CHAOS] = "no chaos experiment is running and none left faults behind"
    return out


@dataclass(frozen=True)
class TriageDecision:
    """The gate's verdict for one incident."""

    incident_id: str
    fingerprint: str
    rule: str
    allowed: tuple[Action, ...]
    default: Action
    certainty: float
    action: Action
    verdict: Literal["execute", "escalate"]
    execute_now: tuple[Action, ...]
    reasons: tuple[str, ...]
    model_choice: str | None = None
    model_choice_used: bool = False
    summary: str = ""
    advice_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def escalated(self) -> bool:
        return self.verdict == "escalate"

    def to_dict(self) -> dict[str, Any]:
        return {
            "incident_id": self.incident_id,
            "fingerprint": self.fingerprint,
            "rule": self.rule,
            "allowed": [a.value for a in self.allowed],
            "default": self.default.value,
            "certainty": self.certainty,
            "action": self.action.value,
            "verdict": self.verdict,
            "execute_now": [a.value for a in self.execute_now],
            "reasons": list(self.reasons),
            "model_choice": self.model_choice,
            "model_choice_used": self.model_choice_used,
            "summary": self.summary,
            "advice_error": self.advice_error,
        }


def resolve_fact(incident: Incident, path: str, device: DeviceFacts | None = None) -> FactValue | object:
    """The structured value a condition names, or a private sentinel when absent.

    Only ``kind``, ``severity``, ``fact.*``, ``slot.*``, ``metric.*``, ``device.*`` (derived by
    :func:`device_facts`) and ``verification.failed|passed`` resolve; there is deliberately no path to
    log lines or event messages.
    """
    if path.startswith("device."):
        return (device or device_facts(incident)).get(path.partition(".")[2])
    if path == "kind":
        return incident.kind.value
    if path == "severity":
        return incident.severity.value
    if path == "verification.failed":
        return sum(1 for v in incident.evidence.verification if not v.passed)
    if path == "verification.passed":
        return sum(1 for v in incident.evidence.verification if v.passed)
    head, _, name = path.partition(".")
    if head == "fact":
        return incident.facts.get(name, _MISSING)
    if head == "metric":
        return incident.evidence.metrics.get(name, _MISSING)
    if head == "slot":
        slot = incident.evidence.slot
        if name in type(slot).model_fields:
            value: FactValue = getattr(slot, name)
            return value
    return _MISSING


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _holds(cond: Condition, value: object) -> bool:
    if cond.op == "exists":
        return (value is not _MISSING) == cond.value
    if value is _MISSING:
        return False
    if cond.op == "eq":
        return value == cond.value and isinstance(value, bool) == isinstance(cond.value, bool)
    if cond.op == "ne":
        return value != cond.value
    if cond.op == "in":
        options = cond.value if isinstance(cond.value, list) else [cond.value]
        return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in options)
    left, right = _number(value), _number(cond.value)
    if left is None or right is None:
        return False
    if cond.op == "gt":
        return left > right
    if cond.op == "ge":
        return left >= right
    if cond.op == "lt":
        return left < right
    return left <= right  # "le"


class TriageEngine:
    """Rules + gate over one :class:`TriagePolicy`.

    Args:
        policy: the triage policy document.
    """

    def __init__(self, policy: TriagePolicy) -> None:
        self.policy = policy

    def match(self, incident: Incident) -> RuleMatch:
        """The first rule that matches and whose default is possible (the fallback when none is).

        A rule whose conditions hold but whose default action's preconditions fail on this device
        (:func:`unavailable_actions`) is passed over, with the reason kept; the actions it would allow
        that are impossible are never offered.
        """
        dev = device_facts(incident, self.policy.canary_parity_ratio, self.policy.chaos_max_run_s)
        blocked = unavailable_actions(incident, dev)
        skipped: list[str] = []
        for rule in self.policy.rules:
            if rule.kinds and incident.kind.value not in rule.kinds:
                continue
            reasons = []
            for cond in rule.when:
                value = resolve_fact(incident, cond.fact, dev)
                if not _holds(cond, value):
                    break
                shown = "absent" if value is _MISSING else repr(value)
                reasons.append(f"{cond.fact} {cond.op} {cond.value!r} (is {shown})")
            else:
                if rule.default in blocked:
                    skipped.append(
                        f"rule {rule.name} passed over: {rule.default.value}: {blocked[rule.default]}"
                    )
                    continue
                return self._matched(
                    rule, [f"rule {rule.name}: {rule.description}".strip(), *reasons], skipped, blocked
                )
        fb = self.policy.fallback
        return self._matched(fb, [f"no rule matched; fallback {fb.name}"], skipped, blocked)

    @staticmethod
    def _matched(
        rule: TriageRule, reasons: list[str], skipped: list[str], blocked: dict[Action, str]
    ) -> RuleMatch:
        offered = tuple(a for a in rule.allowed if a not in blocked or a == rule.default)
        dropped = [f"{a.value} not offered: {blocked[a]}" for a in rule.allowed if a not in offered]
        return RuleMatch(rule, (*reasons, *skipped, *dropped), offered)

    def decide(self, incident: Incident, advice: Advice | None = None) -> TriageDecision:
        """Apply the gate. ``advice`` may only pick the default or one of the rule's model alternatives."""
        m = self.match(incident)
        rule, policy = m.rule, self.policy
        reasons = list(m.reasons)
        choice = advice.choice if advice else None
        used = False
        action = rule.default
        if choice is not None and not policy.model_may_choose:
            reasons.append(f"model choice {choice[:40]!r} not used: policy lets the model only summarise")
        elif choice is not None:
            picked = _as_action(choice)
            if picked is None or picked not in m.offered:
                reasons.append(f"model choice {choice[:40]!r} is not an allowed action; ignored")
            elif ACTION_RANK[picked] > ACTION_RANK[rule.default]:
                reasons.append(
                    f"model choice {picked.value!r} is more severe than the default; only an operator may "
                    "choose it"
                )
            elif picked != rule.default and picked not in rule.model_alternatives:
                reasons.append(
                    f"model choice {picked.value!r} is milder than the required {rule.default.value}; "
                    "the rule allows the model no alternative here"
                )
            else:
                used = True
                action = picked
        why_human = None
        if rule.human_approval:
            why_human = f"rule {rule.name} requires an operator's approval"
            action, used = rule.default, False
        elif action in policy.always_approve:
            why_human = f"policy always requires approval for {action.value}"
        elif rule.certainty < policy.threshold(action):
            why_human = (
                f"certainty {rule.certainty:.2f} is below the {policy.threshold(action):.2f} that "
                f"{action.value} needs"
            )
        if why_human is not None:
            reasons.append(why_human)
            verdict: Literal["execute", "escalate"] = "escalate"
            now: tuple[Action, ...] = (policy.on_escalate,)
            running = _flag(incident.facts, "chaos_active") is True
            left = faults_left_behind(incident.facts)
            if (running or left) and Action.PAUSE_CHAOS in m.offered:
                # a human decides the remedy; the experiment that may be making it worse stops now (a pause
                # also clears the faults one left behind)
                now = (policy.on_escalate, Action.PAUSE_CHAOS)
                what = "is running" if running else "left faults behind"
                reasons.append(f"a chaos experiment {what}: paused while the escalation waits")
        else:
            verdict = "execute"
            now = (action,)
        summary, dropped = _summary(incident, rule, action, verdict, advice)
        if dropped is not None:
            reasons.append(dropped)
        return TriageDecision(
            incident_id=incident.id,
            fingerprint=incident.fingerprint,
            rule=rule.name,
            allowed=m.offered,
            default=rule.default,
            certainty=rule.certainty,
            action=action,
            verdict=verdict,
            execute_now=now,
            reasons=tuple(reasons),
            model_choice=choice,
            model_choice_used=used,
            summary=summary,
            advice_error=advice.error if advice else None,
        )


def _as_action(value: str) -> Action | None:
    try:
        return Action(value)
    except ValueError:
        return None


_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_METRIC = re.compile(r"[a-z0-9_.]{1,64}")
_WORD = re.compile(r"[a-z0-9]+")
_INSTRUCTION_WORDS = frozenset(
    {"ignore", "disregard", "override", "approve", "approved", "approval", "instruction", "instructions",
     "system", "assistant", "prompt", "execute", "authorized", "authorised", "operator", "policy"}
)  # fmt: skip
_ACTION_WORDS = {a: re.compile(r"\b" + a.value.replace("_", r"[\s_-]*") + r"\b") for a in Action}
_ACTION_WORDS[Action.ROLLBACK] = re.compile(r"\broll(?:ed|ing)?[\s_-]*back\b")
_ACTION_WORDS[Action.QUARANTINE] = re.compile(r"\bquarantin")
_ACTION_WORDS[Action.RERUN_VERIFICATION] = re.compile(r"\bre[\s_-]*run")


def _ident(value: object) -> str:
    """A module or version name as shown to operators: itself when it is a plain identifier, else a
    placeholder (free text in a name never reaches a summary)."""
    text = str(value)
    if _IDENT.fullmatch(text):
        return text
    return f"<name of {len(text)} chars, not shown>"


_ECHO = 16
"""A note repeating this many characters of evidence in a row (spacing aside) is an echo."""


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower())


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    grams = (tuple(words[i : i + 3]) for i in range(len(words) - 2))
    return {g for g in grams if not all(w.isdigit() for w in g)}  # version numbers are not prose


def _untrusted_text(incident: Incident) -> str:
    """Every free-text field of the incident (what an attacker can write), joined."""
    ev = incident.evidence
    parts: list[str] = [incident.title, incident.module, str(incident.version or "")]
    parts += [f"{e.kind} {e.message}" for e in ev.events]
    parts += list(ev.logs)
    parts += [f"{v.check} {v.detail}" for v in ev.verification]
    parts += [f"{k} {v}" for k, v in incident.facts.items() if isinstance(v, str)]
    parts += list(ev.metrics)
    slot = ev.slot
    parts += [str(x) for x in (slot.active_version, slot.standby_version, slot.last_known_good) if x]
    parts += [str(slot.canary_version or "")]
    return "\n".join(parts)


def model_note_problem(note: str, incident: Incident, action: Action) -> str | None:
    """Why the model's note must not reach an operator, or None when it may (pure).

    Refused: a note that repeats three or more consecutive words, or 16 characters in a row, of any
    free-text field of the incident (a planted instruction travels by being repeated), uses the
    vocabulary of instructions (ignore, approve, override, system...), or names an action other than the
    one decided.
    """
    low = note.lower()
    untrusted = _untrusted_text(incident)
    if _trigrams(low) & _trigrams(untrusted):
        return "it repeats evidence text"
    flat, flat_note = _flat(untrusted), _flat(low)
    if any(flat_note[i : i + _ECHO] in flat for i in range(len(flat_note) - _ECHO + 1)):
        return "it repeats evidence text"
    if _INSTRUCTION_WORDS & set(_WORD.findall(low)):
        return "it reads like an instruction"
    others = [a.value for a, rx in _ACTION_WORDS.items() if a != action and rx.search(low)]
    if others:
        return f"it names another action ({', '.join(others)})"
    return None


def _summary(
    incident: Incident, rule: TriageRule, action: Action, verdict: str, advice: Advice | None
) -> tuple[str, str | None]:
    """The operator summary, and why the model's note was left out (None when kept or absent).

    Built from structured values only (kind, identifier-shaped module and version, rule, action): no
    title, log or event text is copied into it. The model's note is appended only when
    :func:`model_note_problem` finds nothing wrong with it.
    """
    ver = f" {_ident(incident.version)}" if incident.version else ""
    step = f"proposes {action.value} for approval" if verdict == "escalate" else f"takes {action.value}"
    text = f"{incident.kind.value} on {_ident(incident.module)}{ver}; rule {rule.name} {step}."
    if advice is None or not advice.summary:
        return text, None
    note = neutralise(advice.summary, max_len=MAX_NOTE)
    problem = model_note_problem(note, incident, action)
    if problem is not None:
        return text, f"model note left out: {problem}"
    return f"{text} Model note: {note}", None
