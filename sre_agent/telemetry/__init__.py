"""Telemetry on the device: one DuckDB file, one batched writer, budgets with rollups before drops.

store = Store(paths.telemetry_db, load_telemetry_policy(), clock, device_id)
writer = TelemetryWriter(store)          # a TelemetrySink; start() runs its thread
writer.metric("latency_ms", 3.2, {"slot": "a"})
store.enforce()                          # fold / drop to budget (the writer does this periodically)
store.seal(); store.pending(); store.ack(batch_id)   # the uplink's side
"""

from sre_agent.telemetry.budgets import Plan, TableStats, plan_enforcement
from sre_agent.telemetry.schema import ESSENTIAL, RECORD_TABLES, TABLES, UPLOAD_ORDER
from sre_agent.telemetry.store import (
    BatchInfo,
    Books,
    EnforceReport,
    Store,
    TelemetryLockedError,
    open_readonly,
    status_of,
)
from sre_agent.telemetry.writer import OVERFLOW_SERIES, TelemetryWriter, WriterStats, series_key

__all__ = [
    "ESSENTIAL",
    "OVERFLOW_SERIES",
    "RECORD_TABLES",
    "TABLES",
    "UPLOAD_ORDER",
    "BatchInfo",
    "Books",
    "EnforceReport",
    "Plan",
    "Store",
    "TableStats",
    "TelemetryLockedError",
    "TelemetryWriter",
    "WriterStats",
    "open_readonly",
    "plan_enforcement",
    "series_key",
    "status_of",
]
