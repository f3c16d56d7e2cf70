"""`sre-hub` and `sre-agent pull` as real child processes: a release engineer's and a device's day."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from deployment.sample_models import linear_classifier
from sre_core.http_server import free_port

Run = Callable[..., subprocess.CompletedProcess[str]]


def _hub_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_publish_release_serve_pull_and_refuse(tmp_path: Path, run_cli: Run) -> None:
    repo, state = tmp_path / "repo", tmp_path / "dev"
    r = run_cli(
        "sre-hub",
        "init",
        "--repo",
        str(repo),
        "--channel",
        "stable",
        "--root-threshold",
        "2",
        "--root-keys",
        "3",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    root = json.loads(r.stdout)["root"]
    model = tmp_path / "model.onnx"
    pub = ("sre-hub", "publish", "--repo", str(repo), "--channel", "stable", "--module", "clf")
    # Any bytes as a model: refused before anything is signed (ONNX Runtime cannot load them).
    model.write_bytes(os.urandom(300_000))
    r = run_cli(*pub, "--version", "1.0.0", str(model))
    assert r.returncode == 2 and "onnxruntime cannot load" in r.stderr, r.stderr
    # Inputs the model does not have: refused too.
    model.write_bytes(linear_classifier(seed=1))
    bad_io = tmp_path / "io.yaml"
    bad_io.write_text("runtime: {input_name: pixels}\n")
    r = run_cli(*pub, "--version", "1.0.0", "--manifest", str(bad_io), str(model))
    assert r.returncode == 2 and "pixels" in r.stderr, r.stderr
    r = run_cli(
        "sre-hub",
        "publish",
        "--repo",
        str(repo),
        "--channel",
        "stable",
        "--module",
        "clf",
        "--version",
        "1.0.0",
        str(model),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    target = json.loads(r.stdout)["target"]
    # Releases are immutable: the same bytes again is a no-op, other bytes under 1.0.0 are refused.
    assert run_cli(*pub, "--version", "1.0.0", str(model)).returncode == 0
    other = tmp_path / "other.onnx"
    other.write_bytes(linear_classifier(seed=2))
    r = run_cli(*pub, "--version", "1.0.0", str(other))
    assert r.returncode == 2 and "immutable" in r.stderr, r.stderr
    r = run_cli(
        "sre-hub",
        "release",
        "--repo",
        str(repo),
        "--channel",
        "stable",
        "--module",
        "clf",
        "--version",
        "1.0.0",
        "--expires",
        "bogus",
    )
    assert r.returncode == 2 and "duration" in r.stderr
    r = run_cli(
        "sre-hub",
        "release",
        "--repo",
        str(repo),
        "--channel",
        "stable",
        "--module",
        "clf",
        "--version",
        "1.0.0",
        "--expires",
        "3d",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["serial"] == 1
    assert run_cli("sre-hub", "keys", "rotate", "timestamp", "--repo", str(repo)).returncode == 0
    assert run_cli("sre-hub", "timestamp", "--repo", str(repo), "--expires", "2d").returncode == 0

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "sre-hub"), "serve", "--repo", str(repo), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            if _hub_up(url):
                break
            time.sleep(0.05)
        assert _hub_up(url)
        r = run_cli(
            "sre-agent", "init", "--state", str(state), "--root", root, "--hub", url, "--channel", "stable"
        )
        assert r.returncode == 0, r.stderr
        r = run_cli("sre-agent", "pull", "--state", str(state), "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["trust"] == "fresh" and out["artifacts"]["clf"]["target"] == target
        # tamper with the next version on the hub: exit 1, a message naming the artifact and the check
        model.write_bytes(linear_classifier(seed=3))
        assert (
            run_cli(
                "sre-hub",
                "publish",
                "--repo",
                str(repo),
                "--channel",
                "stable",
                "--module",
                "clf",
                "--version",
                "1.1.0",
                str(model),
            ).returncode
            == 0
        )
        assert (
            run_cli(
                "sre-hub",
                "release",
                "--repo",
                str(repo),
                "--channel",
                "stable",
                "--module",
                "clf",
                "--version",
                "1.1.0",
            ).returncode
            == 0
        )
        (victim,) = (repo / "targets" / "stable").glob("*clf-1.1.0*")
        victim.write_bytes(os.urandom(victim.stat().st_size))
        r = run_cli("sre-agent", "pull", "--state", str(state))
        assert r.returncode == 1
        assert "clf-1.1.0" in r.stderr and "sha256" in r.stderr and "what to do" in r.stderr
        audit = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
        assert audit[-1]["event"] == "pull.refused"
    finally:
        server.terminate()
        server.wait(10)
    # offline: keep what is held and say so (exit 0, trust stale)
    r = run_cli("sre-agent", "pull", "--state", str(state), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["trust"] == "stale" and not out["online"] and out["artifacts"]["clf"]["version"] == "1.0.0"
    # sneakernet: a bundle of the channel on a "USB stick" (after fixing the tampered file)
    victim.unlink()
    model.write_bytes(linear_classifier(seed=4))
    r = run_cli(
        "sre-hub",
        "publish",
        "--repo",
        str(repo),
        "--channel",
        "stable",
        "--module",
        "clf",
        "--version",
        "1.2.0",
        str(model),
    )
    assert r.returncode == 0, r.stderr
    assert (
        run_cli(
            "sre-hub",
            "release",
            "--repo",
            str(repo),
            "--channel",
            "stable",
            "--module",
            "clf",
            "--version",
            "1.2.0",
        ).returncode
        == 0
    )
    r = run_cli(
        "sre-hub", "bundle", "export", "--repo", str(repo), "--channel", "stable", str(tmp_path / "usb")
    )
    assert r.returncode == 0, r.stderr
    r = run_cli("sre-agent", "pull", "--state", str(state), "--from", str(tmp_path / "usb"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["artifacts"]["clf"]["version"] == "1.2.0"
    r = run_cli("sre-agent", "pull", "--state", str(state), "--from", str(tmp_path / "nowhere"))
    assert r.returncode == 2
