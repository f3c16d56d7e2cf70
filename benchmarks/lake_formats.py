"""The fleet lake as Hive Parquet plus compaction (hub/lake.py) against Apache Iceberg (pyiceberg with
its SQL catalog in a hub-style SQLite database): the same uploads landed in both, one JSON object out.

Usage: ``python benchmarks/lake_formats.py [--uploads 200] [--rows 60] [--devices 1000]``
(the Iceberg half needs ``pip install 'pyiceberg[sql-sqlite,pyarrow,pyiceberg-core]'``, in a separate
environment: the hub does not depend on it; without it only the Hive half runs).

Per format: wall and CPU per landed upload (first and last tenth of the run, to show growth), files
on disk and data files a query must read, query time (``GROUP BY device_id`` over one day, through
DuckDB; for Iceberg the scan is planned by pyiceberg and DuckDB reads the planned files, as an engine
would) before and after compaction, and compaction time (Hive: ``Lake.compact``; Iceberg: one
``overwrite`` commit of the day's rows, as pyiceberg has no ``rewrite_data_files``). Ratios are
Iceberg / Hive, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

DAY = datetime(2026, 12, 1, tzinfo=UTC)
SKIPPED = "pyiceberg is not installed: pip install 'pyiceberg[sql-sqlite,pyarrow,pyiceberg-core]'"
SQL = "SELECT device_id, count(*), avg(value) FROM {src} WHERE ts >= TIMESTAMPTZ '{lo}' GROUP BY 1"


def uploads(n: int, rows: int, devices: int) -> list[pa.Table]:
    """``n`` uploads of one device's ``rows`` metric rows each, spread over one UTC day."""
    out = []
    for i in range(n):
        start = (i * 86_400 // n) % 86_400
        ts = [DAY + timedelta(seconds=start + k) for k in range(rows)]
        out.append(pa.table({
            "seq": pa.array(range(rows), pa.int64()), "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "name": ["serving.latency_p95_s"] * rows, "series": [""] * rows,
            "value": pa.array([0.01 * k for k in range(rows)], pa.float64()),
            "device_id": [f"d{i % devices:05d}"] * rows,
        }))  # fmt: skip
    return out


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def _land(batches: list[pa.Table], land: Callable[[int, pa.Table], None]) -> dict[str, float]:
    walls, cpus = [], []
    for i, b in enumerate(batches):
        w, c, _ = _timed(lambda i=i, b=b: land(i, b))  # type: ignore[misc]
        walls.append(w)
        cpus.append(c)
    tenth = max(1, len(batches) // 10)
    return {
        "land_ms_per_upload": round(1000 * sum(walls) / len(walls), 2),
        "land_cpu_ms_per_upload": round(1000 * sum(cpus) / len(cpus), 2),
        "land_ms_first_tenth": round(1000 * sum(walls[:tenth]) / tenth, 2),
        "land_ms_last_tenth": round(1000 * sum(walls[-tenth:]) / tenth, 2),
    }


def _files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def _query(files: list[str]) -> tuple[float, int]:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    src = "read_parquet([" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "])"
    t = time.perf_counter()
    n = len(con.sql(SQL.format(src=src, lo=DAY + timedelta(hours=6))).fetchall())
    dt = time.perf_counter() - t
    con.close()
    return dt, n


def bench_hive(root: Path, batches: list[pa.Table]) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from hub.lake import Lake

    lake = Lake(str(root / "hive"))

    def land(i: int, b: pa.Table) -> None:
        lake.write("metrics", f"u{i:06d}", b)  # what landing one upload writes: one file per day touched

    out: dict[str, Any] = _land(batches, land)
    out["files_on_disk_before"] = _files(root / "hive")
    out["data_files_before"] = len(lake.files("metrics"))
    out["query_s_before"], groups = min(_query(lake.files("metrics")) for _ in range(3))
    out["compact_s"], _, _ = _timed(lambda: lake.compact(max_files=1))
    out["files_on_disk_after"] = _files(root / "hive")
    out["query_s_after"], groups_after = min(_query(lake.files("metrics")) for _ in range(3))
    out["devices_seen"] = [groups, groups_after]
    return _rounded(out)


def bench_iceberg(root: Path, batches: list[pa.Table]) -> dict[str, Any]:
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.expressions import GreaterThanOrEqual
    from pyiceberg.transforms import DayTransform

    wh = root / "iceberg"
    wh.mkdir()
    catalog = SqlCatalog("hub", uri=f"sqlite:///{root / 'hub.db'}", warehouse=f"file://{wh}")
    catalog.create_namespace("fleet")
    tbl = catalog.create_table("fleet.metrics", schema=batches[0].schema)
    with tbl.update_spec() as spec:  # partitioned by each row's day, as the Hive layout is
        spec.add_field("ts", DayTransform(), "ts_day")
    out: dict[str, Any] = _land(batches, lambda i, b: tbl.append(b))
    lo = (DAY + timedelta(hours=6)).isoformat()

    def planned() -> list[str]:
        tbl.refresh()
        return [
            t.file.file_path.removeprefix("file://")
            for t in tbl.scan(GreaterThanOrEqual("ts", lo)).plan_files()
        ]

    def query() -> tuple[float, int]:
        w, _, files = _timed(planned)
        q, n = _query(files)
        return w + q, n

    out["files_on_disk_before"] = _files(wh)
    out["data_files_before"] = len(planned())
    out["plan_s_before"], _, _ = _timed(planned)
    out["query_s_before"], groups = min(query() for _ in range(3))

    def compact() -> None:
        day_rows = tbl.scan().to_arrow()
        tbl.overwrite(day_rows)  # one commit: the day's files replaced by one

    out["compact_s"], _, _ = _timed(compact)
    out["files_on_disk_after"] = _files(wh)  # old snapshots keep their files until they are expired
    out["data_files_after"] = len(planned())
    out["query_s_after"], groups_after = min(query() for _ in range(3))
    out["devices_seen"] = [groups, groups_after]
    return _rounded(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uploads", type=int, default=200)
    ap.add_argument("--rows", type=int, default=60)
    ap.add_argument("--devices", type=int, default=1000)
    args = ap.parse_args()
    try:
        import pyiceberg

        version: str | None = pyiceberg.__version__
    except ImportError:  # the hub does not depend on it: measure Hive alone and say so
        version = None
    batches = uploads(args.uploads, args.rows, args.devices)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hive = bench_hive(root, batches)
        ice = bench_iceberg(root, batches) if version else {"skipped": SKIPPED}
    ratio = {
        k: round(ice[k] / hive[k], 2)
        for k in ("land_ms_per_upload", "land_cpu_ms_per_upload", "files_on_disk_before", "query_s_before",
                  "query_s_after", "compact_s")
        if hive.get(k) and k in ice
    }  # fmt: skip
    print(json.dumps({
        "scale": f"{args.uploads} uploads x {args.rows} rows, {args.devices} devices, one day",
        "pyiceberg": version, "catalog": "SqlCatalog on SQLite (the hub database's engine)",
        "hive": hive, "iceberg": ice, "iceberg_over_hive": ratio,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
