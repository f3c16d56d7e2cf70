"""The one batched telemetry writer: any component calls it; nothing waits on the disk.

Calls (:meth:`TelemetryWriter.metric`, ``event``, ``record``, ``log``) append to in-memory buffers under
a short lock and return. One background thread turns the buffers into Arrow tables and commits them in
ONE transaction per flush, on an interval or when enough rows are waiting (DuckDB manages ~800 rows/s
committing row by row, ~1 M rows/s from Arrow). Producers that already hold columns use the bulk calls
(:meth:`write_metrics`, :meth:`write_table`), which skip the per-row Python cost entirely.

Back-pressure: past ``max_buffer_rows`` non-essential rows are shed at the call and counted as produced
and dropped in the books; essential rows (audit, escalations, verification results) are never shed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from policies.telemetry import WriterPolicy
from sre_agent.telemetry.schema import ESSENTIAL, RECORD_TABLES, TS, table
from sre_agent.telemetry.store import Store
from sre_core.audit import AuditRecord

__all__ = ["OVERFLOW_SERIES", "TelemetryWriter", "WriterStats", "series_key"]

OVERFLOW_SERIES = "__overflow__"
_log = logging.getLogger(__name__)


_EMPTY: dict[str, Any] = {}


def _as_json(col: Sequence[Any]) -> list[str]:
    return [v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True) for v in col]


def series_key(labels: dict[str, str] | None) -> str:
    """Canonical label set: ``k=v`` pairs sorted by key, comma-separated (empty for no labels)."""
    if not labels:
        return ""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


@dataclass
class WriterStats:
    """Counters of the writer since start."""

    rows_written: int = 0
    flushes: int = 0
    cpu_s: float = 0.0
    shed: int = 0
    errors: int = 0
    enforcements: int = 0


class TelemetryWriter:
    """Implements :class:`sre_core.telemetry.TelemetrySink` over a :class:`Store`.

    Args:
        store: the store (owns the database connection).
        policy: flush interval/size, buffer bound, enforcement period (default: the store's policy).
        enforce: run budget enforcement from the writer thread every ``enforce_interval_s``.
    """

    name = "telemetry-writer"

    def __init__(self, store: Store, policy: WriterPolicy | None = None, enforce: bool = True) -> None:
        self.store = store
        self.policy = policy or store.policy.writer
        self.clock = store.clock
        self.enforce_enabled = enforce
        self.stats = WriterStats()
        self._buf_lock = threading.Lock()
        self._rows: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        self._chunks: dict[str, list[pa.Table]] = defaultdict(list)
        self._buffered = 0
        self._shed: dict[str, int] = defaultdict(int)
        self._cond = threading.Condition(self._buf_lock)
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._requested = 0
        self._done = 0
        self._last_enforce = self.clock.monotonic()
        cap_rows = store.query(
            "SELECT DISTINCT name, series FROM (SELECT name, series FROM metrics UNION ALL "
            "SELECT name, series FROM metrics_1m UNION ALL SELECT name, series FROM metrics_1h)"
        ).to_pylist()
        self._series: dict[str, set[str]] = defaultdict(set)
        for r in cap_rows:
            self._series[str(r["name"])].add(str(r["series"]))

    # ---- TelemetrySink ---------------------------------------------------------------------------

    def _now_us(self, ts: datetime | None) -> int:
        return int((ts or self.clock.now()).timestamp() * 1_000_000)

    def _admit(self, name: str, n: int) -> bool:
        """Caller holds the buffer lock. False (and counted) when the row must be shed."""
        if self._buffered + n > self.policy.max_buffer_rows and name not in ESSENTIAL:
            self._shed[name] += n
            self.stats.shed += n
            return False
        self._buffered += n
        if self._buffered >= self.policy.flush_rows:
            self._cond.notify()
        return True

    def metric(
        self, name: str, value: float, labels: dict[str, str] | None = None, ts: datetime | None = None
    ) -> None:
        row = (self._now_us(ts), name, series_key(labels), float(value))
        with self._buf_lock:
            if self._admit("metrics", 1):
                self._rows["metrics"].append(row)

    def event(
        self,
        kind: str,
        message: str,
        severity: str = "info",
        attrs: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        row = (
            self._now_us(ts),
            kind,
            severity,
            message,
            dict(attrs) if attrs else _EMPTY,  # serialised in the writer thread, not on the caller's path
        )
        with self._buf_lock:
            if self._admit("events", 1):
                self._rows["events"].append(row)

    def record(self, table_name: str, row: dict[str, Any]) -> None:
        """A typed row for one of the record tables (``verification_results``, ``escalations``...).

        Never raises into the caller (a serving thread must not die of a telemetry typo): a row for an
        unknown table is kept as a warning event ``telemetry.unknown_record`` carrying the table and row.
        """
        if table_name not in RECORD_TABLES:
            self.event(
                "telemetry.unknown_record",
                f"record for unknown table {table_name!r}",
                "warning",
                {"table": table_name, "row": row},
            )
            return
        ts = row.get("ts")
        when = self._now_us(ts if isinstance(ts, datetime) else None)
        body = dict(row)  # serialised in the writer thread
        with self._buf_lock:
            if self._admit(table_name, 1):
                self._rows[table_name].append((when, body))

    def log(self, level: str, logger: str, message: str, ts: datetime | None = None) -> None:
        """One log line (levels: debug, info, warning, error, critical)."""
        row = (self._now_us(ts), level, logger, message)
        with self._buf_lock:
            if self._admit("logs", 1):
                self._rows["logs"].append(row)

    def audit_mirror(self, rec: AuditRecord) -> None:
        """``AuditLog(mirror=writer.audit_mirror)``: the trail, mirrored (never shed)."""
        ts = datetime.fromisoformat(rec.ts)
        row = (
            self._now_us(ts),
            rec.seq,
            rec.event,
            rec.actor,
            json.dumps(rec.data, default=str, sort_keys=True),
            rec.prev,
            rec.hash,
        )
        with self._buf_lock:
            self._admit("audit", 1)
            self._rows["audit"].append(row)

    # ---- bulk ------------------------------------------------------------------------------------

    def write_metrics(
        self,
        ts_us: np.ndarray[Any, Any] | pa.Array,
        names: Sequence[str] | pa.Array,
        series: Sequence[str] | pa.Array,
        values: np.ndarray[Any, Any] | pa.Array,
    ) -> None:
        """Many samples at once from columns (microsecond timestamps)."""
        tbl = pa.table(
            {
                "ts": pa.array(ts_us, pa.int64()).cast(TS),
                "name": pa.array(names, pa.string()),
                "series": pa.array(series, pa.string()),
                "value": pa.array(values, pa.float64()),
            }
        )
        self.write_table("metrics", tbl)

    def write_table(self, table_name: str, tbl: pa.Table) -> None:
        """Rows for ``table_name`` as an Arrow table with its schema (without ``seq``)."""
        schema = table(table_name).schema
        if not tbl.schema.equals(schema):
            tbl = tbl.select(schema.names).cast(schema)
        with self._buf_lock:
            if self._admit(table_name, tbl.num_rows):
                self._chunks[table_name].append(tbl)

    # ---- flushing --------------------------------------------------------------------------------

    def _take(self) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, list[pa.Table]], dict[str, int]]:
        with self._buf_lock:
            rows, chunks, shed = self._rows, self._chunks, self._shed
            self._rows, self._chunks, self._shed = defaultdict(list), defaultdict(list), defaultdict(int)
            self._buffered = 0
        return rows, chunks, shed

    def _cap_series(self, tbl: pa.Table) -> tuple[pa.Table, int]:
        """Route label sets beyond the per-metric cap into the overflow series."""
        cap = self.store.policy.metrics.series_per_metric
        pairs = tbl.select(["name", "series"]).group_by(["name", "series"]).aggregate([])
        over: list[str] = []
        for n, s in zip(pairs.column("name").to_pylist(), pairs.column("series").to_pylist(), strict=True):
            known = self._series[n]
            if s in known or s == OVERFLOW_SERIES:
                continue
            if len(known) < cap:
                known.add(s)
            else:
                over.append(f"{n}\x1f{s}")
        if not over:
            return tbl, 0
        key = pc.binary_join_element_wise(tbl.column("name"), tbl.column("series"), "\x1f")
        mask = pc.is_in(key, value_set=pa.array(over, pa.string()))
        n_over = int(pc.sum(mask).as_py() or 0)
        series = pc.if_else(mask, pa.scalar(OVERFLOW_SERIES), tbl.column("series"))
        return tbl.set_column(tbl.schema.get_field_index("series"), "series", series), n_over

    def _flush_once(self) -> int:
        with self._flush_lock:
            t0 = time.thread_time()
            rows, chunks, shed = self._take()
            tables: dict[str, pa.Table] = {}
            overflowed: dict[str, int] = {}
            for name in set(rows) | set(chunks):
                schema = table(name).schema
                parts = list(chunks.get(name, []))
                if rows.get(name):
                    cols = list(zip(*rows[name], strict=True))
                    arrays = [
                        pa.array(col, pa.int64()).cast(TS)
                        if f.name == "ts"
                        else pa.array(_as_json(col) if f.name in ("attrs", "body") else col, f.type)
                        for col, f in zip(cols, schema, strict=True)
                    ]
                    parts.append(pa.Table.from_arrays(arrays, schema=schema))
                if not parts:
                    continue
                tbl = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
                if name == "metrics":
                    tbl, n_over = self._cap_series(tbl)
                    if n_over:
                        overflowed[name] = n_over
                tables[name] = tbl
            n = 0
            if tables or shed:
                try:
                    n = self.store.append(tables, dropped=shed, overflowed=overflowed)
                except Exception:
                    self._requeue(tables, shed)
                    raise
                self.stats.rows_written += n
                self.stats.flushes += 1
            self.stats.cpu_s += time.thread_time() - t0
            return n

    def _requeue(self, tables: dict[str, pa.Table], shed: dict[str, int]) -> None:
        """A failed commit (disk full...): keep the rows for the next flush; the buffer bound still holds,
        so under a persistent failure new rows are shed and counted instead of memory growing."""
        with self._buf_lock:
            for name, tbl in tables.items():
                self._chunks[name].insert(0, tbl)
                self._buffered += tbl.num_rows
            for name, k in shed.items():
                self._shed[name] += k

    def flush(self, timeout_s: float = 30.0) -> None:
        """Commit everything buffered so far (in the writer thread when it runs, else here)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._flush_once()
            return
        with self._cond:
            self._requested += 1
            target = self._requested
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._done >= target, timeout=timeout_s):
                raise TimeoutError(f"telemetry flush did not finish within {timeout_s} s")

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._stopping
                        or self._requested > self._done
                        or self._buffered >= self.policy.flush_rows
                    ),
                    timeout=self.policy.flush_interval_s,
                )
                stopping = self._stopping
                target = self._requested
            try:
                self._flush_once()
                if self.enforce_enabled and (
                    self.clock.monotonic() - self._last_enforce >= self.policy.enforce_interval_s
                ):
                    self._last_enforce = self.clock.monotonic()
                    t0 = time.thread_time()
                    self.store.enforce()
                    self.stats.enforcements += 1
                    self.stats.cpu_s += time.thread_time() - t0
            except Exception:
                # The writer must outlive a bad flush (disk full, a bad row); the rows are counted lost.
                self.stats.errors += 1
                _log.exception("telemetry flush failed")
            with self._cond:
                self._done = max(self._done, target)
                self._cond.notify_all()
            if stopping:
                return

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Flush what is buffered and stop the thread."""
        thread = self._thread
        if thread is None:
            self._flush_once()
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join(timeout_s)
        self._thread = None
