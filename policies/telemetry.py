"""The telemetry budget policy: bytes, ages and series caps per signal class, and the outbox bounds.

Offline is the normal state, so these numbers decide what a device keeps through weeks without a link:
metrics are folded raw -> 1 minute -> 1 hour before anything is dropped; logs lose the oldest debug
lines first; the essential class (audit mirror, escalations, verification results) is never dropped and
has reserved space of its own.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from policies.base import PolicyModel, load_default, load_document

__all__ = [
    "EssentialBudget",
    "LogsBudget",
    "MetricsBudget",
    "OutboxBudget",
    "TableBudget",
    "TelemetryPolicy",
    "WriterPolicy",
    "load_telemetry_policy",
]

MiB = 1024 * 1024


class MetricsBudget(PolicyModel):
    """Metrics: raw samples, 1-minute and 1-hour rollups (count/sum/min/max)."""

    bytes: int = Field(default=64 * MiB, ge=1 * MiB, description="raw + rollups together")
    raw_max_age_s: float = Field(default=6 * 3600.0, ge=60, description="older raw samples fold into 1 min")
    minute_max_age_s: float = Field(default=3 * 86400.0, ge=3600, description="older 1-min rows fold to 1 h")
    hour_max_age_s: float = Field(default=400 * 86400.0, ge=86400, description="older 1-h rows are dropped")
    series_per_metric: int = Field(
        default=500, ge=1, le=100_000, description="label sets per metric name; more go to an overflow series"
    )

    @model_validator(mode="after")
    def _order(self) -> MetricsBudget:
        if not self.raw_max_age_s <= self.minute_max_age_s <= self.hour_max_age_s:
            raise ValueError("ages must grow: raw_max_age_s <= minute_max_age_s <= hour_max_age_s")
        return self


class LogsBudget(PolicyModel):
    """Logs: over budget, the oldest debug lines go first, then info, warning, error."""

    bytes: int = Field(default=32 * MiB, ge=1 * MiB)
    max_age_s: float = Field(default=14 * 86400.0, ge=3600)


class TableBudget(PolicyModel):
    """A droppable class of rows (events, chaos journals, triage decisions): oldest first."""

    bytes: int = Field(default=16 * MiB, ge=1 * MiB)
    max_age_s: float = Field(default=60 * 86400.0, ge=3600)


class EssentialBudget(PolicyModel):
    """Audit mirror, escalations, verification results: never dropped.

    When they outgrow ``reserved_bytes`` the device raises an incident and flags "stop non-essential
    work" so that nothing new competes for the space.
    """

    reserved_bytes: int = Field(default=64 * MiB, ge=1 * MiB)


class OutboxBudget(PolicyModel):
    """Sealed batches waiting for the hub's acknowledgement."""

    bytes: int = Field(default=32 * MiB, ge=1 * MiB)
    max_unacked_batches: int = Field(
        default=16, ge=1, le=10_000, description="sealing pauses at this many unacknowledged batches"
    )
    batch_max_rows: int = Field(default=100_000, ge=100, le=10_000_000)


class WriterPolicy(PolicyModel):
    """The batched writer."""

    flush_interval_s: float = Field(default=1.0, gt=0, le=600)
    flush_rows: int = Field(default=20_000, ge=1, le=10_000_000, description="flush early at this many rows")
    max_buffer_rows: int = Field(
        default=1_000_000, ge=100, description="non-essential rows beyond this are dropped (and counted)"
    )
    enforce_interval_s: float = Field(default=60.0, gt=0, le=86400, description="budget enforcement period")


class TelemetryPolicy(PolicyModel):
    """The whole document (``policies/defaults/telemetry.yaml``)."""

    version: str = "1"
    total_bytes: int = Field(default=320 * MiB, ge=8 * MiB, description="hard cap on the database file")
    memory_limit_bytes: int = Field(
        default=64 * MiB,
        ge=16 * MiB,
        description="DuckDB's memory limit (buffer cache + query memory; larger work spills to disk)",
    )
    metrics: MetricsBudget = Field(default_factory=MetricsBudget)
    logs: LogsBudget = Field(default_factory=LogsBudget)
    events: TableBudget = Field(default_factory=TableBudget)
    records: TableBudget = Field(default_factory=TableBudget, description="chaos journals, triage decisions")
    essential: EssentialBudget = Field(default_factory=EssentialBudget)
    outbox: OutboxBudget = Field(default_factory=OutboxBudget)
    writer: WriterPolicy = Field(default_factory=WriterPolicy)

    @model_validator(mode="after")
    def _fits(self) -> TelemetryPolicy:
        parts = (
            self.metrics.bytes
            + self.logs.bytes
            + self.events.bytes
            + self.records.bytes
            + self.essential.reserved_bytes
            + self.outbox.bytes
        )
        if parts > self.total_bytes:
            raise ValueError(
                f"class budgets add up to {parts} bytes, more than total_bytes {self.total_bytes}"
            )
        return self


def load_telemetry_policy(path: Path | None = None) -> TelemetryPolicy:
    """The policy at ``path``, else the shipped default. Raises InputError when invalid."""
    if path is None:
        return load_default(TelemetryPolicy, "telemetry")
    return load_document(TelemetryPolicy, path)
