"""The telemetry store: one DuckDB file (``<state>/telemetry.duckdb``) holding every signal table, the
per-table books, and the outbox of sealed batches.

Everything that changes the file goes through one :class:`Store` (one connection, one lock): the
batched writer appends, budget enforcement folds and drops, the uplink seals and acknowledges. Each of
those is one transaction, so ``kill -9`` at any instant leaves either the old or the new state.

Books, per table: ``produced = uploaded + folded + dropped + pending`` where pending is the rows not
yet sealed plus the rows of sealed batches the hub has not acknowledged. A sealed batch is a zstd
Parquet file (kept as a BLOB in the outbox, so sealing is one transaction) whose id is the sha256 of
its bytes; sealing the same rows again yields the same id, which the hub deduplicates.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from policies.telemetry import TelemetryPolicy
from sre_agent.telemetry.budgets import Plan, TableStats, plan_enforcement
from sre_agent.telemetry.schema import ESSENTIAL, META_DDL, TABLES, TS, UPLOAD_ORDER, table
from sre_core.clock import Clock
from sre_core.errors import SreError

__all__ = [
    "BLOCK_BYTES",
    "BatchInfo",
    "Books",
    "EnforceReport",
    "Store",
    "TelemetryLockedError",
    "open_readonly",
    "status_of",
]

BLOCK_BYTES = 262_144
_BOOK_FIELDS = ("produced", "sealed", "uploaded", "folded", "dropped", "overflowed")


class TelemetryLockedError(SreError):
    """Another process (normally the daemon) holds the database file."""


@dataclass(frozen=True)
class Books:
    """The ledger of one table."""

    table: str
    produced: int
    sealed: int
    uploaded: int
    folded: int
    dropped: int
    overflowed: int
    unsealed: int
    in_outbox: int

    @property
    def balanced(self) -> bool:
        """produced == uploaded + folded + dropped + unsealed + in_outbox."""
        return self.produced == self.uploaded + self.folded + self.dropped + self.unsealed + self.in_outbox

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "produced": self.produced,
            "sealed": self.sealed,
            "uploaded": self.uploaded,
            "folded": self.folded,
            "dropped": self.dropped,
            "overflowed": self.overflowed,
            "unsealed": self.unsealed,
            "in_outbox": self.in_outbox,
            "balanced": self.balanced,
        }


@dataclass(frozen=True)
class BatchInfo:
    """One outbox entry (its payload stays in the database until acknowledged)."""

    batch_id: str
    table: str
    kind: str
    priority: int
    rows: int
    bytes: int
    created_us: int
    attempts: int
    next_try_us: int


@dataclass
class EnforceReport:
    """What one enforcement pass did."""

    folded: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    local_copies_removed: int = 0
    stop_nonessential: bool = False
    incident: str | None = None
    bytes_after: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0


def _lock_error(path: Path, exc: Exception) -> TelemetryLockedError:
    return TelemetryLockedError(
        f"open telemetry database {path}",
        f"another process holds it, normally the running daemon ({exc})",
        "stop the daemon, or read live data through the daemon's admin API",
    )


def _connect(path: Path, read_only: bool, memory_limit_bytes: int | None = None) -> duckdb.DuckDBPyConnection:
    # DuckDB's default memory limit is 80 % of the machine's RAM, and its buffer manager keeps every
    # block it has read until that limit: the daemon's RSS followed the file (up to total_bytes, and the
    # hourly integrity check reads every block). The policy's limit bounds the cache and query memory;
    # larger operators spill to <db>.tmp.
    config: dict[str, str | bool | int | float | list[str]] = {}
    if memory_limit_bytes is not None:
        config["memory_limit"] = f"{memory_limit_bytes}B"
    try:
        con = duckdb.connect(str(path), read_only=read_only, config=config)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise _lock_error(path, exc) from exc
        raise SreError(
            f"open telemetry database {path}", str(exc), "check the file and its directory"
        ) from exc
    con.execute("SET TimeZone = 'UTC'")
    return con


def open_readonly(path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection for CLI queries while no daemon runs.

    Raises:
        TelemetryLockedError: the daemon (or another writer) holds the file.
        SreError: there is no database yet.
    """
    if not Path(path).exists():
        raise SreError(
            f"open telemetry database {path}",
            "it does not exist yet",
            "start the agent (sre-agent run) first",
        )
    return _connect(Path(path), read_only=True)


def _us(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)


class Store:
    """The single owner of ``telemetry.duckdb`` in this process. Thread-safe (one lock).

    Args:
        path: the database file.
        policy: budgets.
        clock: time source (books timestamps, enforcement "now").
        device_id: written into every sealed batch.

    Raises:
        TelemetryLockedError: another process holds the file.
    """

    def __init__(self, path: Path, policy: TelemetryPolicy, clock: Clock, device_id: str = "unknown") -> None:
        self.path = Path(path)
        self.policy = policy
        self.clock = clock
        self.device_id = device_id
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = _connect(self.path, read_only=False, memory_limit_bytes=policy.memory_limit_bytes)
        self._closed = False
        with self._lock:
            for t in TABLES.values():
                self._con.execute(t.ddl())
            for ddl in META_DDL:
                self._con.execute(ddl)
            have = {r[0] for r in self._con.execute("SELECT tbl FROM books").fetchall()}
            for name in TABLES:
                if name not in have:
                    self._con.execute("INSERT INTO books VALUES (?, 1, 0, 0, 0, 0, 0, 0, 0)", [name])
            self._next_seq: dict[str, int] = {
                str(r[0]): int(r[1]) for r in self._con.execute("SELECT tbl, next_seq FROM books").fetchall()
            }
            self._sealed_seq: dict[str, int] = {
                str(r[0]): int(r[1])
                for r in self._con.execute("SELECT tbl, sealed_seq FROM books").fetchall()
            }

    # ---- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._con.close()
                self._closed = True

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- appends ---------------------------------------------------------------------------------

    def append(
        self,
        tables: Mapping[str, pa.Table],
        dropped: Mapping[str, int] | None = None,
        overflowed: Mapping[str, int] | None = None,
    ) -> int:
        """Append Arrow tables (schemas as in :mod:`schema`, without ``seq``) in ONE transaction.

        ``dropped`` counts rows produced but shed before they reached the file (writer back-pressure);
        they enter the books as produced and dropped. Returns the rows written.
        """
        dropped = dropped or {}
        overflowed = overflowed or {}
        written = 0
        with self._lock:
            con = self._con
            con.execute("BEGIN")
            try:
                for name, tbl in tables.items():
                    n = tbl.num_rows
                    if n == 0:
                        continue
                    start = self._next_seq[name]
                    seq = pa.array(np.arange(start, start + n, dtype=np.int64))
                    data = tbl.add_column(0, "seq", seq)  # noqa: F841 (read by DuckDB by name)
                    con.execute(f"INSERT INTO {name} SELECT * FROM data")  # noqa: S608
                    self._next_seq[name] = start + n
                    written += n
                names = set(tables) | set(dropped) | set(overflowed)
                for name in names:
                    n = tables[name].num_rows if name in tables else 0
                    d = int(dropped.get(name, 0))
                    o = int(overflowed.get(name, 0))
                    if n or d or o:
                        con.execute(
                            "UPDATE books SET next_seq = ?, produced = produced + ?, dropped = dropped + ?, "
                            "overflowed = overflowed + ? WHERE tbl = ?",
                            [self._next_seq[name], n + d, d, o, name],
                        )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                # The in-memory sequence may have moved; reload it from the committed books.
                for r in con.execute("SELECT tbl, next_seq FROM books").fetchall():
                    self._next_seq[str(r[0])] = int(r[1])
                raise
        return written

    # ---- books and stats -------------------------------------------------------------------------

    def books(self) -> dict[str, Books]:
        """The ledger of every table."""
        with self._lock:
            outbox = {
                str(r[0]): int(r[1])
                for r in self._con.execute(
                    "SELECT tbl, coalesce(sum(rows), 0) FROM outbox WHERE kind = 'batch' GROUP BY tbl"
                ).fetchall()
            }
            out: dict[str, Books] = {}
            for r in self._con.execute(
                "SELECT tbl, produced, sealed, uploaded, folded, dropped, overflowed, sealed_seq FROM books"
            ).fetchall():
                name = str(r[0])
                row = _q1(self._con, f"SELECT count(*) FROM {name} WHERE seq > ?", [int(r[7])])  # noqa: S608
                unsealed = int(row[0]) if row else 0
                out[name] = Books(
                    name,
                    int(r[1]),
                    int(r[2]),
                    int(r[3]),
                    int(r[4]),
                    int(r[5]),
                    int(r[6]),
                    unsealed,
                    outbox.get(name, 0),
                )
            return out

    def table_bytes(self) -> dict[str, int]:
        """Bytes of persistent storage blocks per table (checkpointed data), in one query."""
        names = [*TABLES, "outbox"]
        parts = " UNION ALL ".join(
            f"SELECT '{n}' AS t, block_id AS b, additional_block_ids AS more "  # noqa: S608
            f"FROM pragma_storage_info('{n}') WHERE persistent"
            for n in names
        )
        sql = (
            f"SELECT t, count(DISTINCT b) FROM (SELECT t, b FROM ({parts}) WHERE b >= 0 "  # noqa: S608
            f"UNION ALL SELECT t, unnest(more) FROM ({parts})) GROUP BY t"
        )
        with self._lock:
            found = {str(r[0]): int(r[1]) * BLOCK_BYTES for r in self._con.execute(sql).fetchall()}
        return {n: found.get(n, 0) for n in names}

    def file_bytes(self) -> int:
        """Bytes on disk: the database file plus its WAL."""
        total = self.path.stat().st_size if self.path.exists() else 0
        wal = self.path.with_name(self.path.name + ".wal")
        if wal.exists():
            total += wal.stat().st_size
        return total

    def _stats(self) -> dict[str, TableStats]:
        sizes = self.table_bytes()
        out: dict[str, TableStats] = {}
        for name in TABLES:
            row = _q1(
                self._con,
                f"SELECT count(*), count(*) FILTER (WHERE seq > ?), min(epoch_us(ts)), max(epoch_us(ts)) "  # noqa: S608
                f"FROM {name}",
                [self._sealed_seq[name]],
            )
            assert row is not None  # noqa: S101
            out[name] = TableStats(
                name,
                rows=int(row[0]),
                unsealed=int(row[1]),
                bytes=sizes[name],
                min_us=None if row[2] is None else int(row[2]),
                max_us=None if row[3] is None else int(row[3]),
            )
        out["outbox"] = TableStats(
            "outbox", rows=0, unsealed=0, bytes=sizes["outbox"], min_us=None, max_us=None
        )
        return out

    def kv_get(self, key: str) -> str | None:
        with self._lock:
            row = _q1(self._con, "SELECT v FROM kv WHERE k = ?", [key])
            return None if row is None else str(row[0])

    def _kv_set(self, key: str, value: str) -> None:
        self._con.execute("DELETE FROM kv WHERE k = ?", [key])
        self._con.execute("INSERT INTO kv VALUES (?, ?)", [key, value])

    @property
    def stop_nonessential(self) -> bool:
        """True while essential data outgrew its reserved space."""
        return self.kv_get("stop_nonessential") == "1"

    # ---- budgets ---------------------------------------------------------------------------------

    def enforce(self, now: datetime | None = None, max_passes: int = 4) -> EnforceReport:
        """Fold, drop and compact until every class is within budget (bounded passes).

        Counters of every fold and drop are then written as metrics (``telemetry.*``), so they are
        uploaded like any other sample.
        """
        now = now or self.clock.now()
        now_us = _us(now)
        report = EnforceReport()
        with self._lock:
            self._con.execute("CHECKPOINT")
            stats = self._stats()
            for _ in range(max_passes):
                plan = plan_enforcement(stats, now_us, self.policy)
                if plan.empty:
                    break
                self._execute(plan, report)
                self._con.execute("CHECKPOINT")
                stats = self._stats()
            self._check_essential(stats, report)
            report.bytes_after = {k: v.bytes for k, v in stats.items()}
            self._emit_counters(now_us, report)
            report.file_bytes = self.file_bytes()
        return report

    def _execute(self, plan: Plan, report: EnforceReport) -> None:
        con = self._con
        con.execute("BEGIN")
        try:
            for name, cutoff in plan.remove_sealed_before.items():
                cur = con.execute(
                    f"DELETE FROM {name} WHERE seq <= ? AND epoch_us(ts) < ?",  # noqa: S608
                    [self._sealed_seq[name], cutoff],
                )
                report.local_copies_removed += _rowcount(cur)
            for fold in plan.folds:
                n = self._fold(fold.src, fold.dst, fold.cutoff_us, fold.bucket)
                report.folded[fold.src] = report.folded.get(fold.src, 0) + n
            for name, cutoff in plan.drop_before.items():
                n = self._drop_where(name, "epoch_us(ts) < ?", [cutoff])
                if n:
                    report.dropped[name] = report.dropped.get(name, 0) + n
            if plan.drop_logs:
                n = self._drop_logs(plan.drop_logs)
                if n:
                    report.dropped["logs"] = report.dropped.get("logs", 0) + n
            if plan.evict_outbox_bytes:
                self._evict_outbox(plan.evict_outbox_bytes, report)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _fold(self, src: str, dst: str, cutoff_us: int, bucket: str) -> int:
        """Fold unsealed ``src`` rows older than ``cutoff_us`` into ``dst`` buckets; delete them."""
        con = self._con
        sealed = self._sealed_seq[src]
        row = _q1(
            con,
            f"SELECT count(*) FROM {src} WHERE seq > ? AND epoch_us(ts) < ?",  # noqa: S608
            [sealed, cutoff_us],
        )
        n = int(row[0]) if row else 0
        if n:
            start = self._next_seq[dst]
            cur = con.execute(
                f"INSERT INTO {dst} SELECT ? + row_number() OVER (ORDER BY b, name, series) - 1, b, name, "  # noqa: S608
                f"series, c, s, lo, hi FROM (SELECT time_bucket(INTERVAL 1 {bucket}, ts) AS b, name, series, "
                f"{_agg_cols(src)} FROM {src} WHERE seq > ? AND epoch_us(ts) < ? GROUP BY ALL)",
                [start, sealed, cutoff_us],
            )
            made = _rowcount(cur)
            self._next_seq[dst] = start + made
            con.execute(
                "UPDATE books SET next_seq = ?, produced = produced + ? WHERE tbl = ?",
                [start + made, made, dst],
            )
            con.execute("UPDATE books SET folded = folded + ? WHERE tbl = ?", [n, src])
        con.execute(f"DELETE FROM {src} WHERE epoch_us(ts) < ?", [cutoff_us])  # noqa: S608
        return n

    def _drop_where(self, name: str, where: str, params: list[Any]) -> int:
        """Delete rows matching ``where``; unsealed ones are counted as dropped. Returns that count."""
        if name in ESSENTIAL:
            raise RuntimeError(f"refusing to drop rows of essential table {name}")
        con = self._con
        sealed = self._sealed_seq[name]
        row = _q1(
            con,
            f"SELECT count(*) FROM {name} WHERE seq > ? AND {where}",  # noqa: S608
            [sealed, *params],
        )
        n = int(row[0]) if row else 0
        con.execute(f"DELETE FROM {name} WHERE {where}", params)  # noqa: S608
        if n:
            con.execute("UPDATE books SET dropped = dropped + ? WHERE tbl = ?", [n, name])
        return n

    def _drop_logs(self, count: int) -> int:
        """Drop ``count`` log rows: local copies of sealed rows first, then debug, info, warning, error."""
        con = self._con
        sealed = self._sealed_seq["logs"]
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _victims AS SELECT seq FROM logs ORDER BY (seq <= ?) DESC, "
            "CASE level WHEN 'debug' THEN 0 WHEN 'info' THEN 1 WHEN 'warning' THEN 2 ELSE 3 END, seq LIMIT ?",
            [sealed, count],
        )
        row = _q1(con, "SELECT count(*) FROM _victims WHERE seq > ?", [sealed])
        n = int(row[0]) if row else 0
        con.execute("DELETE FROM logs WHERE seq IN (SELECT seq FROM _victims)")
        con.execute("DROP TABLE _victims")
        if n:
            con.execute("UPDATE books SET dropped = dropped + ? WHERE tbl = 'logs'", [n])
        return n

    def _evict_outbox(self, need_bytes: int, report: EnforceReport) -> None:
        """Evict the lowest-priority, oldest non-essential batches (their rows count as dropped)."""
        rows = self._con.execute(
            "SELECT batch_id, tbl, rows, bytes FROM outbox WHERE kind = 'batch' "
            "ORDER BY priority DESC, created"
        ).fetchall()
        freed = 0
        for bid, tbl, n, size in rows:
            if freed >= need_bytes:
                break
            if str(tbl) in ESSENTIAL:
                continue
            self._con.execute("DELETE FROM outbox WHERE batch_id = ?", [bid])
            self._con.execute("DELETE FROM outbox_handed WHERE batch_id = ?", [bid])
            self._con.execute("UPDATE books SET dropped = dropped + ? WHERE tbl = ?", [int(n), tbl])
            report.dropped[str(tbl)] = report.dropped.get(str(tbl), 0) + int(n)
            freed += int(size)

    def _check_essential(self, stats: dict[str, TableStats], report: EnforceReport) -> None:
        used = sum(stats[n].bytes for n in ESSENTIAL)
        over = used > self.policy.essential.reserved_bytes
        was = self.kv_get("stop_nonessential") == "1"
        report.stop_nonessential = over
        if over != was:
            self._con.execute("BEGIN")
            self._kv_set("stop_nonessential", "1" if over else "0")
            if over:
                report.incident = (
                    f"essential telemetry uses {used} bytes, more than its reserved "
                    f"{self.policy.essential.reserved_bytes}: stopping non-essential work"
                )
                ev = pa.table(
                    {
                        "ts": pa.array([_us(self.clock.now())], TS),
                        "kind": ["telemetry.essential_full"],
                        "severity": ["critical"],
                        "message": [report.incident],
                        "attrs": [json.dumps({"used_bytes": used, "incident": True})],
                    }
                )
                self._append_in_tx({"events": ev})
            self._con.execute("COMMIT")

    def _append_in_tx(self, tables: Mapping[str, pa.Table]) -> None:
        for name, tbl in tables.items():
            n = tbl.num_rows
            start = self._next_seq[name]
            data = tbl.add_column(0, "seq", pa.array(np.arange(start, start + n, dtype=np.int64)))  # noqa: F841
            self._con.execute(f"INSERT INTO {name} SELECT * FROM data")  # noqa: S608
            self._next_seq[name] = start + n
            self._con.execute(
                "UPDATE books SET next_seq = ?, produced = produced + ? WHERE tbl = ?", [start + n, n, name]
            )

    def _emit_counters(self, now_us: int, report: EnforceReport) -> None:
        """Write the books as ``telemetry.rows_*`` metrics (they are uploaded like any sample)."""
        names: list[str] = []
        series: list[str] = []
        values: list[float] = []
        for r in self._con.execute("SELECT tbl, folded, dropped, overflowed, uploaded FROM books").fetchall():
            for i, what in enumerate(("folded", "dropped", "series_overflow", "uploaded"), start=1):
                names.append(f"telemetry.rows_{what}")
                series.append(f"table={r[0]}")
                values.append(float(r[i]))
        names.append("telemetry.db_bytes")
        series.append("")
        values.append(float(self.file_bytes()))
        tbl = pa.table(
            {
                "ts": pa.array([now_us] * len(names), TS),
                "name": pa.array(names, pa.string()),
                "series": pa.array(series, pa.string()),
                "value": pa.array(values, pa.float64()),
            }
        )
        self._con.execute("BEGIN")
        try:
            self._append_in_tx({"metrics": tbl})
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise

    # ---- outbox ----------------------------------------------------------------------------------

    def seal(self, max_batches: int | None = None) -> list[BatchInfo]:
        """Seal unsealed rows into Parquet batches, highest priority first, while the outbox has room.

        Each batch is one transaction: the payload enters the outbox and the table's sealed cursor
        moves together. Returns the batches made.
        """
        made: list[BatchInfo] = []
        limit = self.policy.outbox.max_unacked_batches
        with self._lock:
            row = _q1(self._con, "SELECT count(*) FROM outbox")
            unacked = int(row[0]) if row else 0
            for name in UPLOAD_ORDER:
                while unacked < limit and (max_batches is None or len(made) < max_batches):
                    info = self._seal_one(name)
                    if info is None:
                        break
                    made.append(info)
                    unacked += 1
        return made

    def _seal_one(self, name: str) -> BatchInfo | None:
        con = self._con
        sealed = self._sealed_seq[name]
        rows = con.sql(
            f"SELECT * FROM {name} WHERE seq > {int(sealed)} ORDER BY seq LIMIT "  # noqa: S608
            f"{int(self.policy.outbox.batch_max_rows)}"
        ).to_arrow_table()
        n = rows.num_rows
        if n == 0:
            return None
        payload = encode_batch(rows, name, self.device_id)
        bid = hashlib.sha256(payload).hexdigest()[:40]
        seq_lo = int(rows.column("seq")[0].as_py())
        seq_hi = int(rows.column("seq")[n - 1].as_py())
        now_us = _us(self.clock.now())
        t = table(name)
        con.execute("BEGIN")
        try:
            con.execute(
                "INSERT INTO outbox VALUES (?, ?, 'batch', ?, ?, ?, ?, ?, make_timestamptz(?), 0, "
                "make_timestamptz(?), ?)",
                [bid, name, t.priority, seq_lo, seq_hi, n, len(payload), now_us, now_us, payload],
            )
            con.execute(
                "UPDATE books SET sealed_seq = ?, sealed = sealed + ? WHERE tbl = ?", [seq_hi, n, name]
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self._sealed_seq[name] = seq_hi
        return BatchInfo(bid, name, "batch", t.priority, n, len(payload), now_us, 0, now_us)

    def queue_document(self, kind: str, payload: bytes, priority: int = -1) -> str:
        """Queue a non-table document (an attestation) for upload; id = sha256 of the payload."""
        bid = hashlib.sha256(payload).hexdigest()[:40]
        now_us = _us(self.clock.now())
        with self._lock:
            if _q1(self._con, "SELECT 1 FROM outbox WHERE batch_id = ?", [bid]):
                return bid
            self._con.execute(
                "INSERT INTO outbox VALUES (?, ?, ?, ?, 0, 0, 0, ?, make_timestamptz(?), 0, "
                "make_timestamptz(?), ?)",
                [bid, kind, kind, priority, len(payload), now_us, now_us, payload],
            )
        return bid

    def pending(self) -> list[BatchInfo]:
        """Unacknowledged outbox entries in upload order (priority, then age)."""
        with self._lock:
            rows = self._con.execute(
                "SELECT batch_id, tbl, kind, priority, rows, bytes, epoch_us(created), attempts, "
                "epoch_us(next_try) FROM outbox ORDER BY priority, created, seq_lo"
            ).fetchall()
        return [
            BatchInfo(
                str(r[0]),
                str(r[1]),
                str(r[2]),
                int(r[3]),
                int(r[4]),
                int(r[5]),
                int(r[6]),
                int(r[7]),
                int(r[8]),
            )
            for r in rows
        ]

    def payload(self, batch_id: str) -> bytes:
        with self._lock:
            row = _q1(self._con, "SELECT payload FROM outbox WHERE batch_id = ?", [batch_id])
        if row is None:
            raise KeyError(batch_id)
        return bytes(row[0])

    def ack(self, batch_id: str) -> bool:
        """The hub acknowledged ``batch_id``: drop it from the outbox, count its rows uploaded.

        Returns False when it was already acknowledged (idempotent).
        """
        now_us = _us(self.clock.now())
        with self._lock:
            row = _q1(self._con, "SELECT tbl, kind, rows FROM outbox WHERE batch_id = ?", [batch_id])
            if row is None:
                return False
            self._con.execute("BEGIN")
            try:
                self._con.execute("DELETE FROM outbox WHERE batch_id = ?", [batch_id])
                self._con.execute("DELETE FROM outbox_handed WHERE batch_id = ?", [batch_id])
                if row[1] == "batch":
                    self._con.execute(
                        "UPDATE books SET uploaded = uploaded + ? WHERE tbl = ?", [int(row[2]), row[0]]
                    )
                self._kv_set("last_ack_us", str(now_us))
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
        return True

    def hand_off(self, batch_id: str, due_us: int) -> None:
        """A hub took ``batch_id`` without the root's receipt: keep it, re-send it from ``due_us`` on."""
        with self._lock:
            self._con.execute("BEGIN")
            try:
                self._con.execute("DELETE FROM outbox_handed WHERE batch_id = ?", [batch_id])
                self._con.execute("INSERT INTO outbox_handed VALUES (?, ?)", [batch_id, due_us])
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def handed(self) -> dict[str, int]:
        """Outbox entries handed to a hub without a root receipt: batch id -> when to re-send (us)."""
        with self._lock:
            rows = self._con.execute(
                "SELECT h.batch_id, max(h.due_us) FROM outbox_handed h JOIN outbox o USING (batch_id) "
                "GROUP BY h.batch_id"
            ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def defer(self, batch_id: str, next_try_us: int) -> None:
        """Record a failed attempt and when to try again."""
        with self._lock:
            self._con.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_try = make_timestamptz(?) "
                "WHERE batch_id = ?",
                [next_try_us, batch_id],
            )

    def last_ack_us(self) -> int | None:
        v = self.kv_get("last_ack_us")
        return None if v is None else int(v)

    # ---- queries ---------------------------------------------------------------------------------

    def status(self, now_us: int | None = None) -> dict[str, Any]:
        """Sizes, budgets, backlog, folds and drops (what ``sre-agent telemetry status`` prints)."""
        now_us = _us(self.clock.now()) if now_us is None else now_us
        with self._lock:
            info = status_of(self._con, self.policy, now_us)
        info["file_bytes"] = self.file_bytes()
        return info

    def query(self, sql: str) -> pa.Table:
        """Run SQL on this connection (under the lock) and return an Arrow table."""
        with self._lock:
            return self._con.cursor().sql(sql).to_arrow_table()


def _agg_cols(src: str) -> str:
    if src == "metrics":
        return "count(*)::BIGINT AS c, sum(value) AS s, min(value) AS lo, max(value) AS hi"
    return "sum(count)::BIGINT AS c, sum(sum) AS s, min(min) AS lo, max(max) AS hi"


def _rowcount(cur: duckdb.DuckDBPyConnection) -> int:
    rows = cur.fetchall()
    return int(rows[0][0]) if rows else 0


def _q1(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    """The first row of a query, fully consuming the result (DuckDB 2.0 refuses new work otherwise)."""
    rows = con.execute(sql, params).fetchall() if params is not None else con.execute(sql).fetchall()
    return rows[0] if rows else None


def encode_batch(rows: pa.Table, table_name: str, device_id: str) -> bytes:
    """A sealed batch: the rows plus ``device_id``, zstd Parquet, table/device in the file metadata.

    Deterministic for the same rows, so re-sealing after a crash yields the same id.
    """
    rows = rows.append_column("device_id", pa.array([device_id] * rows.num_rows, pa.string()))
    rows = rows.replace_schema_metadata({"sre.table": table_name, "sre.device": device_id})
    buf = io.BytesIO()
    pq.write_table(rows, buf, compression="zstd", write_statistics=True)
    return buf.getvalue()


def status_of(con: duckdb.DuckDBPyConnection, policy: TelemetryPolicy, now_us: int) -> dict[str, Any]:
    """Sizes, budgets, backlog and books from any connection (read-only is enough)."""
    tables: dict[str, dict[str, Any]] = {}
    books = {
        str(r[0]): r
        for r in con.execute(
            "SELECT tbl, produced, sealed, uploaded, folded, dropped, overflowed, sealed_seq FROM books"
        ).fetchall()
    }
    for name, t in TABLES.items():
        b = books.get(name)
        sealed_seq = int(b[7]) if b else 0
        row = _q1(con, f"SELECT count(*), count(*) FILTER (WHERE seq > ?) FROM {name}", [sealed_seq])  # noqa: S608
        blocks = _q1(
            con,
            "SELECT count(DISTINCT block_id) FROM pragma_storage_info(?) WHERE persistent AND block_id >= 0",
            [name],
        )
        tables[name] = {
            "class": t.cls,
            "rows": int(row[0]),
            "unsealed": int(row[1]),
            "bytes": int(blocks[0]) * BLOCK_BYTES,
            **(
                {k: int(b[i]) for i, k in enumerate(_BOOK_FIELDS, start=1)}
                if b
                else dict.fromkeys(_BOOK_FIELDS, 0)
            ),
        }
    ob = _q1(con, "SELECT count(*), coalesce(sum(bytes), 0), min(epoch_us(created)) FROM outbox")
    last_ack = _q1(con, "SELECT v FROM kv WHERE k = 'last_ack_us'")
    stop = _q1(con, "SELECT v FROM kv WHERE k = 'stop_nonessential'")
    budgets = {
        "total_bytes": policy.total_bytes,
        "metrics": policy.metrics.bytes,
        "logs": policy.logs.bytes,
        "events": policy.events.bytes,
        "records": policy.records.bytes,
        "essential_reserved": policy.essential.reserved_bytes,
        "outbox": policy.outbox.bytes,
    }
    return {
        "tables": tables,
        "budgets": budgets,
        "backlog": {
            "outbox_batches": int(ob[0]),
            "outbox_bytes": int(ob[1]),
            "oldest_unacked_age_s": None if ob[2] is None else (now_us - int(ob[2])) / 1e6,
            "unsealed_rows": sum(t["unsealed"] for t in tables.values()),
            "since_last_ack_s": None if last_ack is None else (now_us - int(last_ack[0])) / 1e6,
        },
        "drops": {n: t["dropped"] for n, t in tables.items() if t["dropped"]},
        "folds": {n: t["folded"] for n, t in tables.items() if t["folded"]},
        "stop_nonessential": stop is not None and stop[0] == "1",
    }
