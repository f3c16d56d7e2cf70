"""The telemetry table registry shared by device and hub: every table, its columns and signal class.

The device stores these tables in ``telemetry.duckdb`` and uploads them as sealed batches; the hub lands
only batches of these tables with exactly these columns (plus ``device_id``), so one registry is the
contract.

Every data table carries ``seq`` (per-table, assigned by the writer, never reused) and ``ts``. No table
has an index or key: DuckDB's reported WAL-replay failures involve indexes, and append-only telemetry
needs none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

__all__ = [
    "ESSENTIAL",
    "METRIC_TABLES",
    "RECORD_TABLES",
    "TABLES",
    "TS",
    "UPLOAD_ORDER",
    "Table",
    "table",
]

SignalClass = Literal["metrics", "logs", "events", "records", "essential", "meta"]

TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Table:
    """One data table: name, signal class, Arrow schema (without ``seq``), upload priority (0 first)."""

    name: str
    cls: SignalClass
    schema: pa.Schema
    priority: int

    @property
    def full_schema(self) -> pa.Schema:
        return pa.schema([pa.field("seq", pa.int64()), *self.schema])

    def ddl(self) -> str:
        cols = ", ".join(f'"{f.name}" {_duck_type(f.type)}' for f in self.full_schema)
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({cols})"


def _duck_type(t: pa.DataType) -> str:
    if t == pa.int64():
        return "BIGINT"
    if t == pa.float64():
        return "DOUBLE"
    if t == pa.string():
        return "VARCHAR"
    if t == TS:
        return "TIMESTAMPTZ"
    raise TypeError(f"no DuckDB type for {t}")


_ROLLUP = pa.schema(
    [
        pa.field("ts", TS),
        pa.field("name", pa.string()),
        pa.field("series", pa.string()),
        pa.field("count", pa.int64()),
        pa.field("sum", pa.float64()),
        pa.field("min", pa.float64()),
        pa.field("max", pa.float64()),
    ]
)
_BODY = pa.schema([pa.field("ts", TS), pa.field("body", pa.string())])

TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        Table(
            "audit",
            "essential",
            pa.schema(
                [
                    pa.field("ts", TS),
                    pa.field("audit_seq", pa.int64()),
                    pa.field("event", pa.string()),
                    pa.field("actor", pa.string()),
                    pa.field("data", pa.string()),
                    pa.field("prev", pa.string()),
                    pa.field("hash", pa.string()),
                ]
            ),
            0,
        ),
        Table("escalations", "essential", _BODY, 1),
        Table("verification_results", "essential", _BODY, 2),
        Table(
            "events",
            "events",
            pa.schema(
                [
                    pa.field("ts", TS),
                    pa.field("kind", pa.string()),
                    pa.field("severity", pa.string()),
                    pa.field("message", pa.string()),
                    pa.field("attrs", pa.string()),
                ]
            ),
            3,
        ),
        Table("triage_decisions", "records", _BODY, 4),
        Table("chaos_journals", "records", _BODY, 5),
        Table("feedback", "records", _BODY, 6),
        Table("serving_latency_histogram", "records", _BODY, 6),
        Table("metrics_1h", "metrics", _ROLLUP, 7),
        Table("metrics_1m", "metrics", _ROLLUP, 8),
        Table(
            "metrics",
            "metrics",
            pa.schema(
                [
                    pa.field("ts", TS),
                    pa.field("name", pa.string()),
                    pa.field("series", pa.string()),
                    pa.field("value", pa.float64()),
                ]
            ),
            9,
        ),
        Table(
            "logs",
            "logs",
            pa.schema(
                [
                    pa.field("ts", TS),
                    pa.field("level", pa.string()),
                    pa.field("logger", pa.string()),
                    pa.field("message", pa.string()),
                ]
            ),
            10,
        ),
    ]
}

ESSENTIAL = frozenset(n for n, t in TABLES.items() if t.cls == "essential")
METRIC_TABLES = ("metrics", "metrics_1m", "metrics_1h")
RECORD_TABLES = frozenset(n for n, t in TABLES.items() if t.schema == _BODY)
UPLOAD_ORDER = tuple(sorted(TABLES, key=lambda n: TABLES[n].priority))


def table(name: str) -> Table:
    """The table called ``name``. Raises KeyError with the known names."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown telemetry table {name!r}; known: {', '.join(sorted(TABLES))}") from None
