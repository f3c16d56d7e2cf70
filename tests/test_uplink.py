"""Store-and-forward uplink against a real hub on loopback: retries, Retry-After, priorities, kill -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from telemetry_support import device, log_columns, metric_columns, running_hub, small_policy

from hub.fleetdb import FleetDB
from hub.ingest import ingest_routes
from sre_agent.telemetry import Store, TelemetryWriter
from sre_agent.uplink import RetryPolicy, Uplink, parse_retry_after
from sre_core.clock import FakeClock, SystemClock
from sre_core.http_server import ServerThread, free_port


def _now_clock() -> FakeClock:
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


def _fill(store: Store, start_us: int) -> None:
    w = TelemetryWriter(store, enforce=False)
    w.write_table("metrics", metric_columns(start_us, 120, 50))
    w.write_table("logs", log_columns(start_us, 60, 20))
    for i in range(50):
        w.record("escalations", {"i": i})
    w.flush()


def test_retry_policy_backs_off_with_jitter_and_honours_retry_after() -> None:
    rp = RetryPolicy(base_s=1, factor=2, max_s=60, jitter=0.5)
    rng = random.Random(1)
    delays = [rp.delay(a, None, rng) for a in range(12)]
    assert all(0.5 * min(60, 2**a) <= d <= min(60, 2**a) for a, d in enumerate(delays))
    assert max(delays) <= 60
    assert rp.delay(0, 120.0, rng) == 120.0
    assert rp.delay(0, 10**9, rng) == rp.max_retry_after_s
    assert parse_retry_after("30", 0) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0) == 0.0
    assert parse_retry_after("soon", 0) is None
    with pytest.raises(ValueError):
        RetryPolicy(base_s=0)


def test_link_down_keeps_everything_then_a_window_ships_it_all(tmp_path: Path) -> None:
    clock = _now_clock()
    paths, ident = device(tmp_path / "dev")
    store = Store(paths.telemetry_db, small_policy(), clock, ident.device_id)
    _fill(store, int(clock.now().timestamp() * 1e6))
    dead = Uplink(store, ident, f"http://127.0.0.1:{free_port()}", clock, rng=random.Random(0))
    before = clock.monotonic()
    report = dead.flush(max_attempts=4)
    dead.close()
    assert report.link_down and report.failures == 4 and not report.uploaded
    assert clock.monotonic() - before >= 1 + 2 + 4 - 3.5  # backed off between attempts (jittered)
    assert all(b.balanced for b in store.books().values())
    with running_hub(tmp_path / "fleet", clock) as hub:
        hub.fleet.enroll(ident.device_id, ident.public_pem)
        up = Uplink(store, ident, hub.url, clock)
        report = up.flush()
        up.close()
    assert report.pending_after == 0 and report.refused is None
    books = store.books()
    for b in books.values():
        assert b.produced == b.uploaded + b.folded + b.dropped, b
    assert books["escalations"].uploaded == 50 and books["metrics"].uploaded == 6000
    store.close()


class _Throttled:
    """An ASGI wrapper answering 429 + Retry-After to the first ``n`` uploads."""

    def __init__(self, app: Any, n: int, retry_after: int) -> None:
        self.app, self.n, self.retry_after, self.seen = app, n, retry_after, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.seen < self.n:
            self.seen += 1
            resp = JSONResponse({"error": "busy"}, 429, headers={"retry-after": str(self.retry_after)})
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)


def test_retry_after_is_honoured_and_priority_order_kept(tmp_path: Path) -> None:
    clock = _now_clock()
    paths, ident = device(tmp_path / "dev")
    store = Store(paths.telemetry_db, small_policy(), clock, ident.device_id)
    _fill(store, int(clock.now().timestamp() * 1e6))
    fleet = FleetDB(tmp_path / "fleet", clock)
    fleet.enroll(ident.device_id, ident.public_pem)
    app = _Throttled(Starlette(routes=ingest_routes(tmp_path / "fleet", clock=clock, fleet=fleet)), 2, 90)
    with ServerThread(app) as server:
        up = Uplink(store, ident, server.url, clock, retry=RetryPolicy(base_s=1, max_s=10))
        t0 = clock.monotonic()
        report = up.flush(max_attempts=5)
        up.close()
    assert report.failures == 2 and report.pending_after == 0
    # The policy alone would have waited at most 1 + 2 s; the hub asked for 90 s twice.
    assert clock.monotonic() - t0 >= 180
    tables = [r["table"] for r in fleet.receipts()]  # in arrival order
    assert tables[0] == "escalations"
    assert tables.index("logs") > tables.index("metrics")
    store.close()


_CHILD = textwrap.dedent(
    """
    import sys
    from policies.telemetry import TelemetryPolicy
    from sre_agent.telemetry import Store
    from sre_agent.uplink import Uplink
    from sre_core.clock import SystemClock
    from sre_core.identity import load_identity
    from sre_core.paths import StatePaths

    state, hub_url, mode = sys.argv[1:4]
    paths = StatePaths(state)
    ident = load_identity(paths)
    policy = TelemetryPolicy.model_validate(
        {"outbox": {"batch_max_rows": 300, "max_unacked_batches": 10000}}
    )
    store = Store(paths.telemetry_db, policy, SystemClock(), ident.device_id)
    print("open", flush=True)
    if mode == "seal":
        while store.seal(max_batches=1):
            print("sealed", flush=True)
    else:
        report = Uplink(store, ident, hub_url, SystemClock()).flush()
        print("report", report.to_dict(), flush=True)
    store.close()
    print("done", flush=True)
    """
)


def _child(state: Path, hub_url: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(state), hub_url, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _kill_after_lines(proc: subprocess.Popen[str], word: str, n: int) -> bool:
    """SIGKILL once ``n`` lines starting with ``word`` were printed; False if it finished first."""
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        if line.startswith(word):
            seen += 1
            if seen >= n:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return True
    proc.wait(30)
    return False


@pytest.mark.slow
def test_kill_9_during_sealing_and_upload_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    paths, ident = device(tmp_path / "dev")
    start_us = int(time.time() * 1e6)
    policy = small_policy(outbox={"batch_max_rows": 300, "max_unacked_batches": 10000})
    store = Store(paths.telemetry_db, policy, SystemClock(), ident.device_id)
    w = TelemetryWriter(store, enforce=False)
    w.write_table("metrics", metric_columns(start_us, 300, 20))  # 6,000 rows -> 20 batches
    w.write_table("logs", log_columns(start_us, 50, 20))  # 1,000 rows
    for i in range(400):
        w.record("escalations", {"i": i})
    w.flush()
    produced = {k: b.produced for k, b in store.books().items() if b.produced}
    store.close()

    # kill -9 while sealing, three times at different points.
    for n in (2, 5, 9):
        assert _kill_after_lines(_child(paths.root, "http://127.0.0.1:9", "seal"), "sealed", n)
        with Store(paths.telemetry_db, policy, SystemClock(), ident.device_id) as s:
            assert all(b.balanced for b in s.books().values())

    with running_hub(tmp_path / "fleet") as hub:
        hub.fleet.enroll(ident.device_id, ident.public_pem)
        # kill -9 while uploading: as soon as the hub has stored k more batches.
        for k in (2, 7, 12):
            proc = _child(paths.root, hub.url, "upload")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if len(hub.fleet.receipts()) >= k:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.002)
            assert proc.wait(30) == -signal.SIGKILL  # killed mid-upload, not finished
        final = _child(paths.root, hub.url, "upload")
        out, err = final.communicate(timeout=120)
        assert final.returncode == 0, err
        assert "'pending_after': 0" in out

    with Store(paths.telemetry_db, policy, SystemClock(), ident.device_id) as s:
        books = s.books()
    fleet = FleetDB(tmp_path / "fleet")
    for table, n in produced.items():
        b = books[table]
        assert b.produced == n and b.uploaded == n and b.unsealed == 0 and b.in_outbox == 0, b
        sql = f"SELECT count(*) AS n, count(DISTINCT seq) AS d FROM {table}"  # noqa: S608
        got = fleet.query(sql).to_pylist()[0]
        assert got == {"n": n, "d": n}, table  # every row once: nothing lost, nothing duplicated


def test_telemetry_service_runs_the_writer_and_an_uplink_window(tmp_path: Path) -> None:
    from policies.telemetry import load_telemetry_policy
    from sre_agent.telemetry.service import TelemetryService
    from sre_core.audit import AuditLog

    paths, ident = device(tmp_path / "dev")
    svc = TelemetryService(paths, load_telemetry_policy(), SystemClock(), ident.device_id)
    svc.start()
    try:
        audit = AuditLog(paths.audit_log, SystemClock(), mirror=svc.audit_mirror)
        audit.append("agent.start")
        for i in range(100):
            svc.sink.metric("requests", float(i), {"slot": "a"})
        with running_hub(tmp_path / "fleet") as hub:
            hub.fleet.enroll(ident.device_id, ident.public_pem)
            svc.attest(ident, audit.head(), "telemetry@1", "verified", safe_mode=False)
            report = svc.flush_uplink(ident, hub.url)
            attested = hub.fleet.state(ident.device_id)["attested"]
            rows = hub.fleet.query("SELECT count(*) AS n FROM metrics").to_pylist()[0]["n"]
            audited = hub.fleet.query("SELECT hash FROM audit").to_pylist()
        assert report["pending_after"] == 0 and rows == 100
        assert audited == [{"hash": audit.head()}]
        assert attested["audit_head"] == audit.head() and attested["safe_mode"] is False
    finally:
        svc.stop()
