"""Sessions, the router and the v2 server with real ONNX Runtime sessions and real HTTP on loopback."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from deployment.canary import CanaryConfig, Phase, StepConfig
from deployment.manifest import RuntimeSpec
from deployment.oip import HEADER_LENGTH, create_app
from deployment.router import InferenceError, Router
from deployment.sample_models import erroring_classifier, linear_classifier
from deployment.serving import CanaryRun, ModelRepository
from deployment.sessions import CPU, SessionError, SessionOptions, choose_providers, load_session
from sre_core.clock import FakeClock
from sre_core.http_server import ServerThread
from sre_core.telemetry import MemorySink

BASE = linear_classifier(seed=0, hidden_layers=1)


def x(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    return rng.normal(size=(n, 16)).astype(np.float32)


# -- sessions ----------------------------------------------------------------------------------
def test_providers_fall_back_to_cpu_and_threads_come_from_options() -> None:
    assert choose_providers(["CUDAExecutionProvider", "TensorrtExecutionProvider"], [CPU]) == [CPU]
    assert choose_providers(["CUDAExecutionProvider", CPU], ["CUDAExecutionProvider", CPU]) == [
        "CUDAExecutionProvider",
        CPU,
    ]
    runtime = RuntimeSpec(providers=["CUDAExecutionProvider"])
    s = load_session(BASE, name="m", version="1", runtime=runtime, options=SessionOptions(intra_op_threads=2))
    assert s.providers == (CPU,)
    opts = s.session.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert [i.name for i in s.inputs] == ["input"] and s.primary_output == "probabilities"


def test_a_corrupt_model_is_a_clear_error() -> None:
    with pytest.raises(SessionError, match="onnxruntime refused it"):
        load_session(b"not a model", name="m", version="1")


# -- routing ------------------------------------------------------------------------------------
def test_weighted_share_is_exact_and_mirroring_measures_divergence() -> None:
    rng = np.random.default_rng(0)
    router = Router("m", load_session(BASE, name="m", version="1"), seed=1)
    router.start_canary(
        load_session(linear_classifier(seed=9, hidden_layers=1), name="m", version="2"), mirror_share=0
    )
    router.set_weight(0.25)
    seen = Counter(router.infer({"input": x(rng)}).version for _ in range(400))
    assert seen == {"1": 300, "2": 100}
    router.start_canary(load_session(BASE, name="m", version="3"), mirror_share=1.0)
    before = router.snapshot()
    for _ in range(50):
        router.infer({"input": x(rng, 4)})
    delta = router.snapshot().minus(before)
    assert delta.pair_counts("3") == (200, 0)  # identical weights: every row agrees
    assert delta.stats("3").requests == 50 and delta.stats("1").requests == 50


def test_cut_off_and_rollback_are_pointer_swaps() -> None:
    rng = np.random.default_rng(1)
    v1 = load_session(BASE, name="m", version="1")
    router = Router("m", v1)
    router.start_canary(load_session(BASE, name="m", version="2"), mirror_share=0.0)
    router.set_weight(1.0)
    assert router.infer({"input": x(rng)}).version == "2"
    router.cut_canary()
    assert router.infer({"input": x(rng)}).version == "1"
    router.start_canary(load_session(BASE, name="m", version="2"), mirror_share=0.0)
    router.promote()
    assert router.infer({"input": x(rng)}).version == "2"
    assert router.routing.standby is v1
    router.rollback()
    assert router.infer({"input": x(rng)}).version == "1"


def test_canary_failures_are_counted_but_answered_by_the_incumbent() -> None:
    rng = np.random.default_rng(2)
    router = Router("m", load_session(BASE, name="m", version="1"))
    router.start_canary(
        load_session(erroring_classifier(seed=0, hidden_layers=1), name="m", version="2"), mirror_share=0
    )
    router.set_weight(1.0)
    answers = Counter(router.infer({"input": x(rng)}).version for _ in range(300))
    errors = router.snapshot().stats("2").errors
    assert errors > 0 and answers["1"] == errors and answers["2"] == 300 - errors
    router.start_canary(
        load_session(erroring_classifier(seed=0, hidden_layers=1), name="m", version="3"),
        mirror_share=0,
        fallback=False,
    )
    router.set_weight(1.0)
    bad = np.full((1, 16), 5.0, np.float32)  # feature 0 above the threshold: the graph fails
    with pytest.raises(InferenceError):
        router.infer({"input": bad})


def test_telemetry_has_per_version_counts_latency_and_histograms() -> None:
    sink = MemorySink()
    rng = np.random.default_rng(3)
    router = Router("m", load_session(BASE, name="m", version="1"), sink)
    router.start_canary(
        load_session(erroring_classifier(seed=0, hidden_layers=1), name="m", version="2"), mirror_share=0
    )
    router.set_weight(0.5)
    for _ in range(200):
        router.infer({"input": x(rng)})
    mark = router.flush_telemetry()
    got = {(n, lab["version"], lab.get("slot")): v for (n, v, lab) in sink.metrics}
    assert got[("serving.requests", "2", "canary")] == 100
    assert 0 < got[("serving.errors", "2", "canary")] < 100
    assert got[("serving.errors", "1", "active")] == 0
    assert got[("serving.latency_p95_s", "1", "active")] > 0
    hists = [r for (t, r) in sink.records if t == "serving_latency_histogram"]
    assert {h["version"] for h in hists} == {"1", "2"}
    assert sum(hists[0]["counts"].values()) > 0
    sink.metrics.clear()
    router.flush_telemetry(mark)  # nothing new since the mark
    assert not sink.metrics


# -- zero loss during a flip --------------------------------------------------------------------
def test_flip_under_concurrent_in_process_load_loses_nothing() -> None:
    router = Router("m", load_session(BASE, name="m", version="1"), seed=4)
    stop = threading.Event()
    failures: list[BaseException] = []
    seen: list[Counter[str]] = [Counter() for _ in range(4)]

    def worker(i: int) -> None:
        rng = np.random.default_rng(10 + i)
        for _ in range(200_000):
            if stop.is_set():
                return
            try:
                seen[i][router.infer({"input": x(rng)}).version] += 1
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    def let_traffic_flow(n: int = 200) -> None:
        target = sum(sum(c.values()) for c in seen) + n
        for _ in range(2000):  # bounded: at most ~20 s
            if failures or sum(sum(c.values()) for c in seen) >= target:
                return
            stop.wait(0.01)

    try:
        for cycle in range(20):  # 20 flips while the workers hammer the router
            router.start_canary(load_session(BASE, name="m", version=f"v{cycle + 2}"), mirror_share=0.2)
            for w in (0.01, 0.5, 1.0):
                router.set_weight(w)
                let_traffic_flow()
            router.promote()
            let_traffic_flow()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures
    assert sum(sum(c.values()) for c in seen) >= 20 * 4 * 200
    assert router.routing.active.version == "v21"
    assert sum(c["v21"] for c in seen) > 0


def test_canary_flip_under_concurrent_http_load_loses_no_request() -> None:
    sink = MemorySink()
    repo = ModelRepository(sink)
    router = repo.add(load_session(BASE, name="m", version="1.0"), seed=5)
    clock = FakeClock()
    config = CanaryConfig(
        steps=(StepConfig(0.1, 40, 1e6), StepConfig(0.5, 40, 1e6), StepConfig(1.0, 40, 1e6)),
        soak_s=5,
        mirror_share=0.2,
        max_p95_latency_ratio=5.0,  # this test is about the flip, not latency on a shared box
        max_error_rate_increase=0.05,
    )
    run = CanaryRun("m", router, load_session(BASE, name="m", version="2.0"), config, clock, sink)
    stop = threading.Event()
    results: list[list[tuple[int, str]]] = [[] for _ in range(4)]
    body = np.zeros((1, 16), np.float32)
    with ServerThread(create_app(repo)) as server:

        def client(i: int) -> None:
            rng = np.random.default_rng(20 + i)
            with httpx.Client(base_url=server.url, timeout=10) as http:
                for _ in range(50_000):
                    if stop.is_set():
                        return
                    payload = x(rng) if i % 2 else body
                    req = {
                        "inputs": [
                            {
                                "name": "input",
                                "datatype": "FP32",
                                "shape": [1, 16],
                                "data": payload.ravel().tolist(),
                            }
                        ]
                    }
                    try:
                        resp = http.post("/v2/models/m/infer", json=req)
                        version = resp.json().get("model_version", "") if resp.status_code == 200 else ""
                        results[i].append((resp.status_code, version))
                    except httpx.HTTPError:
                        results[i].append((-1, ""))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            run.start()
            for _ in range(3000):
                if run.controller.final:
                    break
                stop.wait(0.02)
                clock.advance(1.0)
                run.tick()
            flipped_at = [len(r) for r in results]
            while min(len(r) - f for r, f in zip(results, flipped_at, strict=True)) < 20:
                stop.wait(0.02)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert run.phase is Phase.PROMOTED
    codes = Counter(code for r in results for (code, _v) in r)
    assert set(codes) == {200}, codes  # not one request failed, before, during or after the flip
    versions = Counter(v for r in results for (_c, v) in r)
    assert versions["1.0"] > 0 and versions["2.0"] > 0
    for r, f in zip(results, flipped_at, strict=True):
        assert {v for (_c, v) in r[f + 1 :]} == {"2.0"}  # after the flip only the new version answers


def test_binary_request_over_plain_http() -> None:
    repo = ModelRepository()
    repo.add(load_session(BASE, name="m", version="1"))
    data = np.random.default_rng(6).normal(size=(2, 16)).astype(np.float32)
    head = (
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[2,16],"parameters":{"binary_data_size":128}}],'
        b'"outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}'
    )
    with (
        ServerThread(create_app(repo, max_body_bytes=4096)) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        resp = http.post(
            "/v2/models/m/infer", content=head + data.tobytes(), headers={HEADER_LENGTH: str(len(head))}
        )
        assert resp.status_code == 200
        n = int(resp.headers[HEADER_LENGTH])
        out = np.frombuffer(resp.content[n:], np.float32).reshape(2, 4)
        expected = load_session(BASE, name="m", version="1").run({"input": data})["probabilities"]
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        short = http.post(
            "/v2/models/m/infer", content=head + data.tobytes()[:-4], headers={HEADER_LENGTH: str(len(head))}
        )
        assert short.status_code == 400 and "fewer binary bytes" in short.json()["error"]
        big = http.post("/v2/models/m/infer", content=b"x" * 5000)
        assert big.status_code == 413
        assert http.post("/v2/models/m/infer", content=b"{nope").status_code == 400
        assert http.get("/v2/health/live").status_code == 200
    empty = ModelRepository()
    with ServerThread(create_app(empty)) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/v2/health/ready").status_code == 503


def test_chaos_input_noise_reaches_the_model_through_the_router_hook(tmp_path: Path) -> None:
    from chaos.faults import chaos_dir
    from sre_agent.cli.serve import InputNoise

    clock = FakeClock()
    spec = chaos_dir(tmp_path)
    spec.mkdir(parents=True)
    expires = (clock.now() + timedelta(seconds=60)).isoformat()
    (spec / "input_noise.json").write_text(
        json.dumps({"share": 1.0, "sigma": 3.0, "seed": 1, "expires_at": expires})
    )
    repo = ModelRepository(preprocess=InputNoise(tmp_path, clock))
    router = repo.add(load_session(BASE, name="m", version="1"))
    clean = load_session(BASE, name="m", version="1")
    data = np.random.default_rng(7).normal(size=(1, 16)).astype(np.float32)
    noisy = router.infer({"input": data}).outputs["probabilities"]
    assert not np.allclose(noisy, clean.run({"input": data})["probabilities"])
    (spec / "input_noise.json").unlink()  # the fault is undone; the hook notices within a second
    clock.advance(1.5)
    np.testing.assert_allclose(
        router.infer({"input": data}).outputs["probabilities"], clean.run({"input": data})["probabilities"]
    )
