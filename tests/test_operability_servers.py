"""Servers validate their port and bind it before they say they serve; the exit codes are documented."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hub.cli import main as hub_main
from sre_core.errors import InputError, SreError
from sre_core.http_server import ServerThread, bind_tcp, free_port


@pytest.fixture
def repo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    r = tmp_path / "hub"
    assert hub_main(["init", "--repo", str(r)]) == 0
    capsys.readouterr()
    return r


def test_out_of_range_port_is_bad_usage_and_nothing_claims_to_serve(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = hub_main(["serve", "--repo", str(repo), "--port", "99999"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "65535" in err and "serving" not in err


def test_busy_port_fails_before_claiming_to_serve(repo: Path) -> None:
    exe = Path(sys.executable).parent / "sre-hub"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = subprocess.run(
            [str(exe), "serve", "--repo", str(repo), "--port", str(port)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert r.returncode == 1, r.stderr  # and it exits: nothing was started that could keep it alive
    assert "already in use" in r.stderr and "serving" not in r.stderr and "Traceback" not in r.stderr


def test_server_thread_refuses_a_busy_port_with_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(SreError, match="already in use"):
            ServerThread(lambda *_: None, port=holder.getsockname()[1]).start()
    with pytest.raises(InputError, match=r"1\.\.65535"):
        bind_tcp("127.0.0.1", 70000)
    with pytest.raises(InputError, match="not"):
        bind_tcp("203.0.113.7", 0)  # TEST-NET-3: not an address of this machine


def test_serve_answers_once_it_says_it_serves(repo: Path) -> None:
    port = free_port()
    exe = Path(sys.executable).parent / "sre-hub"
    proc = subprocess.Popen(
        [str(exe), "serve", "--repo", str(repo), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # blocks until the claim (or the process ends)
        assert f"http://127.0.0.1:{port}" in line, line
        r = httpx.get(f"http://127.0.0.1:{port}/metadata/1.root.json", timeout=30)
        assert r.status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
