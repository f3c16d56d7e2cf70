"""The verification schedule on APScheduler 3: one job per check (and per learned gate).

Each job has the check's interval with jitter, ``max_instances=1`` (a check never overlaps itself),
``coalesce`` (a backlog of missed runs runs once) and a misfire grace time (a run missed by more than
that, e.g. while the device slept, is skipped rather than replayed). The first run of each check is
spread over its jitter window so a device does not run everything at once at start. A small
housekeeping job picks up gates added or removed while the agent runs.

It is a daemon service (``name``, ``start``, ``stop``).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from policies.verification import VerificationPolicy, load_verification_policy
from sre_core.clock import Clock, SystemClock
from sre_core.paths import StatePaths
from sre_core.telemetry import TelemetrySink
from verification.base import CheckResult, Status
from verification.context import SessionCache, VerificationContext
from verification.gates import GATE_PREFIX
from verification.harness import Harness
from verification.recorder import SampleRecorder
from verification.registry import CheckRegistry, PlannedCheck

__all__ = ["GATES_SYNC_JOB", "VerificationScheduler", "build_service"]

GATES_SYNC_JOB = "verification:gates-sync"
_log = logging.getLogger(__name__)


class VerificationScheduler:
    """Runs the harness's checks on their schedules in a background scheduler.

    Args:
        harness: what to run (policy, registry, gates, runner).
        context_factory: builds a fresh context for each run (slots may change between runs).
        clock: wall time for the first-run offsets (the real clock in production).
        rng: jitter source (seedable in tests).
    """

    name = "verification"

    def __init__(
        self,
        harness: Harness,
        context_factory: Callable[[], VerificationContext],
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.harness = harness
        self.context_factory = context_factory
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._sched: Any = None
        self._lock = threading.Lock()
        self._planned: dict[str, PlannedCheck] = {}

    # -- service ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Plan and start. Checks that cannot be loaded are recorded as error results once."""
        if self._sched is not None:
            raise RuntimeError("verification scheduler already started")
        d = self.harness.policy.defaults
        self._sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=d.max_parallel)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": int(d.misfire_grace_s)},
            timezone="UTC",
        )
        planned, problems = self.harness.plan()
        for res in problems:
            self.harness.runner.record(res.stamped(res.check, res.severity, self.clock.now(), 0.0))
        for item in planned:
            self._add(item)
        gp = self.harness.policy.gates
        self._sched.add_job(
            self.sync_gates,
            IntervalTrigger(seconds=gp.interval_s or d.interval_s),
            id=GATES_SYNC_JOB,
            name=GATES_SYNC_JOB,
        )
        self._sched.start()

    def stop(self, wait: bool = True) -> None:
        """Stop taking new runs; with ``wait``, let running jobs finish (each is bounded by its timeout)."""
        if self._sched is not None:
            self._sched.shutdown(wait=wait)
            self._sched = None

    # -- schedule -----------------------------------------------------------------------------------

    def jobs(self) -> list[dict[str, Any]]:
        """The live schedule: one row per job (name, interval, jitter, next run, limits)."""
        rows: list[dict[str, Any]] = []
        sched = self._sched
        if sched is None:
            return rows
        for job in sched.get_jobs():
            trig = job.trigger
            rows.append(
                {
                    "id": job.id,
                    "interval_s": trig.interval.total_seconds() if hasattr(trig, "interval") else None,
                    "jitter_s": getattr(trig, "jitter", None),
                    "next_run": job.next_run_time,
                    "max_instances": job.max_instances,
                    "coalesce": job.coalesce,
                    "misfire_grace_s": job.misfire_grace_time,
                }
            )
        return rows

    def sync_gates(self) -> None:
        """Add jobs for new gates, drop jobs of removed ones (runs periodically)."""
        planned, problems = self.harness.plan_gates()
        for res in problems:
            self.harness.runner.record(res.stamped(res.check, res.severity, self.clock.now(), 0.0))
        want = {p.spec.name: p for p in planned}
        with self._lock:
            have = {n for n in self._planned if n.startswith(GATE_PREFIX)}
        for name in have - set(want):
            self._remove(name)
        for name, item in want.items():
            with self._lock:
                current = self._planned.get(name)
            if current is None or current.check is not item.check or current.spec != item.spec:
                if current is not None:
                    self._remove(name)
                self._add(item)

    def _add(self, item: PlannedCheck) -> None:
        spec = item.spec
        first = self.clock.now() + timedelta(seconds=self.rng.uniform(0, min(spec.jitter_s, spec.interval_s)))
        with self._lock:
            self._planned[spec.name] = item
        self._sched.add_job(
            self._run,
            IntervalTrigger(seconds=spec.interval_s, jitter=spec.jitter_s or None),
            args=[spec.name],
            id=spec.name,
            name=spec.name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(spec.misfire_grace_s)),
            next_run_time=first,
            replace_existing=True,
        )

    def _remove(self, name: str) -> None:
        with self._lock:
            self._planned.pop(name, None)
        try:
            self._sched.remove_job(name)
        except Exception:
            _log.debug("job %s was already gone", name)

    def run_now(self, name: str) -> CheckResult | None:
        """Run one scheduled check now, outside its schedule (a triage re-run); None when not scheduled."""
        return self._run(name)

    def _run(self, name: str) -> CheckResult | None:
        with self._lock:
            item = self._planned.get(name)
        if item is None:
            return None
        try:
            ctx = self.context_factory()
        except Exception as exc:
            _log.exception("verification: cannot build the context for %s", name)
            res = CheckResult(Status.ERROR, f"cannot build the verification context: {exc}"[:500])
            return self.harness.runner.record(res.stamped(name, item.spec.severity, self.clock.now(), 0.0))
        return self.harness.runner.run_one(ctx, item)


def build_service(
    paths: StatePaths,
    clock: Clock,
    sink: TelemetrySink,
    policy: VerificationPolicy | None = None,
    recorder: SampleRecorder | None = None,
    telemetry_query: Callable[[str], list[tuple[Any, ...]]] | None = None,
    registry: CheckRegistry | None = None,
) -> VerificationScheduler:
    """The daemon's verification service, wired to a device state directory.

    Args:
        paths: the device state (slots, audit trail, gates under ``<state>/gates``).
        clock: the agent's clock.
        sink: the telemetry writer (results, metrics, incident events).
        policy: default ``<state>/policies/verification.yaml`` if present, else the shipped default.
        recorder: where serving records recent inputs/outputs (drift checks).
        telemetry_query: SQL on the daemon's own DuckDB connection (the file is held by it).
        registry: installed checks (default: built-ins + ``sre_agent.checks`` entry points).
    """
    from verification.adapters import build_context

    policy = policy or load_verification_policy(paths.policies if paths.policies.is_dir() else None)
    harness = Harness(policy, registry=registry, gates_dir=paths.root / "gates", sink=sink, clock=clock)
    sessions = SessionCache()

    def context() -> VerificationContext:
        return build_context(
            paths, policy, clock=clock, sessions=sessions, recorder=recorder, telemetry_query=telemetry_query
        )

    return VerificationScheduler(harness, context, clock=clock)
