"""Assembling the daemon from settings: which services run and which jobs are scheduled.

This is the one place that knows every component; each component stays ignorant of the others and
receives its clock, paths, telemetry sink and audit log from here.

Services start in this order and stop in reverse (so on SIGTERM the serving plane drains first, chaos
faults are cleared, and the telemetry writer flushes last)::

    telemetry -> admin API -> fault proxy -> chaos guard -> serving -> verification -> responder

Jobs: ``pull-reconcile`` (jittered, ``[hub]``), ``chaos`` (experiment files in ``[chaos]
experiments_dir`` within the policy's windows; pre-flight first), ``uplink`` (``[uplink]``), ``slo``,
``escalations`` (expire, execute verified approvals), ``digest`` and the engine's ``heartbeat``.
Retention and rollups run inside the telemetry writer on the telemetry policy's enforcement period.

Incidents: every component reports through the telemetry sink; an event of kind ``incident`` (the
verification runner's, the canary's, and the ones this module raises for probe failures, SLO burn and
chaos deviations) is also handed to the :class:`ResponderService`, which triages it off the caller's
thread (dedup and cooldown live in :mod:`sre_agent.incidents`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from policies.triage import Action
from sre_agent.admin import AdminServer
from sre_agent.config import AgentSettings
from sre_agent.daemon import Daemon, JobSpec, Service
from sre_agent.incidents import Incident, SlotStatus, incident_from_event
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.paths import StatePaths
from sre_core.telemetry import TelemetrySink

__all__ = [
    "AdminService",
    "ChaosGuard",
    "ChaosSchedule",
    "FaultProxyService",
    "IncidentTee",
    "ResponderService",
    "build_daemon",
    "read_only_sql",
]

_log = logging.getLogger(__name__)

SLO_INTERVAL_S = 60.0
ESCALATIONS_INTERVAL_S = 30.0
DIGEST_INTERVAL_S = 3600.0
ATTEST_INTERVAL_S = 3600.0
MAX_QUERY_ROWS = 10_000
MAX_QUEUED_INCIDENTS = 256
CHAOS_PAUSE_S = 3600.0

_SOURCE_KINDS = {
    "canary": "canary_abort",
    "probe": "probe_failure",
    "slo": "slo_burn",
    "chaos": "chaos_deviation",
    "verification": "verification_failure",
}


# --------------------------------------------------------------------------------------------------
# Telemetry plumbing


class LazySink:
    """Forwards to whatever ``get()`` returns now (the telemetry writer exists only once started)."""

    def __init__(self, get: Callable[[], TelemetrySink]) -> None:
        self._get = get

    def metric(
        self, name: str, value: float, labels: dict[str, str] | None = None, ts: datetime | None = None
    ) -> None:
        self._get().metric(name, value, labels, ts)

    def event(
        self,
        kind: str,
        message: str,
        severity: str = "info",
        attrs: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        self._get().event(kind, message, severity, attrs, ts)

    def record(self, table: str, row: dict[str, Any]) -> None:
        self._get().record(table, row)


class IncidentTee(LazySink):
    """A sink that also hands every ``incident`` event to ``on_incident`` (the responder's queue)."""

    def __init__(
        self,
        get: Callable[[], TelemetrySink],
        on_incident: Callable[[str, str, dict[str, Any], datetime | None], None],
    ) -> None:
        super().__init__(get)
        self._on_incident = on_incident

    def event(
        self,
        kind: str,
        message: str,
        severity: str = "info",
        attrs: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        super().event(kind, message, severity, attrs, ts)
        if kind == "incident":
            try:
                self._on_incident(message, severity, dict(attrs or {}), ts)
            except Exception:  # a reporter must never fail because triage did
                _log.exception("could not queue an incident for triage")


# --------------------------------------------------------------------------------------------------
# The responder as a service


class ResponderService:
    """Triages queued incidents on its own thread, so a canary or check thread never waits on the model.

    The queue is bounded; an incident that does not fit is counted as dropped (the event itself is
    already in telemetry).
    """

    name = "responder"

    def __init__(
        self, paths: StatePaths, clock: Clock, responder_factory: Callable[[], Any], slots: Callable[[], Any]
    ) -> None:
        self.paths = paths
        self.clock = clock
        self._factory = responder_factory
        self._slots = slots
        self.responder: Any = None
        self._queue: queue.Queue[tuple[str, str, dict[str, Any], datetime]] = queue.Queue(
            MAX_QUEUED_INCIDENTS
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counts = {"queued": 0, "dropped": 0, "handled": 0, "failed": 0, "escalated": 0, "duplicates": 0}
        self.recent: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _slot_status(self, module: str) -> SlotStatus:
        """What rules read about the module's slots. The standby counts as verified only when it is not
        marked bad and re-hashes to its signed digest now (a rollback target must be intact)."""
        from deployment.safemode import read_safe_mode

        try:
            safe = read_safe_mode(self.paths).active
            slots = self._slots()
            if slots is None or module not in slots.modules():
                return SlotStatus(safe_mode=safe)
            st = slots.status(module)
            lkg = st.last_known_good or {}
            verified = False
            if st.standby is not None and st.standby.sha256 not in st.bad:
                verified = bool(slots.verify_slot(module, st.standby.slot).ok)
            return SlotStatus(
                active_version=st.active.version if st.active else None,
                standby_version=st.standby.version if st.standby else None,
                standby_verified=verified,
                last_known_good=lkg.get("version"),
                safe_mode=safe,
            )
        except Exception:
            _log.exception("slot status for %s", module)
            return SlotStatus()

    def submit(self, message: str, severity: str, attrs: dict[str, Any], ts: datetime | None) -> None:
        """Queue an ``incident`` event for triage (never blocks; the caller is a check or canary)."""
        attrs = dict(attrs)
        if "incident_kind" not in attrs:
            attrs["incident_kind"] = _SOURCE_KINDS.get(str(attrs.get("source", "")), "")
        if not attrs.get("modules") and attrs.get("module"):
            attrs["modules"] = [str(attrs["module"])]
        facts = dict(attrs.get("facts") or {})
        facts.setdefault("chaos_active", (self.paths.run / "chaos.lease").exists())
        attrs["facts"] = facts
        try:
            self._queue.put_nowait((message, severity, attrs, ts or self.clock.now()))
            with self._lock:
                self.counts["queued"] += 1
        except queue.Full:
            with self._lock:
                self.counts["dropped"] += 1

    def _incident(self, message: str, severity: str, attrs: dict[str, Any], ts: datetime) -> Incident | None:
        """The event as an :class:`Incident` with the module's slot status (read now, on this thread)."""
        sev = {"error": "critical", "critical": "critical", "warning": "warning"}.get(severity, "info")
        module = str((attrs.get("modules") or ["device"])[0])
        return incident_from_event(message, sev, attrs, ts, slot=self._slot_status(module))

    def start(self) -> None:
        self.responder = self._factory()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="responder", daemon=True)
        self._thread.start()

    def _handle(self, item: tuple[str, str, dict[str, Any], datetime]) -> None:
        try:
            incident = self._incident(*item)
            if incident is None:  # names no known incident kind
                return
            out = self.responder.handle(incident)
        except Exception:
            _log.exception("triage of an incident failed: %s", item[0][:200])
            with self._lock:
                self.counts["failed"] += 1
            return
        with self._lock:
            if out.tracked != "new":
                self.counts["duplicates"] += 1
                return
            self.counts["handled"] += 1
            if out.escalation is not None:
                self.counts["escalated"] += 1
            self.recent = [
                *self.recent[-19:],
                {
                    "incident": incident.id,
                    "kind": incident.kind.value,
                    "module": incident.module,
                    "actions": [r.action.value for r in out.results],
                    "escalation": out.escalation.id if out.escalation is not None else None,
                },
            ]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self._handle(item)

    def stop(self) -> None:
        """Finish what is queued (bounded), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for _ in range(MAX_QUEUED_INCIDENTS):
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._handle(item)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self.counts), "recent": list(self.recent)}


# --------------------------------------------------------------------------------------------------
# Admin API


def read_only_sql(sql: str) -> str:
    """``sql`` when it is exactly one SELECT statement; raises ValueError otherwise."""
    import duckdb

    try:
        stmts = duckdb.connect(":memory:").extract_statements(sql)
    except duckdb.Error as exc:
        raise ValueError(str(exc).splitlines()[0]) from exc
    if len(stmts) != 1 or stmts[0].type != duckdb.StatementType.SELECT:
        raise ValueError("only one read-only SELECT statement is allowed")
    return sql


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, str | int | float | bool):
        return v
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


class AdminService:
    """The admin API as a daemon service (routes are given once the other services exist)."""

    name = "admin-api"

    def __init__(self, paths: StatePaths, routes: list[BaseRoute] | None = None) -> None:
        self.paths = paths
        self.routes: list[BaseRoute] = list(routes or [])
        self._server: AdminServer | None = None

    def start(self) -> None:
        self._server = AdminServer(self.paths, routes=self.routes).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


# --------------------------------------------------------------------------------------------------
# Chaos: the fault proxy, the guard (recover on start, clear on stop) and the schedule


class FaultProxyService:
    """The embedded Toxiproxy-API fault proxy with an ``uplink`` proxy in front of the hub.

    The daemon's management traffic (pull and uplink) to a plain-HTTP hub goes through it, so uplink
    experiments act on the real link; chaos runs get its API URL.
    """

    name = "fault-proxy"

    def __init__(self, hub_url: str) -> None:
        self.hub_url = hub_url
        self.api_url: str | None = None
        self.link_url: str | None = None
        self._server: Any = None

    def start(self) -> None:
        from chaos.faultproxy import FaultProxyServer
        from chaos.toxiproxy_client import ToxiproxyClient

        parts = urlsplit(self.hub_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self._server = FaultProxyServer()
        self.api_url = self._server.start()
        with ToxiproxyClient(self.api_url, timeout_s=5.0) as client:
            proxy = client.ensure_proxy("uplink", f"{parts.hostname}:{port}")
        self.link_url = urlunsplit((parts.scheme, str(proxy["listen"]), parts.path, "", ""))

    def toxics(self) -> list[dict[str, Any]]:
        from chaos.toxiproxy_client import ToxiproxyClient

        if self.api_url is None:
            return []
        with ToxiproxyClient(self.api_url, timeout_s=5.0) as client:
            return client.toxics("uplink")

    def stop(self) -> None:
        if self._server is not None:
            from chaos.toxiproxy_client import ToxiproxyClient

            try:
                with ToxiproxyClient(str(self.api_url), timeout_s=5.0) as client:
                    client.reset()
            finally:
                self._server.stop()
                self._server = None


class ChaosGuard:
    """On start: recover a stale chaos lease (undo its faults, audit watchdog reports). On stop: undo
    every fault still in the registry, whatever left it there."""

    name = "chaos-guard"

    def __init__(self, paths: StatePaths, audit: AuditLog, toxiproxy_url: Callable[[], str | None]) -> None:
        self.paths = paths
        self.audit = audit
        self._toxiproxy_url = toxiproxy_url
        self.recovered: list[dict[str, Any]] = []

    def start(self) -> None:
        from chaos.runner import recover

        self.recovered = recover(self.paths, self.audit)

    def clear(self, why: str) -> dict[str, Any]:
        from chaos.watchdog import cleanup

        report = cleanup(self.paths.root, self._toxiproxy_url(), audit=self.audit)
        out = report.to_dict()
        if report.cleared or report.failed:
            self.audit.append("chaos.faults_cleared", why=why, report=out)
        return out

    def stop(self) -> None:
        self.clear("daemon stopping")


class ChaosSchedule:
    """The scheduled chaos job: each experiment file, pre-flight first, inside the policy's windows.

    A ``run`` verdict runs guarded; an ``escalate``/``reject`` verdict stores an escalation packet and is
    never run (the same content is not escalated again while the daemon runs). A deviated or aborted
    run raises a ``chaos_deviation`` incident. ``pause`` (a triage action) stops the running experiment
    and skips ticks until it lapses.
    """

    def __init__(
        self,
        paths: StatePaths,
        settings: AgentSettings,
        clock: Clock,
        audit: AuditLog,
        sink: TelemetrySink,
        serving_url: Callable[[], str | None],
        model: Callable[[], str | None],
        toxiproxy_url: Callable[[], str | None],
    ) -> None:
        self.paths = paths
        self.settings = settings
        self.clock = clock
        self.audit = audit
        self.sink = sink
        self._serving_url = serving_url
        self._model = model
        self._toxiproxy_url = toxiproxy_url
        self.stop_event = threading.Event()
        self.shutting_down = False
        self.paused_until: datetime | None = None
        self._escalated: set[str] = set()
        self.last: list[dict[str, Any]] = []

    def policy(self) -> Any:
        from policies.base import load_document
        from policies.chaos import ChaosPolicy, default_chaos_policy

        installed = self.paths.policies / "chaos.yaml"
        return load_document(ChaosPolicy, installed) if installed.exists() else default_chaos_policy()

    def files(self) -> list[Path]:
        d = self.settings.chaos.experiments_dir
        if d is None or not Path(d).is_dir():
            return []
        return sorted(p for p in Path(d).iterdir() if p.suffix in (".json", ".yaml", ".yml") and p.is_file())

    def pause(self, seconds: float, why: str) -> str:
        self.paused_until = self.clock.now() + timedelta(seconds=seconds)
        self.stop_event.set()
        self.audit.append("chaos.paused", until=self.paused_until.isoformat(), why=why[:300])
        return f"chaos paused until {self.paused_until.isoformat()}"

    def shutdown(self) -> None:
        """The daemon is stopping: interrupt a running experiment (its cleanup still runs), start none."""
        self.shutting_down = True
        self.stop_event.set()

    def tick(self) -> list[dict[str, Any]]:
        from chaos.pipeline import guarded_run

        now = self.clock.now()
        if self.shutting_down or (self.paused_until is not None and now < self.paused_until):
            return []
        self.paused_until = None
        self.stop_event.clear()
        policy = self.policy()
        if not policy.in_window(now):
            self.sink.metric("chaos.outside_window", 1.0)
            return []
        done: list[dict[str, Any]] = []
        for f in self.files():
            if self.stop_event.is_set():
                break
            key = hashlib.sha256(f.read_bytes()).hexdigest()
            if key in self._escalated:
                continue
            out = guarded_run(
                f,
                self.paths,
                policy=policy,
                clock=self.clock,
                serving_url=self._serving_url(),
                model=self._model(),
                toxiproxy_url=self._toxiproxy_url(),
                telemetry=self.sink,
                audit=self.audit,
                stop=self.stop_event,
            )
            row: dict[str, Any] = {"file": f.name, "verdict": out.preflight.verdict}
            if out.run is None:
                self._escalated.add(key)
                row["packet"] = str(out.packet_path)
            else:
                verdict = str(out.run.verdict.value)
                row["run"] = verdict
                if verdict in ("deviated", "aborted"):
                    self.sink.event(
                        "incident",
                        f"chaos experiment {f.name} {verdict}: {'; '.join(out.run.reasons)[:300]}",
                        severity="warning",
                        attrs={
                            "source": "chaos",
                            "incident_kind": "chaos_deviation",
                            "modules": [m for m in [self._model()] if m],
                            "facts": {"verdict": verdict, "experiment": f.name},
                            "dedup_key": f"chaos:{f.name}",
                        },
                    )
            done.append(row)
        self.last = done
        return done


# --------------------------------------------------------------------------------------------------
# Assembly


def _hub_url(paths: StatePaths, settings: AgentSettings) -> str | None:
    from sre_agent.provision import read_device_file

    return str(read_device_file(paths).get("hub") or settings.hub.url or "") or None


def _channel(paths: StatePaths, settings: AgentSettings) -> str:
    from sre_agent.provision import read_device_file

    return str(read_device_file(paths).get("channel") or settings.hub.channel)


def _rows(tbl: Any) -> list[tuple[Any, ...]]:
    cols = [c.to_pylist() for c in tbl.columns]
    return list(zip(*cols, strict=True)) if cols else []


def build_daemon(
    settings: AgentSettings, paths: StatePaths, clock: Clock, heartbeat_s: float = 30.0
) -> Daemon:
    """The daemon with every service and job the settings enable.

    ``clock`` is wrapped in :class:`chaos.faults.SkewedClock`, so a clock-skew experiment reaches the
    agent's notion of wall time (and nothing else).
    """
    from chaos.faults import SkewedClock
    from deployment.slots import SlotManager
    from policies.telemetry import load_telemetry_policy
    from sre_agent.telemetry.service import TelemetryService
    from sre_core.identity import load_identity

    clock = SkewedClock(clock, paths.root)
    identity = load_identity(paths)
    tel_policy_file = paths.policies / "telemetry.yaml"
    tel = TelemetryService(
        paths,
        load_telemetry_policy(tel_policy_file if tel_policy_file.exists() else None),
        clock,
        identity.device_id,
    )
    audit = AuditLog(paths.audit_log, clock, mirror=tel.audit_mirror)
    base_sink: TelemetrySink = LazySink(lambda: tel.sink)
    hub_url = _hub_url(paths, settings)
    http_hub = hub_url is not None and hub_url.startswith(("http://", "https://"))

    services: list[Service] = [tel]
    jobs: list[JobSpec] = []
    holder: dict[str, Any] = {}

    admin = AdminService(paths)
    services.append(admin)

    proxy: FaultProxyService | None = None
    if settings.chaos.enabled and settings.chaos.toxiproxy_url is None and http_hub and hub_url:
        proxy = FaultProxyService(hub_url)
        services.append(proxy)

    def toxiproxy_url() -> str | None:
        return settings.chaos.toxiproxy_url or (proxy.api_url if proxy is not None else None)

    def link_url() -> str | None:
        """The hub as the device reaches it: through the fault proxy for a plain-HTTP hub (a TLS hub is
        reached directly: a loopback address would not match its certificate)."""
        if proxy is not None and proxy.link_url and str(hub_url).startswith("http://"):
            return proxy.link_url
        return hub_url

    guard = ChaosGuard(paths, audit, toxiproxy_url)
    if settings.chaos.enabled:
        services.append(guard)

    # -- incidents -> responder ---------------------------------------------------------------------
    plane: Any = None
    slots_fallback = SlotManager(paths, audit, clock)

    def slots() -> Any:
        return plane.slots if plane is not None else slots_fallback

    def make_responder() -> Any:
        from sre_agent.respond import build_responder

        return build_responder(
            paths,
            settings,
            clock=clock,
            audit=audit,
            handlers=_handlers(paths, clock, audit, base_sink, holder),
            telemetry=base_sink,
            device_id=identity.device_id,
        )

    responder = ResponderService(paths, clock, make_responder, slots)
    sink: TelemetrySink = IncidentTee(lambda: tel.sink, responder.submit)
    holder["responder"] = responder

    # -- serving + pull/reconcile -------------------------------------------------------------------
    def pull() -> Any:
        from deployment.pull import Puller, PullError, load_held

        where = link_url()
        if not where:
            return load_held(paths, clock)
        try:
            return Puller(
                paths, where, _channel(paths, settings), clock=clock, audit=audit, telemetry=sink
            ).pull()
        except PullError as exc:
            return exc.held  # refused or unreachable: keep enforcing what is held (already audited)

    if settings.serving.enabled:
        from sre_agent.cli.serve import ServingPlane

        # The plane applies the chaos input-noise fault (router preprocess) and writes run/serving.pid.
        plane = ServingPlane(settings, paths, sink=sink, audit=audit, clock=clock)
        services.append(plane)
    holder["plane"] = plane

    reconciler: dict[str, Any] = {}

    def pull_reconcile() -> dict[str, Any]:
        from deployment.reconcile import Reconciler

        if "r" not in reconciler:
            reconciler["r"] = Reconciler(
                paths,
                pull,
                clock,
                policy=plane.policy if plane is not None else None,
                audit=audit,
                canary=plane.serving if plane is not None else None,
                telemetry=sink,
            )
        report = reconciler["r"].run_once()
        for o in report.outcomes:
            if o.result == "rolled_back" and o.probes:
                sink.event(
                    "incident",
                    f"probes failed for {o.module} {o.version}: {o.reason}"[:300],
                    severity="error",
                    attrs={
                        "source": "probe",
                        "incident_kind": "probe_failure",
                        "modules": [o.module],
                        "facts": {"version": o.version, "rolled_back": True},
                        "evidence": {"probes": o.probes},
                        "dedup_key": f"probe:{o.module}:{o.version}",
                    },
                )
        out: dict[str, Any] = {"reconcile": report.to_dict()}
        if plane is not None:
            out["sync"] = plane.serving.sync(plane.slots)
        where = link_url()
        if report.online and where and where.startswith(("http://", "https://")):
            from deployment.rollout import device_report, send_report

            try:  # the fleet's rollout gates and halt rule run on these reports (docs/fleet.md)
                send_report(where, paths, device_report(paths, _channel(paths, settings), clock), clock)
            except Exception as exc:  # the hub hears from us at the next sync
                out["report_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return out

    jobs.append(
        JobSpec(
            "pull-reconcile",
            pull_reconcile,
            settings.hub.pull_interval_s,
            jitter_s=settings.hub.pull_jitter_s,
            misfire_grace_s=settings.hub.pull_interval_s,
        )
    )

    # -- verification -------------------------------------------------------------------------------
    from verification.scheduler import build_service

    def telemetry_query(sql: str) -> list[tuple[Any, ...]]:
        if tel.store is None:
            return []
        return _rows(tel.store.query(sql))

    verification = build_service(paths, clock, sink, telemetry_query=telemetry_query)
    services.append(verification)
    holder["verification"] = verification

    # -- chaos schedule -----------------------------------------------------------------------------
    def served_model() -> str | None:
        names: list[str] = plane.repository.names() if plane is not None else []
        return names[0] if names else None

    schedule = ChaosSchedule(
        paths,
        settings,
        clock,
        audit,
        sink,
        serving_url=lambda: plane.url if plane is not None and plane.url else None,
        model=served_model,
        toxiproxy_url=toxiproxy_url,
    )
    holder["chaos"] = schedule
    holder["guard"] = guard
    if settings.chaos.enabled and settings.chaos.experiments_dir is not None:
        jobs.append(
            JobSpec(
                "chaos",
                schedule.tick,
                settings.chaos.interval_s,
                jitter_s=settings.chaos.interval_s * 0.1,
                run_at_start=False,
                misfire_grace_s=settings.chaos.interval_s,
            )
        )

    # -- uplink -------------------------------------------------------------------------------------
    def uplink() -> dict[str, Any]:
        where = link_url()
        status_file = paths.run / "uplink_status.json"
        if not where or not where.startswith(("http://", "https://")):
            report: dict[str, Any] = {"skipped": "no hub URL to upload to"}
        else:
            bw = settings.uplink.bandwidth_kbps
            report = tel.flush_uplink(identity, where, bandwidth_bps=bw * 1000 / 8 if bw else None)
        backlog = 0
        if tel.store is not None:
            backlog = sum(b.rows for b in tel.store.pending())
        atomic_write_json(status_file, {"backlog_rows": backlog, "ts": clock.now().isoformat(), **report})
        return report

    jobs.append(
        JobSpec("uplink", uplink, settings.uplink.interval_s, jitter_s=settings.uplink.interval_s * 0.1)
    )

    # -- declare, admit, sign: a signed attestation of the device's own state, queued first ----------
    def attest() -> str:
        import hashlib

        from deployment.pull import load_held
        from deployment.safemode import is_safe_mode

        held = load_held(paths, clock)
        digest = hashlib.sha256()
        if paths.policies.is_dir():
            for f in sorted(paths.policies.glob("*.yaml")):
                digest.update(f.name.encode() + b"\0" + f.read_bytes())
        policy_version = "sha256:" + digest.hexdigest()[:16]
        return tel.attest(identity, audit.head(), policy_version, str(held.trust), is_safe_mode(paths))

    jobs.append(JobSpec("attest", attest, ATTEST_INTERVAL_S, jitter_s=60.0))

    # -- SLOs ---------------------------------------------------------------------------------------
    def slo() -> list[dict[str, Any]]:
        from datetime import UTC

        from deployment.reconcile import read_last_reconcile
        from sre_agent.slo import evaluate_slos, report_slos

        now = clock.now()
        oldest = last_ack = issued = None
        if tel.store is not None:
            pending = tel.store.pending()
            if pending:
                oldest = datetime.fromtimestamp(min(b.created_us for b in pending) / 1e6, UTC)
            ack = tel.store.last_ack_us()
            last_ack = datetime.fromtimestamp(ack / 1e6, UTC) if ack else None
        desired = read_last_reconcile(paths).get("desired") or {}
        if desired.get("issued"):
            issued = datetime.fromisoformat(str(desired["issued"]))
        results = evaluate_slos(now, oldest, last_ack, issued)
        report_slos(sink, results, now)
        for r in results:
            if r.value is not None and not r.met:
                sink.event(
                    "incident",
                    f"SLO {r.name} is burning: {r.value:.3g} against a target of {r.objective:.3g}",
                    severity="warning",
                    attrs={
                        "source": "slo",
                        "incident_kind": "slo_burn",
                        "facts": {"slo": r.name, "value": r.value, "target": r.objective},
                        "dedup_key": f"slo:{r.name}",
                    },
                )
        return [r.to_dict() for r in results]

    jobs.append(JobSpec("slo", slo, SLO_INTERVAL_S, jitter_s=5.0))

    # -- escalations and the digest -----------------------------------------------------------------
    def escalations() -> int:
        if responder.responder is None:
            return 0
        done = responder.responder.process_escalations(paths.policies / "operators.yaml")
        return len(done)

    jobs.append(JobSpec("escalations", escalations, ESCALATIONS_INTERVAL_S, jitter_s=3.0))

    window = {"start": clock.now()}

    def digest() -> dict[str, Any]:
        from sre_agent.digest import DigestBuilder

        r = responder.responder
        summarizer = None
        if r is not None and r.advisor is not None and hasattr(r.advisor, "summarize"):
            summarizer = r.advisor.summarize
        slot_status = {m: responder._slot_status(m) for m in slots().modules()}
        d = DigestBuilder(
            clock,
            identity.device_id,
            audit,
            escalations=r.escalations if r is not None else None,
            summarizer=summarizer,
            telemetry=sink,
        ).build(window["start"], slots=slot_status)
        window["start"] = d.created_at
        return {"id": d.id, "summary": d.summary}

    jobs.append(JobSpec("digest", digest, DIGEST_INTERVAL_S, jitter_s=60.0, run_at_start=False))

    services.append(responder)
    daemon = Daemon(paths, clock, audit, jobs=jobs, services=services, heartbeat_interval_s=heartbeat_s)
    daemon.before_stop.append(schedule.shutdown)
    daemon.on_job_failure = lambda job, exc: base_sink.event(
        "daemon.job_failed", f"job {job} failed: {type(exc).__name__}: {exc}"[:300], severity="warning",
        attrs={"job": job},
    )  # fmt: skip
    admin.routes = _admin_routes(daemon, tel, responder, schedule, proxy, lambda: plane, settings)
    return daemon


# --------------------------------------------------------------------------------------------------
# Action handlers (what the triage gate may execute)


def _handlers(
    paths: StatePaths, clock: Clock, audit: AuditLog, sink: TelemetrySink, holder: dict[str, Any]
) -> dict[Action, Callable[[Incident], str]]:
    from deployment.slots import SlotManager

    def slots() -> SlotManager:
        plane = holder.get("plane")
        return plane.slots if plane is not None else SlotManager(paths, audit, clock)

    def resync() -> None:
        plane = holder.get("plane")
        if plane is not None:
            plane.serving.sync(plane.slots)

    def rollback(inc: Incident) -> str:
        st = slots().rollback(inc.module, reason=f"triage {inc.id}: {inc.title}"[:300], actor="agent")
        resync()
        return f"{inc.module} now serves {st.active.version if st.active else 'nothing'}"

    def quarantine(inc: Incident) -> str:
        plane = holder.get("plane")
        if plane is not None and plane.serving.busy(inc.module):
            run = plane.serving.runs.get(inc.module)
            if run is not None:
                run.cancel(f"quarantined by triage ({inc.id})")
            return f"canary of {inc.module} stopped"
        st = slots().status(inc.module)
        version = inc.facts.get("version") or inc.version
        if st.standby is not None and st.standby.version == version:
            slots().mark_bad(inc.module, st.standby.sha256, st.standby.version, f"quarantined ({inc.id})")
            return f"{inc.module} {version} blocked"
        raise RuntimeError(f"nothing to quarantine for {inc.module} (no canary, {version} is not standby)")

    def safe_mode(inc: Incident) -> str:
        from deployment.safemode import SafeMode

        SafeMode(paths, slots(), audit, clock, telemetry=sink).enter(
            "operator", detail=f"approved triage of {inc.id}: {inc.title}"[:300]
        )
        resync()
        return "safe mode entered"

    def pause_chaos(inc: Incident) -> str:
        detail: str = holder["chaos"].pause(CHAOS_PAUSE_S, f"triage {inc.id}")
        holder["guard"].clear(f"triage {inc.id}")
        return detail

    def rerun(inc: Incident) -> str:
        check = str(inc.facts.get("check") or "")
        if not check:
            raise RuntimeError("the incident names no verification check")
        res = holder["verification"]._run(check)
        if res is None:
            raise RuntimeError(f"no scheduled check named {check}")
        return f"{check}: {res.status.value}"

    return {
        Action.ROLLBACK: rollback,
        Action.QUARANTINE: quarantine,
        Action.SAFE_MODE: safe_mode,
        Action.PAUSE_CHAOS: pause_chaos,
        Action.RERUN_VERIFICATION: rerun,
    }


def _admin_routes(
    daemon: Daemon,
    tel: Any,
    responder: ResponderService,
    schedule: ChaosSchedule,
    proxy: FaultProxyService | None,
    plane: Callable[[], Any],
    settings: AgentSettings,
) -> list[BaseRoute]:
    from starlette.concurrency import run_in_threadpool

    def status_doc() -> dict[str, Any]:
        p = plane()
        doc = daemon.status()
        doc["serving"] = {"url": p.url, "models": p.repository.names()} if p is not None else None
        doc["responder"] = responder.status()
        doc["chaos"] = {
            "enabled": settings.chaos.enabled,
            "paused_until": schedule.paused_until.isoformat() if schedule.paused_until else None,
            "last": schedule.last,
            "fault_proxy": proxy.api_url if proxy is not None else settings.chaos.toxiproxy_url,
            "uplink_toxics": proxy.toxics() if proxy is not None else None,
        }
        doc["llm"] = {"enabled": settings.llm.enabled}
        return doc

    async def status(_r: Request) -> JSONResponse:
        return JSONResponse(_plain(await run_in_threadpool(status_doc)))

    def query_doc(sql: str) -> dict[str, Any]:
        if tel.store is None:
            raise ValueError("telemetry is not open")
        tbl = tel.store.query(read_only_sql(sql))
        rows = [dict(zip(tbl.column_names, r, strict=True)) for r in _rows(tbl)[:MAX_QUERY_ROWS]]
        return {"columns": tbl.column_names, "rows": _plain(rows), "truncated": tbl.num_rows > MAX_QUERY_ROWS}

    async def query(r: Request) -> JSONResponse:
        import duckdb

        try:
            body = json.loads(await r.body())
            sql = str(body["sql"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'send {"sql": "SELECT ..."}'}, status_code=400)
        try:
            return JSONResponse(await run_in_threadpool(query_doc, sql))
        except (ValueError, duckdb.Error) as exc:
            return JSONResponse({"error": str(exc).splitlines()[0][:500]}, status_code=400)

    def tel_status_doc() -> dict[str, Any]:
        from sre_agent.telemetry import status_of

        store = tel.store
        if store is None:
            raise ValueError("telemetry is not open")
        now_us = int(daemon.clock.now().timestamp() * 1_000_000)
        with store._lock:
            info = status_of(store._con.cursor(), tel.policy, now_us)
        info["file_bytes"] = daemon.paths.telemetry_db.stat().st_size
        return info

    async def tel_status(_r: Request) -> JSONResponse:
        try:
            return JSONResponse(_plain(await run_in_threadpool(tel_status_doc)))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)

    def escalation_rows() -> list[dict[str, Any]]:
        r = responder.responder
        return [e.row() for e in r.escalations.select()] if r is not None else []

    async def escalations(_r: Request) -> JSONResponse:
        return JSONResponse(_plain(await run_in_threadpool(escalation_rows)))

    return [
        Route("/status", status),
        Route("/telemetry/query", query, methods=["POST"]),
        Route("/telemetry/status", tel_status),
        Route("/escalations", escalations),
    ]
