"""Triton's own HTTP client, unchanged, against our v2 server on loopback: correct outputs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from deployment.manifest import RuntimeSpec
from deployment.oip import create_app
from deployment.sample_models import linear_classifier, linear_regressor
from deployment.serving import ModelRepository
from deployment.sessions import load_session
from sre_core.http_server import ServerThread

CLF = linear_classifier(n_features=16, n_classes=4, seed=3, hidden_layers=1)
REG = linear_regressor(n_features=8, seed=4)


def reference(blob: bytes, x: np.ndarray) -> np.ndarray:
    """What ONNX Runtime itself computes, independently of our server."""
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": x})[0])


@pytest.fixture(scope="module")
def client() -> Iterator[th.InferenceServerClient]:
    repo = ModelRepository()
    repo.add(load_session(CLF, name="clf", version="7"))
    repo.add(load_session(REG, name="reg", version="1", runtime=RuntimeSpec(task="regressor")))
    with ServerThread(create_app(repo)) as server:
        c = th.InferenceServerClient(
            url=f"127.0.0.1:{server.port}", connection_timeout=10, network_timeout=10
        )
        try:
            yield c
        finally:
            c.close()


def test_health_and_metadata(client: th.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("clf") and client.is_model_ready("clf", model_version="7")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("clf")
    assert meta["name"] == "clf" and meta["versions"] == ["7"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]}]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_matches_onnxruntime(
    client: th.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    x = np.random.default_rng(11).normal(size=(5, 16)).astype(np.float32)
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = th.InferRequestedOutput("probabilities", binary_data=binary_out)
    result = client.infer("clf", [inp], outputs=[out], request_id="r-1")
    got = result.as_numpy("probabilities")
    assert got is not None and got.shape == (5, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(CLF, x), rtol=1e-6, atol=1e-7)
    resp = result.get_response()
    assert resp["id"] == "r-1" and resp["model_version"] == "7"


def test_regressor_default_outputs_and_compressed_request(client: th.InferenceServerClient) -> None:
    x = np.random.default_rng(12).normal(size=(3, 8)).astype(np.float32)
    inp = th.InferInput("input", [3, 8], "FP32")
    inp.set_data_from_numpy(x)
    for algo in (None, "gzip", "deflate"):
        result = client.infer("reg", [inp], request_compression_algorithm=algo)
        np.testing.assert_allclose(result.as_numpy("value"), reference(REG, x), rtol=1e-6)


def test_bad_requests_get_clear_errors(client: th.InferenceServerClient) -> None:
    x = np.zeros((1, 16), np.float64)
    wrong_type = th.InferInput("input", [1, 16], "FP64")
    wrong_type.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="expects FP32") as err:
        client.infer("clf", [wrong_type])
    assert err.value.status() == "400"
    wrong_shape = th.InferInput("input", [1, 15], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 15), np.float32))
    with pytest.raises(InferenceServerException, match="does not fit"):
        client.infer("clf", [wrong_shape])
    wrong_name = th.InferInput("pixels", [1, 16], "FP32")
    wrong_name.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException, match="no input 'pixels'"):
        client.infer("clf", [wrong_name])
    ok = th.InferInput("input", [1, 16], "FP32")
    ok.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException, match="unknown model") as err:
        client.infer("missing", [ok])
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no output 'logits'"):
        client.infer("clf", [ok], outputs=[th.InferRequestedOutput("logits")])
    with pytest.raises(InferenceServerException, match="no loaded version"):
        client.infer("clf", [ok], model_version="99")
