"""REST fixes, checked with Triton's own HTTP client and raw sockets on loopback.

How each could break: a 404 that tritonclient cannot parse; a Triton extension route missing; NaN
written into a JSON body (invalid JSON); BYTES tensors refused or garbled; a client that stalls its body
holding a request open for ever; a client pinning the canary version to steer its verdict.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from deployment.manifest import RuntimeSpec
from deployment.oip import create_app
from deployment.sample_models import linear_classifier, linear_regressor
from deployment.serving import ModelRepository
from deployment.sessions import load_session
from sre_core.http_server import ServerThread


def string_echo() -> bytes:
    """``text[N] (string) -> echo[N] (string)``: an Identity on a string tensor."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerThread, ModelRepository]]:
    repo = ModelRepository()
    repo.add(load_session(linear_classifier(seed=3), name="clf", version="7"))
    repo.add(
        load_session(linear_regressor(seed=4), name="reg", version="1", runtime=RuntimeSpec(task="regressor"))
    )
    repo.add(load_session(string_echo(), name="echo", version="1"))
    with ServerThread(create_app(repo, body_timeout_s=0.5)) as srv:
        yield srv, repo


@pytest.fixture(scope="module")
def client(server: tuple[ServerThread, ModelRepository]) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(url=f"127.0.0.1:{server[0].port}", connection_timeout=10, network_timeout=10)
    try:
        yield c
    finally:
        c.close()


def test_every_404_is_a_json_error(server: tuple[ServerThread, ModelRepository]) -> None:
    base = f"http://127.0.0.1:{server[0].port}"
    with httpx.Client(timeout=10) as h:
        for method, path in (("GET", "/v2/nope"), ("GET", "/"), ("POST", "/v2/models/missing/infer")):
            r = h.request(method, base + path, content=b"{}")
            assert r.status_code == 404, path
            assert "error" in r.json(), path
        r = h.request("DELETE", base + "/v2/health/live")
        assert r.status_code == 405 and "error" in r.json()


def test_triton_config_index_and_statistics(client: th.InferenceServerClient) -> None:
    cfg = client.get_model_config("clf")
    assert cfg["name"] == "clf" and cfg["platform"] == "onnxruntime_onnx"
    assert cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 16]}]
    index = client.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {
        ("clf", "7", "READY"),
        ("echo", "1", "READY"),
    }
    inp = th.InferInput("input", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    before = client.get_inference_statistics("clf")["model_stats"][0]["inference_count"]
    for _ in range(3):
        client.infer("clf", [inp])
    stats = client.get_inference_statistics("clf")["model_stats"][0]
    assert stats["name"] == "clf" and stats["version"] == "7" and stats["inference_count"] == before + 3
    assert stats["inference_stats"]["success"]["ns"] > 0
    assert {s["name"] for s in client.get_inference_statistics()["model_stats"]} == {"clf", "reg", "echo"}
    with pytest.raises(InferenceServerException, match="not offered"):
        client.load_model("clf")
    meta = client.get_server_metadata()
    assert {"model_configuration", "model_repository", "statistics"} <= set(meta["extensions"])


def test_nan_outputs_are_refused_as_json_and_carried_as_binary(client: th.InferenceServerClient) -> None:
    x = np.full((2, 8), np.nan, np.float32)
    inp = th.InferInput("input", [2, 8], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="NaN or infinity") as err:
        client.infer("reg", [inp], outputs=[th.InferRequestedOutput("value", binary_data=False)])
    assert err.value.status() == "500"
    got = client.infer("reg", [inp], outputs=[th.InferRequestedOutput("value", binary_data=True)])
    value = got.as_numpy("value")
    assert value is not None and np.isnan(value).all()


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors_round_trip(client: th.InferenceServerClient, binary: bool) -> None:
    words = np.array(["hello", "wörld", "", "a longer sentence"], dtype=object)
    inp = th.InferInput("text", [4], "BYTES")
    inp.set_data_from_numpy(words, binary_data=binary)
    out = client.infer("echo", [inp], outputs=[th.InferRequestedOutput("echo", binary_data=binary)])
    got = out.as_numpy("echo")
    assert got is not None
    assert [v.decode() if isinstance(v, bytes) else v for v in got.tolist()] == words.tolist()


def test_a_stalled_body_is_answered_408(server: tuple[ServerThread, ModelRepository]) -> None:
    with socket.create_connection(("127.0.0.1", server[0].port), timeout=30) as sock:
        head = (
            "POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"inputs": [')  # then nothing: the client stalls
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408")
    assert "stalled" in json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]


def test_pinning_the_canary_version_is_refused_over_http(
    server: tuple[ServerThread, ModelRepository],
) -> None:
    srv, repo = server
    router = repo.get("clf")
    assert router is not None
    router.start_canary(load_session(linear_classifier(seed=3), name="clf", version="8"), mirror_share=0.0)
    try:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}]}
        with httpx.Client(timeout=10) as h:
            r = h.post(f"http://127.0.0.1:{srv.port}/v2/models/clf/versions/8/infer", json=body)
            assert r.status_code == 403 and "canaried" in r.json()["error"]
            meta = h.get(f"http://127.0.0.1:{srv.port}/v2/models/clf").json()
            assert "8" not in meta["versions"]
        assert router.snapshot().stats("8").requests == 0
    finally:
        router.cut_canary()
