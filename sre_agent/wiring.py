"""Assembling the daemon from settings: which services run and which jobs are scheduled.

This is the one place that knows every component; each component stays ignorant of the others and
receives its clock, paths, telemetry sink and audit log from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sre_agent.admin import AdminServer
from sre_agent.config import AgentSettings
from sre_agent.daemon import Daemon, JobSpec, Service
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.paths import StatePaths

__all__ = ["AdminService", "build_daemon"]


@dataclass
class AdminService:
    """The admin API as a daemon service."""

    paths: StatePaths
    name: str = "admin-api"
    _server: AdminServer | None = None

    def start(self) -> None:
        self._server = AdminServer(self.paths, routes=[]).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


def build_daemon(
    settings: AgentSettings, paths: StatePaths, clock: Clock, heartbeat_s: float = 30.0
) -> Daemon:
    """The daemon with every service and job the settings enable."""
    audit = AuditLog(paths.audit_log, clock)
    services: list[Service] = [AdminService(paths)]
    jobs: list[JobSpec] = []
    return Daemon(paths, clock, audit, jobs=jobs, services=services, heartbeat_interval_s=heartbeat_s)
