"""Shared helpers for the telemetry / uplink / ingest tests: a real hub on loopback, devices, data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from hub.fleetdb import FleetDB
from hub.ingest import ingest_routes
from hub.server import build_hub_app
from policies.telemetry import TelemetryPolicy
from sre_core.clock import Clock, SystemClock
from sre_core.http_server import ServerThread
from sre_core.identity import DeviceIdentity, load_or_create_identity
from sre_core.paths import StatePaths


@dataclass
class Hub:
    url: str
    fleet: FleetDB
    server: ServerThread


@contextmanager
def running_hub(fleet_dir: Path, clock: Clock | None = None) -> Iterator[Hub]:
    """The real hub app (``build_hub_app``) with our ingest routes, under uvicorn on 127.0.0.1."""
    fleet = FleetDB(fleet_dir, clock or SystemClock())
    app = build_hub_app(fleet_dir.parent, extra_routes=ingest_routes(fleet_dir, clock=clock, fleet=fleet))
    server = ServerThread(app).start()
    try:
        yield Hub(server.url, fleet, server)
    finally:
        server.stop()


def device(root: Path, device_id: str | None = None) -> tuple[StatePaths, DeviceIdentity]:
    paths = StatePaths(root)
    paths.create()
    ident, _ = load_or_create_identity(paths, device_id)
    return paths, ident


def small_policy(**kw: object) -> TelemetryPolicy:
    base: dict[str, object] = {
        "total_bytes": 400 << 20,
        "outbox": {"bytes": 32 << 20, "max_unacked_batches": 1000, "batch_max_rows": 5000},
    }
    base.update(kw)
    return TelemetryPolicy.model_validate(base)


def metric_columns(start_us: int, seconds: int, series: int, hz: int = 1) -> pa.Table:
    """``series`` series sampled at ``hz`` for ``seconds`` from ``start_us``, as the metrics schema."""
    n_t = seconds * hz
    step = 1_000_000 // hz
    ts = start_us + np.repeat(np.arange(n_t, dtype=np.int64) * step, series)
    names = pa.array([f"m{i % 10}" for i in range(series)], pa.string())
    labels = pa.array([f"core={i}" for i in range(series)], pa.string())
    idx = pa.array(np.tile(np.arange(series, dtype=np.int32), n_t))
    values = np.round(np.sin(np.arange(ts.size) / 97.0) * 50 + 50, 1)
    return pa.table(
        {
            "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "name": names.take(idx),
            "series": labels.take(idx),
            "value": pa.array(values, pa.float64()),
        }
    )


def log_columns(start_us: int, seconds: int, per_s: int) -> pa.Table:
    n = seconds * per_s
    ts = start_us + np.arange(n, dtype=np.int64) * (1_000_000 // per_s)
    levels = pa.array(["debug", "info", "debug", "warning", "debug", "error", "info", "debug"])
    return pa.table(
        {
            "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "level": levels.take(pa.array(np.arange(n) % 8)),
            "logger": pa.array(["serving"] * 1).take(pa.array(np.zeros(n, dtype=np.int32))),
            "message": pa.array([f"request {i} handled in {i % 997} ms by worker {i % 4}" for i in range(n)]),
        }
    )


def shifted(template: pa.Table, start_us: int) -> pa.Table:
    """``template`` (built from time 0) moved to start at ``start_us``: cheap repeated data."""
    import pyarrow.compute as pc

    ts = pc.add(template.column("ts").cast(pa.int64()), start_us).cast(pa.timestamp("us", tz="UTC"))
    return template.set_column(template.schema.get_field_index("ts"), "ts", ts)
