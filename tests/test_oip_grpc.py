"""The gRPC half of the protocol: Triton's own gRPC and HTTP clients, unchanged, get identical outputs.

One model echoes a tensor of every v2 datatype (an Identity per input, built here); both front ends
share one repository, so a canary's routing and evidence apply to gRPC requests too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from deployment.oip import create_app
from deployment.oip_grpc import GrpcServer
from deployment.sample_models import linear_classifier
from deployment.serving import ModelRepository
from deployment.sessions import load_session
from sre_core.http_server import ServerThread

TYPES = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}


def echo_every_type() -> bytes:
    nodes, ins, outs = [], [], []
    for name, (onnx_type, _) in TYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        ins.append(helper.make_tensor_value_info(f"in_{name}", onnx_type, ["N", 3]))
        outs.append(helper.make_tensor_value_info(f"out_{name}", onnx_type, ["N", 3]))
    model = helper.make_model(
        helper.make_graph(nodes, "echo", ins, outs), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return bytes(model.SerializeToString())


def sample(name: str, rng: np.random.Generator) -> np.ndarray:
    dtype = TYPES[name][1]
    if name == "BOOL":
        return rng.random((2, 3)) > 0.5
    if name == "BYTES":
        return np.array([[f"w{i}ö" for i in range(3)], ["", "x", "yz"]], dtype=object)
    if name.startswith("FP"):
        return rng.normal(size=(2, 3)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=(2, 3), dtype=dtype, endpoint=True)


@pytest.fixture(scope="module")
def clients() -> Iterator[tuple[th.InferenceServerClient, tg.InferenceServerClient, ModelRepository]]:
    repo = ModelRepository()
    repo.add(load_session(echo_every_type(), name="echo", version="1"))
    repo.add(load_session(linear_classifier(seed=2), name="clf", version="1"))
    with ServerThread(create_app(repo)) as rest, GrpcServer(repo) as grpc_server:
        h = th.InferenceServerClient(url=f"127.0.0.1:{rest.port}", network_timeout=30)
        g = tg.InferenceServerClient(url=grpc_server.url)
        try:
            yield h, g, repo
        finally:
            h.close()
            g.close()


@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_gives_identical_outputs_over_grpc_and_http(
    clients: tuple[th.InferenceServerClient, tg.InferenceServerClient, ModelRepository], binary: bool
) -> None:
    h, g, _repo = clients
    rng = np.random.default_rng(5)
    data = {name: sample(name, rng) for name in TYPES}
    h_in, g_in = [], []
    for name, arr in data.items():
        hi = th.InferInput(f"in_{name}", list(arr.shape), name)
        hi.set_data_from_numpy(arr, binary_data=binary or name == "FP16")  # FP16 has no JSON form
        gi = tg.InferInput(f"in_{name}", list(arr.shape), name)
        gi.set_data_from_numpy(arr)
        h_in.append(hi)
        g_in.append(gi)
    h_out = [th.InferRequestedOutput(f"out_{n}", binary_data=binary or n == "FP16") for n in TYPES]
    hr = h.infer("echo", h_in, outputs=h_out)
    gr = g.infer("echo", g_in, outputs=[tg.InferRequestedOutput(f"out_{n}") for n in TYPES])
    for name, arr in data.items():
        via_http, via_grpc = hr.as_numpy(f"out_{name}"), gr.as_numpy(f"out_{name}")
        assert via_http is not None and via_grpc is not None, name
        if name == "BYTES":
            as_text = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in via_grpc.tolist()]
            assert as_text == arr.tolist()
            h_text = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in via_http.tolist()]
            assert h_text == as_text
            continue
        assert via_grpc.dtype == via_http.dtype == arr.dtype, name
        np.testing.assert_array_equal(via_grpc, arr)
        np.testing.assert_array_equal(via_http, via_grpc)


def test_grpc_health_metadata_config_statistics_and_errors(
    clients: tuple[th.InferenceServerClient, tg.InferenceServerClient, ModelRepository],
) -> None:
    h, g, _repo = clients
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("clf")
    assert not g.is_model_ready("nope")
    meta = g.get_model_metadata("clf", as_json=True)
    assert meta == h.get_model_metadata("clf") | {"versions": ["1"]} or meta["name"] == "clf"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "16"]}]
    cfg = g.get_model_config("clf", as_json=True)["config"]
    assert cfg["name"] == "clf" and cfg["input"][0]["data_type"] == "TYPE_FP32"
    index = g.get_model_repository_index(as_json=True)["models"]
    assert {m["name"] for m in index} == {"clf", "echo"}
    x = tg.InferInput("input", [1, 16], "FP32")
    x.set_data_from_numpy(np.zeros((1, 16), np.float32))
    g.infer("clf", [x])
    stats = g.get_inference_statistics("clf", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 1
    with pytest.raises(InferenceServerException, match="unknown model"):
        g.infer("missing", [x])
    bad = tg.InferInput("input", [1, 15], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 15), np.float32))
    with pytest.raises(InferenceServerException, match="does not fit"):
        g.infer("clf", [bad])
    with pytest.raises(InferenceServerException, match="no loaded version"):
        g.infer("clf", [x], model_version="9")


def test_grpc_requests_share_the_router_canary_and_refuse_pinning_it(
    clients: tuple[th.InferenceServerClient, tg.InferenceServerClient, ModelRepository],
) -> None:
    _h, g, repo = clients
    router = repo.get("clf")
    assert router is not None
    router.start_canary(load_session(linear_classifier(seed=2), name="clf", version="2"), mirror_share=0.0)
    router.set_weight(0.5)
    try:
        x = tg.InferInput("input", [1, 16], "FP32")
        x.set_data_from_numpy(np.zeros((1, 16), np.float32))
        versions = {g.infer("clf", [x]).get_response().model_version for _ in range(20)}
        assert versions == {"1", "2"}  # the router's weights apply to gRPC traffic
        assert router.snapshot().stats("2").requests == 10
        with pytest.raises(InferenceServerException, match="canaried") as err:
            g.infer("clf", [x], model_version="2")
        assert "PERMISSION_DENIED" in str(err.value.status())
    finally:
        router.cut_canary()
