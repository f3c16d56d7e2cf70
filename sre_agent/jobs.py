"""The daemon's periodic jobs, as typed objects: each is called by the scheduler and returns a report.

``pull-reconcile`` (pull the signed desired state, install/canary/flip/roll back, report to the hub),
``uplink`` (store-and-forward telemetry), ``attest`` (a signed device-state attestation), ``slo`` (SLO
evaluation: a breach raises an incident, a met SLO resolves it), ``escalations`` (expire, execute verified
approvals, close answered incidents) and ``digest`` (the periodic health digest).

Each job gets exactly what it uses from :mod:`sre_agent.wiring`; a demo or test may call one directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sre_agent.config import AgentSettings
from sre_agent.daemon import JobSpec
from sre_agent.incidents import FactValue, IncidentKind, IncidentSignal
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.identity import DeviceIdentity
from sre_core.paths import StatePaths
from sre_core.telemetry import TelemetrySink

if TYPE_CHECKING:
    from deployment.artifacts import PullResult
    from deployment.reconcile import Reconciler
    from deployment.slots import SlotManager
    from sre_agent.services.responder import ResponderService
    from sre_agent.services.serving import ServingPlane
    from sre_agent.slo import SloTargets
    from sre_agent.telemetry.service import TelemetryService

__all__ = [
    "ATTEST_INTERVAL_S",
    "DIGEST_INTERVAL_S",
    "ESCALATIONS_INTERVAL_S",
    "SLO_INTERVAL_S",
    "AttestJob",
    "DigestJob",
    "EscalationsJob",
    "PullReconcileJob",
    "SloJob",
    "UplinkJob",
    "channel_of",
    "hub_url_of",
    "other_hubs",
]

SLO_INTERVAL_S = 60.0
ESCALATIONS_INTERVAL_S = 30.0
DIGEST_INTERVAL_S = 3600.0
ATTEST_INTERVAL_S = 3600.0

Report = Callable[[IncidentSignal], None]
Resolve = Callable[[str, str], None]


def hub_url_of(paths: StatePaths, settings: AgentSettings) -> str | None:
    """The hub URL: ``load_settings`` already layers provisioning (device.json) under the file and the
    environment, as ``config show`` reports; device.json is read here only for settings built in code."""
    from sre_agent.provision import read_device_file

    hubs = settings.hub.hubs()  # [hub] urls in order, then url: the first is the preferred hub
    return str((hubs[0] if hubs else None) or read_device_file(paths).get("hub") or "") or None


def other_hubs(settings: AgentSettings) -> list[str]:
    """The hubs after the preferred one, in order (uploads and reports fall back to them)."""
    return [u for u in settings.hub.hubs()[1:] if u.startswith(("http://", "https://"))]


def channel_of(paths: StatePaths, settings: AgentSettings) -> str:
    """The release channel (provisioning, file, environment: see :mod:`sre_agent.config`)."""
    return settings.hub.channel


@dataclass
class PullReconcileJob:
    """Pull, reconcile (the serving plane drives canaries), serve what is active, report to the hub.

    A version whose health probes failed was already rolled back by the deployment core: it raises a
    ``probe_failure`` incident (facts ``version``, ``rolled_back``, ``slot``) so triage blocks it here.
    """

    paths: StatePaths
    settings: AgentSettings
    clock: Clock
    audit: AuditLog
    sink: TelemetrySink
    plane: ServingPlane | None
    link_url: Callable[[], str | None]
    report: Report
    name: str = "pull-reconcile"
    _reconciler: Reconciler | None = field(default=None, repr=False)

    def spec(self) -> JobSpec:
        hub = self.settings.hub
        return JobSpec(
            self.name,
            self,
            hub.pull_interval_s,
            jitter_s=hub.pull_jitter_s,
            misfire_grace_s=hub.pull_interval_s,
        )

    def pull(self) -> PullResult:
        from deployment.pull import Puller, load_held

        where = self.link_url()
        if not where:
            return load_held(self.paths, self.clock)
        # Refused or unreachable: keep enforcing what is held (already audited); the pass reports it.
        return Puller(
            self.paths,
            where,
            channel_of(self.paths, self.settings),
            clock=self.clock,
            audit=self.audit,
            telemetry=self.sink,
            metadata_url=self.settings.hub.metadata_url,  # a CDN/mirror for the signed files
            targets_url=self.settings.hub.targets_url,
            fallbacks=self.settings.hub.pull_fallbacks(),  # other hubs, then mirrors
            sticky_s=self.settings.hub.sticky_s,
        ).pull_or_held()

    def __call__(self) -> dict[str, Any]:
        from deployment.reconcile import Reconciler
        from sre_agent.config import signed_layer_check

        plane = self.plane
        if self._reconciler is None:
            self._reconciler = Reconciler(
                self.paths,
                self.pull,
                self.clock,
                policy=plane.policy if plane is not None else None,
                audit=self.audit,
                canary=plane.serving if plane is not None else None,
                telemetry=self.sink,
                config_check=signed_layer_check(self.paths.root),  # kind: config modules
            )
        report = self._reconciler.run_once()
        for o in report.outcomes:
            if o.result == "rolled_back" and o.probes:
                self.report(
                    IncidentSignal(
                        kind=IncidentKind.PROBE_FAILURE,
                        message=f"probes failed for {o.module} {o.version}: {o.reason}"[:300],
                        module=o.module,
                        severity="critical",
                        source="probe",
                        version=o.version,
                        facts={"version": o.version, "rolled_back": True, "slot": "standby"},
                        evidence={"probes": o.probes},
                        resolve_key=f"probe:{o.module}:{o.version}",
                    )
                )
        out: dict[str, Any] = {"reconcile": report.to_dict()}
        if plane is not None:
            out["sync"] = plane.serving.sync(plane.slots, background=True)  # a load never holds the job
        where = self.link_url()
        if report.online and where and where.startswith(("http://", "https://")):
            from deployment.rollout import device_report, send_report

            try:  # the fleet's rollout gates and halt rule run on these reports (docs/fleet.md)
                doc = device_report(self.paths, channel_of(self.paths, self.settings), self.clock)
                send_report([where, *other_hubs(self.settings)], self.paths, doc, self.clock)
            except Exception as exc:  # the hub hears from us at the next sync
                out["report_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return out


@dataclass
class UplinkJob:
    """Upload pending telemetry batches to the hub (bandwidth-capped); write ``run/uplink_status.json``."""

    paths: StatePaths
    settings: AgentSettings
    clock: Clock
    telemetry: TelemetryService
    identity: DeviceIdentity
    link_url: Callable[[], str | None]
    name: str = "uplink"

    def spec(self) -> JobSpec:
        every = self.settings.uplink.interval_s
        return JobSpec(self.name, self, every, jitter_s=every * 0.1)

    def __call__(self) -> dict[str, Any]:
        where = self.link_url()
        if not where or not where.startswith(("http://", "https://")):
            report: dict[str, Any] = {"skipped": "no hub URL to upload to"}
        else:
            bw = self.settings.uplink.bandwidth_kbps
            hubs = [where, *other_hubs(self.settings)]  # a regional hub first, the root as fallback
            report = self.telemetry.flush_uplink(
                self.identity, hubs, bandwidth_bps=bw * 1000 / 8 if bw else None
            )
        store = self.telemetry.store
        backlog = sum(b.rows for b in store.pending()) if store is not None else 0
        atomic_write_json(
            self.paths.run / "uplink_status.json",
            {"backlog_rows": backlog, "ts": self.clock.now().isoformat(), **report},
        )
        return report


@dataclass
class AttestJob:
    """Declare, admit, sign: a signed attestation of the device's own state, queued first for uplink."""

    paths: StatePaths
    clock: Clock
    telemetry: TelemetryService
    identity: DeviceIdentity
    audit: AuditLog
    name: str = "attest"

    def spec(self) -> JobSpec:
        return JobSpec(self.name, self, ATTEST_INTERVAL_S, jitter_s=60.0)

    def __call__(self) -> str:
        from deployment.pull import load_held
        from deployment.safemode import is_safe_mode

        held = load_held(self.paths, self.clock)
        digest = hashlib.sha256()
        if self.paths.policies.is_dir():
            for f in sorted(self.paths.policies.glob("*.yaml")):
                digest.update(f.name.encode() + b"\0" + f.read_bytes())
        policy_version = "sha256:" + digest.hexdigest()[:16]
        return self.telemetry.attest(
            self.identity, self.audit.head(), policy_version, str(held.trust), is_safe_mode(self.paths)
        )


@dataclass
class SloJob:
    """Evaluate the device SLOs; a breach raises an ``slo_burn`` incident per SLO (facts ``slo``,
    ``value``, ``target``, ``burn_rate``, the active ``versions``), a met SLO resolves its incident.
    ``targets``: the objectives (``[daemon] slo_max_*`` settings; None: the defaults)."""

    paths: StatePaths
    clock: Clock
    telemetry: TelemetryService
    sink: TelemetrySink
    slots: Callable[[], SlotManager | None]
    report: Report
    resolve: Resolve
    interval_s: float = SLO_INTERVAL_S
    targets: SloTargets | None = None
    name: str = "slo"
    _burning: set[str] = field(default_factory=set, repr=False)

    def spec(self) -> JobSpec:
        return JobSpec(self.name, self, self.interval_s, jitter_s=min(5.0, self.interval_s * 0.1))

    def _versions(self) -> str:
        slots = self.slots()
        if slots is None:
            return ""
        out = []
        for m in slots.modules():
            act = slots.status(m).active
            out.append(f"{m}={act.version if act else '-'}")
        return ",".join(out)

    def __call__(self) -> list[dict[str, Any]]:
        from deployment.policy_modules import active_policy_issued
        from sre_agent.slo import evaluate_slos, report_slos

        now = self.clock.now()
        oldest = last_ack = issued = None
        store = self.telemetry.store
        if store is not None:
            pending = store.pending()
            if pending:
                oldest = datetime.fromtimestamp(min(b.created_us for b in pending) / 1e6, UTC)
            ack = store.last_ack_us()
            last_ack = datetime.fromtimestamp(ack / 1e6, UTC) if ack else None
        issued = active_policy_issued(self.paths)  # the active signed policy module (None: factory only)
        results = evaluate_slos(now, oldest, last_ack, issued, targets=self.targets)
        report_slos(self.sink, results, now)
        for r in results:
            key = f"slo:{r.name}"
            if r.value is not None and not r.met:
                facts: dict[str, FactValue] = {"slo": r.name, "value": r.value, "target": r.objective}
                if r.objective:
                    facts["burn_rate"] = round(r.value / r.objective, 4)
                versions = self._versions()
                if versions:
                    facts["versions"] = versions
                self._burning.add(r.name)
                self.report(
                    IncidentSignal(
                        kind=IncidentKind.SLO_BURN,
                        message=f"SLO {r.name} is burning: {r.value:.3g} against {r.objective:.3g}",
                        severity="warning",
                        source="slo",
                        facts=facts,
                        resolve_key=key,
                        ts=now,
                    )
                )
            elif r.value is not None and r.met and r.name in self._burning:
                self._burning.discard(r.name)
                self.resolve(key, f"SLO {r.name} is met again ({r.value:.3g})")
        return [r.to_dict() for r in results]


@dataclass
class EscalationsJob:
    """Expire what is due, execute verified approvals, close the incidents whose escalation was answered."""

    paths: StatePaths
    responder: ResponderService
    interval_s: float = ESCALATIONS_INTERVAL_S
    name: str = "escalations"
    hubs: Callable[[], list[str]] | None = None  # where signed decisions are fetched (regional first)

    def spec(self) -> JobSpec:
        return JobSpec(self.name, self, self.interval_s, jitter_s=min(3.0, self.interval_s * 0.1))

    def __call__(self) -> int:
        r = self.responder.responder
        if r is None:
            return 0
        roster = self.paths.policies / "operators.yaml"
        hubs = self.hubs() if self.hubs is not None else []
        if hubs:  # approvals come down from the hub, verified as `escalations apply` verifies them
            from sre_agent.approvals_sync import sync_approvals

            sync_approvals(hubs, self.paths, r.escalations, roster, r.escalations.clock)
        return len(r.process_escalations(roster))


@dataclass
class DigestJob:
    """The periodic health digest (deterministic facts, the model's summary when it runs)."""

    clock: Clock
    identity: DeviceIdentity
    audit: AuditLog
    sink: TelemetrySink
    responder: ResponderService
    slots: Callable[[], SlotManager | None]
    name: str = "digest"
    _start: datetime | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._start = self.clock.now()

    def spec(self) -> JobSpec:
        return JobSpec(self.name, self, DIGEST_INTERVAL_S, jitter_s=60.0, run_at_start=False)

    def __call__(self) -> dict[str, Any]:
        from sre_agent.digest import DigestBuilder

        start = self._start or self.clock.now()
        r = self.responder.responder
        summarizer = None
        if r is not None and r.advisor is not None and hasattr(r.advisor, "summarize"):
            summarizer = r.advisor.summarize
        slots = self.slots()
        slot_status = {m: self.responder.slot_status(m) for m in (slots.modules() if slots else [])}
        d = DigestBuilder(
            self.clock,
            self.identity.device_id,
            self.audit,
            escalations=r.escalations if r is not None else None,
            summarizer=summarizer,
            telemetry=self.sink,
        ).build(start, slots=slot_status)
        self._start = d.created_at
        return {"id": d.id, "summary": d.summary}
