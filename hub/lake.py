"""The fleet lake: landed telemetry as Hive-partitioned Parquet on any pyarrow filesystem.

Public API::

    Lake(url)                         a local directory (default) or an object-store URL (``s3://...``)
      .write(table, batch_id, rows) -> list[str]     one file per day the rows fall on
      .writer(table, batch_id, schema) -> LakeWriter  the same, fed record batch by record batch
      .compact(max_files=1, table=None) -> dict       merge each partition's files into one
      .tables() -> list[str] ; .partitions(table) -> list[str] ; .files(table) -> list[str]
      .connect() -> duckdb connection with one view per table

Layout ``table=<t>/date=<YYYY-MM-DD>/<name>.parquet``: DuckDB reads it here, Trino/Spark/ClickHouse read
the same tree on object storage. Each row lands under its *own* UTC day (a batch spanning midnight is
split). Files are written under a hidden temporary name and moved into place, so a reader never sees a
partial file. Compaction writes the merged file first and deletes the inputs after, so a crash in
between leaves duplicates, never a loss; the merged file's name is derived from its inputs, so running
compaction again after such a crash converges (see docs/fleet.md for why Hive + compaction rather than
Iceberg).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import secrets
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["FLUSH_BYTES", "Lake", "LakeWriter"]

FLUSH_BYTES = 8 * 1024 * 1024  # rows buffered (all days together) before they are written out
COMPACT_ROWS = 1_000_000  # rows per row group of a compacted file (and about what compaction holds)


class LakeWriter:
    """Streams one batch's rows into hidden per-day temporary files; :meth:`commit` moves them into place.

    Rows held in memory stay below :data:`FLUSH_BYTES` (all days together, see :attr:`pending_bytes`)
    plus the record batch being written, however many rows come. Nothing is visible before
    :meth:`commit`; :meth:`abort` (or leaving a ``with`` block on an exception) deletes the temporary
    files.
    """

    def __init__(self, lake: Lake, table: str, name: str, schema: pa.Schema) -> None:
        self._lake, self._table, self._name, self._schema = lake, table, name, schema
        self._open: dict[Any, tuple[str, Any, Any, list[pa.RecordBatch], int]] = {}
        self._pending = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of rows written but still buffered in memory (every day's file together)."""
        return self._pending

    def __enter__(self) -> LakeWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()

    def _flush(self, day: Any) -> None:
        tmp, out, w, pending, size = self._open[day]
        if pending:
            w.write_table(pa.Table.from_batches(pending, self._schema))
        self._open[day] = (tmp, out, w, [], 0)
        self._pending -= size

    def write(self, rows: pa.RecordBatch) -> None:
        """Append ``rows`` (with a UTC ``ts`` column, no nulls) under each row's own day."""
        days = pc.cast(rows.column("ts"), pa.date32())
        unique = pc.unique(days).to_pylist()
        for day in unique:
            part = rows if len(unique) == 1 else rows.filter(pc.equal(days, pa.scalar(day, pa.date32())))
            if day not in self._open:
                d = self._lake._p(f"table={self._table}", f"date={day.isoformat()}")
                self._lake.fs.create_dir(d, recursive=True)
                tmp = posixpath.join(d, f".tmp-{secrets.token_hex(8)}")
                out = self._lake.fs.open_output_stream(tmp)
                self._open[day] = (tmp, out, pq.ParquetWriter(out, self._schema, compression="zstd"), [], 0)
            tmp, out, w, pending, size = self._open[day]
            self._open[day] = (tmp, out, w, [*pending, part], size + part.nbytes)
            self._pending += part.nbytes
        if self._pending >= FLUSH_BYTES:
            for day in list(self._open):
                self._flush(day)

    def commit(self) -> list[str]:
        """Close every day's file and move it into place; the relative paths written."""
        written = []
        for day in sorted(self._open):
            self._flush(day)
            _tmp, out, w, _, _ = self._open[day]
            w.close()
            out.close()
        for day in sorted(self._open):
            rel = posixpath.join(f"table={self._table}", f"date={day.isoformat()}", f"{self._name}.parquet")
            self._lake.fs.move(self._open[day][0], self._lake._p(rel))
            written.append(rel)
        self._open.clear()
        self._pending = 0
        return written

    def abort(self) -> None:
        """Drop every temporary file (nothing was visible)."""
        for tmp, out, w, _, _ in self._open.values():
            try:
                w.close()
                out.close()
            finally:
                self._lake.fs.delete_file(tmp)
        self._open.clear()
        self._pending = 0


class Lake:
    """Hive-layout Parquet under ``url`` (a path or a pyarrow filesystem URI such as ``s3://bucket/p``)."""

    def __init__(self, url: str) -> None:
        self.url = str(url)
        if "://" in self.url and not self.url.startswith("file://"):
            fs, root = pafs.FileSystem.from_uri(self.url)
            self.fs: pafs.FileSystem = fs
            self.root = root.rstrip("/")
            self.local = False
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = str(Path(self.url.removeprefix("file://")).resolve())
            self.local = True

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _ls(self, path: str, kind: pafs.FileType) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(i.base_name for i in infos if i.type == kind and not i.base_name.startswith((".", "_")))

    def tables(self) -> list[str]:
        return [n.split("=", 1)[1] for n in self._ls(self.root, pafs.FileType.Directory) if "=" in n]

    def partitions(self, table: str) -> list[str]:
        return self._ls(self._p(f"table={table}"), pafs.FileType.Directory)

    def files(self, table: str) -> list[str]:
        out = []
        for part in self.partitions(table):
            d = self._p(f"table={table}", part)
            out += [posixpath.join(d, f) for f in self._ls(d, pafs.FileType.File) if f.endswith(".parquet")]
        return out

    def _put(self, path: str, rows: pa.Table) -> None:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{secrets.token_hex(8)}")
        with self.fs.open_output_stream(tmp) as out:
            pq.write_table(rows, out, compression="zstd")
        self.fs.move(tmp, path)

    def write(self, table: str, name: str, rows: pa.Table) -> list[str]:
        """Land ``rows`` (with a UTC ``ts`` column, no nulls) as ``<name>.parquet`` in each day's
        partition; returns the relative paths written. Idempotent: the same name overwrites itself."""
        days = pc.cast(rows.column("ts"), pa.date32())
        written = []
        unique = pc.unique(days).to_pylist()
        for day in unique:
            # one day (the usual batch): write the rows as they are, no filtered copy
            part = rows if len(unique) == 1 else rows.filter(pc.equal(days, pa.scalar(day, pa.date32())))
            rel = posixpath.join(f"table={table}", f"date={day.isoformat()}", f"{name}.parquet")
            self._put(self._p(rel), part)
            written.append(rel)
        return written

    def writer(self, table: str, name: str, schema: pa.Schema) -> LakeWriter:
        """A streaming :meth:`write`: feed record batches, then ``commit()`` (see :class:`LakeWriter`)."""
        return LakeWriter(self, table, name, schema)

    def _merge(self, d: str, paths: list[str], out_path: str) -> None:
        """Stream ``paths`` into one file (row groups of about :data:`COMPACT_ROWS`): memory stays near
        one row group however many rows the partition holds."""
        schema = pa.unify_schemas(
            [pq.read_schema(p, filesystem=self.fs) for p in paths], promote_options="default"
        )
        tmp = posixpath.join(d, f".tmp-{secrets.token_hex(8)}")
        try:
            with (
                self.fs.open_output_stream(tmp) as out,
                pq.ParquetWriter(out, schema, compression="zstd") as w,
            ):
                held: list[pa.RecordBatch] = []
                rows = 0
                # an explicit schema: a file lacking a column reads it as nulls
                data = ds.dataset(paths, schema=schema, filesystem=self.fs, format="parquet")
                for rb in data.to_batches():
                    held.append(rb)
                    rows += rb.num_rows
                    if rows >= COMPACT_ROWS:
                        w.write_table(pa.Table.from_batches(held, schema))
                        held, rows = [], 0
                if held:
                    w.write_table(pa.Table.from_batches(held, schema))
        except BaseException:
            self.fs.delete_file(tmp)
            raise
        self.fs.move(tmp, out_path)

    def compact(self, max_files: int = 1, table: str | None = None) -> dict[str, Any]:
        """Merge the files of every partition holding more than ``max_files`` into one file."""
        merged = removed = 0
        for t in [table] if table else self.tables():
            for part in self.partitions(t):
                d = self._p(f"table={t}", part)
                names = [f for f in self._ls(d, pafs.FileType.File) if f.endswith(".parquet")]
                if len(names) <= max(1, max_files):
                    continue
                paths = [posixpath.join(d, f) for f in names]
                digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:40]
                self._merge(d, paths, posixpath.join(d, f"compact-{digest}.parquet"))
                for p in paths:
                    self.fs.delete_file(p)
                merged += 1
                removed += len(paths)
        return {"partitions_merged": merged, "files_removed": removed}

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with one view per table (Hive columns ``date``; ``device_id`` in rows)."""
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        for t in self.tables():
            if not re.match(r"^[a-z][a-z0-9_]{0,62}$", t) or not self.files(t):
                continue
            if self.local:
                glob = self._p(f"table={t}", "*", "*.parquet").replace("'", "''")
                con.execute(
                    f"CREATE VIEW \"{t}\" AS SELECT * FROM read_parquet('{glob}', "  # noqa: S608
                    "hive_partitioning = true, hive_types = {'date': DATE}, union_by_name = true)"
                )
            else:
                data = ds.dataset(self._p(f"table={t}"), filesystem=self.fs, format="parquet",
                                  partitioning="hive")  # fmt: skip
                con.register(f"_arrow_{t}", data)
                con.execute(f'CREATE VIEW "{t}" AS SELECT * FROM "_arrow_{t}"')  # noqa: S608
        return con
