"""One ONNX Runtime session per slot, with the execution providers the manifest asks for.

Providers come from the manifest's ``runtime.providers`` (in preference order); those the installed
onnxruntime build does not offer are dropped and ``CPUExecutionProvider`` is always the last resort, so a
model published for a GPU device still serves on a CPU-only one. Thread counts are plain values passed in
(the agent reads them from its ``[serving]`` config section): this package never imports ``sre_agent``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from deployment.manifest import RuntimeSpec
from sre_core.errors import SreError

__all__ = [
    "CPU",
    "ModelSession",
    "SessionError",
    "SessionOptions",
    "TensorInfo",
    "choose_providers",
    "estimate_resident_bytes",
    "load_session",
]

RESIDENT_FACTOR = 2.5
RESIDENT_OVERHEAD = 16 << 20
"""A loaded session's resident size ~ 2.5 x its file + 16 MiB: measured here 2.5x for a 5 MiB model and
1.6x for an 80 MiB one (ONNX Runtime keeps the graph, pre-packed weights and an arena); issue reports
saw 846 MiB for three sessions of a 100 MiB model (2.8x each). An estimate to refuse early, not a cap."""


def estimate_resident_bytes(model: bytes | Path) -> int:
    """Estimated resident size of ``model`` once loaded (see :data:`RESIDENT_FACTOR`)."""
    size = len(model) if isinstance(model, bytes) else Path(model).stat().st_size
    return int(size * RESIDENT_FACTOR) + RESIDENT_OVERHEAD


CPU = "CPUExecutionProvider"

# ONNX Runtime type strings -> the Open Inference Protocol datatype names.
_ORT_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


class SessionError(SreError):
    """A model could not be loaded into ONNX Runtime (corrupt file, unsupported operator...)."""


@dataclass(frozen=True)
class SessionOptions:
    """Runtime knobs, from the agent's ``[serving]`` section.

    Args:
        intra_op_threads: threads inside one operator.
        inter_op_threads: threads across independent operators.
        providers: fallback provider preference when the manifest names none.
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: tuple[str, ...] = (CPU,)

    def __post_init__(self) -> None:
        if not 1 <= self.intra_op_threads <= 256 or not 1 <= self.inter_op_threads <= 256:
            raise ValueError("thread counts must be within 1..256")


@dataclass(frozen=True)
class TensorInfo:
    """Name, v2 datatype and shape (-1 for a dynamic dimension) of one model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_v2(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The requested providers this build offers, in order, always ending with the CPU provider."""
    chosen = [p for p in requested if p in available and p != CPU]
    chosen.append(CPU)
    return chosen


def _info(arg: Any) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else -1 for d in (arg.shape or []))
    return TensorInfo(arg.name, _ORT_TO_V2.get(arg.type, arg.type), shape)


@dataclass
class ModelSession:
    """A loaded model version, ready to run. Thread-safe (ONNX Runtime sessions are)."""

    name: str
    version: str
    session: ort.InferenceSession
    task: str = "classifier"
    inputs: tuple[TensorInfo, ...] = field(default_factory=tuple)
    outputs: tuple[TensorInfo, ...] = field(default_factory=tuple)
    providers: tuple[str, ...] = field(default_factory=tuple)
    primary_output: str = ""
    resident_bytes: int = 0

    def __post_init__(self) -> None:
        self._names = [o.name for o in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model; returns every output by name. ONNX Runtime errors propagate unchanged."""
        names = self._names
        values = self.session.run(names, feeds if type(feeds) is dict else dict(feeds))
        return dict(zip(names, values, strict=True))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "providers": list(self.providers),
            "inputs": [i.to_v2() for i in self.inputs],
            "outputs": [o.to_v2() for o in self.outputs],
        }


def load_session(
    model: bytes | Path,
    *,
    name: str,
    version: str,
    runtime: RuntimeSpec | None = None,
    options: SessionOptions | None = None,
    expected_sha256: str | None = None,
) -> ModelSession:
    """Load ``model`` (serialized bytes or a file path) into an ONNX Runtime session.

    A path is read once into memory and the session is built from those bytes, so with
    ``expected_sha256`` the bytes hashed are exactly the bytes loaded: a file swapped after a slot's
    re-hash (or during this read) is refused, never served.

    Raises:
        SessionError: onnxruntime refused the model, the file cannot be read, or its bytes do not match
            ``expected_sha256``.
    """
    options = options or SessionOptions()
    runtime = runtime or RuntimeSpec()
    requested = runtime.providers or list(options.providers)
    providers = choose_providers(requested, ort.get_available_providers())
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    # Model errors surface as exceptions the router counts; ORT's own stderr logging would only add noise.
    so.log_severity_level = 4
    try:
        data = model.read_bytes() if isinstance(model, Path) else model
    except OSError as exc:
        raise SessionError(f"load model {name} {version}", f"cannot read it: {exc}") from exc
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise SessionError(
            f"load model {name} {version}",
            "its bytes do not match the signed sha256 (changed after verification); not loaded",
            "the version is refused; reinstall it from the hub",
        )
    try:
        sess = ort.InferenceSession(data, sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        raise SessionError(
            f"load model {name} {version}",
            f"onnxruntime refused it: {exc}",
            "check the artifact; a verified artifact that does not load should be reported to the publisher",
        ) from exc
    outputs = tuple(_info(o) for o in sess.get_outputs())
    primary = runtime.output_name or (outputs[0].name if outputs else "")
    return ModelSession(
        name=name,
        version=version,
        session=sess,
        task=runtime.task,
        inputs=tuple(_info(i) for i in sess.get_inputs()),
        outputs=outputs,
        providers=tuple(sess.get_providers()),
        primary_output=primary,
        resident_bytes=estimate_resident_bytes(data),
    )
