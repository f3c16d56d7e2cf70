"""Small real ONNX models built on the spot (tests, benchmarks, the demo).

Nothing can download weights on these machines, so every model used to exercise serving, canaries and
verification is generated here with the ``onnx`` helper API, deterministically from a seed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "doubled_classifier",
    "erroring_classifier",
    "erroring_inputs",
    "linear_classifier",
    "linear_regressor",
    "slow_classifier",
]

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


def erroring_classifier(
    n_features: int = 16,
    n_classes: int = 4,
    seed: int = 0,
    error_threshold: float = 1.0,
    hidden_layers: int = 0,
    input_name: str = "input",
    output_name: str = "probabilities",
) -> bytes:
    """The :func:`linear_classifier` of ``seed`` whose graph *fails at run time* on some inputs.

    The failure is real, inside ONNX Runtime: a ``Gather`` takes its index from the data (index 1 when
    ``input[:, 0] > error_threshold``, else 0) from a one-element table, so any batch holding such a
    row raises "indices element out of data bounds". On standard-normal inputs ``error_threshold=1.0``
    fails about 16 % of single-row requests; other rows get exactly the base model's output.
    """
    base = onnx.load_from_string(
        linear_classifier(
            n_features, n_classes, seed, hidden_layers, input_name=input_name, output_name="_probs"
        )
    )
    graph = base.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1.0], dtype=np.float32), "_one_table"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "_col0"),
            numpy_helper.from_array(np.array(error_threshold, dtype=np.float32), "_thr"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Gather", [input_name, "_col0"], ["_x0"], axis=1),  # [N, 1]
            helper.make_node("Greater", ["_x0", "_thr"], ["_bad"]),
            helper.make_node("Cast", ["_bad"], ["_idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["_one_table", "_idx"], ["_gate"], axis=0),  # [N, 1] of 1.0
            helper.make_node("Mul", ["_probs", "_gate"], [output_name]),
        ]
    )
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_classes])])
    graph.name = f"erroring_classifier_s{seed}"
    onnx.checker.check_model(base)
    return bytes(base.SerializeToString())


def erroring_inputs(
    seed: int, count: int = 500, n_features: int = 16, threshold: float = 2.326, share: float = 0.01
) -> list[np.ndarray]:
    """Standard-normal single-row inputs of which exactly ``round(share * count)`` have
    ``input[:, 0] > threshold`` (the rows an :func:`erroring_classifier` with that threshold fails on).

    Cycling through them gives an error rate of exactly ``share``; plain normal draws do not (512 draws
    above the 1 % quantile number anywhere from 2 to 9, a 0.4 % to 1.8 % "1 %" candidate).
    """
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(count, n_features)).astype(np.float32)
    first = rows[:, 0]
    first[first > threshold] = np.float32(threshold) - np.abs(
        first[first > threshold] - np.float32(threshold)
    )
    bad = rng.choice(count, size=round(share * count), replace=False)
    first[bad] = (
        np.float32(threshold) + np.float32(0.1) + np.abs(rng.normal(size=bad.size)).astype(np.float32)
    )
    return [rows[i : i + 1] for i in range(count)]


def slow_classifier(
    n_features: int = 16,
    n_classes: int = 4,
    seed: int = 0,
    hidden_layers: int = 0,
    extra_layers: int = 8,
    extra_size: int = 256,
    input_name: str = "input",
    output_name: str = "probabilities",
    hidden_size: int = 64,
) -> bytes:
    """The :func:`linear_classifier` of ``seed`` (same outputs) doing ``extra_layers`` of wasted work.

    A chain of MatMul+Relu layers runs on the input and its mean is added to the logits times zero, so
    the predictions equal the base model's while every request costs more: a pure latency regression.
    ``extra_layers=hidden_layers, extra_size=hidden_size`` repeats the base model's work: about 2x.
    """
    base = onnx.load_from_string(
        linear_classifier(
            n_features,
            n_classes,
            seed,
            hidden_layers,
            hidden_size,
            input_name=input_name,
            output_name="_probs",
        )
    )
    graph = base.graph
    rng = np.random.default_rng(seed + 1000)
    prev, width = input_name, n_features
    for i in range(extra_layers):
        w = rng.normal(0, 1 / np.sqrt(width), (width, extra_size)).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(w, f"_xw{i}"))
        graph.node.append(helper.make_node("MatMul", [prev, f"_xw{i}"], [f"_x{i}"]))
        graph.node.append(helper.make_node("Relu", [f"_x{i}"], [f"_xr{i}"]))
        prev, width = f"_xr{i}", extra_size
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "_zero"))
    graph.node.extend(
        [
            helper.make_node("ReduceMean", [prev], ["_waste"], keepdims=1),  # [1, 1]
            helper.make_node("Mul", ["_waste", "_zero"], ["_nothing"]),
            helper.make_node("Add", ["_probs", "_nothing"], [output_name]),
        ]
    )
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_classes])])
    graph.name = f"slow_classifier_s{seed}"
    onnx.checker.check_model(base)
    return bytes(base.SerializeToString())


def doubled_classifier(
    n_features: int = 16,
    n_classes: int = 4,
    seed: int = 0,
    hidden_layers: int = 0,
    hidden_size: int = 64,
    input_name: str = "input",
    output_name: str = "probabilities",
    copies: int = 1,
) -> bytes:
    """The :func:`linear_classifier` of ``seed`` plus ``copies`` full copies of its work.

    Each copy has the base model's operators and weight shapes; the copies' outputs are added times
    zero, so the predictions equal the base model's while every request does ``1 + copies`` times the
    graph work (a tiny model's fixed per-call cost does not grow, so it needs more copies for 2x).
    """
    base = onnx.load_from_string(
        linear_classifier(
            n_features, n_classes, seed, hidden_layers, hidden_size, input_name, output_name="_probs"
        )
    )
    graph = base.graph
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "_zero"))
    total = "_probs"
    for k in range(copies):
        twin = onnx.load_from_string(
            linear_classifier(
                n_features, n_classes, seed + 1 + k, hidden_layers, hidden_size, input_name, "_twin"
            )
        )
        pre = f"_t{k}_"
        for init in twin.graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = pre + init.name
            graph.initializer.append(copy)
        for node in twin.graph.node:
            copy_node = onnx.NodeProto()
            copy_node.CopyFrom(node)
            copy_node.name = pre + node.name if node.name else ""
            copy_node.input[:] = [n if n == input_name else pre + n for n in node.input]
            copy_node.output[:] = [pre + n for n in node.output]
            graph.node.append(copy_node)
        graph.node.extend(
            [
                helper.make_node("Mul", [pre + "_twin", "_zero"], [pre + "nothing"]),
                helper.make_node("Add", [total, pre + "nothing"], [pre + "sum"]),
            ]
        )
        total = pre + "sum"
    graph.node.append(helper.make_node("Identity", [total], [output_name]))
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_classes])])
    graph.name = f"doubled_classifier_s{seed}"
    onnx.checker.check_model(base)
    return bytes(base.SerializeToString())
