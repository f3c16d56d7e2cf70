"""The router's telemetry lands in the real DuckDB writer (every table it writes is a table the store has)."""

from __future__ import annotations

import json
import threading
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


def test_a_model_without_a_canary_has_requests_errors_and_latency_in_duckdb_after_one_flush(
    tmp_path: Path,
) -> None:
    """Steady state: serving telemetry is flushed on a fixed interval whether or not a canary runs."""
    from deployment.router import InferenceError
    from deployment.sample_models import erroring_classifier
    from deployment.serving import ModelRepository, TelemetryFlusher
    from sre_agent.report import collect_device, render_device
    from sre_core.paths import StatePaths

    paths = StatePaths(tmp_path / "state")
    paths.create()
    store = Store(paths.telemetry_db, small_policy(), FakeClock(), "dev-a")
    writer = TelemetryWriter(store, enforce=False)
    writer.start()
    repo = ModelRepository(writer)
    router = repo.add(load_session(erroring_classifier(seed=3), name="clf", version="1.0"))
    flusher = TelemetryFlusher(repo, interval_s=0.05).start()
    try:
        rng = np.random.default_rng(0)
        errors = 0
        for _ in range(200):
            try:
                router.infer({"input": rng.normal(size=(1, 16)).astype(np.float32)})
            except InferenceError:
                errors += 1
        assert 0 < errors < 200
        seen = flusher.flushes
        for _ in range(10_000):  # one more interval: whatever was served before it is now in the sink
            if flusher.flushes >= seen + 2:
                break
            threading.Event().wait(0.01)
        assert flusher.flushes >= seen + 2
        writer.flush()
        rows = store.query(
            "SELECT name, sum(value) AS v FROM metrics WHERE name LIKE 'serving.%' GROUP BY name"
        ).to_pylist()
    finally:
        flusher.stop()
        writer.stop()
    got = {r["name"]: r["v"] for r in rows}
    assert got["serving.requests"] == 200 and got["serving.errors"] == errors
    assert got["serving.latency_p95_s"] > 0
    store.close()
    data = collect_device(paths.root)  # the device report reads and draws them
    drawn = {name for (_t, name, series, _v) in data.metrics if "1.0" in series}
    assert {"serving.requests", "serving.errors", "serving.latency_p95_s"} <= drawn
    assert "inference latency p95" in render_device(data)
