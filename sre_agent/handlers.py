"""The daemon's action handlers: what the triage gate (or an approved escalation) may execute.

The deployment core owns rollback, quarantine and safe mode; verification owns re-runs; the chaos
harness owns pausing. Each handler returns a short detail or raises with the reason it could not act
(the executor turns that into a failed result, the responder into an alert and a follow-up).

Handlers are idempotent for one incident: a rollback for a version that no longer serves says so
instead of flipping back (after a crash and restart the same incident may be handled again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from policies.triage import Action
from sre_agent.actions import ActionHandler
from sre_agent.incidents import Incident
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.paths import StatePaths
from sre_core.telemetry import TelemetrySink

if TYPE_CHECKING:
    from deployment.slots import SlotManager
    from sre_agent.services.chaos import ChaosGuard, ChaosSchedule
    from sre_agent.services.serving import ServingPlane
    from verification.scheduler import VerificationScheduler

__all__ = ["DaemonHandlers", "NoRemedyError"]

CHAOS_PAUSE_S = 3600.0


class NoRemedyError(RuntimeError):
    """The action cannot help here (nothing to roll back to, nothing to quarantine)."""


@dataclass
class DaemonHandlers:
    """The handlers, bound to the assembled daemon's components.

    Args:
        paths, clock, audit, sink: the daemon's state, time, audit trail and telemetry.
        slots: the slot manager in use (the serving plane's when it runs).
        plane: the serving plane (None when serving is off).
        chaos: the chaos schedule and guard (pause and clear).
        verification: the verification scheduler (re-runs).
    """

    paths: StatePaths
    clock: Clock
    audit: AuditLog
    sink: TelemetrySink
    slots: Callable[[], SlotManager]
    plane: ServingPlane | None = None
    chaos: ChaosSchedule | None = None
    guard: ChaosGuard | None = None
    verification: VerificationScheduler | None = None

    def table(self) -> dict[Action, ActionHandler]:
        """Action -> handler (``observe`` and ``alert`` are built into the executor)."""
        return {
            Action.ROLLBACK: self.rollback,
            Action.QUARANTINE: self.quarantine,
            Action.SAFE_MODE: self.safe_mode,
            Action.PAUSE_CHAOS: self.pause_chaos,
            Action.RERUN_VERIFICATION: self.rerun,
        }

    def _resync(self) -> None:
        if self.plane is not None:
            # A version to reload (its session was unloaded: unload_standby) loads in a thread of its
            # own; the one rolled away from answers until then, as it would during a load here.
            self.plane.serving.sync(self.plane.slots, background=True)

    def rollback(self, inc: Incident) -> str:
        """Serve the verified last-known-good; the version rolled away from is marked bad.

        Raises:
            NoRemedyError: the incident's version no longer serves (say so: done already), or there is no
                intact, never-bad standby to go back to.
        """
        slots = self.slots()
        st = slots.status(inc.module)
        if st.active is None:
            raise NoRemedyError(f"{inc.module} has no active version to roll back from")
        if inc.version and st.active.version != inc.version:
            # Done already (before a crash, or by the slot manager's start-up fallback from a corrupt
            # active slot): finish it by blocking the version, or the next reconcile installs it again.
            sb = st.standby
            if sb is not None and sb.version == inc.version and sb.sha256 not in st.bad:
                slots.mark_bad(inc.module, sb.sha256, sb.version, f"rolled back from ({inc.id})"[:300])
                return f"{inc.module} already serves {st.active.version}; {inc.version} marked bad"
            return f"{inc.module} already serves {st.active.version}, not {inc.version}"
        sb = st.standby
        if sb is None or sb.sha256 in st.bad:
            raise NoRemedyError(f"{inc.module}: no good standby version to roll back to")
        check = slots.verify_slot(inc.module, sb.slot)
        if not check.ok:
            why = "; ".join(check.problems)[:200]
            raise NoRemedyError(f"{inc.module}: the standby {sb.version} fails its digest check ({why})")
        new = slots.rollback(inc.module, reason=f"triage {inc.id}: {inc.title}"[:300], actor="agent")
        self._resync()
        now = new.active.version if new.active else "nothing"
        return f"{inc.module} now serves {now}; {st.active.version} marked bad"

    def quarantine(self, inc: Incident) -> str:
        """Block the incident's version on this device: stop its canary, mark a standby bad, or, for the
        version that serves, roll back to the last-known-good (which marks it bad)."""
        plane = self.plane
        if plane is not None and plane.serving.busy(inc.module):
            run = plane.serving.runs.get(inc.module)
            if run is not None and not run.controller.final:
                run.cancel(f"quarantined by triage ({inc.id})")
            else:  # still loading (candidate or first version): cancelled as its load returns
                plane.serving.halt(inc.module, f"quarantined by triage ({inc.id})")
            return f"canary of {inc.module} stopped"
        slots = self.slots()
        st = slots.status(inc.module)
        version = str(inc.facts.get("version") or inc.version or "")
        if st.standby is not None and st.standby.version == version:
            if st.standby.sha256 in st.bad:
                return f"{inc.module} {version} is already blocked"
            slots.mark_bad(inc.module, st.standby.sha256, st.standby.version, f"quarantined ({inc.id})")
            return f"{inc.module} {version} blocked"
        if st.active is not None and st.active.version == version:
            return self.rollback(inc)
        raise NoRemedyError(
            f"nothing to quarantine for {inc.module} ({version or 'no version'} is not installed)"
        )

    def safe_mode(self, inc: Incident) -> str:
        """Serve the factory safe modules; the held desired-state serial is recorded, so safe mode holds
        until ``safe-mode exit`` or a signed desired state with a higher serial."""
        from deployment.manifest import DesiredState
        from deployment.reconcile import read_last_reconcile
        from deployment.safemode import SafeMode

        held = read_last_reconcile(self.paths).get("desired")
        desired = DesiredState.model_validate(held) if held else None
        SafeMode(self.paths, self.slots(), self.audit, self.clock, telemetry=self.sink).enter(
            "operator", detail=f"approved triage of {inc.id}: {inc.title}"[:300], desired=desired
        )
        self._resync()
        return "safe mode entered"

    def pause_chaos(self, inc: Incident) -> str:
        if self.chaos is None:
            raise NoRemedyError("no chaos schedule runs on this device")
        detail = self.chaos.pause(CHAOS_PAUSE_S, f"triage {inc.id}")
        if self.guard is not None:
            self.guard.clear(f"triage {inc.id}")
        return detail

    def rerun(self, inc: Incident) -> str:
        check = str(inc.facts.get("check") or "")
        if not check:
            raise NoRemedyError("the incident names no verification check")
        if self.verification is None:
            raise NoRemedyError("verification does not run on this device")
        res = self.verification.run_now(check)
        if res is None:
            raise NoRemedyError(f"no scheduled check named {check}")
        return f"{check}: {res.status.value}"
