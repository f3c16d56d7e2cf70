"""The incident responder: dedup -> rules -> (model) -> gate -> act or escalate. A thin orchestrator.

Decisions live in :mod:`sre_agent.triage` (pure); this module does the I/O around them: it asks the
advisor (the local model, bounded, any failure falls back to the rule default), runs what the gate allows
through the :class:`~sre_agent.actions.ActionExecutor`, stores escalations, and audits and records every
decision (telemetry table ``triage_decisions``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sre_agent.actions import ActionExecutor, ActionResult
from sre_agent.escalations import Escalation, EscalationStore
from sre_agent.incidents import Incident, IncidentTracker, TrackVerdict
from sre_agent.triage import Advice, RuleMatch, TriageDecision, TriageEngine
from sre_core.audit import AuditLog
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = ["Advisor", "Outcome", "Responder"]

Advisor = Callable[[Incident, RuleMatch], Advice]
"""Given the incident and the matched rule, say which allowed action and why. May raise; may be slow."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one incident sighting."""

    incident_id: str
    tracked: TrackVerdict
    decision: TriageDecision | None = None
    results: tuple[ActionResult, ...] = ()
    escalation: Escalation | None = None
    notes: tuple[str, ...] = field(default=())


class Responder:
    """Handles incidents end to end.

    Args:
        engine: rules + gate.
        executor: runs actions.
        escalations: the escalation store.
        tracker: dedup and cooldown.
        audit: the audit trail.
        advisor: the local model (None = rules only).
        telemetry: sink for decision rows.
    """

    def __init__(
        self,
        engine: TriageEngine,
        executor: ActionExecutor,
        escalations: EscalationStore,
        tracker: IncidentTracker,
        audit: AuditLog,
        advisor: Advisor | None = None,
        telemetry: TelemetrySink | None = None,
    ) -> None:
        self.engine = engine
        self.executor = executor
        self.escalations = escalations
        self.tracker = tracker
        self.audit = audit
        self.advisor = advisor
        self.telemetry = telemetry or NullSink()

    def advise(self, incident: Incident) -> Advice | None:
        """Ask the advisor; an exception becomes an Advice with no choice (the rule default stands)."""
        if self.advisor is None:
            return None
        t0 = time.perf_counter()
        try:
            return self.advisor(incident, self.engine.match(incident))
        except Exception as exc:
            return Advice(
                choice=None,
                error=f"{type(exc).__name__}: {exc}"[:300],
                source="rules",
                latency_s=time.perf_counter() - t0,
            )

    def handle(self, incident: Incident) -> Outcome:
        """Triage one incident sighting (duplicates and cooled-down repeats are only counted)."""
        tracked = self.tracker.observe(incident)
        if tracked != "new":
            return Outcome(incident.id, tracked, notes=(f"{tracked}; fingerprint {incident.fingerprint}",))
        self.audit.append(
            "incident.opened",
            id=incident.id,
            kind=incident.kind.value,
            module=incident.module,
            version=incident.version,
            fingerprint=incident.fingerprint,
        )
        decision = self.engine.decide(incident, self.advise(incident))
        self.audit.append("triage.decision", **decision.to_dict())
        self.telemetry.record("triage_decisions", decision.to_dict())
        results = tuple(self.executor.execute(a, incident) for a in decision.execute_now)
        escalation = self.escalations.create(incident, decision) if decision.escalated else None
        return Outcome(incident.id, tracked, decision, results, escalation)
