"""Carrying out triage actions through handlers the daemon registers.

The deployment core owns rollback, quarantine and safe mode; verification owns re-runs; the chaos
harness owns pausing. This module only maps an :class:`~policies.triage.Action` to the callable that does
it, bounds what a handler can do to the caller (exceptions become a failed result), and records every
attempt in telemetry and the audit trail. ``observe`` and ``alert`` work without any handler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from policies.triage import Action
from sre_agent.incidents import Incident
from sre_core.audit import AuditLog
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = ["ActionExecutor", "ActionHandler", "ActionResult"]

ActionHandler = Callable[[Incident], str]
"""Does the action for the incident; returns a short detail, raises on failure."""


@dataclass(frozen=True)
class ActionResult:
    action: Action
    ok: bool
    detail: str


class ActionExecutor:
    """Runs actions by name through registered handlers.

    Args:
        handlers: action -> handler; ``observe`` and ``alert`` have built-in handlers (an event).
        audit: the audit trail (every attempt is recorded).
        telemetry: where alert events go.
    """

    def __init__(
        self,
        handlers: Mapping[Action, ActionHandler] | None = None,
        audit: AuditLog | None = None,
        telemetry: TelemetrySink | None = None,
    ) -> None:
        self.handlers = dict(handlers or {})
        self.audit = audit
        self.telemetry = telemetry or NullSink()

    def execute(self, action: Action, incident: Incident, actor: str = "agent") -> ActionResult:
        """Run one action; never raises for a handler failure (the result says so)."""
        handler = self.handlers.get(action)
        try:
            if handler is not None:
                detail = handler(incident)
                ok = True
            elif action == Action.OBSERVE:
                detail, ok = "recorded; no change", True
            elif action == Action.ALERT:
                self.telemetry.event(
                    "incident.alert",
                    f"{incident.kind.value} on {incident.module}: {incident.title}"[:300],
                    severity="warning",
                    attrs={"incident_id": incident.id, "module": incident.module},
                )
                detail, ok = "alert raised", True
            else:
                detail, ok = f"no handler registered for {action.value}", False
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}"[:500], False
        result = ActionResult(action, ok, str(detail)[:500])
        if self.audit is not None:
            self.audit.append(
                "triage.action",
                actor=actor,
                incident=incident.id,
                action=action.value,
                ok=ok,
                detail=result.detail,
            )
        return result
