"""Hub at fleet scale: CPU per conditional poll and per device report at 1k/10k/100k devices in the
database, and lake query time before/after compaction. Prints one JSON object.

Usage: ``python benchmarks/fleet.py [--sizes 1000,10000,100000] [--reports 300] [--day-devices 10000]
[--uploads-per-device 1] [--rows-per-upload 60]``

- poll: ``GET /metadata/timestamp.json`` with ``If-None-Match`` (304) through the hub's ASGI app;
- report: ``RolloutService.observe`` of a device report while a rollout runs (counters + gate check),
  the population bulk-inserted first (reports table and the rollout's seeded counters);
- devices per core at one poll a minute and one upload an hour:
  ``1 / (cpu_poll / 60 + cpu_report / 3600)``;
- query: a ``GROUP BY device_id`` over one day of the metrics lake as landing leaves it (one file per
  upload: ``--day-devices`` devices x ``--uploads-per-device`` uploads, rows spread over the day), then
  after ``compact``, with the ratio. The default (10k devices, one upload each: 10k files, 600k rows)
  fits a loaded 2-core box; ``--uploads-per-device 24`` is the full hourly day (240k files).

``--tiers [--sites 4 --per-site 50 --artifact-kib 256]`` runs the tiered-fleet simulation instead
(tests/fleet_tiers.py: a root hub, regional hubs, in-process devices, site uplinks up 20 % of the rounds)
and prints its figures: bytes over the root<->regional links per release and per recall, artifact copies
per site, the no-tier baseline (every device pulling from the root) and the ratio, rounds to converge
with each site's uplink cut once its regional hub served the new state, telemetry landed exactly once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa


def _report(dev: str, version: str) -> dict[str, object]:
    return {"device_id": dev, "channel": "stable", "safe_mode": False, "last_sync": None,
            "modules": {"clf": {"version": version, "phase": "idle", "bad": []}}, "ledger": {}}  # fmt: skip


def bench_reports(root: Path, n: int, reports: int) -> dict[str, float]:
    from deployment.manifest import ModuleManifest
    from hub.repository import HubRepository
    from hub.rollouts import RolloutService, RolloutSpec
    from hub.store import open_store
    from hub.store._schema import reports as reports_t
    from sre_core.clock import FakeClock

    clock = FakeClock()
    repo = HubRepository.init(root / "repo", channels=("stable",), clock=clock)
    for v in ("1.0", "2.0"):
        f = root / f"clf-{v}.bin"
        f.write_bytes(v.encode())
        repo.publish("stable", f, ModuleManifest(name="clf", version=v, mode="file", filename="m.bin"))
    repo.release("stable", "clf", "1.0")
    store = open_store(f"sqlite:///{root / 'hub.db'}")
    at = clock.now().isoformat()
    with store.tx() as conn:
        rows = [
            {"device_id": f"d{i:06d}", "channel": "stable", "received_at": at,
             "body": json.dumps({**_report(f"d{i:06d}", "1.0"), "received_at": at})}
            for i in range(n)
        ]  # fmt: skip
        for i in range(0, n, 20_000):
            conn.execute(reports_t.insert(), rows[i : i + 20_000])
    svc = RolloutService(repo, clock=clock, store=store)
    svc.start(
        RolloutSpec(
            channel="stable", module="clf", version="2.0", waves=[1, 100], soak_s=10**6, min_devices=10**6
        )
    )  # fmt: skip  (gates never pass: we time the steady state)
    t0 = time.process_time()
    for k in range(reports):
        svc.observe(_report(f"d{(k * 7919) % n:06d}", "2.0" if k % 2 else "1.0"))
    cpu = (time.process_time() - t0) / reports
    return {"cpu_per_report_ms": round(cpu * 1000, 3)}


def bench_poll(root: Path, polls: int) -> float:
    """CPU of the hub app answering a conditional poll (304), driven as ASGI (no HTTP client in the
    measured process; a server's HTTP parsing adds to this, a CDN in front removes it)."""
    import asyncio

    from hub.repository import HubRepository
    from hub.server import build_hub_app

    repo = HubRepository.init(root / "prepo", channels=("stable",))
    app = build_hub_app(repo.dir)

    async def call(headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[bytes, bytes]]:
        got: dict[str, object] = {}
        sent: list[int] = []

        async def receive() -> dict[str, object]:
            if sent:  # the client never disconnects: wait until the app is done with us
                await asyncio.Event().wait()
            sent.append(1)
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg: dict[str, object]) -> None:
            if msg["type"] == "http.response.start":
                got["status"], got["headers"] = msg["status"], dict(msg["headers"])  # type: ignore[call-overload]

        scope = {"type": "http", "method": "GET", "path": "/metadata/timestamp.json", "raw_path": b"",
                 "query_string": b"", "headers": headers, "http_version": "1.1", "scheme": "http",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}  # fmt: skip
        await app(scope, receive, send)  # type: ignore[arg-type]
        return int(got["status"]), got["headers"]  # type: ignore[call-overload, return-value]

    async def run() -> float:
        _, hdrs = await call([])
        cond = [(b"if-none-match", hdrs[b"etag"])]
        t0 = time.process_time()
        for _ in range(polls):
            status, _ = await call(cond)
            if status != 304:
                raise RuntimeError(f"expected 304, got {status}")
        return (time.process_time() - t0) / polls

    return asyncio.run(run())


def bench_query(root: Path, devices: int, uploads: int, rows: int) -> dict[str, object]:
    """A day of uploads from ``devices`` devices into the metrics lake, queried before and after compaction.

    Each device uploads ``uploads`` times a day, evenly spaced and phased by device, each upload carrying
    its ``rows`` metric rows spread over the interval since the previous upload: the day partition ends
    with ``devices * uploads`` files and rows spread over the whole day, as landing writes them.
    """
    from hub.lake import Lake

    lake = Lake(str(root / "lake"))
    day = datetime(2026, 12, 1, tzinfo=UTC)
    period = 86_400 / uploads
    t0 = time.perf_counter()
    for d in range(devices):
        dev = f"d{d:05d}"
        for u in range(uploads):
            start = (u * period + (d * 7.919) % period) % 86_400
            ts = [day + timedelta(seconds=int(start + k * period / rows) % 86_400) for k in range(rows)]
            lake.write("metrics", f"{dev}-{u:03d}", pa.table({
                "seq": pa.array(range(u * rows, (u + 1) * rows), pa.int64()),
                "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
                "name": ["serving.latency_p95_s"] * rows, "series": [""] * rows,
                "value": pa.array([0.01 * k for k in range(rows)], pa.float64()), "device_id": [dev] * rows,
            }))  # fmt: skip
    land_s = time.perf_counter() - t0
    sql = (
        "SELECT device_id, count(*), avg(value), max(value) FROM metrics "
        "WHERE date = DATE '2026-12-01' AND ts >= TIMESTAMPTZ '2026-12-01 06:00:00+00' GROUP BY 1"
    )

    def q() -> tuple[float, int]:
        con = lake.connect()
        con.execute("SET enable_progress_bar = false")
        t = time.perf_counter()
        n = len(con.sql(sql).fetchall())
        dt = time.perf_counter() - t
        con.close()
        return dt, n

    files_before = len(lake.files("metrics"))
    before, groups = q()  # one run: over many thousand files it is the slow part of the benchmark
    t0 = time.perf_counter()
    lake.compact(max_files=1)
    compact_s = time.perf_counter() - t0
    after, groups_after = min(q() for _ in range(3))
    if groups_after != groups:
        raise RuntimeError(f"compaction changed the answer: {groups} vs {groups_after} devices")
    return {
        "scale": f"{devices} devices x {uploads} uploads/day x {rows} rows (one file per upload)",
        "files_before": files_before, "files_after": len(lake.files("metrics")),
        "rows": devices * uploads * rows, "land_s": round(land_s, 1),
        "query_s_before": round(before, 4), "query_s_after": round(after, 4),
        "speedup_before_vs_after": round(before / after, 1), "compact_s": round(compact_s, 2),
    }  # fmt: skip


def bench_tiers(sites: int, per_site: int, artifact_kib: int, seed: int) -> dict[str, object]:
    import importlib
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    tiers = importlib.import_module("fleet_tiers")  # the simulation lives with the tests that use it

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # many fsyncs per round
    tmp = Path(tempfile.mkdtemp(prefix="fleet-tiers-", dir=base))
    t0 = time.perf_counter()
    try:
        with tiers.TieredSim(
            tmp, sites=sites, per_site=per_site, artifact_bytes=artifact_kib * 1024, seed=seed
        ) as sim:
            out: dict[str, object] = tiers.run_scenario(sim, max_rounds=80)
            out["total_rounds"] = sim.rounds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiers", action="store_true", help="run the tiered-fleet simulation instead")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--per-site", type=int, default=50)
    ap.add_argument("--artifact-kib", type=int, default=256)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--reports", type=int, default=300)
    ap.add_argument("--polls", type=int, default=500)
    ap.add_argument("--day-devices", type=int, default=10_000, help="devices uploading into the day")
    ap.add_argument(
        "--uploads-per-device", type=int, default=1, help="uploads per device per day (24: hourly)"
    )
    ap.add_argument("--rows-per-upload", type=int, default=60)
    args = ap.parse_args()
    if args.tiers:
        print(json.dumps(bench_tiers(args.sites, args.per_site, args.artifact_kib, args.seed)))
        return
    out: dict[str, object] = {"backend": "sqlite (embedded default)", "per_size": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        poll = bench_poll(root, args.polls)
        out["cpu_per_conditional_poll_ms"] = round(poll * 1000, 3)
        per: dict[str, dict[str, float]] = {}
        for n in [int(x) for x in args.sizes.split(",")]:
            d = root / f"n{n}"
            d.mkdir()
            r = bench_reports(d, n, args.reports)
            cpu_r = float(r["cpu_per_report_ms"]) / 1000
            r["devices_per_core"] = float(int(1 / (poll / 60 + cpu_r / 3600)))
            per[str(n)] = r
        out["per_size"] = per
        sizes = sorted(per, key=int)
        first, last = per[sizes[0]], per[sizes[-1]]
        out["report_cost_ratio_largest_vs_smallest"] = round(
            float(last["cpu_per_report_ms"]) / float(first["cpu_per_report_ms"]),
            2,  # type: ignore[index]
        )
        out["goal_devices_per_core"] = 50_000
        out["query"] = bench_query(root, args.day_devices, args.uploads_per_device, args.rows_per_upload)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
