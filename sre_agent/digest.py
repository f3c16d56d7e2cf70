"""The periodic health digest: structured figures for machines plus a short summary for people.

:func:`build_figures` is pure (values in, figures out). :class:`DigestBuilder` gathers the values it can
reach on the device (triage decisions from the audit trail, escalations from their store), takes the rest
as plain data (metrics, slot status, verification results, supplied by the daemon from telemetry), asks the
local model for a short summary (bounded; any failure falls back to a deterministic template) and emits
the digest as a ``health.digest`` telemetry event, which the uplink ships with everything else.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sre_agent.escalations import Escalation, EscalationStore
from sre_agent.incidents import SlotStatus, VerificationEvidence
from sre_core.audit import AuditLog, AuditRecord
from sre_core.clock import Clock
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = ["DigestBuilder", "DigestFigures", "HealthDigest", "build_figures", "template_summary"]

MAX_METRICS = 32
Summarizer = Callable[[str], str]


class DigestFigures(BaseModel):
    """What happened on the device in one window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str
    window_start: datetime
    window_end: datetime
    incidents_total: int = 0
    incidents_by_kind: dict[str, int] = Field(default_factory=dict)
    actions_taken: dict[str, int] = Field(default_factory=dict)
    actions_failed: int = 0
    escalations_raised: int = 0
    escalations_open: int = 0
    escalations_by_status: dict[str, int] = Field(default_factory=dict)
    verification_runs: int = 0
    verification_failures: int = 0
    safe_mode_modules: list[str] = Field(default_factory=list)
    slots: dict[str, SlotStatus] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)


class HealthDigest(BaseModel):
    """Figures + summary, with a content id (stable for the same figures and summary)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    created_at: datetime
    figures: DigestFigures
    summary: str
    summary_source: Literal["llm", "template"]
    summary_error: str | None = None


def _in_window(ts: str | datetime, start: datetime, end: datetime) -> bool:
    when = ts if isinstance(ts, datetime) else datetime.fromisoformat(ts)
    return start <= when < end


def build_figures(
    *,
    device_id: str,
    window_start: datetime,
    window_end: datetime,
    audit_records: Iterable[AuditRecord] = (),
    escalations: Iterable[Escalation] = (),
    verification: Iterable[VerificationEvidence] = (),
    metrics: Mapping[str, float] | None = None,
    slots: Mapping[str, SlotStatus] | None = None,
) -> DigestFigures:
    """Count what happened in ``[window_start, window_end)``. Pure."""
    kinds: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    failed = raised = 0
    for rec in audit_records:
        if not _in_window(rec.ts, window_start, window_end):
            continue
        if rec.event == "incident.opened":
            kinds[str(rec.data.get("kind", "unknown"))] += 1
        elif rec.event == "triage.action":
            if rec.data.get("ok"):
                actions[str(rec.data.get("action"))] += 1
            else:
                failed += 1
        elif rec.event == "escalation.created":
            raised += 1
    statuses: Counter[str] = Counter(e.status.value for e in escalations)
    checks = list(verification)
    slot_map = dict(slots or {})
    shown = dict(sorted((metrics or {}).items())[:MAX_METRICS])
    return DigestFigures(
        device_id=device_id,
        window_start=window_start,
        window_end=window_end,
        incidents_total=sum(kinds.values()),
        incidents_by_kind=dict(sorted(kinds.items())),
        actions_taken=dict(sorted(actions.items())),
        actions_failed=failed,
        escalations_raised=raised,
        escalations_open=statuses.get("open", 0),
        escalations_by_status=dict(sorted(statuses.items())),
        verification_runs=len(checks),
        verification_failures=sum(1 for c in checks if not c.passed),
        safe_mode_modules=sorted(m for m, s in slot_map.items() if s.safe_mode),
        slots=slot_map,
        metrics={k: round(float(v), 6) for k, v in shown.items()},
    )


def template_summary(f: DigestFigures) -> str:
    """A deterministic one-paragraph summary (used when the model is off or fails)."""
    parts = [f"{f.incidents_total} incident(s)"]
    if f.incidents_by_kind:
        parts[0] += " (" + ", ".join(f"{k} {v}" for k, v in f.incidents_by_kind.items()) + ")"
    acted = ", ".join(f"{k} {v}" for k, v in f.actions_taken.items()) or "none"
    parts.append(f"actions: {acted}")
    if f.actions_failed:
        parts.append(f"{f.actions_failed} action(s) failed")
    parts.append(f"{f.escalations_open} escalation(s) open")
    parts.append(f"verification {f.verification_runs - f.verification_failures}/{f.verification_runs} passed")
    if f.safe_mode_modules:
        parts.append("SAFE MODE: " + ", ".join(f.safe_mode_modules))
    return "; ".join(parts) + "."


def _prompt(f: DigestFigures) -> str:
    data = f.model_dump(mode="json", exclude={"slots", "window_start", "window_end", "device_id"})
    return "Write one short sentence summarising this device health report for an operator: " + json.dumps(
        data, separators=(",", ":")
    )


class DigestBuilder:
    """Builds and emits health digests.

    Args:
        clock: time source (the window ends now).
        device_id: this device.
        audit: the audit trail (triage decisions, actions, escalations raised).
        escalations: the escalation store (open and resolved escalations).
        summarizer: prompt -> short text (e.g. :meth:`sre_agent.llm.LlmAdvisor.summarize`); None = template.
        telemetry: where the digest goes (a ``health.digest`` event).
    """

    def __init__(
        self,
        clock: Clock,
        device_id: str,
        audit: AuditLog,
        escalations: EscalationStore | None = None,
        summarizer: Summarizer | None = None,
        telemetry: TelemetrySink | None = None,
    ) -> None:
        self.clock = clock
        self.device_id = device_id
        self.audit = audit
        self.escalations = escalations
        self.summarizer = summarizer
        self.telemetry = telemetry or NullSink()

    def build(
        self,
        window_start: datetime,
        *,
        metrics: Mapping[str, float] | None = None,
        slots: Mapping[str, SlotStatus] | None = None,
        verification: Iterable[VerificationEvidence] = (),
    ) -> HealthDigest:
        """Build the digest for ``[window_start, now)`` and emit it."""
        now = self.clock.now()
        figures = build_figures(
            device_id=self.device_id,
            window_start=window_start,
            window_end=now,
            audit_records=self.audit.records(),
            escalations=self.escalations.select() if self.escalations else (),
            verification=verification,
            metrics=metrics,
            slots=slots,
        )
        summary, error = template_summary(figures), None
        source: Literal["llm", "template"] = "template"
        if self.summarizer is not None:
            try:
                text = self.summarizer(_prompt(figures)).strip()
                if text:
                    summary, source = text[:400], "llm"
            except Exception as exc:  # the digest must go out even when the model fails
                error = f"{type(exc).__name__}: {exc}"[:300]
        body = figures.model_dump_json() + summary
        digest = HealthDigest(
            id="dig-" + hashlib.sha256(body.encode()).hexdigest()[:16],
            created_at=now,
            figures=figures,
            summary=summary,
            summary_source=source,
            summary_error=error,
        )
        attrs: dict[str, Any] = json.loads(digest.model_dump_json())
        self.telemetry.event("health.digest", summary, severity="info", attrs=attrs, ts=now)
        return digest
