"""The daemon engine: jobs that raise are retried, SIGTERM stops it cleanly, the admin API answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sre_agent.admin import admin_client
from sre_agent.daemon import Daemon, JobSpec
from sre_agent.provision import provision
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock
from sre_core.http_server import free_port
from sre_core.paths import StatePaths


def _wait_for(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_failing_job_is_counted_and_retried_not_fatal(state: StatePaths) -> None:
    calls = {"bad": 0, "good": 0}
    done = threading.Event()

    def bad() -> None:
        calls["bad"] += 1
        raise RuntimeError("boom")

    def good() -> None:
        calls["good"] += 1
        if calls["bad"] >= 3 and calls["good"] >= 3:
            done.set()

    d = Daemon(
        state,
        SystemClock(),
        AuditLog(state.audit_log),
        jobs=[JobSpec("bad", bad, 0.05), JobSpec("good", good, 0.05)],
        heartbeat_interval_s=0.05,
    )
    d.start()
    try:
        assert done.wait(20)
    finally:
        d.stop("test over")
    assert d.stats["bad"].failures >= 3
    assert d.stats["bad"].last_error == "RuntimeError: boom"
    assert d.stats["good"].failures == 0 and d.stats["good"].runs >= 3
    beat = json.loads((state.run / "heartbeat.json").read_text())
    assert beat["jobs"]["bad"]["failures"] >= 3
    events = [r.event for r in AuditLog(state.audit_log).records()]
    assert events[-2:] == ["daemon.started", "daemon.stopped"]


def test_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "dev")
    provision(paths)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRE_AGENT_")}
    env["SRE_AGENT_LLM__ENABLED"] = "false"
    env["SRE_AGENT_SERVING__PORT"] = str(free_port("127.0.0.1"))
    exe = Path(sys.executable).parent / "sre-agent"
    log = (tmp_path / "daemon.log").open("w")  # a file, not a pipe: nobody reads a pipe until exit
    proc = subprocess.Popen(
        [str(exe), "run", "--state", str(paths.root), "--heartbeat", "0.2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        assert _wait_for((paths.run / "heartbeat.json").exists), "no heartbeat"
        client = None
        assert _wait_for(lambda: admin_client(paths) is not None), "admin API did not answer"
        client = admin_client(paths)
        assert client is not None
        assert client.get("/ping").json() == {"ok": True}
        # A request without the token is refused.
        import httpx

        raw = httpx.Client(transport=httpx.HTTPTransport(uds=str(paths.run / "admin.sock")), timeout=5)
        assert raw.get("http://x/ping").status_code == 401
        client.close()
        raw.close()
        # CLI commands reach live data through the daemon while it holds telemetry.duckdb.
        st = subprocess.run(
            [str(exe), "status", "--json", "--state", str(paths.root)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert st.returncode == 0, st.stderr
        daemon = json.loads(st.stdout)["daemon"]
        assert daemon["pid"] == proc.pid and "telemetry" in daemon["services"]
        tel = subprocess.run(
            [str(exe), "telemetry", "status", "--json", "--state", str(paths.root)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert tel.returncode == 0, tel.stderr
        assert "metrics" in json.loads(tel.stdout)["tables"]
        bad = subprocess.run(
            [str(exe), "telemetry", "query", "DROP TABLE metrics", "--state", str(paths.root)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert bad.returncode == 2, bad.stderr
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.close()
    assert rc == 0, (tmp_path / "daemon.log").read_text()[-4000:]
    recs = list(AuditLog(paths.audit_log).records())
    assert recs[-1].event == "daemon.stopped"
    assert recs[-1].data["reason"] == "SIGTERM"
    assert not (paths.run / "admin.sock").exists()
    assert AuditLog(paths.audit_log).verify()[1] is None
    st = subprocess.run(
        [str(exe), "status", "--json", "--state", str(paths.root)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert json.loads(st.stdout)["daemon"] is None
