"""Small real ONNX models built on the spot (tests, benchmarks, the demo).

Nothing can download weights on these machines, so every model used to exercise serving, canaries and
verification is generated here with the ``onnx`` helper API, deterministically from a seed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["linear_classifier", "linear_regressor"]

OPSET = 17


def linear_classifier(
    n_features: int = 16,
    n_classes: int = 4,
    seed: int = 0,
    hidden_layers: int = 0,
    hidden_size: int = 64,
    input_name: str = "input",
    output_name: str = "probabilities",
) -> bytes:
    """A softmax classifier ``input[N, n_features] -> probabilities[N, n_classes]``.

    ``hidden_layers`` adds MatMul+Relu layers: the same task, more work per request (a "slower" model).
    Returns the serialized model.
    """
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    prev, width = input_name, n_features
    for i in range(hidden_layers):
        w = rng.normal(0, 1 / np.sqrt(width), (width, hidden_size)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"hw{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"hw{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"hr{i}"]))
        prev, width = f"hr{i}", hidden_size
    w = rng.normal(0, 1, (width, n_classes)).astype(np.float32)
    b = rng.normal(0, 0.1, (n_classes,)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    nodes += [
        helper.make_node("MatMul", [prev, "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [output_name], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        f"classifier_s{seed}",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def linear_regressor(
    n_features: int = 8, seed: int = 0, input_name: str = "input", output_name: str = "value"
) -> bytes:
    """``input[N, n_features] -> value[N, 1]``, a linear map."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (n_features, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "w"], [output_name])],
        f"regressor_s{seed}",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
