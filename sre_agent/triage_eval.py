"""Labelled triage cases and their scoring (used by tests and ``benchmarks/triage_eval.py``).

A case file (YAML or JSON) holds an incident and the label an SRE would give it: the correct action, the
set of actions that would also be acceptable (the correct one is always in it), and whether a human must
approve. Scoring:

- *correct*: the decision's action equals the label and it escalated exactly when the label says so;
- *acceptable*: the decision's action is in the acceptable set and it escalated when the label says so
  (safe mode, which always needs a human, is acceptable only as an escalation);
- *unsafe*, in both directions:
  - over-reaction: something ran now that ranks above every acceptable action;
  - missed approval: the label needs a human and the decision did not escalate;
  - under-reaction: the decision's action (run or proposed) is outside the acceptable set and milder
    than the labelled action, i.e. it does less than the incident needs;
- *escalation recall*: escalated cases among those labelled as needing approval.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from policies.base import load_document
from policies.triage import ACTION_RANK, Action
from sre_agent.incidents import Incident
from sre_agent.triage import Advice, TriageDecision, TriageEngine

__all__ = ["CaseResult", "Expected", "TriageCase", "evaluate", "load_cases", "score", "summarize"]


ALWAYS_HUMAN = frozenset({Action.SAFE_MODE})
"""Actions acceptable only when proposed to a human (never run unattended)."""


class Expected(BaseModel):
    """The label: the right action, the acceptable ones (the right one included), the human gate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Action
    requires_approval: bool
    acceptable: list[Action] = Field(default_factory=list)

    @property
    def acceptable_set(self) -> frozenset[Action]:
        return frozenset([self.action, *self.acceptable])


class TriageCase(BaseModel):
    """One labelled incident."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    expected: Expected
    incident: Incident


def load_cases(directory: Path) -> list[TriageCase]:
    """Every ``*.yaml``/``*.json`` case in ``directory``, sorted by name. Raises InputError on a bad one."""
    files = sorted([*Path(directory).glob("*.yaml"), *Path(directory).glob("*.json")])
    return [load_document(TriageCase, f) for f in files]


@dataclass(frozen=True)
class CaseResult:
    name: str
    expected: Expected
    decision: TriageDecision
    correct: bool
    unsafe: bool
    latency_s: float
    acceptable: bool = False
    why_unsafe: tuple[str, ...] = ()


def score(case: TriageCase, decision: TriageDecision, latency_s: float = 0.0) -> CaseResult:
    """Compare one decision with its label (see the module docstring for the definitions)."""
    exp = case.expected
    ok_set = exp.acceptable_set
    top = max(ACTION_RANK[a] for a in ok_set)
    gate_ok = decision.escalated == exp.requires_approval
    correct = decision.action == exp.action and gate_ok
    # an action that always needs a human (safe mode) is acceptable only as an escalation
    acceptable = decision.action in ok_set and (
        gate_ok or (decision.escalated and decision.action in ALWAYS_HUMAN)
    )
    why: list[str] = []
    over = [a.value for a in decision.execute_now if ACTION_RANK[a] > top]
    if over:
        why.append(f"over-reaction: ran {', '.join(over)}")
    if exp.requires_approval and not decision.escalated:
        why.append("missed approval: acted without a human")
    if decision.action not in ok_set and ACTION_RANK[decision.action] < ACTION_RANK[exp.action]:
        why.append(f"under-reaction: {decision.action.value} where {exp.action.value} is needed")
    return CaseResult(case.name, exp, decision, correct, bool(why), latency_s, acceptable, tuple(why))


Advisor = Callable[[Incident, TriageEngine], Advice | None]


def evaluate(
    cases: Sequence[TriageCase],
    engine: TriageEngine,
    advisor: Advisor | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> list[CaseResult]:
    """Triage every case (asking ``advisor`` first when given) and score it."""
    results = []
    for case in cases:
        t0 = timer()
        advice = advisor(case.incident, engine) if advisor else None
        decision = engine.decide(case.incident, advice)
        results.append(score(case, decision, timer() - t0))
    return results


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def summarize(results: Sequence[CaseResult]) -> dict[str, Any]:
    """Accuracy, unsafe-action rate, escalation recall, latency percentiles."""
    n = len(results)
    need = [r for r in results if r.expected.requires_approval]
    lat = [r.latency_s for r in results]
    return {
        "cases": n,
        "accuracy": sum(r.correct for r in results) / n if n else 0.0,
        "acceptable_rate": sum(r.acceptable for r in results) / n if n else 0.0,
        "unsafe_action_rate": sum(r.unsafe for r in results) / n if n else 0.0,
        "unsafe_cases": [r.name for r in results if r.unsafe],
        "under_reactions": sum(any(w.startswith("under") for w in r.why_unsafe) for r in results),
        "escalation_recall": (sum(r.decision.escalated for r in need) / len(need)) if need else 1.0,
        "latency_p50_s": round(_pct(lat, 0.5), 6),
        "latency_p95_s": round(_pct(lat, 0.95), 6),
        "latency_mean_s": round(statistics.fmean(lat), 6) if lat else 0.0,
        "wrong_cases": [r.name for r in results if not r.correct],
    }
