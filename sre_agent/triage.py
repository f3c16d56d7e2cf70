"""Triage: the deterministic rules engine and the policy gate. Pure: values in, decision out.

1. :meth:`TriageEngine.match` picks the first policy rule whose conditions hold on the incident's
   structured values. That fixes the allowed actions, the default and the certainty. Log and event text
   is never read here.
2. An :class:`Advice` (from the local model, or none) may name one action and carry a summary. The choice
   counts only when it is in the allowed set and no more severe than the default; anything else is
   ignored and recorded. So the model can only narrow, never widen.
3. :meth:`TriageEngine.decide` applies the gate: a rule needing a human, an action policy always gates,
   or a certainty under the action's threshold escalates (proposing the action, running only the policy's
   ``on_escalate`` action meanwhile); otherwise the action executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from policies.triage import ACTION_RANK, Action, Condition, TriagePolicy, TriageRule
from sre_agent.incidents import FactValue, Incident

__all__ = ["Advice", "RuleMatch", "TriageDecision", "TriageEngine", "resolve_fact"]

_MISSING = object()


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
    """The matched rule and the conditions that held."""

    rule: TriageRule
    reasons: tuple[str, ...]


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


def resolve_fact(incident: Incident, path: str) -> FactValue | object:
    """The structured value a condition names, or a private sentinel when absent.

    Only ``kind``, ``severity``, ``fact.*``, ``slot.*``, ``metric.*`` and ``verification.failed|passed``
    resolve; there is deliberately no path to log lines or event messages.
    """
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
        """The first rule that matches (the fallback when none does)."""
        for rule in self.policy.rules:
            if rule.kinds and incident.kind.value not in rule.kinds:
                continue
            reasons = []
            for cond in rule.when:
                value = resolve_fact(incident, cond.fact)
                if not _holds(cond, value):
                    break
                shown = "absent" if value is _MISSING else repr(value)
                reasons.append(f"{cond.fact} {cond.op} {cond.value!r} (is {shown})")
            else:
                return RuleMatch(rule, (f"rule {rule.name}: {rule.description}".strip(), *reasons))
        fb = self.policy.fallback
        return RuleMatch(fb, (f"no rule matched; fallback {fb.name}",))

    def decide(self, incident: Incident, advice: Advice | None = None) -> TriageDecision:
        """Apply the gate. ``advice`` may only pick the default or a milder allowed action."""
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
            if picked is None or picked not in rule.allowed:
                reasons.append(f"model choice {choice[:40]!r} is not an allowed action; ignored")
            elif ACTION_RANK[picked] > ACTION_RANK[rule.default]:
                reasons.append(
                    f"model choice {picked.value!r} is more severe than the default; only an operator may "
                    "choose it"
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
        else:
            verdict = "execute"
            now = (action,)
        return TriageDecision(
            incident_id=incident.id,
            fingerprint=incident.fingerprint,
            rule=rule.name,
            allowed=tuple(rule.allowed),
            default=rule.default,
            certainty=rule.certainty,
            action=action,
            verdict=verdict,
            execute_now=now,
            reasons=tuple(reasons),
            model_choice=choice,
            model_choice_used=used,
            summary=_summary(incident, rule, action, verdict, advice),
            advice_error=advice.error if advice else None,
        )


def _as_action(value: str) -> Action | None:
    try:
        return Action(value)
    except ValueError:
        return None


def _summary(
    incident: Incident, rule: TriageRule, action: Action, verdict: str, advice: Advice | None
) -> str:
    """The operator summary: deterministic facts first, then the model's note when it wrote one."""
    what = incident.title or f"{incident.kind.value} on {incident.module}"
    ver = f" {incident.version}" if incident.version else ""
    step = f"proposes {action.value} for approval" if verdict == "escalate" else f"takes {action.value}"
    text = f"{what} ({incident.module}{ver}); rule {rule.name} {step}."
    if advice is not None and advice.summary:
        text += f" Model note: {advice.summary}"
    return text
