"""Health probes of each kind: passing, failing, timing out, hanging; policy refusals before anything runs."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deployment.manifest import ProbeSpec
from deployment.probes import ProbeContext, ProbeRefusedError, ProbeRunner
from policies.deployment import ProbePolicy
from sre_core.clock import FakeClock


def script(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / "probes" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def ctx(tmp_path: Path) -> ProbeContext:
    slot = tmp_path / "modules" / "clf" / "a"
    slot.mkdir(parents=True)
    (slot / "model.onnx").write_bytes(b"m")
    return ProbeContext("clf", "1.0", slot / "model.onnx", slot, swapped_ns=time.time_ns())


def runner(tmp_path: Path, clock: FakeClock) -> ProbeRunner:
    return ProbeRunner(ProbePolicy(exec_allowlist=[str(tmp_path / "probes") + "/"]), clock)


def exec_spec(path: str, **kw: float) -> ProbeSpec:
    return ProbeSpec.model_validate({"kind": "exec", "argv": [path], "attempts": 1, **kw})


# ----------------------------------------------------------------------------- exec
def test_exec_passes_and_sees_artifact_path_without_shell(
    tmp_path: Path, clock: FakeClock, ctx: ProbeContext
) -> None:
    out = tmp_path / "env.txt"
    p = script(tmp_path, "check", f'test -f "$SRE_ARTIFACT_PATH" && echo "$SRE_ARTIFACT_PATH $1" > {out}')
    spec = ProbeSpec(kind="exec", argv=[p, "$(touch /tmp/pwned)"], attempts=1)
    res = runner(tmp_path, clock).run(spec, ctx)
    assert res.ok and res.outcome == "passed"
    # The argument reached the probe verbatim: no shell expanded it.
    assert out.read_text().strip() == f"{ctx.artifact_path} $(touch /tmp/pwned)"


def test_exec_failure_reports_status_and_output(tmp_path: Path, clock: FakeClock, ctx: ProbeContext) -> None:
    p = script(tmp_path, "fail", "echo model not loaded; exit 3")
    res = runner(tmp_path, clock).run(exec_spec(p, attempts=2, interval_s=5), ctx)
    assert not res.ok and res.outcome == "failed" and res.attempts == 2
    assert "exit status 3" in res.detail and "model not loaded" in res.detail
    assert clock.monotonic() == 5.0  # one interval between the two attempts, on the injected clock


def test_exec_passes_on_a_later_attempt(tmp_path: Path, clock: FakeClock, ctx: ProbeContext) -> None:
    n = tmp_path / "count"
    p = script(tmp_path, "warm", f'echo x >> {n}; test "$(wc -l < {n})" -ge 3')
    res = runner(tmp_path, clock).run(exec_spec(p, attempts=5, interval_s=1, initial_delay_s=30), ctx)
    assert res.ok and res.attempts == 3
    assert clock.monotonic() == 32.0  # initial delay + two intervals


def test_exec_timeout_kills_the_group(tmp_path: Path, clock: FakeClock, ctx: ProbeContext) -> None:
    pidfile = tmp_path / "child.pid"
    # A hanging probe: ignores SIGTERM, starts a grandchild, waits forever.
    p = script(tmp_path, "hang", f"trap '' TERM; sleep 300 & echo $! > {pidfile}; wait")
    res = runner(tmp_path, clock).run(exec_spec(p, timeout_s=0.5), ctx)
    assert not res.ok and res.outcome == "timeout" and "killed" in res.detail
    grandchild = int(pidfile.read_text())
    for _ in range(100):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        state = (
            Path(f"/proc/{grandchild}/stat").read_text().split()[2]
            if Path(f"/proc/{grandchild}").exists()
            else "X"
        )
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the probe's grandchild survived the timeout")


def test_exec_not_on_allowlist_is_refused_before_anything_runs(
    tmp_path: Path, clock: FakeClock, ctx: ProbeContext
) -> None:
    marker = tmp_path / "ran"
    allowed = script(tmp_path, "touch", f"touch {marker}")
    outside = tmp_path / "elsewhere.sh"
    outside.write_text(f"#!/bin/sh\ntouch {marker}\n")
    outside.chmod(0o755)
    specs = [exec_spec(allowed), exec_spec(str(outside))]
    with pytest.raises(ProbeRefusedError, match="allowlist"):
        runner(tmp_path, clock).run_all(specs, ctx)
    assert not marker.exists()
    with pytest.raises(ProbeRefusedError):
        runner(tmp_path, clock).run(exec_spec("/bin/sh"), ctx)
    # A path that only looks like it is inside an allowed directory.
    with pytest.raises(ProbeRefusedError):
        runner(tmp_path, clock).run(exec_spec(str(tmp_path / "probes" / ".." / "elsewhere.sh")), ctx)


def test_exec_missing_binary_is_an_error_not_a_crash(
    tmp_path: Path, clock: FakeClock, ctx: ProbeContext
) -> None:
    (tmp_path / "probes").mkdir()
    res = runner(tmp_path, clock).run(exec_spec(str(tmp_path / "probes" / "nope")), ctx)
    assert not res.ok and res.outcome == "error"


# ----------------------------------------------------------------------------- http
class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
        code = {"/ok": 200, "/created": 204, "/fail": 503, "/redirect": 302}.get(self.path, 404)
        self.send_response(code)
        if code == 302:
            self.send_header("Location", "/ok")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def http_server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers (a hung application)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"http://127.0.0.1:{s.getsockname()[1]}/health"
    s.close()


def http_spec(url: str, **kw: float) -> ProbeSpec:
    return ProbeSpec.model_validate({"kind": "http", "url": url, "attempts": 1, **kw})


def test_http_2xx_passes_others_fail(
    tmp_path: Path, clock: FakeClock, ctx: ProbeContext, http_server: str
) -> None:
    r = runner(tmp_path, clock)
    assert r.run(http_spec(f"{http_server}/ok"), ctx).ok
    assert r.run(http_spec(f"{http_server}/created"), ctx).ok
    failed = r.run(http_spec(f"{http_server}/fail", attempts=3), ctx)
    assert not failed.ok and failed.detail == "HTTP 503" and failed.attempts == 3
    redirected = r.run(http_spec(f"{http_server}/redirect"), ctx)
    assert not redirected.ok and redirected.detail == "HTTP 302"  # redirects are not followed


def test_http_slow_and_hanging_time_out(
    tmp_path: Path, clock: FakeClock, ctx: ProbeContext, http_server: str, silent_server: str
) -> None:
    r = runner(tmp_path, clock)
    slow = r.run(http_spec(f"{http_server}/slow", timeout_s=0.3), ctx)
    assert not slow.ok and slow.outcome == "timeout"
    hung = r.run(http_spec(silent_server, timeout_s=0.3), ctx)
    assert not hung.ok and hung.outcome == "timeout"


def test_http_connection_refused_fails(tmp_path: Path, clock: FakeClock, ctx: ProbeContext) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    res = runner(tmp_path, clock).run(http_spec(f"http://127.0.0.1:{port}/"), ctx)
    assert not res.ok and res.outcome == "failed" and "Connect" in res.detail


def test_http_to_a_remote_host_is_refused(tmp_path: Path, clock: FakeClock, ctx: ProbeContext) -> None:
    with pytest.raises(ProbeRefusedError, match="host"):
        runner(tmp_path, clock).run(http_spec("http://192.0.2.1/health"), ctx)
    with pytest.raises(ProbeRefusedError):
        runner(tmp_path, clock).run(http_spec("file:///etc/passwd"), ctx)


# ----------------------------------------------------------------------------- file
def test_file_ready_after_swap_passes(tmp_path: Path, clock: FakeClock, ctx: ProbeContext) -> None:
    ready = tmp_path / "ready"
    ready.write_text("ok")
    res = runner(tmp_path, clock).run(ProbeSpec(kind="file", path=str(ready), attempts=1), ctx)
    assert res.ok


def test_file_older_than_swap_is_stale(tmp_path: Path, clock: FakeClock, ctx: ProbeContext) -> None:
    ready = tmp_path / "ready"
    ready.write_text("ok")
    old = ctx.swapped_ns - 10**9
    os.utime(ready, ns=(old, old))
    res = runner(tmp_path, clock).run(ProbeSpec(kind="file", path=str(ready), attempts=2, interval_s=1), ctx)
    assert not res.ok and "older than the swap" in res.detail


def test_file_never_written_times_out_on_attempts(
    tmp_path: Path, clock: FakeClock, ctx: ProbeContext
) -> None:
    spec = ProbeSpec(kind="file", path="ready", attempts=10, interval_s=6, initial_delay_s=60)
    res = runner(tmp_path, clock).run(spec, ctx)
    assert not res.ok and res.attempts == 10 and "does not exist" in res.detail
    assert clock.monotonic() == 60 + 9 * 6  # waited its whole window on the injected clock


def test_run_all_stops_at_first_failure(tmp_path: Path, clock: FakeClock, ctx: ProbeContext) -> None:
    marker = tmp_path / "second-ran"
    specs = [exec_spec(script(tmp_path, "f", "exit 1")), exec_spec(script(tmp_path, "s", f"touch {marker}"))]
    rep = runner(tmp_path, clock).run_all(specs, ctx)
    assert not rep.ok and len(rep.results) == 1 and not marker.exists()
    assert runner(tmp_path, clock).run_all([], ctx).ok


def test_deployment_policy_documents(tmp_path: Path) -> None:
    from policies.deployment import load_deployment_policy
    from sre_core.errors import InputError

    default = load_deployment_policy(tmp_path / "absent.yaml")
    assert default.canary_steps == [1, 5, 25, 50, 100] and default.flapping.max_rollbacks == 3
    assert default.probes.allows("/usr/bin/true") and not default.probes.allows("/bin/sh")
    doc = tmp_path / "deployment.yaml"
    doc.write_text("probes:\n  exec_alowlist: [/bin/sh]\n")  # a typo must not silently widen anything
    with pytest.raises(InputError, match="exec_alowlist"):
        load_deployment_policy(doc)
    doc.write_text("probes:\n  exec_allowlist: [bin/sh]\n")
    with pytest.raises(InputError, match="absolute"):
        load_deployment_policy(doc)
    doc.write_text("canary_steps: [5, 1, 100]\n")
    with pytest.raises(InputError, match="increasing"):
        load_deployment_policy(doc)
    doc.write_text("flapping: {max_rollbacks: 2, window_s: 600}\n")
    assert load_deployment_policy(doc).flapping.window_s == 600


def test_delays_intervals_and_attempts_count_against_the_budget(clock: FakeClock) -> None:
    """How to break it: hide the time in initial delays and intervals (an hour each, any number of
    probes); before, only the attempts' own run time was capped, so an unjudged version served."""
    from deployment.probes import worst_case_s

    runner = ProbeRunner(ProbePolicy(max_total_s=100, max_probes=3), clock)
    slow = ProbeSpec(kind="file", path="ready", initial_delay_s=60, attempts=3, timeout_s=5, interval_s=10)
    assert worst_case_s(slow) == 60 + 3 * 5 + 2 * 10
    runner.check_allowed([slow])  # 95 s: inside the cap
    with pytest.raises(ProbeRefusedError, match="max_total_s"):
        runner.check_allowed([slow, ProbeSpec(kind="file", path="ready", timeout_s=1, attempts=6)])
    quick = ProbeSpec(kind="file", path="ready", timeout_s=1, attempts=1)
    with pytest.raises(ProbeRefusedError, match="at most 3 probes"):
        runner.check_allowed([quick] * 4)
    before = clock.monotonic()
    with pytest.raises(ProbeRefusedError):
        runner.run_all([ProbeSpec(kind="file", path="ready", initial_delay_s=3600)], ctx_for(clock))
    assert clock.monotonic() == before  # refused before any delay was slept


def ctx_for(clock: FakeClock) -> ProbeContext:
    return ProbeContext("clf", "1.0", Path("/nonexistent/m"), Path("/nonexistent"), 0)
