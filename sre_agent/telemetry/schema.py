"""Table definitions of ``telemetry.duckdb``: the shared registry (:mod:`sre_core.telemetry_schema`,
the contract with the hub's ingest) plus the device-only bookkeeping tables (``META_DDL``)."""

from __future__ import annotations

from sre_core.telemetry_schema import (
    ESSENTIAL,
    METRIC_TABLES,
    RECORD_TABLES,
    TABLES,
    TS,
    UPLOAD_ORDER,
    Table,
    table,
)

__all__ = [
    "ESSENTIAL",
    "META_DDL",
    "METRIC_TABLES",
    "RECORD_TABLES",
    "TABLES",
    "TS",
    "UPLOAD_ORDER",
    "Table",
    "table",
]

META_DDL = [
    # Per-table books: every row produced ends up uploaded, folded into a rollup, dropped, or is pending.
    """CREATE TABLE IF NOT EXISTS books (
        tbl VARCHAR, next_seq BIGINT, sealed_seq BIGINT, produced BIGINT, sealed BIGINT,
        uploaded BIGINT, folded BIGINT, dropped BIGINT, overflowed BIGINT)""",
    """CREATE TABLE IF NOT EXISTS outbox (
        batch_id VARCHAR, tbl VARCHAR, kind VARCHAR, priority INTEGER, seq_lo BIGINT, seq_hi BIGINT,
        rows BIGINT, bytes BIGINT, created TIMESTAMPTZ, attempts INTEGER, next_try TIMESTAMPTZ,
        payload BLOB)""",
    "CREATE TABLE IF NOT EXISTS kv (k VARCHAR, v VARCHAR)",
    # Batches a hub answered 200 without the root's signed receipt (a regional hub's "queued", or a tier
    # that lies): kept in the outbox, re-sent from due_us on until a receipt comes back.
    "CREATE TABLE IF NOT EXISTS outbox_handed (batch_id VARCHAR, due_us BIGINT)",
]
