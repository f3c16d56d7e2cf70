"""Incidents: what the device noticed, with the evidence attached, deduplicated by fingerprint.

An :class:`Incident` is raised by verification failures, canary aborts, probe failures, SLO burn and chaos
deviations. Its ``facts`` are structured values set by the component that raised it (counts, rates, slot
names); those are what triage rules read. Its ``evidence`` (metrics, events, log lines, slot status,
verification results) is context for people and the model: log and event text is untrusted data, never an
instruction, and no rule can match on it.

:class:`IncidentTracker` is pure bookkeeping (values in, verdict out, the clock injected): the same
fingerprint while an incident is open is a duplicate; a fingerprint that was closed less than the cooldown
ago is suppressed, so a flapping check does not raise a storm of incidents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sre_core.clock import Clock

__all__ = [
    "MAX_LOG_LINE",
    "Evidence",
    "EvidenceEvent",
    "FactValue",
    "Incident",
    "IncidentKind",
    "IncidentTracker",
    "Severity",
    "SlotStatus",
    "TrackVerdict",
    "VerificationEvidence",
    "check_category",
    "incident_from_event",
]

MAX_LOG_LINE = 500
"""Log lines are cut to this many characters when an incident is built (bounded evidence)."""
MAX_LOG_LINES = 50
MAX_EVENTS = 50

FactValue = str | int | float | bool | None


class IncidentKind(StrEnum):
    """Where an incident came from."""

    VERIFICATION_FAILURE = "verification_failure"
    CANARY_ABORT = "canary_abort"
    PROBE_FAILURE = "probe_failure"
    SLO_BURN = "slo_burn"
    CHAOS_DEVIATION = "chaos_deviation"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlotStatus(_Model):
    """The module's A/B slots as the deployment core reports them."""

    active_version: str | None = None
    standby_version: str | None = None
    standby_verified: bool = False
    last_known_good: str | None = None
    canary_version: str | None = None
    canary_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    safe_mode: bool = False


class EvidenceEvent(_Model):
    """One event from telemetry; ``message`` is untrusted text."""

    ts: str
    kind: str
    message: str = ""


class VerificationEvidence(_Model):
    """One verification check result."""

    check: str
    passed: bool
    detail: str = ""


class Evidence(_Model):
    """What was observed around the incident. Text fields are data, never instructions."""

    metrics: dict[str, float] = Field(default_factory=dict)
    events: list[EvidenceEvent] = Field(default_factory=list, max_length=MAX_EVENTS)
    logs: list[str] = Field(default_factory=list)
    slot: SlotStatus = Field(default_factory=SlotStatus)
    verification: list[VerificationEvidence] = Field(default_factory=list)

    @field_validator("logs")
    @classmethod
    def _bound_logs(cls, v: list[str]) -> list[str]:
        # Keep the newest lines, each cut to a bounded length: hostile logs cannot blow up a prompt.
        return [line[:MAX_LOG_LINE] for line in v[-MAX_LOG_LINES:]]


class Incident(_Model):
    """One incident on one module of one device.

    ``facts`` holds the structured values rules match on (e.g. ``consecutive_failures``,
    ``burn_rate``, ``slot``, ``category``); ``evidence`` is context.
    """

    id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,80}$")
    kind: IncidentKind
    module: str = Field(min_length=1, max_length=100)
    version: str | None = None
    severity: Severity = Severity.WARNING
    opened_at: datetime
    title: str = Field(default="", max_length=200)
    facts: dict[str, FactValue] = Field(default_factory=dict)
    evidence: Evidence = Field(default_factory=Evidence)
    fingerprint_keys: tuple[str, ...] = Field(
        default=(), description="facts that distinguish incidents of the same kind/module/version"
    )

    @property
    def fingerprint(self) -> str:
        """Stable identity of "the same problem": kind, module, version and the chosen facts."""
        key = {
            "kind": self.kind.value,
            "module": self.module,
            "version": self.version,
            "facts": {k: self.facts.get(k) for k in sorted(self.fingerprint_keys)},
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json")
        return data


TrackVerdict = Literal["new", "duplicate", "suppressed"]


@dataclass
class _Entry:
    incident_id: str
    opened_at: datetime
    last_seen: datetime
    count: int = 1
    closed_at: datetime | None = None


@dataclass
class IncidentTracker:
    """Dedup and cooldown by fingerprint (pure apart from the injected clock).

    Args:
        clock: time source.
        cooldown: after an incident closes, the same fingerprint is suppressed this long.
        reopen_after: an open incident not seen for this long is closed automatically.
        max_entries: bound on tracked fingerprints (oldest closed ones are forgotten first).
    """

    clock: Clock
    cooldown: timedelta = timedelta(minutes=30)
    reopen_after: timedelta = timedelta(hours=6)
    max_entries: int = 10_000
    _entries: dict[str, _Entry] = field(default_factory=dict)

    def observe(self, incident: Incident) -> TrackVerdict:
        """Record a sighting. ``new`` means triage it; otherwise it is only counted."""
        now = self.clock.now()
        fp = incident.fingerprint
        entry = self._entries.get(fp)
        if entry is not None and entry.closed_at is None and now - entry.last_seen > self.reopen_after:
            entry.closed_at = entry.last_seen
        if entry is None or (entry.closed_at is not None and now - entry.closed_at >= self.cooldown):
            self._entries[fp] = _Entry(incident.id, now, now)
            self._prune()
            return "new"
        entry.last_seen = now
        entry.count += 1
        return "duplicate" if entry.closed_at is None else "suppressed"

    def close(self, fingerprint: str) -> bool:
        """Mark the incident with this fingerprint resolved; the cooldown starts now."""
        entry = self._entries.get(fingerprint)
        if entry is None or entry.closed_at is not None:
            return False
        entry.closed_at = self.clock.now()
        return True

    def count(self, fingerprint: str) -> int:
        """How many sightings the current (or last) incident with this fingerprint had."""
        entry = self._entries.get(fingerprint)
        return entry.count if entry else 0

    def open_fingerprints(self) -> list[str]:
        return [fp for fp, e in self._entries.items() if e.closed_at is None]

    def _prune(self) -> None:
        if len(self._entries) <= self.max_entries:
            return
        closed = sorted(
            (fp for fp, e in self._entries.items() if e.closed_at is not None),
            key=lambda fp: self._entries[fp].closed_at or self._entries[fp].last_seen,
        )
        for fp in closed[: len(self._entries) - self.max_entries]:
            del self._entries[fp]
        while len(self._entries) > self.max_entries:
            oldest = min(self._entries, key=lambda fp: self._entries[fp].last_seen)
            del self._entries[oldest]


# --------------------------------------------------------------------------------------------------
# Incidents from telemetry events (the verification runner emits ``kind="incident"`` events)

CHECK_CATEGORIES: dict[str, str] = {
    "model.golden": "behaviour",
    "rollback.readiness": "rollback_readiness",
    "integrity.slots": "integrity",
    "integrity.telemetry_db": "data_integrity",
    "integrity.audit_chain": "data_integrity",
}
"""Verification check name -> the category triage rules match on (prefix rules below for the rest)."""
_PREFIX_CATEGORIES = {"drift": "drift", "resources": "performance", "trust": "trust", "model": "behaviour"}


def check_category(check: str) -> str:
    """The triage category of a verification check name."""
    if check in CHECK_CATEGORIES:
        return CHECK_CATEGORIES[check]
    prefix = check.split(".", 1)[0]
    return _PREFIX_CATEGORIES.get(prefix, prefix)


def _fact(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _normalise_facts(kind: IncidentKind, attrs: dict[str, Any], facts: dict[str, FactValue]) -> None:
    """Derive the facts the triage rules name from what each reporter sends."""
    if kind == IncidentKind.CANARY_ABORT and "gate" not in facts:
        # the serving plane sends its gate verdicts: the first failed gate and its sample count
        failed = [g for g in attrs.get("gates") or [] if isinstance(g, dict) and g.get("verdict") == "fail"]
        if failed:
            facts["gate"] = str(failed[0].get("gate", ""))[:64]
            n = _number(failed[0].get("n"))
            if n is not None:
                facts["samples"] = int(n)
    evidence = attrs.get("evidence")
    modules = [str(m) for m in attrs.get("modules") or []]
    if facts.get("check") == "integrity.slots" and isinstance(evidence, dict) and modules:
        # which of the module's slots failed to re-hash: the rules roll back only onto an intact standby
        roles = {r: evidence.get(f"{modules[0]}/{r}") for r in ("active", "standby")}
        ok = {r: v.get("ok") for r, v in roles.items() if isinstance(v, dict)}
        if ok.get("active") is False:
            facts["slot"] = "active"
        elif ok.get("standby") is False:
            facts["slot"] = "standby"
        if isinstance(ok.get("standby"), bool):
            facts["standby_intact"] = ok["standby"]
    if kind == IncidentKind.SLO_BURN and "burn_rate" not in facts:
        # drift SLOs are "at most" objectives: the burn rate is the value over its objective
        value, target = _number(facts.get("value")), _number(facts.get("target"))
        if value is not None and target is not None and target > 0:
            facts["burn_rate"] = round(value / target, 4)


def incident_from_event(
    message: str,
    severity: str,
    attrs: dict[str, Any],
    ts: datetime,
    *,
    slot: SlotStatus | None = None,
    logs: list[str] | None = None,
) -> Incident | None:
    """Turn an ``incident`` telemetry event (``attrs["incident_kind"]``, ``facts``, ``modules``...) into an
    :class:`Incident`; None when the event names no known incident kind.

    The event's message and evidence become untrusted evidence text; only ``attrs["facts"]`` (scalars)
    become facts. The verification check's category is normalised with :func:`check_category`.
    """
    try:
        kind = IncidentKind(str(attrs.get("incident_kind", "")))
    except ValueError:
        return None
    facts: dict[str, FactValue] = {
        str(k)[:64]: v for k, v in dict(attrs.get("facts") or {}).items() if _fact(v)
    }
    check = str(attrs.get("check") or facts.get("check") or "")
    if kind == IncidentKind.VERIFICATION_FAILURE and check:
        facts["check"] = check
        facts["category"] = check_category(check)
        # the runner raises on the first failure of a streak; recurrences are counted by the responder
        facts.setdefault("consecutive_failures", 1)
    _normalise_facts(kind, attrs, facts)
    modules = [str(m) for m in attrs.get("modules") or []]
    module = modules[0] if modules else "device"
    key = str(attrs.get("dedup_key") or f"{kind.value}:{module}:{check}")
    verification = []
    if kind == IncidentKind.VERIFICATION_FAILURE and check:
        verification.append(VerificationEvidence(check=check, passed=False, detail=message[:MAX_LOG_LINE]))
    raw_evidence = attrs.get("evidence")
    lines = list(logs or [])
    if raw_evidence:
        lines.append(json.dumps(raw_evidence, default=str, sort_keys=True)[:MAX_LOG_LINE])
    metrics = {
        str(k): float(v)
        for k, v in dict(attrs.get("measurements") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    sev = severity if severity in {s.value for s in Severity} else Severity.WARNING.value
    digest = hashlib.sha256(f"{key}|{ts.isoformat()}".encode()).hexdigest()[:16]
    version = attrs.get("version") or facts.get("version") or (slot.active_version if slot else None)
    return Incident(
        id=f"inc-{digest}",
        kind=kind,
        module=module[:100] or "device",
        version=str(version)[:100] if version is not None else None,
        severity=Severity(sev),
        opened_at=ts,
        title=message[:200],
        facts=facts,
        evidence=Evidence(metrics=metrics, logs=lines, slot=slot or SlotStatus(), verification=verification),
        fingerprint_keys=("check",) if check else (),
    )
