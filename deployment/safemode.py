"""Safe mode: when the device can no longer trust its orders, it serves factory safe modules.

Entered when the signed desired state has expired by trusted time, when automatic rollbacks repeat
(``flapping.max_rollbacks`` within ``flapping.window_s`` from the deployment policy), or on operator
command. Left when a fresh signed desired state arrives (for an expiry: one that is valid by trusted
time; after flapping or an operator: one with a higher serial than the one held at entry), or by an
operator. While it lasts: no installs, no canaries, no chaos (other components call
:func:`is_safe_mode`), and every reconcile raises an alert.

The decision (:func:`decide`) is pure; :class:`SafeMode` persists ``<state>/safemode.json`` *before*
it re-points the slots, and :meth:`SafeMode.sync_slots` re-applies the stored verdict on start, so a
crash between the two cannot leave the device half in safe mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from deployment.artifacts import TrustStatus
from deployment.manifest import DesiredState
from deployment.slots import SlotError, SlotManager
from policies.deployment import FlappingRule
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = [
    "SafeMode",
    "SafeModeState",
    "SafeVerdict",
    "decide",
    "is_safe_mode",
    "read_safe_mode",
    "safe_mode_file",
]

Reason = Literal["expired", "flapping", "operator"]
_MAX_ROLLBACK_MARKS = 200


def safe_mode_file(paths: StatePaths) -> Path:
    """``<state>/safemode.json``."""
    return paths.root / "safemode.json"


@dataclass(frozen=True)
class SafeModeState:
    """The persisted safe-mode record."""

    active: bool = False
    reason: str | None = None
    detail: str = ""
    since: str | None = None
    serial_at_entry: int | None = None
    expires_at_entry: str | None = None
    rollbacks: list[str] = field(default_factory=list)
    entries: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "reason": self.reason,
            "detail": self.detail,
            "since": self.since,
            "serial_at_entry": self.serial_at_entry,
            "expires_at_entry": self.expires_at_entry,
            "rollbacks": list(self.rollbacks),
            "entries": self.entries,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SafeModeState:
        return cls(
            active=bool(d.get("active", False)),
            reason=d.get("reason"),
            detail=str(d.get("detail", "")),
            since=d.get("since"),
            serial_at_entry=d.get("serial_at_entry"),
            expires_at_entry=d.get("expires_at_entry"),
            rollbacks=[str(x) for x in d.get("rollbacks", [])],
            entries=int(d.get("entries", 0)),
        )


def read_safe_mode(paths: StatePaths) -> SafeModeState:
    """The stored safe-mode record (inactive when none)."""
    try:
        return SafeModeState.from_dict(json.loads(safe_mode_file(paths).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return SafeModeState()
    except (OSError, ValueError):
        # An unreadable record must not let chaos or canaries run: treat it as safe mode.
        return SafeModeState(active=True, reason="operator", detail="safemode.json is unreadable")


def is_safe_mode(paths: StatePaths) -> bool:
    """True while the device is in safe mode (chaos and canaries must not start)."""
    return read_safe_mode(paths).active


@dataclass(frozen=True)
class SafeVerdict:
    """What :func:`decide` concluded: ``enter``, ``leave`` or ``stay`` (keep the current mode)."""

    action: Literal["enter", "leave", "stay"]
    reason: Reason | None = None
    detail: str = ""


def _recent(marks: list[str], now: datetime, window_s: float) -> list[str]:
    lo = now - timedelta(seconds=window_s)
    return [m for m in marks if datetime.fromisoformat(m) > lo]


def decide(
    state: SafeModeState,
    trust: TrustStatus,
    desired: DesiredState | None,
    trusted_now: datetime,
    flapping: FlappingRule,
) -> SafeVerdict:
    """Pure safe-mode decision for one reconcile, from trusted time and the held desired state."""
    expired = trust is TrustStatus.EXPIRED or (desired is not None and desired.is_expired(trusted_now))
    if not state.active:
        if expired:
            when = desired.expires.isoformat() if desired else "unknown"
            return SafeVerdict("enter", "expired", f"desired state expired at {when}")
        recent = _recent(state.rollbacks, trusted_now, flapping.window_s)
        if len(recent) >= flapping.max_rollbacks:
            return SafeVerdict(
                "enter",
                "flapping",
                f"{len(recent)} automatic rollbacks within {flapping.window_s:g} s",
            )
        return SafeVerdict("stay")
    if expired or desired is None or trust is not TrustStatus.FRESH:
        return SafeVerdict("stay")
    if state.serial_at_entry is None:
        # Entered with no desired state held: an operator's safe mode holds until `safe-mode exit`;
        # flapping leaves on the first fresh desired state.
        newer = state.reason != "operator"
    else:
        newer = desired.serial > state.serial_at_entry
    if state.reason == "expired":
        renewed = newer or desired.expires.isoformat() != state.expires_at_entry
        if renewed:
            return SafeVerdict("leave", "expired", f"fresh desired state serial {desired.serial}")
        return SafeVerdict("stay")
    if newer:
        return SafeVerdict("leave", None, f"new desired state serial {desired.serial}")
    return SafeVerdict("stay")


class SafeMode:
    """Enter, leave and remember safe mode; serve the factory safe modules while it lasts.

    Args:
        paths: device state layout.
        slots: the slot manager (serves ``<state>/safe/<name>`` per module).
        audit: the audit trail.
        clock: time for records.
        flapping: the flapping rule from the deployment policy.
        telemetry: where alerts go.
    """

    def __init__(
        self,
        paths: StatePaths,
        slots: SlotManager,
        audit: AuditLog,
        clock: Clock | None = None,
        flapping: FlappingRule | None = None,
        telemetry: TelemetrySink | None = None,
    ) -> None:
        self.paths = paths
        self.slots = slots
        self.audit = audit
        self.clock = clock or SystemClock()
        self.flapping = flapping or FlappingRule()
        self.telemetry = telemetry or NullSink()

    def state(self) -> SafeModeState:
        return read_safe_mode(self.paths)

    def _write(self, st: SafeModeState) -> None:
        atomic_write_json(safe_mode_file(self.paths), st.to_dict())

    def enter(
        self,
        reason: Reason,
        detail: str = "",
        actor: str = "agent",
        desired: DesiredState | None = None,
    ) -> SafeModeState:
        """Persist safe mode, then serve each module's safe module. Idempotent."""
        cur = self.state()
        if cur.active:
            self.sync_slots()
            return cur
        st = SafeModeState(
            active=True,
            reason=reason,
            detail=detail,
            since=self.clock.now().isoformat(),
            serial_at_entry=desired.serial if desired else None,
            expires_at_entry=desired.expires.isoformat() if desired else None,
            rollbacks=cur.rollbacks,
            entries=cur.entries + 1,
        )
        self._write(st)
        self.audit.append("safe_mode.entered", actor=actor, reason=reason, detail=detail)
        served = self.sync_slots()
        self.alert(f"safe mode entered: {reason} ({detail})", served=served)
        return st

    def exit(self, detail: str = "", actor: str = "agent") -> SafeModeState:
        """Persist normal mode, then serve each module's active slot again. Idempotent."""
        cur = self.state()
        if not cur.active:
            self.sync_slots()
            return cur
        # Flapping marks are cleared: the operator or a new desired state judged the situation.
        st = SafeModeState(active=False, entries=cur.entries)
        self._write(st)
        self.audit.append("safe_mode.left", actor=actor, previous_reason=cur.reason, detail=detail)
        self.sync_slots()
        self.telemetry.event("safe_mode", f"safe mode left: {detail}", severity="info")
        return st

    def sync_slots(self) -> dict[str, bool]:
        """Make every module's slots agree with the stored mode (call on start). Returns served-safe map."""
        active = self.state().active
        served: dict[str, bool] = {}
        for module in self.slots.modules():
            try:
                if active:
                    served[module] = self.slots.enter_safe(module, reason="safe mode")
                else:
                    self.slots.leave_safe(module)
            except SlotError as exc:
                served[module] = False
                self.audit.append("safe_mode.slot_refused", module=module, why=exc.message)
        return served

    def record_rollback(self, module: str) -> SafeModeState:
        """Remember an automatic rollback for the flapping rule (bounded list)."""
        cur = self.state()
        now = self.clock.now()
        marks = [*_recent(cur.rollbacks, now, self.flapping.window_s), now.isoformat()]
        st = SafeModeState(**{**cur.to_dict(), "rollbacks": marks[-_MAX_ROLLBACK_MARKS:]})
        self._write(st)
        return st

    def alert(self, message: str, **attrs: Any) -> None:
        """Raise an alert (telemetry event, severity critical)."""
        self.telemetry.event("safe_mode", message, severity="critical", attrs=attrs)
