"""Our Chaos Toolkit actions and probes on real components: slots, a v2 server, the fault proxy, processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from chaos import actions, probes
from chaos.actions import ChaosActionError
from chaos.faultproxy import FaultProxyServer
from chaos.faults import FaultRegistry, SkewedClock, apply_input_noise, input_noise_spec
from chaos.toxiproxy_client import ToxiproxyClient, ToxiproxyUnavailableError
from deployment.sample_models import linear_classifier
from deployment.slots import SlotManager
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock, SystemClock
from sre_core.http_server import free_port
from sre_core.paths import StatePaths
from tests.deploy_helpers import make_artifact

MB = 1024 * 1024


def _cfg(state: StatePaths, **extra: object) -> dict[str, object]:
    return {"state_dir": str(state.root), **extra}


@pytest.fixture
def device(state: StatePaths) -> StatePaths:
    """Module ``classifier``: v2 active, v1 last-known-good standby (real slot manager, real ONNX bytes)."""
    mgr = SlotManager(state, AuditLog(state.audit_log))
    for version, seed in (("1", 1), ("2", 2)):
        art = make_artifact(
            state.cas, "classifier", version, linear_classifier(seed=seed), filename="model.onnx"
        )
        mgr.install(art)
        mgr.flip("classifier")
        mgr.commit("classifier")
    return state


def _slots(state: StatePaths) -> SlotManager:
    return SlotManager(state, AuditLog(state.audit_log))


# --- slots ----------------------------------------------------------------------------------------------


def test_corrupt_standby_is_detectable_and_undone_exactly(device: StatePaths) -> None:
    st = _slots(device).status("classifier")
    assert st.active is not None and st.standby is not None
    standby_file = st.standby.artifact_path
    before = standby_file.read_bytes()
    active_before = st.active.artifact_path.read_bytes()

    out = actions.corrupt_standby_slot("classifier", nbytes=64, configuration=_cfg(device))
    assert out["file"] == str(standby_file)
    after = standby_file.read_bytes()
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 64
    check = _slots(device).verify_slot("classifier", st.standby.slot)
    assert not check.ok, "the slot manager's re-hash detects the corruption"
    assert st.active.artifact_path.read_bytes() == active_before, "the active slot is never touched"
    assert probes.slot_status("classifier", configuration=_cfg(device))["active_slot"] == st.active.slot

    report = actions.clear_faults(configuration=_cfg(device))
    assert report["ok"] and len(report["cleared"]) == 1
    assert standby_file.read_bytes() == before
    assert _slots(device).verify_slot("classifier", st.standby.slot).ok


def test_rollback_drill_flips_and_returns_without_marking_bad(device: StatePaths) -> None:
    original = _slots(device).status("classifier").active
    assert original is not None
    out = actions.rollback_drill("classifier", hold_s=0, configuration=_cfg(device))
    assert out["active"] == original.slot
    st = _slots(device).status("classifier")
    assert st.active is not None and st.active.slot == original.slot and st.bad == {}
    events = [r.event for r in AuditLog(device.audit_log).records()]
    assert events.count("slot.rollback_started") == 2
    assert FaultRegistry(device.root).list() == []


def test_interrupted_drill_is_flipped_back_by_cleanup(device: StatePaths) -> None:
    original = _slots(device).status("classifier").active
    assert original is not None
    reg = FaultRegistry(device.root)
    reg.record(
        "rollback_drill", "classifier", {"kind": "flip_back", "module": "classifier", "slot": original.slot}
    )
    actions._swap(device.root, "classifier", None)  # the drill got this far, then died
    assert _slots(device).status("classifier").active.slot != original.slot  # type: ignore[union-attr]
    assert reg.clear().ok
    assert _slots(device).status("classifier").active.slot == original.slot  # type: ignore[union-attr]


def test_slot_actions_refuse_without_slots(state: StatePaths) -> None:
    with pytest.raises(ChaosActionError, match="slot state"):
        actions.corrupt_standby_slot("ghost", configuration=_cfg(state))
    with pytest.raises(ChaosActionError, match="state directory"):
        actions.corrupt_standby_slot("ghost", configuration={})
    assert FaultRegistry(state.root).list() == []


# --- OS faults ------------------------------------------------------------------------------------------


def test_fill_disk_honours_reserve_and_cap(state: StatePaths) -> None:
    ballast = state.root / "run" / "chaos" / "fill.bin"
    out = actions.fill_disk(reserve_mb=0, max_mb=1, configuration=_cfg(state))
    assert out["bytes"] == MB and ballast.stat().st_size == MB
    assert os.stat(ballast).st_blocks * 512 >= MB, "allocated for real, not sparse"
    actions.clear_faults(configuration=_cfg(state))
    assert not ballast.exists()
    free_mb = shutil.disk_usage(state.root).free / MB
    out = actions.fill_disk(reserve_mb=free_mb * 10, max_mb=100, configuration=_cfg(state))
    assert out["bytes"] == 0, "already below the reserve: nothing is written"
    actions.clear_faults(configuration=_cfg(state))
    with pytest.raises(ChaosActionError):
        actions.fill_disk(reserve_mb=-1, configuration=_cfg(state))


def test_stress_cpu_workers_run_stop_by_themselves_and_are_killed_on_cleanup(state: StatePaths) -> None:
    out = actions.stress_cpu(workers=1, duration_s=120, configuration=_cfg(state))
    (pid,) = out["pids"]
    proc = psutil.Process(pid)
    assert proc.is_running()
    assert actions.clear_faults(configuration=_cfg(state))["ok"]
    proc.wait(10)
    assert not psutil.pid_exists(pid) or proc.status() == psutil.STATUS_ZOMBIE

    short = actions.stress_cpu(workers=1, duration_s=0.2, configuration=_cfg(state))
    psutil.Process(short["pids"][0]).wait(30)  # ends by itself
    with pytest.raises(ChaosActionError):
        actions.stress_cpu(workers=1000, configuration=_cfg(state))
    actions.clear_faults(configuration=_cfg(state))


def test_cleanup_never_kills_a_reused_pid(state: StatePaths) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        FaultRegistry(state.root).record(
            "cpu_stress", "x", {"kind": "kill_pids", "pids": [{"pid": bystander.pid, "create_time": 1.0}]}
        )
        assert FaultRegistry(state.root).clear().ok
        assert bystander.poll() is None, "create time differs: not ours, not killed"
    finally:
        bystander.kill()
        bystander.wait()


def test_clock_skew_applies_to_agent_clock_until_cleared(state: StatePaths) -> None:
    base = SystemClock()
    skewed = SkewedClock(base, state.root)
    actions.skew_agent_clock(3600, duration_s=600, configuration=_cfg(state))
    assert skewed.now() - base.now() > timedelta(minutes=59)
    actions.clear_faults(configuration=_cfg(state))
    assert skewed.now() - base.now() < timedelta(minutes=1)
    fake = FakeClock()
    actions.skew_agent_clock(-60, duration_s=1, configuration=_cfg(state))
    fake.set(SystemClock().now() + timedelta(seconds=5))
    assert SkewedClock(fake, state.root).now() == fake.now(), "the skew expires by itself"
    actions.clear_faults(configuration=_cfg(state))


def test_input_noise_spec_share_and_expiry(state: StatePaths) -> None:
    actions.inject_input_noise(share=0.1, sigma=1.0, duration_s=60, seed=7, configuration=_cfg(state))
    now = SystemClock().now()
    spec = input_noise_spec(state.root, now)
    assert spec is not None and spec.share == 0.1
    x = [0.0] * 8
    hit = sum(apply_input_noise(x, spec, i) != x for i in range(2000))
    assert 120 <= hit <= 280, hit
    assert apply_input_noise(x, spec, 5) == apply_input_noise(x, spec, 5), "deterministic per request"
    assert input_noise_spec(state.root, now + timedelta(seconds=61)) is None
    actions.clear_faults(configuration=_cfg(state))
    assert input_noise_spec(state.root, now) is None


# --- serving: real v2 server, real worker process --------------------------------------------------------


@pytest.fixture
def v2() -> Iterator[str]:
    from deployment.oip import create_app
    from deployment.serving import ModelRepository
    from deployment.sessions import load_session
    from sre_core.http_server import ServerThread

    repo = ModelRepository()
    repo.add(load_session(linear_classifier(seed=1), name="classifier", version="1"))
    with ServerThread(create_app(repo)) as server:
        yield server.url


def test_inference_probes_against_real_v2_server(state: StatePaths, v2: str) -> None:
    cfg = _cfg(state, serving_url=v2)
    assert probes.serving_ready(configuration=cfg) is True
    p95 = probes.inference_p95_ms("classifier", samples=10, configuration=cfg)
    assert 0 < p95 < float("inf")
    assert probes.inference_error_rate("classifier", samples=10, configuration=cfg) == 0.0
    assert probes.inference_error_rate("nope", samples=3, payload={"inputs": []}, configuration=cfg) == 1.0
    slo = probes.slo_status("classifier", max_p95_ms=1e9, max_error_rate=0.0, samples=5, configuration=cfg)
    assert slo["ok"] and slo["breaches"] == []
    strict = probes.slo_status("classifier", max_p95_ms=0.0, max_error_rate=0.0, samples=5, configuration=cfg)
    assert not strict["ok"] and "p95" in strict["breaches"][0]
    dead = _cfg(state, serving_url="http://127.0.0.1:9")
    assert probes.serving_ready(timeout_s=0.5, configuration=dead) is False


_WORKER = textwrap.dedent(
    """
    import http.server, os, sys
    pid_file = sys.argv[1]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.send_header("Content-Length", "0"); self.end_headers()
        def log_message(self, *a): pass
    srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), H)
    srv.allow_reuse_address = True
    tmp = pid_file + ".tmp"
    open(tmp, "w").write(str(os.getpid())); os.replace(tmp, pid_file)
    srv.serve_forever()
    """
)


def test_kill_and_restart_serving_worker(state: StatePaths, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    pid_file = state.run / "serving.pid"
    port = free_port()
    argv = [sys.executable, str(script), str(pid_file), str(port)]
    first = subprocess.Popen(argv)
    url = f"http://127.0.0.1:{port}"
    cfg = _cfg(state, serving_url=url, serving_restart=json.dumps(argv))
    try:
        deadline = time.monotonic() + 20
        while not probes.serving_ready(0.5, cfg) and time.monotonic() < deadline:
            time.sleep(0.05)
        out = actions.kill_serving_worker("SIGKILL", configuration=cfg)
        assert out["pid"] == first.pid
        first.wait(10)
        assert not probes.serving_ready(0.5, cfg)
        restarted = actions.restart_serving_worker(timeout_s=20, configuration=cfg)
        assert len(restarted["restarted"]) == 1
        assert probes.serving_ready(2.0, cfg)
        assert int(pid_file.read_text()) != first.pid
        assert FaultRegistry(state.root).list() == []
    finally:
        for p in (first.pid, int(pid_file.read_text()) if pid_file.exists() else 0):
            if p:
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass


# --- uplink through the fault proxy ----------------------------------------------------------------------


class _Echo:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            with c:
                c.settimeout(5)
                while data := c.recv(4096):
                    c.sendall(data)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(2)


def test_uplink_actions_through_fault_proxy_and_cleanup(state: StatePaths) -> None:
    echo = _Echo()
    try:
        with FaultProxyServer() as fp:
            cfg = _cfg(state, toxiproxy_url=fp.url, uplink_upstream=echo.addr)
            actions.slow_uplink(200, 10, configuration=cfg)
            actions.degrade_uplink_bandwidth(100, configuration=cfg)
            actions.timeout_uplink(5000, stream="upstream", configuration=cfg)
            actions.reset_uplink_peer(5000, stream="downstream", configuration=cfg)
            types = sorted(t["type"] for t in probes.uplink_toxics(configuration=cfg))
            assert types == ["bandwidth", "latency", "reset_peer", "timeout"]
            kinds = sorted(f.kind for f in FaultRegistry(state.root).list())
            assert kinds == ["proxy", "toxic:bandwidth", "toxic:latency", "toxic:reset_peer", "toxic:timeout"]
            removed = actions.restore_uplink(configuration=cfg)["removed"]
            assert len(removed) == 4 and probes.uplink_toxics(configuration=cfg) == []
            assert actions.clear_faults(configuration=cfg)["ok"]
            with ToxiproxyClient(fp.url) as c:
                assert c.proxies() == {}, "the proxy the action created is removed too"
            with pytest.raises(ChaosActionError):
                actions.slow_uplink(-5, configuration=cfg)
            with pytest.raises(ChaosActionError):
                actions.add_uplink_toxic("bogus", configuration=cfg)
    finally:
        echo.close()


def test_uplink_action_against_hung_toxiproxy_is_bounded_and_records_nothing(state: StatePaths) -> None:
    sock = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    try:
        cfg = _cfg(
            state,
            toxiproxy_url=f"http://127.0.0.1:{sock.getsockname()[1]}",
            toxiproxy_timeout_s=0.3,
            uplink_upstream="127.0.0.1:9",
        )
        with pytest.raises(ToxiproxyUnavailableError):
            actions.slow_uplink(100, configuration=cfg)
        assert FaultRegistry(state.root).list() == []
    finally:
        sock.close()


def test_discover_lists_our_activities() -> None:
    from chaos import discover

    d = discover()
    names = {a["name"] for a in d["activities"]}
    assert set(actions.__all__) | set(probes.__all__) <= names


def test_uplink_backlog_from_status_file_or_outbox(state: StatePaths) -> None:
    import duckdb

    cfg = _cfg(state)
    assert probes.uplink_backlog(configuration=cfg) == 0  # no telemetry yet
    con = duckdb.connect(str(state.telemetry_db))
    con.execute("CREATE TABLE outbox (batch_id VARCHAR, kind VARCHAR, rows BIGINT)")
    con.execute("INSERT INTO outbox VALUES ('b1', 'batch', 120), ('b2', 'batch', 30), ('a', 'attest', 1)")
    con.close()
    assert probes.uplink_backlog(configuration=cfg) == 150
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb,time; c=duckdb.connect({str(state.telemetry_db)!r}); "
         "print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ChaosActionError, match="backlog unknown"):
            probes.uplink_backlog(configuration=cfg)
        (state.run / "uplink_status.json").write_text(json.dumps({"backlog_rows": 7}))
        assert probes.uplink_backlog(configuration=cfg) == 7
    finally:
        holder.kill()
        holder.wait()


def test_cut_uplink_blocks_then_restores_by_itself(state: StatePaths) -> None:
    echo = _Echo()
    try:
        with FaultProxyServer() as fp:
            cfg = _cfg(state, toxiproxy_url=fp.url, uplink_upstream=echo.addr)
            result: list[dict[str, object]] = []
            t = threading.Thread(target=lambda: result.append(actions.cut_uplink(1.5, configuration=cfg)))
            t.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):  # the proxy is not there yet
                    if len(probes.uplink_toxics(configuration=cfg)) == 2:
                        break
                time.sleep(0.02)
            with ToxiproxyClient(fp.url) as api:
                listen = api.get_proxy("uplink")["listen"]
            with socket.create_connection(("127.0.0.1", int(listen.rsplit(":", 1)[1])), timeout=0.3) as s:
                s.sendall(b"x")
                with pytest.raises(TimeoutError):
                    s.recv(1)  # cut: nothing comes back
            t.join(10)
            assert result and result[0]["cut_s"] == 1.5
            assert probes.uplink_toxics(configuration=cfg) == []
            with socket.create_connection(("127.0.0.1", int(listen.rsplit(":", 1)[1])), timeout=5) as s:
                s.sendall(b"y")
                assert s.recv(1) == b"y"
            assert [f.kind for f in FaultRegistry(state.root).list()] == ["proxy"]
            actions.clear_faults(configuration=cfg)
    finally:
        echo.close()
