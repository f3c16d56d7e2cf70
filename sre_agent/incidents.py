"""Incidents: what the device noticed, with the evidence attached, deduplicated by fingerprint.

An :class:`Incident` is raised by verification failures, canary aborts, probe failures, SLO burn and chaos
deviations. Its ``facts`` are structured values set by the component that raised it (counts, rates, slot
names); those are what triage rules read. Its ``evidence`` (metrics, events, log lines, slot status,
verification results) is context for people and the model: log and event text is untrusted data, never an
instruction, and no rule can match on it.

:class:`IncidentTracker` is pure bookkeeping (values in, verdict out, the clock injected): the same
fingerprint while an incident is open is a duplicate; the same fingerprint after its incident closed is a
new occurrence (``recurred``), never silently dropped: the tracker keeps each fingerprint's earlier
occurrences and the actions they took within a window, so the responder can tell a failed remedy or a
flapping fault (escalated to a human) from a first sighting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sre_core.clock import Clock

__all__ = [
    "FACT_PRODUCERS",
    "MAX_LOG_LINE",
    "Evidence",
    "EvidenceEvent",
    "FactValue",
    "Incident",
    "IncidentKind",
    "IncidentSignal",
    "IncidentTracker",
    "Severity",
    "SlotStatus",
    "TrackVerdict",
    "TrackedIncident",
    "VerificationEvidence",
    "check_category",
    "incident_from_event",
    "incident_from_signal",
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
        return self._digest(with_version=True)

    @property
    def family(self) -> str:
        """The fingerprint without the version: "the same problem" across versions (a fault that follows
        every version a remedy moves to, e.g. the active slot's bytes corrupted again and again)."""
        return self._digest(with_version=False)

    def _digest(self, with_version: bool) -> str:
        key = {
            "kind": self.kind.value,
            "module": self.module,
            "version": self.version if with_version else "*",
            "facts": {k: self.facts.get(k) for k in sorted(self.fingerprint_keys)},
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json")
        return data


_DEFAULT_FINGERPRINT_KEYS: dict[IncidentKind, tuple[str, ...]] = {
    IncidentKind.VERIFICATION_FAILURE: ("check", "slot"),
    IncidentKind.SLO_BURN: ("slo",),
    IncidentKind.CHAOS_DEVIATION: ("experiment",),
    IncidentKind.PROBE_FAILURE: ("slot",),
    IncidentKind.CANARY_ABORT: (),
}
"""Facts that tell two incidents of one kind/module/version apart (the check and slot, the SLO...)."""

_SOURCE_KINDS = {
    "canary": IncidentKind.CANARY_ABORT,
    "probe": IncidentKind.PROBE_FAILURE,
    "slo": IncidentKind.SLO_BURN,
    "chaos": IncidentKind.CHAOS_DEVIATION,
    "verification": IncidentKind.VERIFICATION_FAILURE,
}


@dataclass(frozen=True)
class IncidentSignal:
    """What a producer (canary, probe, verification, SLO, chaos, a job) hands the responder: one typed
    value, built once at the producer (or once from a telemetry event by :meth:`from_event`).

    ``facts`` are the structured values rules read; ``evidence`` is untrusted context; ``resolve_key``
    names what a later "resolved" signal of the same producer closes (e.g. ``verification:integrity.slots``).
    """

    kind: IncidentKind
    message: str
    module: str = "device"
    severity: str = "warning"
    source: str = ""
    version: str | None = None
    facts: dict[str, FactValue] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, float] = field(default_factory=dict)
    resolve_key: str = ""
    ts: datetime | None = None

    @property
    def key(self) -> str:
        """The resolve key (a default from kind, module and the distinguishing facts)."""
        if self.resolve_key:
            return self.resolve_key
        parts = [str(self.facts.get(k)) for k in _DEFAULT_FINGERPRINT_KEYS[self.kind] if k in self.facts]
        return ":".join([self.kind.value, self.module, *parts])

    def with_facts(self, **facts: FactValue) -> IncidentSignal:
        """A copy with ``facts`` added (existing values are kept)."""
        return replace(self, facts={**facts, **self.facts})

    def to_attrs(self) -> dict[str, Any]:
        """The telemetry event's ``attrs`` (what :meth:`from_event` reads back)."""
        return {
            "source": self.source,
            "incident_kind": self.kind.value,
            "modules": [self.module],
            "version": self.version,
            "facts": dict(self.facts),
            "evidence": self.evidence,
            "measurements": dict(self.measurements),
            "dedup_key": self.resolve_key or self.key,
        }

    @classmethod
    def from_event(
        cls, message: str, severity: str, attrs: dict[str, Any], ts: datetime | None = None
    ) -> IncidentSignal | None:
        """The signal an ``incident`` telemetry event carries (components that only report through the
        telemetry sink: the canary, the verification runner); None when it names no incident kind."""
        raw_kind = str(attrs.get("incident_kind") or "")
        kind: IncidentKind | None
        try:
            kind = IncidentKind(raw_kind) if raw_kind else _SOURCE_KINDS.get(str(attrs.get("source", "")))
        except ValueError:
            kind = None
        if kind is None:
            return None
        facts: dict[str, FactValue] = {
            str(k)[:64]: v for k, v in dict(attrs.get("facts") or {}).items() if _fact(v)
        }
        modules = [str(m) for m in attrs.get("modules") or []]
        if not modules and attrs.get("module"):
            modules = [str(attrs["module"])]
        module = (modules[0] if modules else "device")[:100] or "device"
        check = str(attrs.get("check") or facts.get("check") or "")
        if kind == IncidentKind.VERIFICATION_FAILURE and check:
            facts["check"] = check
            facts["category"] = check_category(check)
            # the runner raises on the first failure of a streak; recurrences are counted by the responder
            facts.setdefault("consecutive_failures", 1)
        _normalise_facts(kind, attrs, facts, modules)
        version = attrs.get("version") or facts.get("version")
        if kind == IncidentKind.CANARY_ABORT and version is not None:
            facts.setdefault("version", str(version))
        evidence = attrs.get("evidence")
        measurements = {
            str(k): float(v)
            for k, v in dict(attrs.get("measurements") or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        sev = {"error": "critical", "critical": "critical", "warning": "warning"}.get(severity, "info")
        return cls(
            kind=kind,
            message=message,
            module=module,
            severity=sev,
            source=str(attrs.get("source") or ""),
            version=str(version) if version is not None else None,
            facts=facts,
            evidence=dict(evidence)
            if isinstance(evidence, dict)
            else ({"raw": evidence} if evidence else {}),
            measurements=measurements,
            resolve_key=str(attrs.get("dedup_key") or ""),
            ts=ts,
        )


FACT_PRODUCERS: dict[str, str] = {
    "check": "verification.runner:Runner._incident",
    "status": "verification.runner:Runner._incident",
    "category": "sre_agent.incidents:IncidentSignal.from_event",
    "consecutive_failures": "sre_agent.incidents:IncidentSignal.from_event",
    "slot": "sre_agent.incidents:_normalise_facts",
    "standby_intact": "sre_agent.incidents:_normalise_facts",
    "standby_failing": "sre_agent.incidents:_normalise_facts",
    "both_slots_failing": "sre_agent.incidents:_normalise_facts",
    "gate": "sre_agent.incidents:_normalise_facts",
    "samples": "sre_agent.incidents:_normalise_facts",
    "burn_rate": "sre_agent.jobs:SloJob.__call__",
    "slo": "sre_agent.jobs:SloJob.__call__",
    "versions": "sre_agent.jobs:SloJob.__call__",
    "value": "sre_agent.jobs:SloJob.__call__",
    "target": "sre_agent.jobs:SloJob.__call__",
    "rolled_back": "sre_agent.jobs:PullReconcileJob.__call__",
    "version": "sre_agent.jobs:PullReconcileJob.__call__",
    "experiment": "sre_agent.services.chaos:ChaosSchedule._raise",
    "persisted_after_cleanup": "sre_agent.services.chaos:ChaosSchedule._after_cleanup",
    "recovered": "sre_agent.services.chaos:ChaosSchedule._after_cleanup",
    "cleanup_ok": "sre_agent.services.chaos:ChaosSchedule._after_cleanup",
    "chaos_active": "sre_agent.services.responder:ResponderService._enrich",
    "chaos_targets": "sre_agent.services.responder:ResponderService._enrich",
    "active_serving": "sre_agent.services.responder:ResponderService._enrich",
    "active_down": "sre_agent.services.responder:ResponderService._enrich",
    "since_flip_s": "sre_agent.services.responder:slot_facts",
    "standby_committed": "sre_agent.services.responder:slot_facts",
    "standby_bad": "sre_agent.services.responder:slot_facts",
    "standby_recalled": "sre_agent.services.responder:slot_facts",
    "bad_versions": "sre_agent.services.responder:slot_facts",
    "recalled_versions": "sre_agent.services.responder:slot_facts",
    "occurrences": "sre_agent.respond:Responder._recurred",
}
"""Fact name -> the production code that emits it (``module:qualname``). Every fact a triage rule or the
triage engine reads must be here; tests check that each producer exists and names its fact."""

TrackVerdict = Literal["new", "duplicate", "recurred"]
"""``new``: first sighting (or none within the window); ``duplicate``: the incident is open (or its remedy
did not hold); ``recurred``: it closed and is back, a new occurrence with earlier ones in the window."""

MAX_HISTORY = 20
"""Earlier occurrences kept per fingerprint (the newest)."""


@dataclass
class TrackedIncident:
    """The responder's record of one problem (one fingerprint) while it is open and after it closed."""

    fingerprint: str
    incident_id: str
    opened_at: datetime
    last_seen: datetime
    kind: str = ""
    module: str = ""
    version: str | None = None
    title: str = ""
    key: str = ""
    facts: dict[str, FactValue] = field(default_factory=dict)
    count: int = 1
    actions: list[str] = field(default_factory=list)
    """Actions that ran and succeeded for this incident, in order."""
    failed: list[str] = field(default_factory=list)
    """Actions that were tried and failed."""
    acting: str | None = None
    """The action being carried out now (persisted before acting: a crash mid-action is seen on restart)."""
    incident: dict[str, Any] | None = None
    """The incident an action is in flight for (what a resume after a crash acts on again)."""
    interrupted: str | None = None
    """An action cut short by a crash (found on restart); the next sighting runs it again."""
    escalation: str | None = None
    closed_at: datetime | None = None
    closed_why: str = ""
    closed_by_remedy: bool = False
    """Closed because an action ran (not because the producer saw it recover): a repeat reopens it."""
    family: str = ""
    """The fingerprint without the version (:attr:`Incident.family`)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Earlier occurrences of this fingerprint (newest last, bounded): ``opened_at``, ``closed_at`` (ISO),
    ``why``, ``actions``, ``failed``."""

    def earlier(self, since: datetime) -> list[dict[str, Any]]:
        """Earlier occurrences opened at or after ``since``."""
        return [h for h in self.history if datetime.fromisoformat(str(h["opened_at"])) >= since]

    @property
    def open(self) -> bool:
        return self.closed_at is None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("opened_at", "last_seen", "closed_at"):
            d[k] = d[k].isoformat() if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrackedIncident:
        data = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("opened_at", "last_seen", "closed_at"):
            if data.get(k) is not None:
                data[k] = datetime.fromisoformat(str(data[k]))
        return cls(**data)


@dataclass
class IncidentTracker:
    """Dedup, follow-through and recurrence by fingerprint (pure apart from the injected clock).

    An incident stays open until the code that resolves it calls :meth:`close` (the check passes again,
    the SLO is met, an escalation is answered, the action that ends it succeeded). The same fingerprint
    while open is a duplicate (the responder decides whether that means a failed remedy). After it
    closed, the same fingerprint is a new occurrence: ``recurred`` when earlier occurrences fall within
    ``window`` (kept with the actions they took, so the responder can escalate a flapping fault or a
    remedy that did not hold), else ``new``. Nothing is dropped: a flapping check is bounded by the
    responder escalating it once, not by silence.

    Args:
        clock: time source.
        cooldown: an incident an action closed (``by_remedy``) that is seen again within this long is
            reopened as the same incident (its remedy did not hold).
        window: how far back earlier occurrences and actions count.
        reopen_after: when set, an open incident not seen for this long closes by itself (None: never).
        max_entries: bound on tracked fingerprints (oldest closed ones are forgotten first).
    """

    clock: Clock
    cooldown: timedelta = timedelta(minutes=30)
    window: timedelta = timedelta(hours=1)
    reopen_after: timedelta | None = None
    max_entries: int = 10_000
    _entries: dict[str, TrackedIncident] = field(default_factory=dict)

    def observe(self, incident: Incident, key: str = "") -> TrackVerdict:
        """Record a sighting. ``new`` and ``recurred`` mean triage it; ``duplicate`` is counted."""
        now = self.clock.now()
        fp = incident.fingerprint
        entry = self._entries.get(fp)
        if (
            entry is not None
            and entry.open
            and self.reopen_after is not None
            and now - entry.last_seen > self.reopen_after
        ):
            entry.closed_at, entry.closed_why = entry.last_seen, "not seen again"
        if (
            entry is not None
            and entry.closed_at is not None
            and entry.closed_by_remedy
            and now - entry.closed_at < self.cooldown
        ):  # the remedy did not hold: the same problem again, reopened
            entry.closed_at, entry.closed_why, entry.closed_by_remedy = None, "", False
        if entry is not None and entry.closed_at is None:
            entry.last_seen = now
            entry.count += 1
            return "duplicate"
        history: list[dict[str, Any]] = []
        escalation = None
        if entry is not None:  # closed, and back: a new occurrence that remembers the earlier ones
            history = [*entry.history, _occurrence(entry)][-MAX_HISTORY:]
            history = [h for h in history if datetime.fromisoformat(str(h["opened_at"])) >= now - self.window]
            escalation = entry.escalation
        self._entries[fp] = TrackedIncident(
            fingerprint=fp,
            incident_id=incident.id,
            opened_at=now,
            last_seen=now,
            kind=incident.kind.value,
            module=incident.module,
            version=incident.version,
            title=incident.title,
            key=key,
            facts=dict(incident.facts),
            family=incident.family,
            history=history,
            escalation=escalation,
        )
        self._prune()
        return "recurred" if history else "new"

    def occurrences(self, fingerprint: str) -> int:
        """Occurrences of this fingerprint within the window, the current one included (0: unknown)."""
        entry = self._entries.get(fingerprint)
        if entry is None:
            return 0
        return 1 + len(entry.earlier(self.clock.now() - self.window))

    def earlier_actions(self, fingerprint: str) -> list[str]:
        """Actions that ran (or failed) for earlier occurrences of this fingerprint within the window."""
        entry = self._entries.get(fingerprint)
        if entry is None:
            return []
        since = self.clock.now() - self.window
        return [a for h in entry.earlier(since) for a in [*h.get("actions", []), *h.get("failed", [])]]

    def family_actions(self, family: str) -> list[str]:
        """Actions that succeeded for any incident of this family (any version) within the window."""
        since = self.clock.now() - self.window
        out: list[str] = []
        for e in self._entries.values():
            if e.family != family or not family:
                continue
            out += [a for h in e.earlier(since) for a in h.get("actions", [])]
            if e.opened_at >= since:
                out += e.actions
        return out

    def get(self, fingerprint: str) -> TrackedIncident | None:
        return self._entries.get(fingerprint)

    def close(self, fingerprint: str, why: str = "", by_remedy: bool = False) -> bool:
        """Mark the incident with this fingerprint resolved; the cooldown starts now. ``by_remedy``: an
        action resolved it (a repeat within the cooldown reopens it as a failed remedy)."""
        entry = self._entries.get(fingerprint)
        if entry is None or entry.closed_at is not None:
            return False
        entry.closed_at = self.clock.now()
        entry.closed_why = why[:300]
        entry.closed_by_remedy = by_remedy
        entry.acting = None
        return True

    def close_key(self, key: str, why: str = "") -> list[str]:
        """Close every open incident raised under the resolve ``key``; the fingerprints closed."""
        fps = [fp for fp, e in self._entries.items() if e.open and key and e.key == key]
        return [fp for fp in fps if self.close(fp, why)]

    def for_escalation(self, escalation_id: str) -> list[str]:
        """Open fingerprints waiting on this escalation."""
        return [fp for fp, e in self._entries.items() if e.open and e.escalation == escalation_id]

    def count(self, fingerprint: str) -> int:
        """How many sightings the current (or last) incident with this fingerprint had."""
        entry = self._entries.get(fingerprint)
        return entry.count if entry else 0

    def open_fingerprints(self) -> list[str]:
        return [fp for fp, e in self._entries.items() if e.closed_at is None]

    def open_incidents(self) -> list[TrackedIncident]:
        return [e for e in self._entries.values() if e.closed_at is None]

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "incidents": [e.to_dict() for e in self._entries.values()]}

    def load_dict(self, data: dict[str, Any]) -> None:
        """Replace the entries with a stored :meth:`to_dict` document (unknown entries are skipped)."""
        entries: dict[str, TrackedIncident] = {}
        for raw in data.get("incidents") or []:
            try:
                e = TrackedIncident.from_dict(raw)
            except (TypeError, ValueError, KeyError):
                continue
            entries[e.fingerprint] = e
        self._entries = entries

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


def _occurrence(e: TrackedIncident) -> dict[str, Any]:
    """An earlier occurrence as :attr:`TrackedIncident.history` keeps it."""
    return {
        "incident_id": e.incident_id,
        "opened_at": e.opened_at.isoformat(),
        "closed_at": e.closed_at.isoformat() if e.closed_at else None,
        "why": e.closed_why,
        "count": e.count,
        "actions": list(e.actions),
        "failed": list(e.failed),
    }


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


def _normalise_facts(
    kind: IncidentKind, attrs: dict[str, Any], facts: dict[str, FactValue], modules: list[str]
) -> None:
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
            facts["standby_failing"] = not ok["standby"]
            facts["both_slots_failing"] = ok.get("active") is False and not ok["standby"]
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
    """Turn an ``incident`` telemetry event into an :class:`Incident` (through :class:`IncidentSignal`);
    None when the event names no known incident kind."""
    sig = IncidentSignal.from_event(message, severity, attrs, ts)
    return incident_from_signal(sig, slot=slot, logs=logs) if sig is not None else None


def incident_from_signal(
    sig: IncidentSignal, *, slot: SlotStatus | None = None, logs: list[str] | None = None
) -> Incident:
    """The :class:`Incident` a signal raises, with the module's slot status read by the caller.

    The signal's message and evidence become untrusted evidence text; only its facts (scalars) are facts.
    """
    ts = sig.ts or datetime.now().astimezone()
    facts = dict(sig.facts)
    check = str(facts.get("check") or "")
    verification = []
    if sig.kind == IncidentKind.VERIFICATION_FAILURE and check:
        verification.append(
            VerificationEvidence(check=check, passed=False, detail=sig.message[:MAX_LOG_LINE])
        )
    lines = list(logs or [])
    if sig.evidence:
        lines.append(json.dumps(sig.evidence, default=str, sort_keys=True)[:MAX_LOG_LINE])
    sev = sig.severity if sig.severity in {s.value for s in Severity} else Severity.WARNING.value
    digest = hashlib.sha256(f"{sig.key}|{ts.isoformat()}".encode()).hexdigest()[:16]
    version = sig.version or (slot.active_version if slot else None)
    keys = tuple(k for k in _DEFAULT_FINGERPRINT_KEYS[sig.kind] if k in facts)
    return Incident(
        id=f"inc-{digest}",
        kind=sig.kind,
        module=sig.module[:100] or "device",
        version=str(version)[:100] if version is not None else None,
        severity=Severity(sev),
        opened_at=ts,
        title=sig.message[:200],
        facts=facts,
        evidence=Evidence(
            metrics=dict(sig.measurements), logs=lines, slot=slot or SlotStatus(), verification=verification
        ),
        fingerprint_keys=keys,
    )
