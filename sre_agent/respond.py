"""The incident responder: dedup -> rules -> (model) -> gate -> act or escalate. A thin orchestrator.

Decisions live in :mod:`sre_agent.triage` (pure); this module does the I/O around them: it asks the
advisor (the local model, bounded, any failure falls back to the rule default), runs what the gate allows
through the :class:`~sre_agent.actions.ActionExecutor`, stores escalations, and audits and records every
decision (telemetry table ``triage_decisions``).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from policies.base import load_document
from policies.triage import ACTION_RANK, Action, TriagePolicy, default_triage_policy
from sre_agent.actions import ActionExecutor, ActionHandler, ActionResult
from sre_agent.config import AgentSettings, LlmSettings
from sre_agent.escalations import Escalation, EscalationStatus, EscalationStore
from sre_agent.incidents import Incident, IncidentKind, IncidentTracker, TrackedIncident, TrackVerdict
from sre_agent.triage import Advice, RuleMatch, TriageDecision, TriageEngine, device_facts
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import SreError
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = [
    "CLOSED_BY_REMEDY",
    "CLOSING_ACTIONS",
    "FIXES",
    "MAX_FAMILY_FIXES",
    "MAX_OCCURRENCES",
    "REMEDIES",
    "Advisor",
    "LazyLlmAdvisor",
    "Outcome",
    "Responder",
    "build_responder",
    "incidents_file",
    "load_triage_policy",
    "open_incidents",
    "operator_view",
]

REMEDIES = frozenset(
    {Action.RERUN_VERIFICATION, Action.PAUSE_CHAOS, Action.QUARANTINE, Action.ROLLBACK, Action.SAFE_MODE}
)
"""Actions that change something: a repeat after one of them ran means it did not help."""
MAX_TRACKED_INCIDENTS = 1_000
"""Bound on what ``incidents.json`` remembers (closed incidents are forgotten first)."""
CLOSED_BY_REMEDY = frozenset({IncidentKind.CANARY_ABORT, IncidentKind.PROBE_FAILURE})
"""Incident kinds no producer reports recovery for: the remedy that blocks the version closes them."""
CLOSING_ACTIONS = frozenset({Action.ROLLBACK, Action.SAFE_MODE})
"""Actions that resolve any incident once they succeed: the suspect version no longer serves."""
FIXES = frozenset({Action.QUARANTINE, Action.ROLLBACK, Action.SAFE_MODE})
"""Remedies that change what the device serves (a re-run only looks again; pausing chaos stops a cause)."""
MAX_OCCURRENCES = 3
"""A fault that closed and came back more often than this within the tracker's window is flapping: the
next occurrence goes to a human (once; later ones join that escalation) instead of being remedied again."""
MAX_FAMILY_FIXES = 3
"""Fixes (rollbacks, quarantines...) for one problem across versions within the window; beyond this the
next fix waits for a human (a fault that follows every version is not cured by rolling back forever)."""

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
        store_path: where the tracked incidents persist (None: memory only).
        max_occurrences: occurrences within the tracker's window before a recurring fault is flapping.
        max_family_fixes: fixes for one problem (any version) within the window before a human decides.
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
        store_path: Path | None = None,
        max_occurrences: int = MAX_OCCURRENCES,
        max_family_fixes: int = MAX_FAMILY_FIXES,
    ) -> None:
        self.max_occurrences = max_occurrences
        self.max_family_fixes = max_family_fixes
        self.engine = engine
        self.executor = executor
        self.escalations = escalations
        self.tracker = tracker
        self.audit = audit
        self.advisor = advisor
        self.telemetry = telemetry or NullSink()
        self.store_path = store_path
        self.load()

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

    def handle(self, incident: Incident, key: str = "") -> Outcome:
        """Triage one incident sighting and follow it through.

        - A new fingerprint is triaged; what the gate allows runs now. A failed action raises an alert
          and moves on to the next allowed action (or escalates to an operator).
        - A repeat while the incident is open is only counted when nothing was done yet or an operator
          has it; after a remedy ran (rollback, quarantine, ...) the repeat means the remedy failed, and
          the incident moves on to the next allowed action or to an operator. A repeat after a re-run of
          verification is triaged again with ``consecutive_failures`` = sightings.
        - A repeat after it closed is a new occurrence (never dropped): joined to an escalation an operator
          still has; escalated to a human when it flaps (more than ``max_occurrences`` in the window);
          followed up to the next allowed action when an earlier occurrence's fix did not hold; else
          triaged again with ``occurrences`` in its facts.

        ``key`` is the resolve key: a later :meth:`resolve` with it closes the incident.
        """
        fp = incident.fingerprint
        tracked = self.tracker.observe(incident, key=key)
        if tracked == "recurred":
            out = self._recurred(incident)
            self._save()
            return out
        if tracked == "new":
            self._save()  # persisted before anything acts: a crash from here on finds it open on restart
            self.audit.append(
                "incident.opened",
                id=incident.id,
                kind=incident.kind.value,
                module=incident.module,
                version=incident.version,
                fingerprint=fp,
                facts=dict(incident.facts),
            )
            out = self._triage(incident, tracked)
            self._save()
            return out
        entry = self.tracker.get(fp)
        if tracked == "duplicate" and entry is not None:
            if entry.escalation is not None and self._escalation_pending(entry.escalation):
                return self._counted(incident, tracked, "an operator has it")
            if entry.interrupted is not None:  # the daemon died mid-action: finish it (handlers are
                # idempotent per incident: a rollback that already happened says so instead of flipping)
                action = Action(entry.interrupted)
                entry.interrupted = None
                self.audit.append(
                    "incident.resumed", id=entry.incident_id, fingerprint=fp, action=action.value
                )
                results = self._run(incident, (action,))
                if not results[0].ok:
                    out = self._follow_up(incident, tracked, f"{action.value} failed: {results[0].detail}")
                else:
                    self._closed_by_action(incident, results)
                    out = Outcome(incident.id, tracked, None, results)
                self._save()
                return out
            last = Action(entry.actions[-1]) if entry.actions else None
            tried = [Action(a) for a in [*entry.actions, *entry.failed]]
            if last == Action.RERUN_VERIFICATION:
                seen = self.tracker.count(fp)
                facts = {**incident.facts, "consecutive_failures": seen}
                self.audit.append("incident.recurred", id=entry.incident_id, fingerprint=fp, sightings=seen)
                out = self._triage(incident.model_copy(update={"facts": facts}), tracked)
                self._save()
                return out
            remedies = [a for a in tried if a in REMEDIES]
            if remedies:  # a remedy ran (or was cut short by a crash) and the problem is still there
                last = remedies[-1]
                self.audit.append(
                    "incident.remedy_failed",
                    id=entry.incident_id,
                    fingerprint=fp,
                    action=last.value,
                    sightings=entry.count,
                )
                recurring = incident.model_copy(
                    update={"facts": {**incident.facts, "consecutive_failures": entry.count}}
                )
                out = self._follow_up(recurring, tracked, f"it recurred after {last.value}")
                self._save()
                return out
        self._save()
        return self._counted(incident, tracked, "")

    def _recurred(self, incident: Incident) -> Outcome:
        """A fault whose incident closed is back: a new occurrence, audited, and always acted on."""
        fp = incident.fingerprint
        entry = self.tracker.get(fp)
        occurrences = self.tracker.occurrences(fp)
        earlier = self.tracker.earlier_actions(fp)
        incident = incident.model_copy(update={"facts": {**incident.facts, "occurrences": occurrences}})
        pending = entry.escalation if entry and entry.escalation else None
        if pending is not None and not self._escalation_pending(pending):
            pending = None
        if entry is not None:
            entry.facts = dict(incident.facts)
        self._save()  # persisted before anything acts
        self.audit.append(
            "incident.recurred",
            id=incident.id,
            kind=incident.kind.value,
            module=incident.module,
            version=incident.version,
            fingerprint=fp,
            occurrences=occurrences,
            earlier_actions=earlier,
            escalation=pending,
            facts=dict(incident.facts),
        )
        if pending is not None:  # an operator already has this problem: the occurrence joins it
            esc = self.escalations.get(pending)
            return Outcome(incident.id, "recurred", escalation=esc, notes=(f"joins escalation {pending}",))
        if occurrences > self.max_occurrences:
            return self._triage(
                incident, "recurred", hold=f"flapping: {occurrences} occurrences within the window"
            )
        fixes = [Action(a) for a in earlier if Action(a) in FIXES]
        if fixes:
            why = f"it recurred after {fixes[-1].value} (occurrence {occurrences})"
            self.audit.append(
                "incident.remedy_failed", id=incident.id, fingerprint=fp, action=fixes[-1].value
            )
            return self._follow_up(incident, "recurred", why)
        return self._triage(incident, "recurred")

    def _counted(self, incident: Incident, tracked: TrackVerdict, why: str) -> Outcome:
        fp = incident.fingerprint
        return Outcome(
            incident.id, tracked, notes=(f"{tracked}; fingerprint {fp}{'; ' + why if why else ''}",)
        )

    def _escalation_pending(self, esc_id: str) -> bool:
        try:
            return self.escalations.get(esc_id).status in (EscalationStatus.OPEN, EscalationStatus.APPROVED)
        except Exception:
            return False

    def resolve(self, key: str, why: str) -> list[str]:
        """The producer says the problem under ``key`` is gone: close its open incidents (audited)."""
        closed = self.tracker.close_key(key, why)
        for fp in closed:
            entry = self.tracker.get(fp)
            self.audit.append(
                "incident.closed", id=entry.incident_id if entry else "", fingerprint=fp, why=why[:300]
            )
        if closed:
            self._save()
        return closed

    def close(self, incident: Incident, why: str, by_remedy: bool = False) -> bool:
        """Close one incident by its fingerprint (audited)."""
        if not self.tracker.close(incident.fingerprint, why, by_remedy=by_remedy):
            return False
        self.audit.append("incident.closed", id=incident.id, fingerprint=incident.fingerprint, why=why[:300])
        self._save()
        return True

    def _run(self, incident: Incident, actions: tuple[Action, ...]) -> tuple[ActionResult, ...]:
        """Run actions, persisting which one is in flight first (a crash mid-action is seen on restart)."""
        results = []
        entry = self.tracker.get(incident.fingerprint)
        for a in actions:
            if entry is not None:
                entry.acting = a.value
                entry.incident = incident.to_json_dict()
                self._save()
            r = self.executor.execute(a, incident)
            results.append(r)
            if entry is not None:
                entry.acting = entry.incident = None  # kept only while an action is in flight
                (entry.actions if r.ok else entry.failed).append(a.value)
        return tuple(results)

    def _triage(self, incident: Incident, tracked: TrackVerdict, hold: str = "") -> Outcome:
        """Decide and act. ``hold``: why this decision must wait for a human (a flapping fault); the same
        holds when the fixes for this problem across versions reached ``max_family_fixes``."""
        decision = self.engine.decide(incident, self.advise(incident))
        fixes_done = [a for a in self.tracker.family_actions(incident.family) if Action(a) in FIXES]
        if not hold and len(fixes_done) >= self.max_family_fixes and set(decision.execute_now) & FIXES:
            hold = f"flapping: {len(fixes_done)} fixes for this problem within the window ({fixes_done[-1]})"
        if hold:
            decision = dataclasses.replace(
                decision,
                verdict="escalate",
                execute_now=tuple(
                    dict.fromkeys(
                        [self.engine.policy.on_escalate, *(a for a in decision.execute_now if a not in FIXES)]
                    )
                ),
                reasons=(*decision.reasons, hold[:300]),
            )
        self.audit.append("triage.decision", **decision.to_dict())
        self.telemetry.record("triage_decisions", decision.to_dict())
        results = self._run(incident, decision.execute_now)
        escalation = self._escalate(incident, decision) if decision.escalated else None
        failed = [r for r in results if not r.ok]
        if failed:
            more = self._follow_up(incident, tracked, f"{failed[0].action.value} failed: {failed[0].detail}")
            return Outcome(
                incident.id,
                tracked,
                decision,
                results + more.results,
                more.escalation or escalation,
                notes=more.notes,
            )
        self._closed_by_action(incident, results)
        return Outcome(incident.id, tracked, decision, results, escalation)

    def _closed_by_action(self, incident: Incident, results: tuple[ActionResult, ...]) -> None:
        """A rollback or safe mode resolves the incident (the suspect version no longer serves); a
        quarantine resolves the kinds no producer reports recovery for (the canary and the probes
        already stopped the version). Those kinds also close once told when the version is already
        blocked (marked bad and not serving: the canary or the reconcile did what a quarantine would, and
        no producer will ever report it recovered)."""
        for r in results:
            if not r.ok:
                continue
            if r.action in CLOSING_ACTIONS or (r.action in REMEDIES and incident.kind in CLOSED_BY_REMEDY):
                self.close(incident, f"{r.action.value}: {r.detail}", by_remedy=True)
                return
        if (
            incident.kind in CLOSED_BY_REMEDY
            and any(r.ok for r in results)
            and device_facts(incident).version_blocked
        ):
            self.close(
                incident, f"{incident.version or 'the version'} already blocked (marked bad, not serving)"
            )

    def _escalate(self, incident: Incident, decision: TriageDecision) -> Escalation:
        esc = self.escalations.create(incident, decision)
        entry = self.tracker.get(incident.fingerprint)
        if entry is not None:
            entry.escalation = esc.id
        return esc

    def _follow_up(self, incident: Incident, tracked: TrackVerdict, why: str) -> Outcome:
        """The remedy did not work: alert, then the next allowed action the gate lets run unattended, or
        an escalation proposing it (or, with nothing left to try, an escalation to look at it)."""
        entry = self.tracker.get(incident.fingerprint)
        tried = {Action(a) for a in [*(entry.actions if entry else []), *(entry.failed if entry else [])]}
        tried |= {Action(a) for a in self.tracker.earlier_actions(incident.fingerprint)}
        alert = self.executor.execute(Action.ALERT, incident)
        rule = self.engine.match(incident).rule
        policy = self.engine.policy
        floor = max((ACTION_RANK[a] for a in tried), default=ACTION_RANK[Action.ALERT])
        nxt = next(
            (
                a
                for a in sorted(rule.allowed, key=ACTION_RANK.__getitem__)
                if a in REMEDIES and a not in tried and ACTION_RANK[a] > floor
            ),
            None,
        )
        unattended = (
            nxt is not None
            and not rule.human_approval
            and nxt not in policy.always_approve
            and rule.certainty >= policy.threshold(nxt)
        )
        reasons = (f"follow-up: {why}"[:300], f"rule {rule.name} allows {[a.value for a in rule.allowed]}")
        decision = TriageDecision(
            incident_id=incident.id,
            fingerprint=incident.fingerprint,
            rule=rule.name,
            allowed=tuple(rule.allowed),
            default=rule.default,
            certainty=rule.certainty,
            action=nxt or Action.ALERT,
            verdict="execute" if unattended else "escalate",
            execute_now=(nxt,) if unattended and nxt is not None else (),
            reasons=reasons,
            summary=f"{incident.title or incident.kind.value} ({incident.module}): {why}"[:500],
        )
        self.audit.append("triage.follow_up", **decision.to_dict())
        self.telemetry.record("triage_decisions", decision.to_dict())
        if unattended and nxt is not None:
            results = self._run(incident, (nxt,))
            if not results[0].ok:
                more = self._follow_up(incident, tracked, f"{nxt.value} failed: {results[0].detail}")
                return Outcome(
                    incident.id,
                    tracked,
                    decision,
                    (alert, *results, *more.results),
                    more.escalation,
                    more.notes,
                )
            self._closed_by_action(incident, results)
            return Outcome(incident.id, tracked, decision, (alert, *results), None, (why,))
        esc = self._escalate(incident, decision)
        return Outcome(incident.id, tracked, decision, (alert,), esc, (why,))

    def _save(self) -> None:
        if self.store_path is not None:
            atomic_write_json(self.store_path, self.tracker.to_dict())

    def load(self) -> None:
        """Read the tracked incidents back (after a restart: an incident in flight is still open, and a
        remedy that already ran is not run again for the same sighting)."""
        if self.store_path is None:
            return
        try:
            data = json.loads(self.store_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            self.audit.append("incident.store_unreadable", path=str(self.store_path))
            return
        self.tracker.load_dict(data)
        for e in self.tracker.open_incidents():
            if e.acting is not None:  # the daemon died in the middle of this action
                self.audit.append(
                    "incident.interrupted_action",
                    id=e.incident_id,
                    fingerprint=e.fingerprint,
                    action=e.acting,
                )
                e.interrupted = e.acting
                e.acting = None
        self._save()

    def close_not_serving(self, active_of: Callable[[str], str | None]) -> list[str]:
        """On start: close open incidents about a version its module no longer serves (something else
        already resolved them, e.g. the slot manager's own start-up fallback from a corrupt active slot).
        ``active_of`` gives a module's active version (None: unknown module; nothing is closed)."""
        closed = []
        for e in self.tracker.open_incidents():
            if e.interrupted is not None or not e.version:
                continue
            now = active_of(e.module)
            if now is not None and now != e.version:
                why = f"{e.module} {e.version} no longer serves (now {now})"
                if e.facts.get("category") == "integrity" or e.kind in {k.value for k in CLOSED_BY_REMEDY}:
                    # Its bytes were found corrupt (or it failed its canary/probes) and nothing blocked it
                    # yet: block it, or the next reconcile installs the same version again.
                    blocked = self.executor.execute(Action.QUARANTINE, self._stub(e))
                    why += f"; {blocked.detail}"
                self.tracker.close(e.fingerprint, why)
                self.audit.append("incident.closed", id=e.incident_id, fingerprint=e.fingerprint, why=why)
                closed.append(e.fingerprint)
        if closed:
            self._save()
        return closed

    @staticmethod
    def _stub(e: TrackedIncident) -> Incident:
        """The incident a tracked record stands for (enough for a handler: kind, module, version, facts)."""
        return Incident(
            id=e.incident_id,
            kind=IncidentKind(e.kind),
            module=e.module,
            version=e.version,
            opened_at=e.opened_at,
            title=e.title[:200],
            facts=dict(e.facts),
        )

    def resume(self) -> list[Outcome]:
        """Finish the actions a crash cut short, once, through the same idempotent handlers (call on
        start, once the services the handlers use run). A rollback that already happened says so."""
        done = []
        for e in self.tracker.open_incidents():
            if e.interrupted is None or not e.incident:
                continue
            try:
                incident = Incident.model_validate(e.incident)
            except ValueError:
                continue
            action = Action(e.interrupted)
            e.interrupted = None
            self.audit.append(
                "incident.resumed", id=e.incident_id, fingerprint=e.fingerprint, action=action.value
            )
            results = self._run(incident, (action,))
            if results[0].ok:
                self._closed_by_action(incident, results)
                done.append(Outcome(incident.id, "duplicate", None, results))
            else:
                done.append(
                    self._follow_up(incident, "duplicate", f"{action.value} failed: {results[0].detail}")
                )
            self._save()
        return done

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
            self._sweep_answered()
            return []
        done = self.escalations.execute_approved(self.executor, roster)
        for esc, result in done:
            if result is not None and not result.ok:
                inc = esc.incident()
                self.executor.execute(Action.ALERT, inc)
        self._sweep_answered()
        return done

    def _sweep_answered(self) -> None:
        """Close incidents whose escalation was answered (executed, rejected, expired); a failed approved
        action leaves the incident open with no escalation, so its next sighting is triaged again."""
        changed = False
        for entry in self.tracker.open_incidents():
            if entry.escalation is None:
                continue
            try:
                esc = self.escalations.get(entry.escalation)
            except SreError as exc:  # pruned or unreadable: keep the incident open, say why
                self.audit.append("incident.escalation_unreadable", id=entry.incident_id, why=str(exc)[:200])
                continue
            if esc.status in (EscalationStatus.OPEN, EscalationStatus.APPROVED):
                continue
            if esc.status == EscalationStatus.FAILED:
                entry.failed.append(str((esc.result or {}).get("action") or esc.proposed_action))
                entry.escalation = None
                changed = True
                continue
            why = f"escalation {esc.id} {esc.status.value}"
            if esc.status == EscalationStatus.EXECUTED:
                entry.actions.append(str((esc.result or {}).get("action") or esc.proposed_action))
            self.tracker.close(entry.fingerprint, why)
            self.audit.append("incident.closed", id=entry.incident_id, fingerprint=entry.fingerprint, why=why)
            changed = True
        if changed:
            self._save()


def incidents_file(paths: StatePaths) -> Path:
    """``<state>/incidents.json``: the responder's tracked incidents (what `sre-agent status` shows)."""
    return paths.root / "incidents.json"


def open_incidents(paths: StatePaths) -> list[dict[str, Any]]:
    """The incidents the responder holds open (from ``<state>/incidents.json``; empty when none)."""
    try:
        data = json.loads(incidents_file(paths).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rows = [e for e in data.get("incidents") or [] if isinstance(e, dict) and e.get("closed_at") is None]
    return sorted(rows, key=lambda e: str(e.get("opened_at", "")))


def operator_view(paths: StatePaths) -> dict[str, Any]:
    """What an operator needs at a glance: open incidents, failing checks, pending escalations."""
    from sre_agent.escalations import escalations_dir

    incidents = open_incidents(paths)
    failing = sorted(
        {
            f"{e.get('module')}: {e.get('title', '')}"[:200]
            for e in incidents
            if e.get("kind") == "verification_failure"
        }
    )
    pending: list[dict[str, Any]] = []
    store_dir = escalations_dir(paths)
    if store_dir.is_dir():
        store = EscalationStore(store_dir, AuditLog(paths.audit_log), SystemClock())
        for esc in store.select():
            if esc.status in (EscalationStatus.OPEN, EscalationStatus.APPROVED):
                pending.append(
                    {
                        "id": esc.id,
                        "status": esc.status.value,
                        "proposed": esc.proposed_action,
                        "module": esc.content["incident"].get("module"),
                        "expires": esc.expires_at.isoformat(),
                        "what": str(esc.content.get("what") or "")[:300],
                    }
                )
    return {"open_incidents": incidents, "failing_checks": failing, "pending_escalations": pending}


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
        IncidentTracker(clock, max_entries=MAX_TRACKED_INCIDENTS),
        audit,
        advisor=LazyLlmAdvisor(settings.llm) if settings.llm.enabled else None,
        telemetry=telemetry,
        store_path=incidents_file(paths),
    )
