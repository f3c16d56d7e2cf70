"""The telemetry store's memory is bounded by its policy, not by the size of the database file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from telemetry_support import small_policy

from sre_agent.telemetry import Store
from sre_core.clock import FakeClock

MiB = 1 << 20


def _random_logs(rng: np.random.Generator, start: int, n: int) -> pa.Table:
    """``n`` log rows with incompressible 128-character messages (so the file really grows)."""
    messages = [bytes(r).hex() for r in rng.integers(0, 256, size=(n, 64), dtype=np.uint8)]
    return pa.table(
        {
            "ts": pa.array(np.arange(start, start + n, dtype=np.int64)).cast(pa.timestamp("us", tz="UTC")),
            "level": pa.array(["info"] * n),
            "logger": pa.array(["serving"] * n),
            "message": pa.array(messages),
        }
    )


def test_duckdb_cache_stays_within_the_policy_memory_limit(tmp_path: Path, clock: FakeClock) -> None:
    limit = 16 * MiB
    store = Store(tmp_path / "t.duckdb", small_policy(memory_limit_bytes=limit), clock, "dev-a")
    rng = np.random.default_rng(7)
    n = 50_000
    for k in range(6):
        store.append({"logs": _random_logs(rng, k * n, n)})
    store.query("CHECKPOINT")
    # Read every block, as the integrity check does hourly: without a limit DuckDB keeps them all cached.
    store.query("SELECT count(*), sum(hash(COLUMNS(*))) FROM logs")
    assert (tmp_path / "t.duckdb").stat().st_size > limit  # the data really outgrew the limit
    assert store.query("SELECT current_setting('memory_limit') AS m").to_pylist() == [{"m": "16.0 MiB"}]
    used = store.query("SELECT sum(memory_usage_bytes) AS b FROM duckdb_memory()").to_pylist()[0]["b"]
    assert used <= limit
    store.close()


def test_default_policy_bounds_duckdb_memory_below_the_file_cap() -> None:
    policy = small_policy()
    assert policy.memory_limit_bytes == 64 * MiB
    assert policy.memory_limit_bytes < policy.total_bytes
