"""The daemon engine: scheduled jobs (APScheduler) plus long-running services, with a clean shutdown.

A job that raises is logged, counted and retried at its next interval, never fatal. On stop (SIGTERM)
the scheduler stops taking new runs, waits for running jobs, then services stop in reverse start order
(the serving plane drains in-flight requests, telemetry flushes, chaos faults are cleared).
What the jobs and services are is decided in :mod:`sre_agent.wiring`.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler

from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.paths import StatePaths

__all__ = ["Daemon", "JobSpec", "JobStats", "Service"]

_log = logging.getLogger(__name__)


class Service(Protocol):
    """Something that runs for the daemon's lifetime (the inference server, the telemetry writer)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class JobSpec:
    """A periodic job."""

    name: str
    func: Callable[[], object]
    interval_s: float
    jitter_s: float = 0.0
    run_at_start: bool = True
    misfire_grace_s: float = 60.0


@dataclass
class JobStats:
    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_ok: str | None = None
    last_error: str | None = None
    last_duration_s: float | None = None


@dataclass
class Daemon:
    """Schedules ``jobs`` and runs ``services`` until :meth:`stop`."""

    paths: StatePaths
    clock: Clock
    audit: AuditLog
    jobs: list[JobSpec] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    heartbeat_interval_s: float = 30.0
    on_job_failure: Callable[[str, BaseException], None] | None = None
    before_stop: list[Callable[[], None]] = field(default_factory=list)
    """Called first on stop, before waiting for running jobs (e.g. interrupt a chaos run)."""
    stats: dict[str, JobStats] = field(default_factory=dict)
    _started: list[Service] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _scheduler: Any = None
    _started_at: datetime | None = None

    def _wrap(self, job: JobSpec) -> Callable[[], None]:
        def run() -> None:
            stats = self.stats.setdefault(job.name, JobStats())
            t0 = self.clock.monotonic()
            try:
                job.func()
            except Exception as exc:
                with self._lock:
                    stats.runs += 1
                    stats.failures += 1
                    stats.consecutive_failures += 1
                    stats.last_error = f"{type(exc).__name__}: {exc}"
                _log.error(
                    "job %s failed; it runs again at its next interval",
                    job.name,
                    extra={"fields": {"job": job.name, "trace": traceback.format_exc(limit=5)}},
                )
                if self.on_job_failure is not None:
                    self.on_job_failure(job.name, exc)
                return
            finally:
                stats.last_duration_s = self.clock.monotonic() - t0
            with self._lock:
                stats.runs += 1
                stats.consecutive_failures = 0
                stats.last_ok = self.clock.now().isoformat()

        return run

    def status(self) -> dict[str, Any]:
        """What runs and how the jobs fare (the admin API's ``/status`` and the heartbeat file)."""
        with self._lock:
            jobs = {k: dict(vars(v)) for k, v in self.stats.items()}
        return {
            "ts": self.clock.now().isoformat(),
            "pid": os.getpid(),
            "started": self._started_at.isoformat() if self._started_at else None,
            "services": [s.name for s in self._started],
            "jobs": jobs,
        }

    def heartbeat(self) -> dict[str, Any]:
        """Write ``<state>/run/heartbeat.json`` (liveness for watchdogs and the CLI) and return it."""
        beat = self.status()
        atomic_write_json(self.paths.run / "heartbeat.json", beat)
        return beat

    def start(self) -> None:
        """Start services in order, then the scheduler. A service failing to start stops the others."""
        self._started_at = self.clock.now()
        self.paths.run.mkdir(parents=True, exist_ok=True)
        for svc in self.services:
            try:
                svc.start()
            except Exception:
                _log.exception("service %s failed to start", svc.name)
                self.stop("start-up failure")
                raise
            self._started.append(svc)
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1}, timezone="UTC"
        )
        all_jobs = [JobSpec("heartbeat", self.heartbeat, self.heartbeat_interval_s), *self.jobs]
        for job in all_jobs:
            # APScheduler runs on real wall time whatever clock we were given: anchor on it.
            delay = 0 if job.run_at_start else job.interval_s
            first = datetime.now(tz=UTC) + timedelta(seconds=delay)
            self._scheduler.add_job(
                self._wrap(job),
                "interval",
                seconds=job.interval_s,
                jitter=job.jitter_s or None,
                id=job.name,
                name=job.name,
                next_run_time=first,
                misfire_grace_time=int(job.misfire_grace_s),
            )
        self._scheduler.start()
        self.audit.append(
            "daemon.started", jobs=[j.name for j in all_jobs], services=[s.name for s in self._started]
        )

    def stop(self, reason: str = "stop requested") -> None:
        """Stop scheduling, wait for running jobs, stop services in reverse order. Idempotent."""
        for hook in self.before_stop:
            try:
                hook()
            except Exception:
                _log.exception("a stop hook failed")
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        errors = []
        while self._started:
            svc = self._started.pop()
            try:
                svc.stop()
            except Exception as exc:
                errors.append(f"{svc.name}: {exc}")
                _log.exception("service %s failed to stop cleanly", svc.name)
        self.heartbeat()
        self.audit.append("daemon.stopped", reason=reason, errors=errors)
