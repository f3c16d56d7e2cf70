"""The telemetry store + writer as one daemon service, and the periodic uplink job.

Wiring (``sre_agent/wiring.py``)::

    tel = TelemetryService(paths, policy, clock, identity.device_id)
    services.append(tel)                      # opens the store, starts the writer thread
    audit = AuditLog(paths.audit_log, clock, mirror=tel.audit_mirror)
    jobs.append(JobSpec("uplink", lambda: tel.flush_uplink(identity, hub_url), interval_s=60, jitter_s=10))
    jobs.append(JobSpec("attest", lambda: tel.attest(identity, audit.head(), policy_version, trust, safe),
                        interval_s=3600))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from policies.telemetry import TelemetryPolicy
from sre_agent.telemetry.store import Store
from sre_agent.telemetry.writer import TelemetryWriter
from sre_core.audit import AuditRecord
from sre_core.clock import Clock
from sre_core.identity import DeviceIdentity
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = ["TelemetryService"]


class TelemetryService:
    """Owns ``telemetry.duckdb`` for the daemon's lifetime (the only process that opens it)."""

    name = "telemetry"

    def __init__(self, paths: StatePaths, policy: TelemetryPolicy, clock: Clock, device_id: str) -> None:
        self.paths = paths
        self.policy = policy
        self.clock = clock
        self.device_id = device_id
        self.store: Store | None = None
        self.writer: TelemetryWriter | None = None

    def start(self) -> None:
        self.store = Store(self.paths.telemetry_db, self.policy, self.clock, self.device_id)
        self.writer = TelemetryWriter(self.store)
        self.writer.start()

    def stop(self) -> None:
        if self.writer is not None:
            self.writer.stop()
        if self.store is not None:
            self.store.close()
        self.writer = self.store = None

    @property
    def sink(self) -> TelemetrySink:
        """Where components write (a NullSink before start)."""
        return self.writer if self.writer is not None else NullSink()

    def audit_mirror(self, rec: AuditRecord) -> None:
        if self.writer is not None:
            self.writer.audit_mirror(rec)

    def attest(
        self,
        identity: DeviceIdentity,
        audit_head: str,
        policy_version: str,
        trust_status: str,
        safe_mode: bool,
    ) -> str:
        """Sign the device's current state (in-toto in DSSE) and queue it first in the outbox."""
        from sre_agent.attestation import collect_state, queue_attestation

        if self.store is None:
            raise RuntimeError("telemetry service is not started")
        state = collect_state(self.paths, self.clock, audit_head, policy_version, trust_status, safe_mode)
        return queue_attestation(self.store, identity, state)

    def flush_uplink(
        self, identity: DeviceIdentity, hub_url: str | Sequence[str], bandwidth_bps: float | None = None
    ) -> dict[str, Any]:
        """One uplink window: commit what is buffered, seal, upload. Returns the report as a dict."""
        from sre_agent.uplink import Uplink, receipt_root

        if self.store is None or self.writer is None:
            raise RuntimeError("telemetry service is not started")
        self.writer.flush()
        up = Uplink(self.store, identity, hub_url, self.clock, bandwidth_bps=bandwidth_bps,
                    receipt_root=receipt_root(self.paths))  # fmt: skip
        try:
            return up.flush().to_dict()
        finally:
            up.close()
