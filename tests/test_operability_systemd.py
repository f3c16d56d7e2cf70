"""The systemd unit: Type=notify with readiness and watchdog, a dedicated user, hardening; the daemon
started the way systemd starts it (ExecStart, Environment=, NOTIFY_SOCKET, WATCHDOG_USEC)."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sre_agent.provision import provision
from sre_core.http_server import free_port
from sre_core.paths import StatePaths
from sre_core.sdnotify import SystemdNotifier

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "packaging" / "sre-agent.service"
VENV = Path(sys.executable).parent.parent


def _render(state: Path) -> str:
    """The unit as installed on this machine: the venv and the state directory substituted."""
    return (
        UNIT.read_text().replace("/opt/sre-agent/.venv", str(VENV)).replace("/var/lib/sre-agent", str(state))
    )


def _service(text: str) -> dict[str, list[str]]:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    out: dict[str, list[str]] = {}
    for line in text.splitlines():  # repeated keys (Environment=) keep every value
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    assert cp.has_section("Service")
    return out


def test_unit_is_notify_with_watchdog_dedicated_user_and_hardening(tmp_path: Path) -> None:
    svc = _service(_render(tmp_path / "state"))
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert int(svc["WatchdogSec"][0]) > 0
    assert svc["User"] == ["sre-agent"] and svc["Group"] == ["sre-agent"]
    for key, value in (
        ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("CapabilityBoundingSet", ""),
        ("RestrictSUIDSGID", "yes"), ("UMask", "0077"),
    ):  # fmt: skip
        assert svc[key] == [value], key
    sysusers = (ROOT / "packaging" / "sre-agent.sysusers.conf").read_text()
    assert any(line.split()[:2] == ["u", "sre-agent"] for line in sysusers.splitlines())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_rendered_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    unit = tmp_path / "sre-agent.service"
    unit.write_text(_render(tmp_path / "state"))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr


def test_notifier_reads_the_environment_like_sd_notify(tmp_path: Path) -> None:
    assert SystemdNotifier.from_env({}).send("READY=1") is False  # not supervised: a no-op
    n = SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, pid=2
    )
    assert n.watchdog_interval_s is None  # the watchdog is for another process
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000"}, pid=2)
    assert n.watchdog_interval_s == 1.5
    gone = SystemdNotifier(str(tmp_path / "no-such.sock"))
    assert gone.ready() is False  # a missing supervisor socket is logged, never raised


@pytest.mark.slow
def test_daemon_started_as_systemd_would_reports_ready_and_pings_the_watchdog(tmp_path: Path) -> None:
    state = tmp_path / "state"
    provision(StatePaths(state))
    svc = _service(_render(state))
    argv = shlex.split(svc["ExecStart"][0])
    assert Path(argv[0]).is_file(), argv
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    for assignment in svc.get("Environment", []):
        k, _, v = assignment.partition("=")
        env[k] = v
    sock_path = tmp_path / "notify.sock"
    env.update(
        NOTIFY_SOCKET=str(sock_path),
        WATCHDOG_USEC="2000000",  # ping every second
        SRE_AGENT_LLM__ENABLED="false",  # test-only: no model load
        SRE_AGENT_SERVING__PORT=str(free_port()),
    )
    got: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(1.0)
        log = (tmp_path / "daemon.log").open("w")
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in got) < 2:
                try:
                    got.append(sock.recv(4096).decode())
                except TimeoutError:
                    assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            assert got and got[0].startswith("READY=1"), got
            assert sum("WATCHDOG=1" in m for m in got) >= 2, got
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
            for _ in range(10):  # STOPPING=1 was sent before the daemon stopped its services
                try:
                    got.append(sock.recv(4096).decode())
                except TimeoutError:
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert rc == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    assert any(m.startswith("STOPPING=1") for m in got), got
