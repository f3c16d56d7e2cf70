"""Managed serving: router overhead, HTTP throughput/p99 against a peer server, MTTR, requests lost in a flip.

All parts use the same ONNX model (an MLP classifier built in code, ~0.13 ms per request on one thread):

- router overhead: ``Router.infer`` vs a bare ``InferenceSession.run`` in the same process, interleaved
  blocks (minimum of block means, medians too); with no canary and with a canary in progress (5 %, no
  mirroring: a cold canary session runs slower, which shows in that figure, not routing cost).
- HTTP: our v2 server and a *peer*, each in its own child process, driven by the same closed-loop
  client at a fixed concurrency with identical JSON requests, in interleaved windows; throughput and p99
  as ratios (ours / peer: ``peer_throughput_ratio``, goal > 1; ``peer_p99_ratio``, goal < 1). The peer
  is a real MLServer (Seldon's Open Inference Protocol server) serving the same ONNX file with
  onnxruntime on one thread through a custom runtime (``benchmarks/_mlserver_onnx.py``, NumpyCodec
  decoding), one worker process (``parallel_workers: 0``, like our single uvicorn process). MLServer's
  pins cannot join our lock (its fastapi needs starlette < 0.51), so it runs from its own venv,
  ``.venv-bench`` (``make bench`` builds it from ``benchmarks/mlserver-requirements.txt``), and is
  reached over HTTP only. Without that venv the peer is a stand-in (a plain starlette/uvicorn v2
  endpoint doing json -> numpy -> session.run) and the JSON says so (``"peer": "starlette-standin"``).
  Reported next to it: our binary-tensor path, and our server forced to offload every inference to the
  thread pool (by default it offloads only models slower than 1 ms).
- gRPC: the protocol's gRPC half (``deployment.oip_grpc``) against MLServer's gRPC endpoint, both in
  child processes, closed-loop unary ModelInfer calls (raw tensor contents) from grpc.aio in
  interleaved windows, in the same run as the HTTP comparison (``grpc.peer_throughput_ratio``, goal > 1;
  ``grpc.peer_p99_ratio``, goal < 1). Skipped (said so) without the MLServer venv.
- canary (``--canary``, on its own): 20 canaries of each kind under the shipped default policy, real
  sessions, two client threads saturating the machine: identical tiny and 5 MiB candidates must be
  promoted, a 2x slower and a 1 %-error candidate aborted; outcome counts and wall time per step.
- canary through the daemon (``--canary-daemon``, on its own): the same four kinds, each its own model
  module, through the real ``sre-agent run`` (a child process) pulling releases from a real hub on
  loopback (the harness of the live tests, ``tests/live_harness.py``) while keep-alive HTTP clients send
  inference to the module under test throughout (cycling inputs of which exactly 1 % make the erroring
  candidate fail). Each run publishes a new version; the manifests leave every canary field unset, so
  the device's shipped default policy decides, on real time (only the daemon's pull interval is
  shortened, to 5 s, as in the live tests). Per kind: promoted/aborted/inconclusive counts, publish to
  verdict, and the time each step took to decide, from the daemon's audit trail.
- MTTR: a real canary of a model that fails on some inputs, at 100 % weight, under a traffic thread;
  from the controller's failed-gate verdict to the first request answered by the incumbent (the router
  points at the already-loaded session), next to the naive path (load a new session of the incumbent
  after the failure, then serve it).
- flip: real canaries promoted through every step to the flip while client threads send HTTP requests
  to the in-process server; requests lost (non-200 or transport errors).

The load generator is a minimal asyncio HTTP/1.1 keep-alive client (hand-written: httpx costs more per
request than the servers under test, which would hide the difference). On a 2-core machine the client
and server share the cores; the ratio is what compares, not absolute numbers.

Run: ``python benchmarks/serving.py [--http-seconds 6] [--concurrency 8] [--mttr-iterations 50] [--flips 2]
[--peer-venv .venv-bench]``, or ``python benchmarks/serving.py --canary [--canary-runs 20]``, or
``python benchmarks/serving.py --canary-daemon [--canary-runs 20] [--canary-kinds K1,K2]
[--canary-connections 4]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 32
HIDDEN, WIDTH = 3, 1024
ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".venv-bench"
MLSERVER_RUNTIME = Path(__file__).resolve().parent / "_mlserver_onnx.py"
MLSERVER_GRPC_PORTS: dict[int, int] = {}  # MLServer child pid -> its gRPC port


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def model_bytes() -> bytes:
    from deployment.sample_models import linear_classifier

    return linear_classifier(
        n_features=N_FEATURES, n_classes=10, seed=0, hidden_layers=HIDDEN, hidden_size=WIDTH
    )


# -- router overhead ------------------------------------------------------------------------------
def router_overhead(blob: bytes, blocks: int, per_block: int) -> dict[str, Any]:
    from deployment.router import Router
    from deployment.sessions import ModelSession, load_session

    bare = load_session(blob, name="m", version="1")
    sess = bare.session
    routed = Router("m", bare)  # the very same session: the difference is the router alone
    canary_router = Router("m", bare)
    canary_router.start_canary(load_session(blob, name="m", version="2"), mirror_share=0.0)
    canary_router.set_weight(0.05)
    x = np.random.default_rng(0).normal(size=(1, N_FEATURES)).astype(np.float32)
    feeds = {"input": x}
    for _ in range(500):  # warm every session
        sess.run(None, feeds)
        routed.infer(feeds)
        canary_router.infer(feeds)

    def block(fn: Any) -> float:
        t = time.perf_counter()
        for _ in range(per_block):
            fn()
        return (time.perf_counter() - t) / per_block

    bare_t: list[float] = []
    routed_t: list[float] = []
    canary_t: list[float] = []
    kinds = [
        (bare_t, lambda: sess.run(None, feeds)),
        (routed_t, lambda: routed.infer(feeds)),
        (canary_t, lambda: canary_router.infer(feeds)),
    ]
    for i in range(blocks):
        for sink, fn in kinds if i % 2 == 0 else kinds[::-1]:  # alternate the order: no position bias
            sink.append(block(fn))

    # The router's own cost, measured apart: the same router over a session stub that returns at once
    # (what the router adds is independent of the model; this stays readable on a loaded machine where
    # the run-to-run noise of a real session is larger than the difference being measured).
    class _Stub:
        def __init__(self) -> None:
            self.out = [np.zeros((1, 10), np.float32)]

        def run(self, names: Any, feeds: Any) -> list[np.ndarray]:
            return self.out

    stub = ModelSession(name="m", version="1", session=_Stub(), outputs=bare.outputs)  # type: ignore[arg-type]
    stub_router = Router("m", stub)
    stub_t = [block(lambda: stub.session.run(None, feeds)) for _ in range(20)]
    stub_r = [block(lambda: stub_router.infer(feeds)) for _ in range(20)]
    router_cost = min(stub_r) - min(stub_t)
    # The minimum over interleaved blocks is the cost without interference from other processes (the
    # timeit convention); the medians are reported next to it for a loaded machine.
    b, r, c = min(bare_t), min(routed_t), min(canary_t)
    bm, rm = statistics.median(bare_t), statistics.median(routed_t)
    return {
        "bare_session_run_us": round(b * 1e6, 2),
        "routed_us": round(r * 1e6, 2),
        "routed_with_canary_us": round(c * 1e6, 2),
        "overhead_us": round((r - b) * 1e6, 2),
        "ratio": round(r / b, 4),
        "ratio_with_canary": round(c / b, 4),
        "ratio_of_medians": round(rm / bm, 4),
        "router_cost_us": round(router_cost * 1e6, 2),
        "ratio_from_router_cost": round((b + router_cost) / b, 4),
        "goal_ratio": 1.05,
        "method": f"min of {len(bare_t)} interleaved blocks of {per_block} calls",
    }


# -- HTTP ----------------------------------------------------------------------------------------
def build_app(kind: str, model_path: str) -> Any:
    """Our v2 app (``ours``, ``ours-offload``) or the peer's, serving the model at ``model_path``."""
    if kind in ("ours", "ours-offload"):
        from deployment.oip import create_app
        from deployment.serving import ModelRepository
        from deployment.sessions import load_session

        repo = ModelRepository()
        repo.add(load_session(Path(model_path), name="m", version="1"))
        return create_app(repo, offload_above_s=0.0) if kind == "ours-offload" else create_app(repo)
    import onnxruntime as ort
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_path, sess_options=so, providers=["CPUExecutionProvider"])

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    async def infer(request: Request) -> JSONResponse:
        body = await request.json()
        inp = body["inputs"][0]
        arr = np.array(inp["data"], dtype=np.float32).reshape(inp["shape"])
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, {inp["name"]: arr})
        return JSONResponse(
            {
                "model_name": request.path_params["name"],
                "outputs": [
                    {"name": n, "datatype": "FP32", "shape": list(o.shape), "data": o.flatten().tolist()}
                    for n, o in zip(names, outs, strict=True)
                ],
            }
        )

    return Starlette(
        routes=[Route("/v2/health/ready", ready), Route("/v2/models/{name}/infer", infer, methods=["POST"])]
    )


def child_server(kind: str, port: int, model_path: str) -> None:
    """Runs in a child process: our v2 server or the peer, under uvicorn, until killed."""
    import uvicorn

    if kind == "ours-grpc":
        from deployment.oip_grpc import GrpcServer
        from deployment.serving import ModelRepository
        from deployment.sessions import load_session

        repo = ModelRepository()
        repo.add(load_session(Path(model_path), name="m", version="1"))
        gc.freeze()
        server = GrpcServer(repo, port=port).start()  # held: a collected grpc server stops
        threading.Event().wait()
        server.stop()
        return

    app = build_app(kind, model_path)
    if kind != "peer":
        gc.freeze()  # as ServingPlane.start does: start-up objects leave the collector's scans
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def asgi_cost(model_path: Path, body: bytes, blocks: int = 60, per_block: int = 50) -> dict[str, Any]:
    """CPU per request of each app called straight through ASGI in this process (no sockets, no
    client): the handler cost without the network noise of a shared machine. Interleaved blocks."""
    apps = {kind: build_app(kind, str(model_path)) for kind in ("peer", "ours")}
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/m/infer",
        "raw_path": b"/v2/models/m/infer",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }

    async def call(app: Any) -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        status: list[int] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(dict(scope), receive, send)
        if status != [200]:
            raise RuntimeError(f"in-process request failed: {status}")

    async def run() -> dict[str, list[float]]:
        res: dict[str, list[float]] = {k: [] for k in apps}
        for app in apps.values():
            for _ in range(100):
                await call(app)
        for i in range(blocks):
            order = list(apps.items()) if i % 2 else list(apps.items())[::-1]
            for kind, app in order:
                t = time.perf_counter()
                for _ in range(per_block):
                    await call(app)
                res[kind].append((time.perf_counter() - t) / per_block)
        return res

    res = asyncio.run(run())
    ours, peer = min(res["ours"]), min(res["peer"])
    return {
        "ours_us": round(ours * 1e6, 1),
        "peer_us": round(peer * 1e6, 1),
        "cost_ratio": round(ours / peer, 3),
        "method": f"min of {blocks} interleaved blocks of {per_block} ASGI calls",
    }


async def _worker(port: int, request: bytes, deadline: float, lat: list[float], bad: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            if not status.startswith(b"HTTP/1.1 200"):
                bad.append(1)
    finally:
        writer.close()


async def _window(port: int, request: bytes, seconds: float, concurrency: int) -> tuple[list[float], int]:
    lat: list[float] = []
    bad: list[int] = []
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(_worker(port, request, deadline, lat, bad) for _ in range(concurrency)))
    return lat, len(bad)


def load_interleaved(
    targets: dict[str, tuple[int, bytes]], seconds: float, concurrency: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Closed-loop load on each target in alternating windows (so drifting machine load hits all alike)."""

    async def main() -> dict[str, tuple[list[float], int, float]]:
        acc: dict[str, tuple[list[float], int, float]] = {k: ([], 0, 0.0) for k in targets}
        for port, req in targets.values():  # warm-up, not measured
            await _window(port, req, 0.5, concurrency)
        for _ in range(rounds):
            for kind, (port, req) in targets.items():
                t = time.perf_counter()
                lat, bad = await _window(port, req, seconds / rounds, concurrency)
                prev = acc[kind]
                acc[kind] = (prev[0] + lat, prev[1] + bad, prev[2] + time.perf_counter() - t)
        return acc

    out = {}
    for kind, (lat, bad, spent) in asyncio.run(main()).items():
        out[kind] = {
            "requests": len(lat),
            "errors": bad,
            "throughput_rps": round(len(lat) / spent, 1),
            "p50_ms": round(_p(lat, 0.5) * 1e3, 3),
            "p99_ms": round(_p(lat, 0.99) * 1e3, 3),
        }
    return out


def _http_request(body: bytes, extra: str = "", content_type: str = "application/json") -> bytes:
    head = (
        f"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def start_child(kind: str, model_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    from sre_core.http_server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, "--port", str(port), "--model", str(model_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited during start-up")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float, what: str) -> None:
    import httpx

    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited during start-up (exit {proc.returncode})")
        time.sleep(0.1)
    raise RuntimeError(f"{what} was not ready within {timeout_s:.0f} s")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child started in its own session, with everything it spawned."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def mlserver_version(venv: Path) -> str | None:
    """The MLServer version installed in the peer venv, or None when there is no usable one."""
    python, cli = venv / "bin" / "python", venv / "bin" / "mlserver"
    if not (python.exists() and cli.exists()):
        return None
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('mlserver'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def start_mlserver(venv: Path, model_path: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """MLServer from the peer venv serving ``model_path`` as model ``m`` with the ONNX custom runtime.

    The model repository (runtime module, settings, model) is written under ``workdir``; HTTP, gRPC and
    metrics listen on free ports on 127.0.0.1. The child runs in its own session (killed as a group)."""
    from sre_core.http_server import free_port

    repo = workdir / "mlserver-repo"
    (repo / "m").mkdir(parents=True)
    shutil.copyfile(MLSERVER_RUNTIME, repo / "_mlserver_onnx.py")
    shutil.copyfile(model_path, repo / "m" / "model.onnx")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "parallel_workers": 0,  # inference in the server process, as ours
        "metrics_endpoint": None,
        "debug": False,  # no access log
    }
    (repo / "settings.json").write_text(json.dumps(settings))
    (repo / "m" / "model-settings.json").write_text(
        json.dumps(
            {"name": "m", "implementation": "_mlserver_onnx.OnnxModel", "parameters": {"uri": "./model.onnx"}}
        )
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("MLSERVER")
    }
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    log = (workdir / "mlserver.log").open("wb")
    proc = subprocess.Popen(
        [str(venv / "bin" / "mlserver"), "start", str(repo)],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        _wait_ready(proc, http_port, 120, "MLServer")
    except BaseException as e:
        _stop_group(proc)
        tail = (workdir / "mlserver.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{e}; its log ends:\n{tail}") from e
    MLSERVER_GRPC_PORTS[proc.pid] = grpc_port
    return proc, http_port


def http_comparison(model_path: Path, seconds: float, concurrency: int, peer_venv: Path) -> dict[str, Any]:
    x = np.random.default_rng(1).normal(size=(1, N_FEATURES)).astype(np.float32)
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
    ).encode()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, N_FEATURES],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    binary = _http_request(
        head + x.tobytes(), f"Inference-Header-Content-Length: {len(head)}\r\n", "application/octet-stream"
    )
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "seconds_each": seconds,
        "payload": "JSON, 1 x 32 FP32",
    }
    version = mlserver_version(peer_venv)
    out["peer"] = f"mlserver {version}" if version else "starlette-standin"
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    try:
        if version:
            procs["peer"] = start_mlserver(peer_venv, model_path, workdir)
        for kind in ("ours", "ours-offload") if version else ("peer", "ours", "ours-offload"):
            procs[kind] = start_child(kind, model_path)
        targets = {
            "peer": (procs["peer"][1], _http_request(body)),
            "ours": (procs["ours"][1], _http_request(body)),
            "ours_binary_tensors": (procs["ours"][1], binary),
            "ours_always_offloaded": (procs["ours-offload"][1], _http_request(body)),
        }
        out["load"] = load_interleaved(targets, seconds, concurrency, rounds=max(4, round(seconds * 2)))
        if version:  # the gRPC half against the same peer, in the same run
            procs["ours-grpc"] = start_grpc_child(model_path)
            grpc_targets = {
                "peer": MLSERVER_GRPC_PORTS[procs["peer"][0].pid],
                "ours": procs["ours-grpc"][1],
            }
            out["grpc"] = grpc_interleaved(grpc_targets, x, seconds, concurrency, max(4, round(seconds * 2)))
            g = out["grpc"]
            out["grpc"]["peer_throughput_ratio"] = round(
                g["ours"]["throughput_rps"] / g["peer"]["throughput_rps"], 3
            )
            out["grpc"]["peer_p99_ratio"] = round(g["ours"]["p99_ms"] / g["peer"]["p99_ms"], 3)
        else:
            out["grpc"] = {"skipped": "no MLServer venv: its gRPC is the peer (make bench builds it)"}
    finally:
        for kind, (proc, _port) in procs.items():
            if kind == "peer" and version:
                _stop_group(proc)
            else:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    load = out["load"]
    out["peer_throughput_ratio"] = round(load["ours"]["throughput_rps"] / load["peer"]["throughput_rps"], 3)
    out["peer_p99_ratio"] = round(load["ours"]["p99_ms"] / load["peer"]["p99_ms"], 3)
    out["goal"] = "peer_throughput_ratio > 1, peer_p99_ratio < 1"
    # In-process handler cost: always against the stand-in (MLServer lives in another venv).
    out["in_process_cost_vs_standin"] = asgi_cost(model_path, body)
    if version:
        out["peer_note"] = (
            f"MLServer {version} from {peer_venv}, custom runtime benchmarks/_mlserver_onnx.py "
            "(onnxruntime, 1 thread, NumpyCodec), parallel_workers 0, same JSON request and client"
        )
    else:
        out["peer_note"] = (
            "plain starlette/uvicorn v2 endpoint standing in for MLServer: no MLServer venv at "
            f"{peer_venv}; `make bench` builds it (benchmarks/mlserver-requirements.txt)"
        )
    return out


# -- gRPC -----------------------------------------------------------------------------------------
def start_grpc_child(model_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Our gRPC front end in a child process; waits until ServerLive answers."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    from sre_core.http_server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", "ours-grpc", "--port", str(port), "--model", str(model_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(600):
            try:
                if stub.ServerLive(pb.ServerLiveRequest(), timeout=1).live:
                    return proc, port
            except grpc.RpcError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("our gRPC server exited during start-up")
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("our gRPC server did not start")


def grpc_interleaved(
    ports: dict[str, int], x: np.ndarray, seconds: float, concurrency: int, rounds: int
) -> dict[str, Any]:
    """Closed-loop unary ModelInfer calls (raw tensor contents, as tritonclient sends them) on each
    target in alternating windows; one grpc.aio channel per target."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())

    async def window(stub: Any, secs: float) -> tuple[list[float], int]:
        lat: list[float] = []
        bad = [0]
        deadline = time.perf_counter() + secs

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    await stub.ModelInfer(request, timeout=30)
                except grpc.aio.AioRpcError:
                    bad[0] += 1
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, bad[0]

    async def main() -> dict[str, tuple[list[float], int, float]]:
        channels = {k: grpc.aio.insecure_channel(f"127.0.0.1:{p}") for k, p in ports.items()}
        stubs = {k: pb_grpc.GRPCInferenceServiceStub(c) for k, c in channels.items()}
        acc: dict[str, tuple[list[float], int, float]] = {k: ([], 0, 0.0) for k in ports}
        try:
            for stub in stubs.values():
                await window(stub, 0.5)
            for _ in range(rounds):
                for kind, stub in stubs.items():
                    t = time.perf_counter()
                    lat, bad = await window(stub, seconds / rounds)
                    prev = acc[kind]
                    acc[kind] = (prev[0] + lat, prev[1] + bad, prev[2] + time.perf_counter() - t)
        finally:
            for c in channels.values():
                await c.close()
        return acc

    out: dict[str, Any] = {"payload": "raw_input_contents, 1 x 32 FP32", "concurrency": concurrency}
    for kind, (lat, bad, spent) in asyncio.run(main()).items():
        out[kind] = {
            "requests": len(lat),
            "errors": bad,
            "throughput_rps": round(len(lat) / spent, 1),
            "p50_ms": round(_p(lat, 0.5) * 1e3, 3),
            "p99_ms": round(_p(lat, 0.99) * 1e3, 3),
        }
    return out


# -- MTTR -----------------------------------------------------------------------------------------
def recovery_s(answered: list[tuple[float, str]], t0: float) -> float | None:
    """Seconds from the verdict at ``t0`` to the first answer by the incumbent (a version named
    ``good...``) after the last one answered (or failed) by anything else; None when no such answer came
    (under load the traffic thread may not run at all after the cut: counted as unanswered, not a crash).
    """
    after = [(t, v) for (t, v) in answered if t > t0]
    last_bad = max((t for (t, v) in after if not v.startswith("good")), default=t0)
    first_good = min((t for (t, v) in after if v.startswith("good") and t > last_bad), default=None)
    return None if first_good is None else first_good - t0


def _ms(values: list[float], q: float) -> float | None:
    """The q-quantile in milliseconds; None (JSON null, not NaN) when nothing was measured."""
    return round(_p(values, q) * 1e3, 3) if values else None


def mttr(blob: bytes, model_path: Path, iterations: int) -> dict[str, Any]:
    """MTTR = first request answered by the incumbent after the last one answered (or failed) by the
    canary, minus the time of the failed-gate verdict. The canary holds 50 % (so the gate has incumbent
    evidence to compare with) and fails for real on about a third of its inputs."""
    from deployment.canary import CanaryConfig, StepConfig
    from deployment.router import InferenceError, Router
    from deployment.sample_models import erroring_classifier
    from deployment.serving import CanaryRun
    from deployment.sessions import load_session
    from sre_core.clock import FakeClock
    from sre_core.telemetry import NullSink

    bad_blob = erroring_classifier(n_features=N_FEATURES, n_classes=10, seed=0, error_threshold=0.5)
    config = CanaryConfig(steps=(StepConfig(0.5, 50, 1e9),), mirror_share=0.0, soak_s=0)
    incumbent = load_session(blob, name="m", version="good")
    bad = load_session(bad_blob, name="m", version="bad")
    results: dict[str, list[float]] = {"preloaded": [], "naive_reload": []}
    unanswered = 0
    rng = np.random.default_rng(2)
    inputs = [rng.normal(size=(1, N_FEATURES)).astype(np.float32) for _ in range(256)]
    for i in range(iterations * 2):
        path = "preloaded" if i % 2 == 0 else "naive_reload"
        router = Router("m", incumbent)
        clock = FakeClock()
        run = CanaryRun("m", router, bad, config, clock, NullSink())
        run.start()
        router.start_canary(bad, mirror_share=0.0, fallback=False)  # canary failures reach the client
        router.set_weight(0.5)
        answered: list[tuple[float, str]] = []
        stop = threading.Event()

        def traffic(r: Router, out: list[tuple[float, str]], halt: threading.Event) -> None:
            k = 0
            while not halt.is_set():
                k += 1
                try:
                    v = r.infer({"input": inputs[k % len(inputs)]}).version
                except InferenceError:
                    v = "failed"
                out.append((time.perf_counter(), v))

        worker = threading.Thread(target=traffic, args=(router, answered, stop))
        worker.start()
        try:
            give_up = time.perf_counter() + 30
            decision = run.evaluate()
            while decision.action != "abort" and time.perf_counter() < give_up:
                time.sleep(0.001)
                clock.advance(0.1)
                decision = run.evaluate()
            if decision.action != "abort":
                raise RuntimeError("the erroring canary was not cut off within 30 s")
            t0 = time.perf_counter()  # the failed-gate verdict
            if path == "preloaded":
                run.act(decision)
            else:
                router.replace_active(load_session(model_path, name="m", version="good-reloaded"))
            t_cut = time.perf_counter()
            # Let traffic flow on the restored version until it has answered (bounded): under load the
            # traffic thread may not run at all for a while after the cut, which left nothing to measure.
            while time.perf_counter() < t_cut + 10 and (
                time.perf_counter() < t_cut + 0.05
                or not any(v.startswith("good") and t > t_cut for (t, v) in answered[-8:])
            ):
                time.sleep(0.001)
        finally:
            stop.set()
            worker.join(10)
        took = recovery_s(answered, t0)
        if took is None:
            unanswered += 1
            continue
        results[path].append(took)
    pre, naive = results["preloaded"], results["naive_reload"]
    return {
        "iterations": iterations,
        "unanswered": unanswered,
        "note": "naive_reload is also the MTTR cost of canary.unload_standby (rollback reloads it)",
        "preloaded_p50_ms": _ms(pre, 0.5),
        "preloaded_p99_ms": _ms(pre, 0.99),
        "naive_reload_p50_ms": _ms(naive, 0.5),
        "naive_reload_p99_ms": _ms(naive, 0.99),
        "p50_ratio_naive_over_ours": round(_p(naive, 0.5) / _p(pre, 0.5), 2) if pre and naive else None,
    }


# -- canary verdicts under the default policy -------------------------------------------------------
CANARY_REQUESTS_PER_TICK = 200  # the controller's clock: 0.5 s per 200 requests (a 400 requests/s device)


def _relabel(blob: bytes, note: str) -> bytes:
    import onnx

    model = onnx.load_from_string(blob)
    model.doc_string = note
    return bytes(model.SerializeToString())


def _canary_trial(incumbent: bytes, candidate: bytes, n_features: int, seed: int) -> dict[str, Any]:
    """One canary under the default policy while two client threads send requests as fast as they can."""
    from deployment.canary import CanaryConfig
    from deployment.router import InferenceError, Router
    from deployment.serving import CanaryRun
    from deployment.sessions import load_session
    from policies.deployment import load_deployment_policy
    from sre_core.clock import FakeClock
    from sre_core.telemetry import NullSink

    policy = load_deployment_policy()
    config = CanaryConfig.from_spec(None, policy.canary_steps, policy.canary)
    router = Router("m", load_session(incumbent, name="m", version="1"), NullSink(), seed=seed)
    clock = FakeClock()
    run = CanaryRun("m", router, load_session(candidate, name="m", version="2"), config, clock, NullSink())
    from deployment.sample_models import erroring_inputs

    # exactly 1 % of the inputs above the erroring classifier's threshold (plain draws vary 0.4-1.8 %)
    inputs = [{"input": x} for x in erroring_inputs(seed, n_features=n_features)]
    stop = threading.Event()
    served = [0, 0]

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            with contextlib.suppress(InferenceError):  # only if the incumbent itself failed
                router.infer(inputs[i % len(inputs)])
            i += 7
            served[k] += 1

    workers = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
    for w in workers:
        w.start()
    step_times: list[float] = []
    t_start = time.perf_counter()
    try:
        run.start()
        t_step, mark = time.perf_counter(), 0
        for _ in range(200_000):
            if run.controller.final:
                break
            while sum(served) < mark + CANARY_REQUESTS_PER_TICK:
                stop.wait(0.001)
            mark = sum(served)
            clock.advance(0.5)
            step = run.controller.step
            phase = run.controller.phase
            run.tick()
            if run.controller.step != step or run.controller.phase != phase:
                now = time.perf_counter()
                step_times.append(now - t_step)
                t_step = now
    finally:
        stop.set()
        for w in workers:
            w.join(10)
    return {
        "phase": run.phase.value,
        "reason": run.controller.reason,
        "seconds": time.perf_counter() - t_start,
        "requests": sum(served),
        "step_seconds": step_times,
    }


def _standalone_ratio(a_blob: bytes, b_blob: bytes, n_features: int) -> float:
    """Median per-call time of b over a, interleaved, single thread (how much slower b really is)."""
    from deployment.sessions import load_session

    a = load_session(a_blob, name="m", version="a")
    b = load_session(b_blob, name="m", version="b")
    feeds = {"input": np.random.default_rng(0).normal(size=(1, n_features)).astype(np.float32)}
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(2000):
        for sess, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            sess.run(feeds)
            out.append(time.perf_counter() - t)
    return float(statistics.median(tb) / statistics.median(ta))


def canary_kinds() -> dict[str, tuple[bytes, bytes, int, str]]:
    """name -> (incumbent, candidate, input features, expected verdict): the four kinds the issue asks
    for, shared by the in-process trials and the daemon mode."""
    from deployment.sample_models import doubled_classifier, erroring_classifier, linear_classifier

    tiny: dict[str, Any] = {"hidden_layers": 2}
    big: dict[str, Any] = {"n_features": 64, "hidden_layers": 6, "hidden_size": 512}  # ~5 MiB
    base, large = linear_classifier(**tiny), linear_classifier(**big)
    slow = doubled_classifier(**tiny, copies=3)
    return {
        "identical_tiny": (base, _relabel(base, "2"), 16, "promoted"),
        "identical_5mib": (large, _relabel(large, "2"), 64, "promoted"),
        "slower_2x": (base, slow, 16, "aborted"),
        # input[:, 0] > 2.326 fails inside ONNX Runtime; erroring_inputs makes that exactly 1 % of inputs
        "errors_1pct": (base, erroring_classifier(error_threshold=2.326, **tiny), 16, "aborted"),
    }


def canary_trials(runs: int, only: set[str] | None = None) -> dict[str, Any]:
    """``runs`` canaries of each kind (``only``: these kinds) under the default policy (real sessions,
    two client threads)."""
    kinds = canary_kinds()
    base, slow = kinds["slower_2x"][0], kinds["slower_2x"][1]
    out: dict[str, Any] = {
        "policy": "shipped default (steps 1/5/25/50/100 %, 300 samples, soak 60 s, mirror 10 %)",
        "clock": f"controller time advances 0.5 s per {CANARY_REQUESTS_PER_TICK} requests (400 req/s)",
        "slower_2x_standalone_ratio": round(_standalone_ratio(base, slow, 16), 2),
    }
    for name, (inc, cand, n_features, expected) in kinds.items():
        if only and name not in only:
            continue
        trials = [_canary_trial(inc, cand, n_features, seed) for seed in range(runs)]
        right = sum(t["phase"] == expected for t in trials)
        per_step: dict[str, float] = {}
        for i in range(max((len(t["step_seconds"]) for t in trials), default=0)):
            vals = [t["step_seconds"][i] for t in trials if len(t["step_seconds"]) > i]
            per_step[str(i + 1)] = round(statistics.median(vals), 2)
        out[name] = {
            "expected": expected,
            "right": right,
            "runs": runs,
            "wrong_reasons": [t["reason"] for t in trials if t["phase"] != expected][:3],
            "median_decision_s": round(statistics.median(t["seconds"] for t in trials), 2),
            "median_requests": int(statistics.median(t["requests"] for t in trials)),
            "median_wall_s_per_transition": per_step,
        }
    return out


# -- canary verdicts through the real daemon --------------------------------------------------------
DAEMON_MODULES = {
    "identical_tiny": "tiny",
    "identical_5mib": "big",
    "slower_2x": "slow",
    "errors_1pct": "err",
}
VERDICTS = {
    "canary.promoted": "promoted",
    "canary.gate_failed": "aborted",
    "canary.inconclusive": "inconclusive",
    "canary.cancelled": "cancelled",
}


class _AuditTail:
    """The daemon's audit trail read from outside, incrementally (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.records
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].splitlines():
            with contextlib.suppress(ValueError):
                self.records.append(json.loads(line))
        return self.records

    def of(self, module: str, version: str, events: set[str] | None = None) -> list[dict[str, Any]]:
        return [
            r for r in self.records
            if r["data"].get("module") == module and r["data"].get("version") == version
            and (events is None or r["event"] in events)
        ]  # fmt: skip


def _ts(rec: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rec["ts"]).timestamp()


def _daemon_run(
    lv: Any,
    tail: _AuditTail,
    module: str,
    version: str,
    blob: bytes,
    spec: Any,
    timeout_s: float,
) -> dict[str, Any]:
    """Publish ``module`` ``version`` at the hub and wait (bounded) for the daemon's verdict on it."""
    from deployment.manifest import ModuleManifest

    f = lv.tmp / f"{module}-{version}.onnx"
    f.write_bytes(blob)
    t_pub = time.time()
    lv.repo.publish("stable", f, ModuleManifest(name=module, version=version, mode="managed", canary=spec))
    lv.repo.release("stable", module, version)
    deadline = time.monotonic() + timeout_s
    verdict = None
    while time.monotonic() < deadline:
        if lv.proc is not None and lv.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({lv.proc.returncode}):\n{lv.tail()}")
        tail.poll()
        done = tail.of(module, version, set(VERDICTS))
        refused = [
            r
            for r in tail.of(module, version, {"canary.aborted"})
            if "refused" in str(r["data"].get("reason"))
        ]
        if done or refused:
            verdict = (done or refused)[0]
            break
        time.sleep(0.25)
    if verdict is None:
        return {"outcome": "timeout", "publish_to_verdict_s": None, "step_s": [], "reason": "no verdict"}
    outcome = VERDICTS.get(verdict["event"], "refused")
    started = tail.of(module, version, {"canary.started"})
    steps = sorted(tail.of(module, version, {"canary.step"}), key=lambda r: r["seq"])
    marks = [_ts(r) for r in steps] + [_ts(verdict)]
    return {
        "outcome": outcome,
        "reason": str(verdict["data"].get("reason", "")),
        "publish_to_verdict_s": round(_ts(verdict) - t_pub, 2),
        "publish_to_canary_start_s": round(_ts(started[0]) - t_pub, 2) if started else None,
        # the canary's own record of each step opening; the last interval ends at the verdict
        "load_s": round(_ts(steps[0]) - _ts(started[0]), 2) if started and steps else None,
        "step_s": [round(b - a, 2) for a, b in itertools.pairwise(marks)],
        "verdict_at": verdict["ts"],
    }


def canary_daemon(
    runs: int,
    only: set[str] | None = None,
    connections: int = 4,
    spec: Any = None,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """``runs`` canaries of each kind through the real daemon (``sre-agent run`` as a child process, a
    real hub on loopback, releases published at the hub), clients sending inference over HTTP throughout.

    Kinds are interleaved run by run (tiny, 5 MiB, 2x slower, 1 % errors, then again), each its own
    model module served side by side, each run a new version of that module. ``spec``: kind -> the
    manifest's canary spec (None, the default: every field unset, so the device's shipped policy
    decides). The daemon's intervals are shortened only as the live tests shorten them (its settings:
    pull every 5 s); the canary runs on real time.
    """
    from deployment.manifest import ModuleManifest
    from deployment.sample_models import erroring_inputs

    sys.path.insert(0, str(ROOT))
    from tests.live_harness import LoadClient, infer_requests, live_rig

    kinds = {k: v for k, v in canary_kinds().items() if not only or k in only}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    load: list[float] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, live_rig(Path(tmp), rehash_every_s=3600) as lv:
        for kind, (inc, _cand, _nf, _exp) in kinds.items():
            f = lv.tmp / f"{DAEMON_MODULES[kind]}-1.0.onnx"
            f.write_bytes(inc)
            lv.repo.publish(
                "stable", f, ModuleManifest(name=DAEMON_MODULES[kind], version="1.0", mode="managed")
            )
            lv.repo.release("stable", DAEMON_MODULES[kind], "1.0")
        lv.start()
        client = LoadClient(lv.port, connections).start()
        tail = _AuditTail(lv.paths.audit_log)
        try:
            deadline = time.monotonic() + 300
            while not all(
                (st := lv.status(DAEMON_MODULES[k])).active is not None and st.phase.value == "idle"
                for k in kinds
            ):
                if time.monotonic() > deadline or (lv.proc is not None and lv.proc.poll() is not None):
                    raise RuntimeError(f"the first versions were never served:\n{lv.tail()}")
                time.sleep(0.5)
            for r in range(runs):
                for kind, (_inc, cand, n_features, _exp) in kinds.items():
                    module, version = DAEMON_MODULES[kind], f"{r + 2}.0"
                    client.target = infer_requests(module, erroring_inputs(r, n_features=n_features))
                    before, t_run = client.snapshot(), time.perf_counter()
                    res = _daemon_run(
                        lv, tail, module, version, _relabel(cand, f"{kind} {version}"),
                        spec(kind) if spec is not None else None, timeout_s,
                    )  # fmt: skip
                    after, spent = client.snapshot(), time.perf_counter() - t_run
                    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    res["requests"] = sum(delta.values())
                    res["requests_per_s"] = round(res["requests"] / spent, 1) if spent > 0 else None
                    res["client_not_200"] = {k: v for k, v in delta.items() if k != "200" and v}
                    res["loadavg_1m"] = round(os.getloadavg()[0], 2)
                    load.append(os.getloadavg()[0])
                    results[kind].append(res)
                    for _ in range(240):  # the slots settle (idle) before the next release
                        if lv.status(module).phase.value == "idle":
                            break
                        time.sleep(0.25)
        finally:
            client.stop()
            rc = lv.stop() if lv.proc is not None else None
    out: dict[str, Any] = {
        "mode": "daemon: sre-agent run child + hub on loopback, releases published at the hub",
        "policy": "shipped default (steps 1/5/25/50/100 %, 300 samples, soak 60 s, mirror 10 %)"
        if spec is None
        else "manifest specs given by the caller",
        "time": "real time throughout; daemon pull interval 5 s (its settings' minimum), as the live tests",
        "client": f"{connections} keep-alive HTTP connections, closed loop, exactly 1 % erroring inputs",
        "daemon_exit_code": rc,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "loadavg_1m": {
            "min": round(min(load), 2) if load else None,
            "median": round(statistics.median(load), 2) if load else None,
            "max": round(max(load), 2) if load else None,
        },
    }
    for kind, rows in results.items():
        expected = kinds[kind][3]
        outcomes = Counter(row["outcome"] for row in rows)
        verdict_s = [row["publish_to_verdict_s"] for row in rows if row["publish_to_verdict_s"] is not None]
        per_step: dict[str, float] = {}
        labels = ["step1", "step2", "step3", "step4", "step5", "soak"]
        for i, label in enumerate(labels):
            vals = [row["step_s"][i] for row in rows if len(row["step_s"]) > i]
            if vals:
                per_step[label] = round(statistics.median(vals), 2)
        out[kind] = {
            "module": DAEMON_MODULES[kind],
            "expected": expected,
            "runs": len(rows),
            "right": outcomes.get(expected, 0),
            "outcomes": dict(outcomes),
            "wrong_reasons": [row["reason"] for row in rows if row["outcome"] != expected][:3],
            "publish_to_verdict_s": verdict_s,
            "median_publish_to_verdict_s": round(statistics.median(verdict_s), 2) if verdict_s else None,
            "median_decision_s_per_step": per_step,
            "median_publish_to_canary_start_s": _median(
                [row.get("publish_to_canary_start_s") for row in rows]
            ),
            "median_load_s": _median([row.get("load_s") for row in rows]),
            "median_requests_per_s": _median([row.get("requests_per_s") for row in rows]),
            "client_not_200": dict(sum((Counter(row["client_not_200"]) for row in rows), Counter())),
            "runs_detail": rows,
        }
    return out


def _median(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(statistics.median(vals), 2) if vals else None


# -- requests lost during flips -------------------------------------------------------------------
def flip_loss(blob: bytes, flips: int, clients: int) -> dict[str, Any]:
    import httpx

    from deployment.canary import CanaryConfig, Phase, StepConfig
    from deployment.oip import create_app
    from deployment.serving import CanaryRun, ModelRepository
    from deployment.sessions import load_session
    from sre_core.clock import FakeClock
    from sre_core.http_server import ServerThread
    from sre_core.telemetry import NullSink

    repo = ModelRepository()
    router = repo.add(load_session(blob, name="m", version="v0"))
    config = CanaryConfig(
        steps=tuple(StepConfig(w, 30, 1e9) for w in (0.01, 0.05, 0.25, 0.5, 1.0)),
        soak_s=3,
        mirror_share=0.2,
        max_p95_latency_ratio=5.0,
    )
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    stop = threading.Event()
    x = np.random.default_rng(3).normal(size=(1, N_FEATURES)).astype(np.float32).ravel().tolist()
    req = {"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": x}]}
    phases = []
    with ServerThread(create_app(repo)) as server:

        def client() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                while not stop.is_set():
                    try:
                        ok = http.post("/v2/models/m/infer", json=req).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        counts["ok" if ok else "failed"] += 1

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        try:
            for k in range(flips):
                clock = FakeClock()
                run = CanaryRun(
                    "m", router, load_session(blob, name="m", version=f"v{k + 1}"), config, clock, NullSink()
                )
                run.start()
                for _ in range(20_000):
                    if run.controller.final:
                        break
                    time.sleep(0.01)
                    clock.advance(1.0)
                    run.tick()
                phases.append(run.phase.value)
            time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    return {
        "flips": flips,
        "promoted": phases.count(Phase.PROMOTED.value),
        "requests": counts["ok"] + counts["failed"],
        "requests_lost": counts["failed"],
        "goal_lost": 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--http-seconds", type=float, default=6.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--overhead-blocks", type=int, default=60)
    ap.add_argument("--mttr-iterations", type=int, default=50)
    ap.add_argument("--flips", type=int, default=2)
    ap.add_argument(
        "--canary",
        action="store_true",
        help="only the canary verdict trials (identical x2 sizes promoted, 2x slower / 1%% errors aborted)",
    )
    ap.add_argument("--canary-runs", type=int, default=20)
    ap.add_argument(
        "--canary-daemon",
        action="store_true",
        help="the canary verdict trials through the real daemon (sre-agent run + hub, HTTP clients)",
    )
    ap.add_argument("--canary-connections", type=int, default=4, help="--canary-daemon: client connections")
    ap.add_argument(
        "--canary-kinds",
        default="",
        help="comma-separated subset of identical_tiny,identical_5mib,slower_2x,errors_1pct (default: all)",
    )
    ap.add_argument(
        "--peer-venv",
        type=Path,
        default=PEER_VENV,
        help="venv holding MLServer (default: .venv-bench, built by `make bench`)",
    )
    ap.add_argument("--child", choices=["ours", "ours-offload", "peer", "ours-grpc"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_server(args.child, args.port, args.model)
        return 0
    started = time.perf_counter()
    if args.canary_daemon:
        only = {k for k in args.canary_kinds.split(",") if k}
        res1: dict[str, Any] = {"benchmark": "serving-canary-daemon", "cpus": os.cpu_count()}
        res1["canary"] = canary_daemon(args.canary_runs, only or None, args.canary_connections)
        res1["elapsed_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(res1, sort_keys=True))
        return 0
    if args.canary:
        res0: dict[str, Any] = {"benchmark": "serving-canary", "cpus": os.cpu_count()}
        only = {k for k in args.canary_kinds.split(",") if k}
        res0["canary"] = canary_trials(args.canary_runs, only or None)
        res0["elapsed_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(res0, sort_keys=True))
        return 0
    blob = model_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.onnx"
        model_path.write_bytes(blob)
        res: dict[str, Any] = {
            "benchmark": "serving",
            "model": f"MLP {N_FEATURES}->{HIDDEN}x{WIDTH}->10, ONNX built in code, batch 1, 1 ORT thread",
            "cpus": os.cpu_count(),
        }
        res["router_overhead"] = router_overhead(blob, args.overhead_blocks, 100)
        res["http"] = http_comparison(
            model_path, args.http_seconds, args.concurrency, args.peer_venv.absolute()
        )
        res["peer"] = res["http"]["peer"]
        res["peer_throughput_ratio"] = res["http"]["peer_throughput_ratio"]
        res["peer_p99_ratio"] = res["http"]["peer_p99_ratio"]
        res["grpc"] = res["http"].pop("grpc")
        res["mttr"] = mttr(blob, model_path, args.mttr_iterations)
        res["flip"] = flip_loss(blob, args.flips, 4)
    res["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
