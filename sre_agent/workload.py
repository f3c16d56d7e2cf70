"""Which of the daemon's jobs may run when the disk is short: one pure decision, one thin gate.

Below the disk reserve (the verification policy's ``reserves``: free MB and free percent under the state
directory) or while essential telemetry outgrew its reserved space (the telemetry store's
``stop_nonessential``), non-essential work stops: chaos experiments (they write journals, backups and may
fill the disk on purpose) and the operator digest (report rendering, the local model). Essential work
never stops: pulling and reconciling signed state, serving, verification, triage and escalations, the
SLOs, attestation and the uplink (moving telemetry off the device is what frees its space).

:func:`decide` is pure (values in, a :class:`WorkDecision` out). :class:`WorkGate` wraps a job: it reads
the disk state, asks :func:`decide`, and skips a stopped job with a logged reason, an audit entry when
work stops and resumes, and a count per job that the daemon's status shows.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sre_core.audit import AuditLog

__all__ = [
    "ESSENTIAL_JOBS",
    "NONESSENTIAL_JOBS",
    "DiskState",
    "WorkDecision",
    "WorkGate",
    "decide",
    "disk_state",
]

_log = logging.getLogger(__name__)
_MB = 1024 * 1024

NONESSENTIAL_JOBS: dict[str, str] = {
    "chaos": "chaos experiments",
    "digest": "the operator digest (report rendering, the local model)",
}
"""Jobs that stop while the disk is short, and what they are."""
ESSENTIAL_JOBS = frozenset(
    {
        "heartbeat",
        "pull-reconcile",
        "uplink",
        "attest",
        "slo",
        "escalations",
        "chaos-aftermath",
        "signed-config",
    }
)
"""Jobs that always run (a job named in neither set runs too: stopping is opt-in, by name)."""


@dataclass(frozen=True)
class DiskState:
    """What the decision reads: free space under the state directory, the reserve, essential data."""

    free_bytes: int
    total_bytes: int
    reserve_bytes: int
    reserve_pct: float = 0.0
    essential_full: bool = False


@dataclass(frozen=True)
class WorkDecision:
    """Whether non-essential work stops, and why (empty when it runs)."""

    stop_nonessential: bool
    reason: str = ""

    def may_run(self, job: str) -> bool:
        return not (self.stop_nonessential and job in NONESSENTIAL_JOBS)


def decide(state: DiskState) -> WorkDecision:
    """Non-essential work stops below the disk reserve or while essential telemetry is over its share."""
    why = []
    if state.free_bytes < state.reserve_bytes:
        why.append(f"disk free {state.free_bytes // _MB} MB < reserve {state.reserve_bytes // _MB} MB")
    pct = 100.0 * state.free_bytes / state.total_bytes if state.total_bytes > 0 else 100.0
    if pct < state.reserve_pct:
        why.append(f"disk free {pct:.1f}% < reserve {state.reserve_pct:g}%")
    if state.essential_full:
        why.append("essential telemetry is over its reserved space")
    return WorkDecision(bool(why), "; ".join(why))


def disk_state(root: Path, policies_dir: Path, essential_full: Callable[[], bool] | None = None) -> DiskState:
    """The disk state of the device now: ``shutil.disk_usage`` of ``root`` against the verification
    policy's reserves (the installed policy, else the shipped default)."""
    from policies.verification import load_verification_policy

    usage = shutil.disk_usage(root)
    res = load_verification_policy(policies_dir).reserves
    full = False
    if essential_full is not None:
        try:
            full = bool(essential_full())
        except Exception:  # the telemetry store not open yet: judge on the disk alone
            full = False
    return DiskState(
        free_bytes=usage.free,
        total_bytes=usage.total,
        reserve_bytes=int(res.min_free_disk_mb * _MB),
        reserve_pct=res.min_free_disk_pct,
        essential_full=full,
    )


@dataclass
class WorkGate:
    """Runs a job only when :func:`decide` lets it; a skipped run returns ``{"skipped": reason}``.

    Args:
        state: reads the disk state now.
        audit: ``work.nonessential_stopped`` / ``work.nonessential_resumed`` when the decision changes,
            ``job.skipped`` the first time each job is skipped in a stop period.
    """

    state: Callable[[], DiskState]
    audit: AuditLog
    decision: WorkDecision = field(default_factory=lambda: WorkDecision(False))
    skipped: dict[str, int] = field(default_factory=dict)
    _noted: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> WorkDecision:
        """Decide now (audited when the decision changes)."""
        try:
            now = decide(self.state())
        except Exception as exc:  # cannot tell: keep the last decision, say why
            _log.warning("disk state unreadable: %s", exc)
            return self.decision
        with self._lock:
            was, self.decision = self.decision, now
            if now.stop_nonessential != was.stop_nonessential:
                self._noted.clear()
                changed = True
            else:
                changed = False
        if changed:
            event = "work.nonessential_stopped" if now.stop_nonessential else "work.nonessential_resumed"
            self.audit.append(event, reason=now.reason, jobs=sorted(NONESSENTIAL_JOBS))
        return now

    def wrap(self, name: str, func: Callable[[], object]) -> Callable[[], object]:
        """``func`` behind the gate (essential jobs are returned as they are)."""
        if name not in NONESSENTIAL_JOBS:
            return func

        def gated() -> object:
            decision = self.check()
            if decision.may_run(name):
                return func()
            with self._lock:
                self.skipped[name] = self.skipped.get(name, 0) + 1
                first = name not in self._noted
                self._noted.add(name)
            _log.warning("job %s skipped: %s", name, decision.reason)
            if first:
                self.audit.append(
                    "job.skipped", job=name, what=NONESSENTIAL_JOBS[name], reason=decision.reason
                )
            return {"skipped": decision.reason}

        return gated

    def status(self) -> dict[str, Any]:
        """What `sre-agent status` shows: whether non-essential work is stopped, why, what was skipped."""
        with self._lock:
            d = self.decision
            return {
                "stop_nonessential": d.stop_nonessential,
                "reason": d.reason,
                "stopped_jobs": sorted(NONESSENTIAL_JOBS) if d.stop_nonessential else [],
                "skipped": dict(self.skipped),
            }
