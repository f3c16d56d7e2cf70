"""Triage policy: which actions an incident allows, the default, the certainty, and what needs a human.

Rules are matched in order, first match wins, and the ``fallback`` rule catches the rest. A rule reads only
structured values (``kind``, ``severity``, ``fact.*``, ``slot.*``, ``metric.*``, ``verification.*``, and
``device.*``, derived from those by :func:`sre_agent.triage.device_facts`, e.g. ``device.rollback_ready``):
log lines and event messages are not addressable, so no text an attacker can put in a log can change
which actions are allowed.

The model may move *down* from a rule's default only to the rule's ``model_alternatives`` (actions the
rule marks as enough where its case is ambiguous), never below a required default and never up: an
allowed action above the default is only ever taken with an operator's signed approval.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from policies.base import PolicyModel, load_default

__all__ = [
    "ACTION_RANK",
    "DEFAULT_CANARY_PARITY_RATIO",
    "DEFAULT_CHAOS_MAX_RUN_S",
    "DEVICE_FACTS",
    "INCIDENT_KINDS",
    "Action",
    "Condition",
    "TriagePolicy",
    "TriageRule",
    "default_triage_policy",
]

INCIDENT_KINDS = ("verification_failure", "canary_abort", "probe_failure", "slo_burn", "chaos_deviation")
IncidentKindName = Literal[
    "verification_failure", "canary_abort", "probe_failure", "slo_burn", "chaos_deviation"
]


class Action(StrEnum):
    """What the agent can do about an incident, mildest first."""

    OBSERVE = "observe"
    ALERT = "alert"
    RERUN_VERIFICATION = "rerun_verification"
    PAUSE_CHAOS = "pause_chaos"
    QUARANTINE = "quarantine"
    ROLLBACK = "rollback"
    SAFE_MODE = "safe_mode"


ACTION_RANK: dict[Action, int] = {a: i for i, a in enumerate(Action)}
"""Severity order of actions: an action "beyond" another ranks higher."""

FactValue = str | int | float | bool | None

DEFAULT_CANARY_PARITY_RATIO = 1.25
"""Default ``canary_parity_ratio``: a candidate within 25% of the incumbent on the failed gate's metric is
no worse than it."""

DEFAULT_CHAOS_MAX_RUN_S = 900.0
"""Default ``chaos_max_run_s``: the chaos policy's default ``max_experiment_s`` (the hard wall-clock budget
of one run)."""

DEVICE_FACTS = frozenset(
    {
        "rollback_ready",
        "active_down",
        "active_failing",
        "both_slots_failing",
        "standby_committed",
        "standby_bad",
        "standby_recalled",
        "standby_failing",
        "chaos_active",
        "chaos_explains",
        "chaos_may_explain",
        "chaos_expected_effect",
        "chaos_damage_off_model",
        "incumbent_as_bad",
        "slo_of_model",
        "version_blocked",
    }
)
"""Facts the triage engine derives from an incident's facts and slot status (``device.<name>``)."""

_FACT_PATH = (
    r"^(kind|severity|(fact|slot|metric|device)\.[A-Za-z_][A-Za-z0-9_.-]{0,63}"
    r"|verification\.(failed|passed))$"
)


class Condition(PolicyModel):
    """``<fact> <op> <value>``; a missing fact makes every op false except ``exists: false``."""

    fact: str = Field(
        pattern=_FACT_PATH,
        description="kind, severity, fact.X, slot.X, metric.X, device.X (derived), verification.failed",
    )
    op: Literal["eq", "ne", "gt", "ge", "lt", "le", "in", "exists"] = "eq"
    value: FactValue | list[str | int | float | bool] = None

    @model_validator(mode="after")
    def _check(self) -> Condition:
        head, _, name = self.fact.partition(".")
        if head == "device" and name not in DEVICE_FACTS:
            raise ValueError(f"unknown device fact {name!r}; known: {', '.join(sorted(DEVICE_FACTS))}")
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("op 'in' needs a list value")
        if self.op in ("gt", "ge", "lt", "le") and (
            isinstance(self.value, bool) or not isinstance(self.value, int | float)
        ):
            raise ValueError(f"op {self.op!r} needs a number")
        if self.op == "exists" and not isinstance(self.value, bool):
            raise ValueError("op 'exists' needs true or false")
        return self


class TriageRule(PolicyModel):
    """One rule: a match, the allowed actions, the default, its certainty, and the human gate."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    description: str = ""
    kinds: list[IncidentKindName] = Field(default_factory=list, description="empty = any kind")
    when: list[Condition] = Field(default_factory=list, description="all must hold")
    allowed: list[Action] = Field(min_length=1)
    default: Action
    certainty: float = Field(ge=0.0, le=1.0)
    human_approval: bool = Field(
        default=False, description="a human must approve the default before it runs (the rule escalates)"
    )
    model_alternatives: list[Action] = Field(
        default_factory=list,
        description="milder allowed actions the model may pick instead of the default where this rule's "
        "case is ambiguous; empty = the default is required (the model only summarises)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TriageRule:
        if self.default not in self.allowed:
            raise ValueError(f"default {self.default.value!r} is not in allowed")
        for a in self.model_alternatives:
            if a not in self.allowed or ACTION_RANK[a] >= ACTION_RANK[self.default]:
                raise ValueError(f"model alternative {a.value!r} must be allowed and milder than the default")
        if self.human_approval and self.model_alternatives:
            raise ValueError("a rule that needs a human has no model alternatives")
        return self

    def autonomous(self, action: Action) -> bool:
        """Whether the agent may take ``action`` without a human under this rule (before certainty).

        Only the default and milder allowed actions qualify, and none when the rule needs approval:
        anything above the default is for an operator to choose.
        """
        return (
            action in self.allowed
            and not self.human_approval
            and ACTION_RANK[action] <= ACTION_RANK[self.default]
        )


class TriagePolicy(PolicyModel):
    """The whole triage document (``policies/defaults/triage.yaml``)."""

    version: int = Field(ge=1)
    min_certainty: dict[Action, float] = Field(
        default_factory=dict, description="an action runs unattended only at or above this certainty"
    )
    always_approve: list[Action] = Field(
        default_factory=list, description="actions that always need a human, whatever the rule says"
    )
    on_escalate: Action = Field(
        default=Action.ALERT, description="what runs at once while an escalation waits (observe or alert)"
    )
    escalation_ttl_s: int = Field(default=86_400, ge=60, le=30 * 86_400)
    model_may_choose: bool = Field(
        default=False,
        description="let the local model pick among a rule's default and its model_alternatives; "
        "false = summary only",
    )
    canary_parity_ratio: float = Field(
        default=DEFAULT_CANARY_PARITY_RATIO,
        ge=1.0,
        le=10.0,
        description="a canary abort whose candidate figure is within this ratio of the incumbent's (for the "
        "failed gate's metric) shows the incumbent failing as badly: device.incumbent_as_bad",
    )
    chaos_max_run_s: float = Field(
        default=DEFAULT_CHAOS_MAX_RUN_S,
        gt=0.0,
        le=86_400.0,
        description="the longest one chaos experiment runs (the chaos policy's max_experiment_s): a running "
        "experiment explains at most this much of an age SLO (time since the last ack, policy age)",
    )
    rules: list[TriageRule] = Field(default_factory=list)
    fallback: TriageRule

    @model_validator(mode="after")
    def _check(self) -> TriagePolicy:
        names = [r.name for r in self.rules] + [self.fallback.name]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate rule names {dupes}")
        if self.fallback.when:
            raise ValueError("the fallback rule must match everything (no 'when')")
        if self.fallback.default not in (Action.OBSERVE, Action.ALERT):
            raise ValueError("the fallback default must be observe or alert (it has no preconditions)")
        if self.on_escalate not in (Action.OBSERVE, Action.ALERT):
            raise ValueError("on_escalate must be observe or alert")
        for a, v in self.min_certainty.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"min_certainty[{a.value}] = {v} is outside 0..1")
        return self

    def threshold(self, action: Action) -> float:
        """Certainty an action needs to run unattended (1.0 when not listed, so unknown means escalate)."""
        return self.min_certainty.get(action, 1.0)


def default_triage_policy() -> TriagePolicy:
    """The shipped default document."""
    return load_default(TriagePolicy, "triage")
