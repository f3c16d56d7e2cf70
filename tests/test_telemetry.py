"""Telemetry store, batched writer and budgets on a real DuckDB file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from telemetry_support import log_columns, metric_columns, small_policy

from sre_agent.telemetry import (
    OVERFLOW_SERIES,
    TABLES,
    Store,
    TableStats,
    TelemetryLockedError,
    TelemetryWriter,
    plan_enforcement,
)
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock
from sre_core.telemetry import TelemetrySink


def _us(clock: FakeClock) -> int:
    return int(clock.now().timestamp() * 1_000_000)


def test_writer_is_a_sink_and_commits_in_batches(tmp_path: Path, clock: FakeClock) -> None:
    store = Store(tmp_path / "t.duckdb", small_policy(), clock, "dev-a")
    writer = TelemetryWriter(store, enforce=False)
    assert isinstance(writer, TelemetrySink)
    writer.start()
    for i in range(2500):
        writer.metric("latency_ms", float(i), {"slot": "a", "model": "m"})
    writer.event("flip", "slot b active", "info", {"from": "a"})
    writer.record("verification_results", {"check": "model.golden", "ok": True})
    writer.record("escalations", {"what": "chaos refused"})
    writer.log("debug", "serving", "hello")
    audit = AuditLog(tmp_path / "audit.jsonl", clock, mirror=writer.audit_mirror)
    audit.append("install", module="m", version="2")
    writer.flush()
    writer.stop()
    # 2,505 rows arrived through a handful of commits, not one per row.
    assert writer.stats.rows_written == 2505
    assert writer.stats.flushes <= 5
    got = store.query("SELECT count(*) AS n, min(series) AS s FROM metrics").to_pylist()[0]
    assert got == {"n": 2500, "s": "model=m,slot=a"}
    audit_rows = store.query("SELECT event, hash FROM audit").to_pylist()
    assert audit_rows == [{"event": "install", "hash": audit.head()}]
    body = store.query("SELECT body FROM verification_results").to_pylist()[0]["body"]
    assert json.loads(body)["check"] == "model.golden"
    books = store.books()
    assert all(b.balanced for b in books.values())
    assert books["metrics"].produced == 2500
    # A record for a table that does not exist never raises into the caller; it is kept as an event.
    writer.record("no_such_table", {"x": 1})
    writer.flush()
    kept = store.query("SELECT attrs FROM events WHERE kind = 'telemetry.unknown_record'").to_pylist()
    assert json.loads(kept[0]["attrs"]) == {"table": "no_such_table", "row": {"x": 1}}
    store.close()


def test_series_cap_routes_new_label_sets_to_overflow(tmp_path: Path, clock: FakeClock) -> None:
    store = Store(tmp_path / "t.duckdb", small_policy(metrics={"series_per_metric": 3}), clock)
    writer = TelemetryWriter(store, enforce=False)
    for i in range(6):
        writer.metric("req", 1.0, {"path": f"/p{i}"})
    writer.metric("other", 1.0, {"path": "/x"})
    writer.flush()
    rows = store.query(
        "SELECT name, series, count(*) AS n FROM metrics GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    assert {"name": "req", "series": OVERFLOW_SERIES, "n": 3} in rows
    assert len([r for r in rows if r["name"] == "req"]) == 4
    assert store.books()["metrics"].overflowed == 3
    # The cap survives a restart (known series are reloaded).
    store.close()
    store = Store(tmp_path / "t.duckdb", small_policy(metrics={"series_per_metric": 3}), clock)
    writer = TelemetryWriter(store, enforce=False)
    writer.metric("req", 1.0, {"path": "/p9"})
    writer.metric("req", 1.0, {"path": "/p0"})
    writer.flush()
    assert store.books()["metrics"].overflowed == 4
    store.close()


def test_rollups_preserve_count_sum_min_max(tmp_path: Path, clock: FakeClock) -> None:
    policy = small_policy(metrics={"raw_max_age_s": 600, "minute_max_age_s": 7200})
    store = Store(tmp_path / "t.duckdb", policy, clock)
    writer = TelemetryWriter(store, enforce=False)
    start = _us(clock)
    data = metric_columns(start, 3 * 3600, series=4)
    writer.write_table("metrics", data)
    writer.flush()
    clock.advance(3 * 3600)
    report = store.enforce()
    books = store.books()
    assert books["metrics"].folded == report.folded["metrics"] > 0
    assert books["metrics_1m"].folded == report.folded["metrics_1m"] > 0
    # Every raw sample is either still raw or counted inside exactly one rollup row.
    q = """
        SELECT (SELECT count(*) FROM metrics WHERE name LIKE 'm%')
             + (SELECT sum(count) FROM metrics_1m WHERE name LIKE 'm%')
             + (SELECT sum(count) FROM metrics_1h WHERE name LIKE 'm%') AS n,
               (SELECT sum(value) FROM metrics WHERE name LIKE 'm%')
             + (SELECT sum(sum) FROM metrics_1m WHERE name LIKE 'm%')
             + (SELECT sum(sum) FROM metrics_1h WHERE name LIKE 'm%') AS s,
               (SELECT max(max) FROM metrics_1h) AS hi, (SELECT min(min) FROM metrics_1h) AS lo
    """
    got = store.query(q).to_pylist()[0]
    values = data.column("value").to_pylist()
    assert got["n"] == data.num_rows
    assert got["s"] == pytest.approx(sum(values), rel=1e-9)
    assert got["hi"] <= max(values) and got["lo"] >= min(values)
    # The fold counters are metrics too.
    counters = store.query(
        "SELECT value FROM metrics WHERE name = 'telemetry.rows_folded' AND series = 'table=metrics'"
    ).to_pylist()
    assert counters[-1]["value"] == books["metrics"].folded
    assert all(b.balanced for b in books.values())
    store.close()


def test_logs_drop_oldest_debug_first_and_count_it(tmp_path: Path, clock: FakeClock) -> None:
    policy = small_policy(logs={"bytes": 1 << 20})
    store = Store(tmp_path / "t.duckdb", policy, clock)
    writer = TelemetryWriter(store, enforce=False)
    writer.write_table("logs", log_columns(_us(clock), 600, per_s=400))
    writer.flush()
    report = store.enforce()
    rows = store.query("SELECT level, count(*) AS n FROM logs GROUP BY level").to_pylist()
    left = {r["level"]: r["n"] for r in rows}
    assert report.dropped["logs"] == store.books()["logs"].dropped > 0
    assert left.get("debug", 0) == 0  # debug went first...
    assert left["error"] == 240_000 // 8  # ...errors were never touched
    assert store.books()["logs"].balanced
    store.close()


def test_essential_data_is_never_dropped_and_full_reserve_raises_incident(
    tmp_path: Path, clock: FakeClock
) -> None:
    policy = small_policy(essential={"reserved_bytes": 1 << 20}, events={"bytes": 1 << 20, "max_age_s": 3600})
    store = Store(tmp_path / "t.duckdb", policy, clock)
    writer = TelemetryWriter(store, enforce=False)
    for i in range(30_000):
        writer.record("escalations", {"i": i, "context": os.urandom(100).hex()})
    writer.flush()
    clock.advance(timedelta(days=90))
    report = store.enforce()
    assert store.query("SELECT count(*) AS n FROM escalations").to_pylist()[0]["n"] == 30_000
    assert store.books()["escalations"].dropped == 0
    assert report.stop_nonessential and store.stop_nonessential
    ev = store.query("SELECT kind, severity FROM events").to_pylist()
    assert {"kind": "telemetry.essential_full", "severity": "critical"} in ev
    store.close()


def test_backpressure_sheds_non_essential_and_counts_it(tmp_path: Path, clock: FakeClock) -> None:
    store = Store(tmp_path / "t.duckdb", small_policy(writer={"max_buffer_rows": 100}), clock)
    writer = TelemetryWriter(store, enforce=False)
    for i in range(150):
        writer.metric("x", float(i))
    for i in range(20):
        writer.record("escalations", {"i": i})
    writer.flush()
    books = store.books()
    assert books["metrics"].produced == 150
    assert books["metrics"].dropped == 50
    assert books["escalations"].produced == books["escalations"].unsealed == 20
    assert all(b.balanced for b in books.values())
    store.close()


def test_second_process_gets_a_clear_locked_error(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "t.duckdb"
    Store(db, small_policy(), clock).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import duckdb, sys, time
                con = duckdb.connect({str(db)!r})
                print("held", flush=True)
                sys.stdin.readline()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TelemetryLockedError) as err:
            Store(db, small_policy(), clock)
        assert "daemon" in err.value.message
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


def test_plan_prefers_rollups_and_local_copies_over_drops() -> None:
    policy = small_policy(metrics={"bytes": 4 << 20})
    now = 10 * 86400 * 1_000_000
    hour = 3600 * 1_000_000

    def st(name: str, rows: int = 0, unsealed: int = 0, size: int = 0, lo: int | None = None) -> TableStats:
        return TableStats(name, rows, unsealed, size, lo, None if lo is None else now)

    names = [*TABLES, "outbox"]
    base = {n: st(n) for n in names}
    # Over budget with only unsealed raw data: fold sooner, never drop.
    stats = {**base, "metrics": st("metrics", 1000, 1000, 8 << 20, now - 2 * hour)}
    plan = plan_enforcement(stats, now, policy)
    assert plan.folds and not plan.drop_before
    assert plan.folds[0].src == "metrics" and plan.folds[0].cutoff_us > now - 2 * hour
    # Over budget with sealed copies present: remove those first, nothing folded or dropped.
    stats = {**base, "metrics": st("metrics", 1000, 400, 8 << 20, now - hour)}
    plan = plan_enforcement(stats, now, policy)
    assert plan.remove_sealed_before == {"metrics": now + 1} and not plan.folds
    # Within budget and young: nothing to do.
    stats = {**base, "metrics": st("metrics", 10, 10, 1 << 20, now - 60_000_000)}
    assert plan_enforcement(stats, now, policy).empty


def test_byte_pressure_folds_sooner_and_keeps_metrics_within_budget(tmp_path: Path, clock: FakeClock) -> None:
    budget = 2 << 20
    store = Store(tmp_path / "t.duckdb", small_policy(metrics={"bytes": budget}), clock)
    writer = TelemetryWriter(store, enforce=False)
    for _ in range(4):
        writer.write_table("metrics", metric_columns(_us(clock), 3600, 50))
        writer.flush()
        clock.advance(3600)
        report = store.enforce()
        metric_bytes = sum(report.bytes_after[t] for t in ("metrics", "metrics_1m", "metrics_1h"))
        assert metric_bytes <= budget
    books = store.books()
    # Pressure was relieved by folding (well before raw_max_age_s), not by dropping samples.
    assert books["metrics"].folded > 0 and books["metrics"].dropped == 0
    total = store.query(
        "SELECT (SELECT count(*) FROM metrics WHERE name SIMILAR TO 'm[0-9]') "
        "+ (SELECT coalesce(sum(count), 0) FROM metrics_1m WHERE name SIMILAR TO 'm[0-9]') "
        "+ (SELECT coalesce(sum(count), 0) FROM metrics_1h WHERE name SIMILAR TO 'm[0-9]') AS n"
    ).to_pylist()[0]["n"]
    assert total == 4 * 3600 * 50
    assert all(b.balanced for b in books.values())
    store.close()


def test_store_status_reports_sizes_backlog_and_books(tmp_path: Path, clock: FakeClock) -> None:
    store = Store(tmp_path / "t.duckdb", small_policy(), clock, "dev-s")
    writer = TelemetryWriter(store, enforce=False)
    writer.write_table("metrics", metric_columns(_us(clock), 60, 10))
    writer.flush()
    store.seal()
    clock.advance(120)
    info = store.status()
    assert info["tables"]["metrics"]["produced"] == 600 and info["tables"]["metrics"]["sealed"] == 600
    assert info["backlog"]["outbox_batches"] == 1 and info["backlog"]["oldest_unacked_age_s"] == 120
    assert info["file_bytes"] > 0 and info["budgets"]["metrics"] == store.policy.metrics.bytes
    store.close()
