"""Assembling the daemon from settings: which services run and which jobs are scheduled.

This is the one place that knows every component; each component stays ignorant of the others and
receives its clock, paths, telemetry sink and audit log from here. :func:`assemble` builds everything
once as an :class:`Assembly` of typed objects; ``sre-agent run`` (:func:`build_daemon`), the admin API
and ``make demo`` all use it. To add a service or a job: build it in :func:`assemble` and append it to
``services`` / ``jobs`` there.

Services start in this order and stop in reverse (so on SIGTERM the serving plane drains first, chaos
faults are cleared, and the telemetry writer flushes last)::

    telemetry -> admin API -> fault proxy -> chaos guard -> serving -> verification -> responder

Jobs (:mod:`sre_agent.jobs`): ``pull-reconcile``, ``chaos`` (experiment files in ``[chaos]
experiments_dir`` within the policy's windows; pre-flight first), ``chaos-aftermath`` (damage a
run left behind, re-measured until it clears), ``uplink``, ``attest``, ``slo``,
``escalations``, ``digest`` and the engine's ``heartbeat``. Retention and rollups run inside the
telemetry writer on the telemetry policy's enforcement period.

Incidents: every producer hands the responder one typed :class:`~sre_agent.incidents.IncidentSignal`:
the jobs here through :meth:`ResponderService.report`, the canary and verification runner through
an ``incident`` telemetry event that :class:`IncidentTee` converts once. The responder triages it off
the caller's thread and follows it through (:mod:`sre_agent.respond`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sre_agent.config import AgentSettings, LiveConfig
from sre_agent.daemon import Daemon, JobSpec, Service
from sre_agent.handlers import DaemonHandlers
from sre_agent.jobs import (
    AttestJob,
    DigestJob,
    EscalationsJob,
    PullReconcileJob,
    SloJob,
    UplinkJob,
    hub_url_of,
)
from sre_agent.services.admin import AdminService, admin_routes, read_only_sql, table_rows
from sre_agent.services.chaos import ChaosGuard, ChaosSchedule, FaultProxyService
from sre_agent.services.responder import IncidentTee, LazySink, ResponderService
from sre_agent.workload import WorkGate, disk_state
from sre_core.audit import AuditLog, AuditRecord
from sre_core.clock import Clock
from sre_core.identity import DeviceIdentity
from sre_core.paths import StatePaths
from sre_core.telemetry import TelemetrySink

if TYPE_CHECKING:
    from deployment.slots import SlotManager
    from sre_agent.respond import Responder
    from sre_agent.services.serving import ServingPlane
    from sre_agent.telemetry.service import TelemetryService
    from verification.scheduler import VerificationScheduler

__all__ = [
    "AdminService",
    "Assembly",
    "ChaosGuard",
    "ChaosSchedule",
    "FaultProxyService",
    "IncidentTee",
    "ResponderService",
    "assemble",
    "build_daemon",
    "read_only_sql",
]

_log = logging.getLogger(__name__)


@dataclass
class Assembly:
    """Every service and job of one device daemon, built once by :func:`assemble`."""

    settings: AgentSettings
    paths: StatePaths
    clock: Clock
    identity: DeviceIdentity
    audit: AuditLog
    telemetry: TelemetryService
    sink: TelemetrySink
    """The sink components report through (incident events reach the responder)."""
    admin: AdminService
    proxy: FaultProxyService | None
    guard: ChaosGuard
    responder: ResponderService
    plane: ServingPlane | None
    verification: VerificationScheduler
    chaos: ChaosSchedule
    handlers: DaemonHandlers
    slot_manager: SlotManager
    services: list[Service] = field(default_factory=list)
    jobs: list[JobSpec] = field(default_factory=list)
    work: WorkGate | None = None
    """Which jobs may run while the disk is short (:mod:`sre_agent.workload`)."""

    def slots(self) -> SlotManager:
        """The slot manager in use (the serving plane's when it runs)."""
        return self.plane.slots if self.plane is not None else self.slot_manager

    def job(self, name: str) -> JobSpec:
        """The job called ``name`` (KeyError when it is not scheduled)."""
        for j in self.jobs:
            if j.name == name:
                return j
        raise KeyError(name)

    def daemon(self, heartbeat_s: float = 30.0) -> Daemon:
        """The daemon engine over these services and jobs, with the admin routes bound to it."""
        daemon = Daemon(
            self.paths,
            self.clock,
            self.audit,
            jobs=list(self.jobs),
            services=list(self.services),
            heartbeat_interval_s=heartbeat_s,
        )
        daemon.before_stop.append(self.chaos.shutdown)
        raw = LazySink(lambda: self.telemetry.sink)
        daemon.on_job_failure = lambda job, exc: raw.event(
            "daemon.job_failed", f"job {job} failed: {type(exc).__name__}: {exc}"[:300], severity="warning",
            attrs={"job": job},
        )  # fmt: skip
        self.admin.routes = admin_routes(
            daemon, self.telemetry, self.responder, self.chaos, self.proxy, self.plane, self.settings,
            work=self.work,
        )  # fmt: skip
        return daemon


_decisions = logging.getLogger("sre_agent.decisions")


def log_decision(rec: AuditRecord) -> None:
    """Every audited decision and action (canary steps, flips, rollbacks, incidents, escalations, stops)
    also goes to the log as one structured line (a JSON object under ``log_format = "json"``)."""
    level = logging.WARNING if rec.event.endswith(("failed", "_failed", "refused")) else logging.INFO
    _decisions.log(
        level,
        rec.event,
        extra={"fields": {"event": rec.event, "actor": rec.actor, "seq": rec.seq, **rec.data}},
    )


def assemble(settings: AgentSettings, paths: StatePaths, clock: Clock) -> Assembly:
    """Build every service and job the settings enable (nothing starts here).

    ``clock`` is wrapped in :class:`chaos.faults.SkewedClock`, so a clock-skew experiment reaches the
    agent's notion of wall time (and nothing else).
    """
    from chaos.faults import SkewedClock
    from deployment.slots import SlotManager
    from policies.telemetry import load_telemetry_policy
    from sre_agent.respond import build_responder
    from sre_agent.slo import SloTargets
    from sre_agent.telemetry.service import TelemetryService
    from sre_core.identity import load_identity
    from verification.scheduler import build_service

    clock = SkewedClock(clock, paths.root)
    identity = load_identity(paths)
    tel_policy_file = paths.policies / "telemetry.yaml"
    tel = TelemetryService(
        paths,
        load_telemetry_policy(tel_policy_file if tel_policy_file.exists() else None),
        clock,
        identity.device_id,
    )

    def mirror(rec: AuditRecord) -> None:
        tel.audit_mirror(rec)
        log_decision(rec)

    audit = AuditLog(paths.audit_log, clock, mirror=mirror)
    base_sink: TelemetrySink = LazySink(lambda: tel.sink)
    hub_url = hub_url_of(paths, settings)
    http_hub = hub_url is not None and hub_url.startswith(("http://", "https://"))

    admin = AdminService(paths)
    proxy: FaultProxyService | None = None
    if settings.chaos.enabled and settings.chaos.toxiproxy_url is None and http_hub and hub_url:
        proxy = FaultProxyService(hub_url)

    def toxiproxy_url() -> str | None:
        return settings.chaos.toxiproxy_url or (proxy.api_url if proxy is not None else None)

    def link_url() -> str | None:
        """The hub as the device reaches it: through the fault proxy for a plain-HTTP hub (a TLS hub is
        reached directly: a loopback address would not match its certificate)."""
        if proxy is not None and proxy.link_url and str(hub_url).startswith("http://"):
            return proxy.link_url
        return hub_url

    guard = ChaosGuard(paths, audit, toxiproxy_url)
    slot_manager = SlotManager(paths, audit, clock)

    def slots() -> SlotManager:
        served = handlers.plane  # set once the serving plane exists (below)
        return served.slots if served is not None else slot_manager

    handlers = DaemonHandlers(paths, clock, audit, base_sink, slots)

    def make_responder() -> Responder:
        return build_responder(
            paths,
            settings,
            clock=clock,
            audit=audit,
            handlers=handlers.table(),
            telemetry=base_sink,
            device_id=identity.device_id,
        )

    def serving(module: str) -> bool | None:
        """Whether a managed (served) module's model is loaded; None for files and when nothing serves."""
        served = handlers.plane
        if served is None:
            return None
        active = slots().status(module).active
        if active is None or active.manifest.mode != "managed":
            return None
        return served.repository.get(module) is not None

    responder = ResponderService(paths, clock, make_responder, slots, sink=base_sink, serving=serving)
    sink: TelemetrySink = IncidentTee(lambda: tel.sink, responder.submit, responder.resolved)

    plane: ServingPlane | None = None
    if settings.serving.enabled:
        from sre_agent.services.serving import ServingPlane

        # The plane applies the chaos input-noise fault (router preprocess) and writes run/serving.pid.
        plane = ServingPlane(settings, paths, sink=sink, audit=audit, clock=clock)
    handlers.plane = plane

    def telemetry_query(sql: str) -> list[tuple[Any, ...]]:
        if tel.store is None:
            return []
        return table_rows(tel.store.query(sql))

    verification = build_service(paths, clock, sink, telemetry_query=telemetry_query)

    def served_model() -> str | None:
        names: list[str] = plane.repository.names() if plane is not None else []
        return names[0] if names else None

    def recheck(check: str) -> bool | None:
        res = verification.run_now(check)
        return None if res is None else not res.status.failing

    schedule = ChaosSchedule(
        paths,
        settings,
        clock,
        audit,
        sink,
        serving_url=lambda: plane.url if plane is not None and plane.url else None,
        model=served_model,
        toxiproxy_url=toxiproxy_url,
        report=responder.report,
        recheck=recheck,
        resolve=responder.resolve,
    )
    handlers.chaos = schedule
    handlers.guard = guard
    handlers.verification = verification

    services: list[Service] = [tel, admin]
    if proxy is not None:
        services.append(proxy)
    if settings.chaos.enabled:
        services.append(guard)
    if plane is not None:
        services.append(plane)
    services += [verification, responder]

    def slots_or_none() -> SlotManager | None:
        return slots()

    jobs: list[JobSpec] = [
        PullReconcileJob(paths, settings, clock, audit, sink, plane, link_url, responder.report).spec()
    ]
    if settings.chaos.enabled and settings.chaos.experiments_dir is not None:
        every = settings.chaos.interval_s
        jobs.append(
            JobSpec(
                "chaos", schedule.tick, every, jitter_s=every * 0.1, run_at_start=False, misfire_grace_s=every
            )
        )
        # Damage a run left behind is re-measured until it clears (reported again while it lasts).
        jobs.append(JobSpec("chaos-aftermath", schedule.remeasure, min(60.0, every), run_at_start=False))
    jobs += [
        UplinkJob(paths, settings, clock, tel, identity, link_url).spec(),
        AttestJob(paths, clock, tel, identity, audit).spec(),
        SloJob(
            paths,
            clock,
            tel,
            sink,
            slots_or_none,
            responder.report,
            responder.resolve,
            interval_s=settings.daemon.slo_interval_s,
            targets=SloTargets(
                max_unacked_age_s=settings.daemon.slo_max_unacked_age_s,
                max_since_ack_s=settings.daemon.slo_max_since_ack_s,
                max_policy_age_s=settings.daemon.slo_max_policy_age_s,
            ),
        ).spec(),
        EscalationsJob(
            paths,
            responder,
            interval_s=settings.daemon.escalations_interval_s,
            hubs=lambda: [h for h in [link_url(), *settings.hub.hubs()[1:]] if h],
        ).spec(),
        DigestJob(clock, identity, audit, sink, responder, slots_or_none).spec(),
        # A committed signed config module's live keys apply in place (sre_agent.config.LIVE_KEYS).
        JobSpec("signed-config", LiveConfig(settings), 5.0, misfire_grace_s=5.0),
    ]
    # Below the disk reserve, non-essential jobs (chaos, the digest) skip with a logged reason.
    work = WorkGate(
        lambda: disk_state(
            paths.root,
            paths.policies,
            lambda: bool(tel.store.stop_nonessential) if tel.store is not None else False,
        ),
        audit,
    )
    jobs = [dataclasses.replace(j, func=work.wrap(j.name, j.func)) for j in jobs]
    return Assembly(
        settings=settings,
        paths=paths,
        clock=clock,
        identity=identity,
        audit=audit,
        telemetry=tel,
        sink=sink,
        admin=admin,
        proxy=proxy,
        guard=guard,
        responder=responder,
        plane=plane,
        verification=verification,
        chaos=schedule,
        handlers=handlers,
        slot_manager=slot_manager,
        services=services,
        jobs=jobs,
        work=work,
    )


def build_daemon(
    settings: AgentSettings, paths: StatePaths, clock: Clock, heartbeat_s: float = 30.0
) -> Daemon:
    """The daemon with every service and job the settings enable (:func:`assemble`, then the engine)."""
    return assemble(settings, paths, clock).daemon(heartbeat_s)
