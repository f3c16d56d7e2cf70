"""The incident responder: dedup -> rules -> (model) -> gate -> act or escalate. A thin orchestrator.

Decisions live in :mod:`sre_agent.triage` (pure); this module does the I/O around them: it asks the
advisor (the local model, bounded, any failure falls back to the rule default), runs what the gate allows
through the :class:`~sre_agent.actions.ActionExecutor`, stores escalations, and audits and records every
decision (telemetry table ``triage_decisions``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from policies.base import load_document
from policies.triage import Action, TriagePolicy, default_triage_policy
from sre_agent.actions import ActionExecutor, ActionHandler, ActionResult
from sre_agent.config import AgentSettings, LlmSettings
from sre_agent.escalations import Escalation, EscalationStatus, EscalationStore
from sre_agent.incidents import Incident, IncidentTracker, TrackVerdict
from sre_agent.triage import Advice, RuleMatch, TriageDecision, TriageEngine
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = ["Advisor", "LazyLlmAdvisor", "Outcome", "Responder", "build_responder", "load_triage_policy"]

MAX_TRACKED = 10_000

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
        self._last_action: dict[str, Action | None] = {}

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
        """Triage one incident sighting.

        Duplicates and cooled-down repeats are only counted, with one exception: when the last action
        for the problem was to re-run verification (a "try again first" action) and it recurs, it is
        triaged again with ``consecutive_failures`` set to the number of sightings, so a persistent
        failure moves on to the next rule instead of being re-run forever.
        """
        fp = incident.fingerprint
        tracked = self.tracker.observe(incident)
        if tracked != "new":
            if tracked == "duplicate" and self._last_action.get(fp) == Action.RERUN_VERIFICATION:
                seen = self.tracker.count(fp)
                facts = {**incident.facts, "consecutive_failures": seen}
                self.audit.append("incident.recurred", id=incident.id, fingerprint=fp, sightings=seen)
                return self._triage(incident.model_copy(update={"facts": facts}), tracked)
            return Outcome(incident.id, tracked, notes=(f"{tracked}; fingerprint {fp}",))
        self.audit.append(
            "incident.opened",
            id=incident.id,
            kind=incident.kind.value,
            module=incident.module,
            version=incident.version,
            fingerprint=fp,
        )
        return self._triage(incident, tracked)

    def _triage(self, incident: Incident, tracked: TrackVerdict) -> Outcome:
        decision = self.engine.decide(incident, self.advise(incident))
        self.audit.append("triage.decision", **decision.to_dict())
        self.telemetry.record("triage_decisions", decision.to_dict())
        results = tuple(self.executor.execute(a, incident) for a in decision.execute_now)
        escalation = self.escalations.create(incident, decision) if decision.escalated else None
        if len(self._last_action) >= MAX_TRACKED:
            self._last_action.pop(next(iter(self._last_action)))
        self._last_action[incident.fingerprint] = decision.execute_now[0] if decision.execute_now else None
        return Outcome(incident.id, tracked, decision, results, escalation)

    def process_escalations(self, roster_path: Path) -> list[tuple[Escalation, ActionResult | None]]:
        """The daemon's periodic escalation job: expire what is due, then carry out approved escalations
        (each approval verified again against the operator policy at ``roster_path`` right before acting).
        Without an operator policy nothing is executed."""
        from policies.approvals import load_roster
        from sre_core.errors import InputError

        self.escalations.expire_due()
        try:
            roster = load_roster(roster_path)
        except InputError as exc:
            if self.escalations.select(EscalationStatus.APPROVED):
                self.audit.append("escalation.execution_blocked", why=exc.why[:300])
            return []
        return self.escalations.execute_approved(self.executor, roster)


def load_triage_policy(policies_dir: Path) -> TriagePolicy:
    """``<policies>/triage.yaml`` when the signed policy module installed one, else the shipped default.

    Raises:
        InputError: the installed document is invalid (never silently replaced by the default).
    """
    installed = Path(policies_dir) / "triage.yaml"
    if installed.exists():
        return load_document(TriagePolicy, installed)
    return default_triage_policy()


class LazyLlmAdvisor:
    """Loads the local model on first use (start-up stays fast; a load failure only costs a fallback)."""

    def __init__(self, settings: LlmSettings) -> None:
        self.settings = settings
        self._advisor: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._advisor is None:
                from sre_agent.llm import LlmAdvisor, LocalModel

                self._advisor = LlmAdvisor(LocalModel.from_settings(self.settings), self.settings)
            return self._advisor

    def __call__(self, incident: Incident, match: RuleMatch) -> Advice:
        advice: Advice = self._get()(incident, match)
        return advice

    def summarize(self, prompt: str) -> str:
        text: str = self._get().summarize(prompt)
        return text


def build_responder(
    paths: StatePaths,
    settings: AgentSettings,
    *,
    clock: Clock,
    audit: AuditLog,
    handlers: Mapping[Action, ActionHandler] | None = None,
    telemetry: TelemetrySink | None = None,
    device_id: str = "",
) -> Responder:
    """Wire a responder for the daemon: policy from the device, escalations under the state directory,
    the local model when ``settings.llm.enabled`` (loaded lazily), the daemon's action handlers."""
    from sre_agent.escalations import escalations_dir

    policy = load_triage_policy(paths.policies)
    store = EscalationStore(
        escalations_dir(paths),
        audit,
        clock,
        device_id=device_id,
        telemetry=telemetry,
        ttl=timedelta(seconds=policy.escalation_ttl_s),
    )
    return Responder(
        TriageEngine(policy),
        ActionExecutor(handlers, audit=audit, telemetry=telemetry),
        store,
        IncidentTracker(clock),
        audit,
        advisor=LazyLlmAdvisor(settings.llm) if settings.llm.enabled else None,
        telemetry=telemetry,
    )
