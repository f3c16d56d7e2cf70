"""`sre-agent serve` as a real child process: serves the active slot, follows a rollback, stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from deployment.sample_models import linear_classifier
from deployment.slots import SlotManager
from sre_core.audit import AuditLog
from sre_core.http_server import free_port
from sre_core.paths import StatePaths
from tests.deploy_helpers import make_artifact


def install(state: StatePaths, tmp: Path) -> None:
    slots = SlotManager(state, AuditLog(state.audit_log))
    for version, seed in (("1.0", 0), ("2.0", 1)):
        blob = linear_classifier(seed=seed)
        slots.install(make_artifact(tmp / "cas", "clf", version, blob, mode="managed"))
        slots.flip("clf")
        slots.commit("clf")


def infer_version(http: httpx.Client) -> str:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": np.zeros(16).tolist()}]
    }
    resp = http.post("/v2/models/clf/infer", json=body)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["model_version"])


@pytest.mark.slow
def test_serve_command_serves_active_version_and_follows_rollback(
    state: StatePaths, tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    install(state, tmp_path)
    port, grpc_port = free_port(), free_port()
    exe = Path(sys.executable).parent / "sre-agent"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--state",
            str(state.root),
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--sync-every",
            "0.2",
            "--duration",
            "120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            for _ in range(300):  # bounded wait for start-up (imports + session load)
                try:
                    if http.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
            assert infer_version(http) == "2.0"
            import tritonclient.grpc as tg  # the protocol's gRPC half, on the same models

            with tg.InferenceServerClient(url=f"127.0.0.1:{grpc_port}") as g:
                x = tg.InferInput("input", [1, 16], "FP32")
                x.set_data_from_numpy(np.zeros((1, 16), np.float32))
                assert g.infer("clf", [x]).get_response().model_version == "2.0"
            pid_file = state.run / "serving.pid"  # where the chaos harness finds the serving worker
            assert pid_file.read_text().strip() == str(proc.pid)
            done = run_cli("sre-agent", "rollback", "--state", str(state.root), "clf", "--reason", "test")
            assert done.returncode == 0, done.stderr
            for _ in range(200):
                if infer_version(http) == "1.0":
                    break
                time.sleep(0.05)
            assert infer_version(http) == "1.0"
            assert http.get("/v2/models/clf").json()["versions"][0] == "1.0"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 0
    assert not (state.run / "serving.pid").exists()
