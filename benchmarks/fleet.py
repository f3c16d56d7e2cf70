"""Hub at fleet scale: CPU per conditional poll and per device report at 1k/10k/100k devices in the
database, and lake query time before/after compaction. Prints one JSON object.

Usage: ``python benchmarks/fleet.py [--sizes 1000,10000,100000] [--files 4000] [--reports 300]``

- poll: ``GET /metadata/timestamp.json`` with ``If-None-Match`` (304) through the hub's ASGI app;
- report: ``RolloutService.observe`` of a device report while a rollout runs (counters + gate check),
  the population bulk-inserted first (reports table and the rollout's seeded counters);
- devices per core at one poll a minute and one upload an hour:
  ``1 / (cpu_poll / 60 + cpu_report / 3600)``;
- query: ``count(*) ... GROUP BY`` over the metrics lake with one file per upload (``--files`` uploads
  of a 10k-device fleet's day, scaled down to fit a loaded 2-core box), then after ``compact``.
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


def bench_query(root: Path, files: int) -> dict[str, float]:
    from hub.lake import Lake

    lake = Lake(str(root / "lake"))
    day = datetime(2026, 12, 1, tzinfo=UTC)
    for i in range(files):
        dev = f"d{i % 10_000:05d}"
        ts = [day + timedelta(seconds=(i * 17 + k) % 86_000) for k in range(60)]
        lake.write("metrics", f"b{i:06d}", pa.table({
            "seq": pa.array(range(60), pa.int64()), "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "name": ["serving.latency_p95_s"] * 60, "series": [""] * 60,
            "value": pa.array([0.01 * k for k in range(60)], pa.float64()), "device_id": [dev] * 60,
        }))  # fmt: skip
    sql = "SELECT device_id, count(*), avg(value) FROM metrics WHERE date = DATE '2026-12-01' GROUP BY 1"

    def q() -> float:
        con = lake.connect()
        t0 = time.perf_counter()
        con.sql(sql).fetchall()
        dt = time.perf_counter() - t0
        con.close()
        return dt

    before = min(q() for _ in range(2))
    t0 = time.perf_counter()
    lake.compact(max_files=1)
    compact_s = time.perf_counter() - t0
    after = min(q() for _ in range(3))
    return {
        "files_before": files, "files_after": len(lake.files("metrics")),
        "query_s_before": round(before, 4), "query_s_after": round(after, 4),
        "speedup": round(before / after, 1), "compact_s": round(compact_s, 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--reports", type=int, default=300)
    ap.add_argument("--polls", type=int, default=500)
    ap.add_argument("--files", type=int, default=4000)
    args = ap.parse_args()
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
        out["query"] = bench_query(root, args.files)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
