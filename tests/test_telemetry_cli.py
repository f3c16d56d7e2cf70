"""`sre-agent telemetry status|query` and `sre-agent uplink flush` as real child processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from telemetry_support import device, metric_columns, running_hub, small_policy

from sre_agent.telemetry import Store, TelemetryWriter
from sre_core.clock import SystemClock


def test_status_query_and_flush(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    paths, ident = device(tmp_path / "dev")
    store = Store(paths.telemetry_db, small_policy(), SystemClock(), ident.device_id)
    w = TelemetryWriter(store, enforce=False)
    w.write_table("metrics", metric_columns(int(time.time() * 1e6), 60, 10))
    w.record("escalations", {"what": "x"})
    w.flush()
    store.close()
    st = str(paths.root)

    r = run_cli("sre-agent", "telemetry", "status", "--state", st, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tables"]["metrics"]["produced"] == 600
    assert info["backlog"]["unsealed_rows"] == 601
    assert info["budgets"]["total_bytes"] > 0

    q = run_cli(
        "sre-agent", "telemetry", "query", "--state", st, "--json", "SELECT count(*) AS n FROM metrics"
    )
    assert json.loads(q.stdout)["rows"] == [{"n": 600}]
    bad = run_cli("sre-agent", "telemetry", "query", "--state", st, "SELECT * FROM nope")
    assert bad.returncode == 2 and "nope" in bad.stderr

    # Hub unreachable: failure, data kept.
    down = run_cli(
        "sre-agent", "uplink", "flush", "--state", st, "--hub", "http://127.0.0.1:9", "--attempts", "1"
    )
    assert down.returncode == 1 and "kept" in down.stderr
    with running_hub(tmp_path / "fleet") as hub:
        hub.fleet.enroll(ident.device_id, ident.public_pem)
        ok = run_cli("sre-agent", "uplink", "flush", "--state", st, "--hub", hub.url, "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["rows"] == 601
    after = json.loads(run_cli("sre-agent", "telemetry", "status", "--state", st, "--json").stdout)
    assert after["tables"]["metrics"]["uploaded"] == 600 and after["backlog"]["outbox_batches"] == 0


def test_commands_say_the_daemon_holds_the_file(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    paths, ident = device(tmp_path / "dev")
    Store(paths.telemetry_db, small_policy(), SystemClock(), ident.device_id).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb,sys; c=duckdb.connect({str(paths.telemetry_db)!r}); "
         "print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = run_cli("sre-agent", "telemetry", "status", "--state", str(paths.root))
        assert r.returncode == 1 and "daemon" in r.stderr
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
