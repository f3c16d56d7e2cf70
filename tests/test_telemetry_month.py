"""Thirty days offline at 100 series x 1 Hz plus logs, then one link window: budget, rollups, books."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from telemetry_support import device, log_columns, metric_columns, running_hub, shifted

from hub.fleetdb import FleetDB
from policies.telemetry import load_telemetry_policy
from sre_agent.telemetry import Store, TelemetryWriter
from sre_agent.uplink import Uplink
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock

DAYS = 30
SERIES = 100
STEP_S = 6 * 3600


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_thirty_days_offline_stays_in_budget_and_the_books_balance(tmp_path: Path) -> None:
    # Start 30 days in the past so the hub (real clock) accepts the device's signatures at the end.
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(days=DAYS))
    policy = load_telemetry_policy()
    paths, ident = device(tmp_path / "dev")
    store = Store(paths.telemetry_db, policy, clock, ident.device_id)
    writer = TelemetryWriter(store, enforce=False)
    audit = AuditLog(paths.audit_log, clock, mirror=writer.audit_mirror)
    t0_us = int(clock.now().timestamp() * 1e6)
    sample_rows = 0
    max_file = 0
    hour_metrics = metric_columns(0, 3600, SERIES)
    hour_logs = log_columns(0, 3600, 2)
    for _step in range(DAYS * 86400 // STEP_S):
        start_us = int(clock.now().timestamp() * 1e6)
        # Six hours of samples and logs, written an hour at a time with their own timestamps.
        for h in range(STEP_S // 3600):
            writer.write_table("metrics", shifted(hour_metrics, start_us + h * 3_600_000_000))
            writer.write_table("logs", shifted(hour_logs, start_us + h * 3_600_000_000))
            writer.flush()
        writer.record("escalations", {"what": "link down", "since": str(clock.now())})
        writer.record("verification_results", {"check": "model.golden", "ok": True})
        audit.append("heartbeat", offline=True)
        sample_rows += STEP_S * SERIES
        writer.flush()
        clock.advance(STEP_S)
        store.enforce()
        max_file = max(max_file, store.file_bytes())
        assert store.file_bytes() <= policy.total_bytes
    now_us = int(clock.now().timestamp() * 1e6)

    # Rollups cover the old data: every sample is raw, or counted in exactly one 1 min / 1 h bucket.
    cover = store.query(
        """
        SELECT (SELECT count(*) FROM metrics WHERE name SIMILAR TO 'm[0-9]') AS raw,
               (SELECT coalesce(sum(count), 0) FROM metrics_1m WHERE name SIMILAR TO 'm[0-9]') AS minute,
               (SELECT coalesce(sum(count), 0) FROM metrics_1h WHERE name SIMILAR TO 'm[0-9]') AS hour,
               (SELECT min(epoch_us(ts)) FROM metrics_1h) AS hour_from,
               (SELECT min(epoch_us(ts)) FROM metrics_1m) AS minute_from,
               (SELECT min(epoch_us(ts)) FROM metrics WHERE name SIMILAR TO 'm[0-9]') AS raw_from
        """
    ).to_pylist()[0]
    assert cover["raw"] + cover["minute"] + cover["hour"] == sample_rows
    assert cover["hour_from"] <= t0_us  # the first hour of the month is still there, as 1 h rollups
    assert cover["raw_from"] >= now_us - int(policy.metrics.raw_max_age_s * 1e6) - 60_000_000
    assert cover["minute_from"] >= now_us - int(policy.metrics.minute_max_age_s * 1e6) - 3_600_000_000
    books = store.books()
    assert books["metrics"].folded > 0 and books["metrics_1m"].folded > 0
    assert books["metrics"].dropped == 0  # samples were folded, never dropped
    assert (
        books["escalations"].dropped == books["audit"].dropped == books["verification_results"].dropped == 0
    )

    # The link opens: everything left ships, and the books balance exactly. (The device clock is the
    # real one again: the hub refuses signatures more than 5 minutes off its own clock.)
    clock.set(datetime.now(UTC))
    with running_hub(tmp_path / "fleet") as hub:
        hub.fleet.enroll(ident.device_id, ident.public_pem)
        up = Uplink(store, ident, hub.url, clock)
        for _ in range(10):
            if up.flush().pending_after == 0 and store.books()["metrics"].unsealed == 0:
                break
        up.close()
    books = store.books()
    fleet = FleetDB(tmp_path / "fleet")
    for name, b in books.items():
        assert b.unsealed == 0 and b.in_outbox == 0, b
        assert b.produced == b.uploaded + b.folded + b.dropped, b
        if b.uploaded:
            sql = f"SELECT count(*) AS n, count(DISTINCT seq) AS d FROM {name}"  # noqa: S608
            assert fleet.query(sql).to_pylist()[0] == {"n": b.uploaded, "d": b.uploaded}
    assert books["audit"].uploaded == DAYS * 86400 // STEP_S
    # The drop and fold counters travelled too.
    counters = fleet.query(
        "SELECT max(value) AS v FROM metrics "
        "WHERE name = 'telemetry.rows_folded' AND series = 'table=metrics'"
    ).to_pylist()[0]["v"]
    assert counters is not None and counters > 0
    print(f"\n{DAYS} days: max file {max_file / 2**20:.1f} MiB")
    print([b.to_dict() for b in books.values()])
    store.close()
