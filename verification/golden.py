"""Publisher side: derive a module's golden spec (vectors, input baseline, fleet output shares) from the
model itself, so release tooling and tests ship what the device checks against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deployment.manifest import GoldenSpec, GoldenVector
from verification.builtin.drift import baseline_stats, class_shares

__all__ = ["make_golden"]


def make_golden(
    model: bytes | Path,
    inputs: np.ndarray,
    input_name: str = "input",
    vectors: int = 4,
    tolerance: float = 1e-4,
    baseline: np.ndarray | None = None,
    classifier: bool = True,
) -> GoldenSpec:
    """Run ``model`` on ``inputs`` with ONNX Runtime and build its golden spec.

    Args:
        model: serialized ONNX model or a path to one.
        inputs: ``[N, features]`` representative inputs; the first ``vectors`` rows become golden vectors.
        input_name: the model's input tensor name.
        vectors: how many golden vectors to ship.
        tolerance: max absolute error allowed per output element.
        baseline: inputs to derive the drift baseline from (default: ``inputs``).
        classifier: also ship the predicted-class shares as the fleet output baseline.
    """
    import onnxruntime as ort

    src = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    x = np.asarray(inputs, dtype=np.float32)
    outs = sess.run(out_names, {input_name: x})
    golden = [
        GoldenVector(
            inputs={input_name: x[i : i + 1].tolist()},
            expected={n: np.asarray(o)[i : i + 1].tolist() for n, o in zip(out_names, outs, strict=True)},
            tolerance=tolerance,
        )
        for i in range(min(vectors, len(x)))
    ]
    fleet = None
    if classifier:
        scores = np.asarray(outs[0])
        fleet = class_shares(scores, scores.shape[1]).tolist()
    base = np.asarray(baseline if baseline is not None else inputs, dtype=np.float64)
    return GoldenSpec(
        vectors=golden, input_stats={input_name: baseline_stats(base)}, fleet_output_distribution=fleet
    )
