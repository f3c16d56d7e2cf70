"""The router's telemetry lands in the real DuckDB writer (every table it writes is a table the store has)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deployment.router import Router
from deployment.sample_models import linear_classifier
from deployment.sessions import load_session
from sre_agent.telemetry.store import Store
from sre_agent.telemetry.writer import TelemetryWriter
from sre_core.clock import FakeClock
from tests.telemetry_support import small_policy


def test_router_flush_lands_in_duckdb(tmp_path: Path) -> None:
    store = Store(tmp_path / "t.duckdb", small_policy(), FakeClock(), "dev-a")
    writer = TelemetryWriter(store, enforce=False)
    writer.start()
    try:
        session = load_session(linear_classifier(seed=3), name="clf", version="1.0")
        router = Router("clf", session, sink=writer, seed=1)
        x = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
        for _ in range(50):
            router.infer({"input": x})
        router.flush_telemetry()
        writer.flush()
    finally:
        writer.stop()
    assert writer.stats.rows_written > 0
    rows = store.query("SELECT body FROM serving_latency_histogram").to_pylist()
    assert rows, "latency histograms were not stored"
    hist = json.loads(rows[0]["body"])
    assert sum(hist["counts"].values() if isinstance(hist["counts"], dict) else hist["counts"]) >= 50
    assert all(b.balanced for b in store.books().values())
    store.close()
