"""Escalations: what the agent would not do alone, with the context an operator needs to decide.

An escalation's *content* (what, why, device state, the incident with its evidence, the triage decision,
the model's summary, the proposed and allowed actions, creation and expiry) is immutable and hashed
(:func:`policies.approvals.content_hash`); an operator's signed approval is bound to that hash. The record
around it carries the lifecycle status, its history, the approval and the result.

Lifecycle, as one table (:data:`TRANSITIONS`)::

    open --approve--> approved --executed--> executed
                               --failed----> failed
                               --expire----> expired   (the approval lapsed before the agent acted)
    open --reject---> rejected
    open --expire---> expired

Storage: one JSON file per escalation under ``<state>/escalations/`` (atomic writes, a lock file for
transitions). The status field is a convenience copy: "executed once" and "decided once" are enforced by
the hash-chained audit trail (:meth:`EscalationStore.ledger`), where the start of every execution is
recorded before the action runs; an escalation the trail records as started, executed, failed, rejected
or expired is refused whatever its file says, and a broken chain blocks every approval and execution.
Every write is also offered to the telemetry sink as a row of the ``escalations`` table (the DuckDB store
and its uplink, where wired), and every step is audited.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.approvals import Approval, ApprovalError, OperatorRoster, content_hash, verify_approval
from policies.triage import Action
from sre_agent.actions import ActionExecutor, ActionResult
from sre_agent.incidents import Incident
from sre_agent.triage import TriageDecision
from sre_core.atomic import atomic_write_json, fsync_dir, remove_stale_temps
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.errors import InputError, SreError
from sre_core.lifecycle import NoTransitionError, StateTable
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = [
    "RESUME",
    "TABLE",
    "TRANSITIONS",
    "Escalation",
    "EscalationEvent",
    "EscalationStatus",
    "EscalationStore",
    "build_content",
    "escalations_dir",
    "next_status",
]

MAX_ESCALATIONS = 5_000
_DECISIVE = frozenset(
    {
        "escalation.execution_started",
        "escalation.executed",
        "escalation.failed",
        "escalation.reject",
        "escalation.expire",
    }
)
"""Audit events after which an escalation is never decided or executed again."""


class EscalationStatus(StrEnum):
    OPEN = "open"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    EXECUTED = "executed"
    FAILED = "failed"


class EscalationEvent(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    EXPIRE = "expire"
    EXECUTED = "executed"
    FAILED = "failed"


S, E = EscalationStatus, EscalationEvent
TRANSITIONS: dict[tuple[EscalationStatus, EscalationEvent], EscalationStatus] = {
    (S.OPEN, E.APPROVE): S.APPROVED,
    (S.OPEN, E.REJECT): S.REJECTED,
    (S.OPEN, E.EXPIRE): S.EXPIRED,
    (S.APPROVED, E.EXECUTED): S.EXECUTED,
    (S.APPROVED, E.FAILED): S.FAILED,
    (S.APPROVED, E.EXPIRE): S.EXPIRED,
}


RESUME: dict[EscalationStatus, EscalationStatus] = {s: s for s in EscalationStatus}
"""Every stored status is stable across a restart: an open one waits, an approved one is verified again
and executed by the next escalations job, the rest are final."""
TABLE: StateTable[EscalationStatus, EscalationEvent] = StateTable(
    "escalation", TRANSITIONS, S.OPEN, RESUME, frozenset({S.REJECTED, S.EXPIRED, S.EXECUTED, S.FAILED})
)


def next_status(status: EscalationStatus, event: EscalationEvent) -> EscalationStatus:
    """The lifecycle table. Raises InputError for an event the state does not accept."""
    try:
        return TABLE.next(status, event)
    except NoTransitionError:
        raise InputError(
            f"{event.value} escalation",
            f"an escalation that is {status.value} cannot be {event.value}d",
            "list escalations to see their state",
        ) from None


def escalations_dir(paths: StatePaths) -> Path:
    return paths.root / "escalations"


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ts: datetime
    event: str
    actor: str
    detail: str = ""


class Escalation(BaseModel):
    """The stored record: immutable ``content`` + its hash, and the mutable lifecycle around it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^esc-[0-9a-f]{16}$")
    content: dict[str, Any]
    content_hash: str
    status: EscalationStatus = EscalationStatus.OPEN
    history: list[HistoryEntry] = Field(default_factory=list)
    approval: dict[str, Any] | None = None
    result: dict[str, Any] | None = None

    @property
    def proposed_action(self) -> str:
        return str(self.content["proposed_action"])

    @property
    def allowed(self) -> list[str]:
        return [str(a) for a in self.content["allowed"]]

    @property
    def expires_at(self) -> datetime:
        return datetime.fromisoformat(str(self.content["expires_at"]))

    @property
    def fingerprint(self) -> str:
        return str(self.content["incident"].get("fingerprint", ""))

    def incident(self) -> Incident:
        data = dict(self.content["incident"])
        data.pop("fingerprint", None)
        return Incident.model_validate(data)

    def row(self) -> dict[str, Any]:
        """A flat row for the telemetry ``escalations`` table."""
        return {
            "id": self.id,
            "created_at": self.content["created_at"],
            "expires_at": self.content["expires_at"],
            "device_id": self.content.get("device_id", ""),
            "incident_id": self.content["incident"]["id"],
            "kind": self.content["incident"]["kind"],
            "module": self.content["incident"]["module"],
            "proposed_action": self.proposed_action,
            "status": self.status.value,
            "content_hash": self.content_hash,
            "document": self.model_dump_json(),
        }


def build_content(
    incident: Incident,
    decision: TriageDecision,
    *,
    device_id: str,
    now: datetime,
    ttl: timedelta,
    device_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The immutable, hashed content of an escalation."""
    inc = incident.to_json_dict()
    inc["fingerprint"] = incident.fingerprint
    return {
        "v": 1,
        "what": incident.title or f"{incident.kind.value} on {incident.module}",
        "why": list(decision.reasons),
        "device_id": device_id,
        "device_state": device_state or {"slot": incident.evidence.slot.model_dump(mode="json")},
        "incident": inc,
        "decision": decision.to_dict(),
        "llm_summary": decision.summary,
        "proposed_action": decision.action.value,
        "allowed": [a.value for a in decision.allowed],
        "created_at": now.isoformat(),
        "expires_at": (now + ttl).isoformat(),
    }


class EscalationStore:
    """Escalation files under one directory, with audited, verified transitions.

    Args:
        directory: ``<state>/escalations``.
        audit: the audit trail.
        clock: time source ("now" is read once per operation).
        device_id: recorded in new escalations.
        telemetry: receives a ``record("escalations", row)`` on every write (the DuckDB mirror seam).
        ttl: how long an escalation stays open before it expires.
    """

    def __init__(
        self,
        directory: Path,
        audit: AuditLog,
        clock: Clock,
        device_id: str = "",
        telemetry: TelemetrySink | None = None,
        ttl: timedelta = timedelta(hours=24),
    ) -> None:
        self.directory = Path(directory)
        self.audit = audit
        self.clock = clock
        self.device_id = device_id
        self.telemetry = telemetry or NullSink()
        self.ttl = ttl

    # -- storage ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / ".lock").open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _path(self, esc_id: str) -> Path:
        return self.directory / f"{esc_id}.json"

    def _write(self, esc: Escalation) -> None:
        atomic_write_json(self._path(esc.id), json.loads(esc.model_dump_json()))
        try:
            self.telemetry.record("escalations", esc.row())
        except Exception as exc:  # the file is the record of truth; a failing mirror must not block it
            self.audit.append("escalation.mirror_failed", id=esc.id, error=str(exc)[:200])

    def get(self, esc_id: str) -> Escalation:
        """Load one escalation and check its content hash.

        Raises:
            InputError: unknown id.
            SreError: the file is unreadable or its content does not match its hash (edited).
        """
        if not esc_id.startswith("esc-") or "/" in esc_id:
            raise InputError(f"show escalation {esc_id}", "not an escalation id", "ids look like esc-0123…")
        path = self._path(esc_id)
        if not path.exists():
            raise InputError(f"show escalation {esc_id}", "no such escalation", "run `escalations list`")
        try:
            esc = Escalation.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise SreError(
                f"read escalation {esc_id}", f"the file is damaged: {exc.errors()[0]['msg']}"
            ) from exc
        if content_hash(esc.content) != esc.content_hash or esc.id != "esc-" + esc.content_hash[:16]:
            raise SreError(
                f"read escalation {esc_id}",
                "its content does not match its hash (the file was edited)",
                "treat the device as tampered; compare with the copy uploaded to the hub",
            )
        return esc

    def select(self, status: EscalationStatus | None = None) -> list[Escalation]:
        """All escalations (newest first), optionally of one status. Damaged files are skipped."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in sorted(self.directory.glob("esc-*.json"))[:MAX_ESCALATIONS]:
            try:
                esc = self.get(p.stem)
            except SreError:
                continue
            if status is None or esc.status == status:
                out.append(esc)
        out.sort(key=lambda e: str(e.content["created_at"]), reverse=True)
        return out

    def open_for(self, fingerprint: str) -> Escalation | None:
        """The open (or approved, not yet executed) escalation for an incident fingerprint."""
        for esc in self.select():
            if esc.fingerprint == fingerprint and esc.status in (S.OPEN, S.APPROVED):
                return esc
        return None

    # -- lifecycle -------------------------------------------------------------------------------
    def create(
        self, incident: Incident, decision: TriageDecision, device_state: dict[str, Any] | None = None
    ) -> Escalation:
        """Store a new escalation for an escalated decision (or return the open one for the same problem)."""
        if not decision.escalated:
            raise ValueError("create() needs an escalated decision")
        with self._locked():
            remove_stale_temps(self.directory)
            existing = self.open_for(incident.fingerprint)
            if existing is not None:
                self.audit.append("escalation.duplicate", id=existing.id, incident=incident.id)
                return existing
            now = self.clock.now()
            content = build_content(
                incident, decision, device_id=self.device_id, now=now, ttl=self.ttl, device_state=device_state
            )
            h = content_hash(content)
            esc = Escalation(
                id="esc-" + h[:16],
                content=content,
                content_hash=h,
                history=[HistoryEntry(ts=now, event="created", actor="agent", detail=decision.rule)],
            )
            self._write(esc)
        self.audit.append(
            "escalation.created",
            id=esc.id,
            incident=incident.id,
            proposed=esc.proposed_action,
            content_hash=h,
        )
        return esc

    def _transition(
        self, esc: Escalation, event: EscalationEvent, actor: str, detail: str, **update: Any
    ) -> Escalation:
        new = next_status(esc.status, event)
        entry = HistoryEntry(ts=self.clock.now(), event=event.value, actor=actor, detail=detail[:500])
        updated = esc.model_copy(update={"status": new, "history": [*esc.history, entry], **update})
        self._write(updated)
        self.audit.append(
            f"escalation.{event.value}", actor=actor, id=esc.id, status=new.value, detail=detail[:500]
        )
        return updated

    # -- the execution ledger: the hash-chained audit trail, not the status field ------------------
    def ledger(self) -> dict[str, tuple[str, int]]:
        """Escalation id -> (the last decisive event, its audit seq), read from the verified audit trail.

        Decisive events: the start of an execution (written before the action runs), its result, a
        rejection and an expiry. The status field in an escalation file is a convenience copy; whether an
        escalation may still be decided or executed is answered here.

        Raises:
            SreError: the audit trail's chain is broken (edited or truncated in the middle): nothing is
                approved or executed until it is repaired.
        """
        _, broken = self.audit.verify()
        if broken is not None and not broken.reason.startswith("torn final line"):
            raise SreError(
                "check the escalation ledger",
                f"the audit trail is broken at line {broken.line}: {broken.reason}",
                "treat the device as tampered; no escalation is approved or executed until it is repaired",
            )
        out: dict[str, tuple[str, int]] = {}
        for rec in self.audit.records():
            if rec.event in _DECISIVE and isinstance(rec.data.get("id"), str):
                out[str(rec.data["id"])] = (rec.event, rec.seq)
        return out

    def _refuse_if_finished(self, esc: Escalation, what: str, actor: str) -> None:
        """Raise (and audit) when the ledger says ``esc`` was already executed, rejected or expired."""
        seen = self.ledger().get(esc.id)
        if seen is None:
            return
        event, seq = seen
        self.audit.append(
            "escalation.replay_refused",
            actor=actor,
            id=esc.id,
            status_field=esc.status.value,
            ledger=event,
            seq=seq,
            what=what,
        )
        raise InputError(
            f"{what} {esc.id}",
            f"the audit trail records {event} for it (seq {seq}); it cannot be decided or executed again "
            f"(its file says {esc.status.value})",
            "a new incident gets a new escalation; compare the file with the copy uploaded to the hub",
        )

    def decide(self, approval: Approval, roster: OperatorRoster) -> Escalation:
        """Apply a signed approval or rejection after verifying it.

        Raises:
            ApprovalError: forged, expired, unknown operator, bound to other content, action not
                allowed or more severe than the proposed one. The refusal is audited and nothing changes.
            InputError: the escalation is unknown, no longer open, or the audit trail records it as
                executed, rejected or expired (whatever its status field says; audited).
        """
        with self._locked():
            esc = self.get(approval.escalation_id)
            self._refuse_if_finished(esc, approval.decision, approval.operator)
            now = self.clock.now()
            try:
                verify_approval(
                    approval,
                    escalation_id=esc.id,
                    escalation_hash=esc.content_hash,
                    allowed=esc.allowed,
                    proposed=esc.proposed_action,
                    roster=roster,
                    now=now,
                )
            except ApprovalError as exc:
                self.audit.append(
                    "escalation.approval_refused",
                    actor=approval.operator,
                    id=esc.id,
                    decision=approval.decision,
                    why=exc.why,
                )
                raise
            if esc.status == S.OPEN and now >= esc.expires_at:
                self._transition(esc, E.EXPIRE, "agent", "expired before a decision arrived")
                raise InputError(f"{approval.decision} {esc.id}", "the escalation has expired", "re-triage")
            event = E.APPROVE if approval.decision == "approve" else E.REJECT
            detail = f"{approval.decision} {approval.action or ''} by {approval.operator}: {approval.reason}"
            return self._transition(
                esc, event, approval.operator, detail, approval=json.loads(approval.model_dump_json())
            )

    def expire_due(self) -> list[Escalation]:
        """Expire open or approved escalations past their expiry, and approved ones whose approval lapsed."""
        out = []
        with self._locked():
            now = self.clock.now()
            for esc in self.select():
                lapsed = (
                    esc.status == S.APPROVED
                    and esc.approval is not None
                    and (now >= datetime.fromisoformat(str(esc.approval["expires_at"])))
                )
                # an escalation expires at its own expiry, approved or not: nothing acts on evidence that old
                if (esc.status in (S.OPEN, S.APPROVED) and now >= esc.expires_at) or lapsed:
                    out.append(self._transition(esc, E.EXPIRE, "agent", "expired"))
        return out

    def prune(self, older_than: timedelta) -> list[str]:
        """Delete finished escalations (rejected, expired, executed, failed) whose last change is older
        than ``older_than``: the files are bounded; the audit trail and the uploaded copies remain."""
        removed = []
        with self._locked():
            cutoff = self.clock.now() - older_than
            for esc in self.select():
                if esc.status in (S.OPEN, S.APPROVED):
                    continue
                last = (
                    esc.history[-1].ts if esc.history else datetime.fromisoformat(esc.content["created_at"])
                )
                if last < cutoff:
                    self._path(esc.id).unlink(missing_ok=True)
                    removed.append(esc.id)
            if removed:
                fsync_dir(self.directory)
        if removed:
            self.audit.append("escalation.pruned", ids=removed[:100], count=len(removed))
        return removed

    def execute_approved(
        self, executor: ActionExecutor, roster: OperatorRoster
    ) -> list[tuple[Escalation, ActionResult | None]]:
        """Carry out approved escalations, verifying each approval again right before acting.

        An approval that no longer verifies (expired, operator removed from policy, file altered) is
        never executed: the escalation expires (or stays as it is, for a forged one) and it is audited.
        """
        done: list[tuple[Escalation, ActionResult | None]] = []
        with self._locked():
            for esc in self.select(S.APPROVED):
                now = self.clock.now()
                try:
                    approval = Approval.model_validate(esc.approval or {})
                    verify_approval(
                        approval,
                        escalation_id=esc.id,
                        escalation_hash=esc.content_hash,
                        allowed=esc.allowed,
                        proposed=esc.proposed_action,
                        roster=roster,
                        now=now,
                    )
                except (ApprovalError, ValidationError) as exc:
                    why = exc.why if isinstance(exc, ApprovalError) else "approval document invalid"
                    self.audit.append("escalation.execution_refused", id=esc.id, why=why)
                    done.append((self._transition(esc, E.EXPIRE, "agent", f"not executed: {why}"), None))
                    continue
                action = Action(str(approval.action))
                seen = self.ledger().get(esc.id)
                if seen is not None:
                    # the file says "approved" but the trail says otherwise: the status field was edited
                    # (or the agent stopped mid-action). Never act twice; restore the recorded outcome.
                    event, seq = seen
                    self.audit.append(
                        "escalation.replay_refused",
                        id=esc.id,
                        status_field=esc.status.value,
                        ledger=event,
                        seq=seq,
                        what="execute",
                    )
                    restored = E.EXECUTED if event == "escalation.executed" else E.FAILED
                    why = f"not executed again: the audit trail records {event} (seq {seq})"
                    done.append((self._transition(esc, restored, "agent", why), None))
                    continue
                if now >= esc.expires_at:
                    # the approval may still be valid, but the evidence it was given on is too old to act on
                    why = f"the escalation expired at {esc.expires_at.isoformat()} before the agent acted"
                    self.audit.append("escalation.execution_refused", id=esc.id, why=why)
                    done.append((self._transition(esc, E.EXPIRE, "agent", f"not executed: {why}"), None))
                    continue
                # persisted before acting: a crash after this line never leads to a second execution
                self.audit.append(
                    "escalation.execution_started",
                    id=esc.id,
                    action=action.value,
                    operator=approval.operator,
                    content_hash=esc.content_hash,
                    approval_signature=approval.signature,
                )
                result = executor.execute(action, esc.incident(), actor=approval.operator)
                event = E.EXECUTED if result.ok else E.FAILED
                updated = self._transition(
                    esc,
                    event,
                    "agent",
                    f"{action.value}: {result.detail}",
                    result={"action": action.value, "ok": result.ok, "detail": result.detail},
                )
                done.append((updated, result))
        return done
