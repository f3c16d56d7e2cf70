"""Shared by the model checks: run a slot's signed golden vectors through a real ONNX Runtime session."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from verification.context import SessionCache, SlotView, sha256_file

__all__ = ["GoldenOutcome", "intact", "run_golden"]

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass
class GoldenOutcome:
    """What one slot did with its golden vectors."""

    ok: bool
    vectors: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    max_abs_error: float = 0.0
    error: str | None = None

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "vectors": self.vectors, "max_abs_error": self.max_abs_error}
        if self.failed:
            out["failed"] = self.failed[:5]
        if self.error:
            out["error"] = self.error
        return out


def intact(slot: SlotView) -> tuple[bool, str]:
    """Re-hash the slot's installed files against the signed digests. Returns (ok, reason)."""
    if not slot.path.is_dir():
        return False, f"slot directory {slot.path} is missing"
    if slot.files:
        for rel, want in sorted(slot.files.items()):
            f = slot.path / rel
            if not f.is_file():
                return False, f"{rel} is missing"
            got = sha256_file(f)
            if got != want:
                return False, f"{rel}: sha256 {got[:16]}... does not match the signed {want[:16]}..."
        return True, f"{len(slot.files)} files match their signed digests"
    if not slot.artifact.is_file():
        return False, f"artifact {slot.artifact.name} is missing"
    got = sha256_file(slot.artifact)
    if got != slot.sha256:
        return False, f"sha256 {got[:16]}... does not match the signed {slot.sha256[:16]}..."
    return True, "matches its signed digest"


def run_golden(sessions: SessionCache, slot: SlotView) -> GoldenOutcome:
    """Load the slot's model in a real session and compare every golden vector within its tolerance."""
    golden = slot.manifest.golden if slot.manifest is not None else None
    vectors = golden.vectors if golden is not None else []
    try:
        sess = sessions.get(slot.artifact)
    except Exception as exc:
        return GoldenOutcome(False, error=f"model does not load: {type(exc).__name__}: {exc}"[:500])
    input_types = {i.name: i.type for i in sess.get_inputs()}
    output_names = {o.name for o in sess.get_outputs()}
    out = GoldenOutcome(True, vectors=len(vectors))
    for idx, vec in enumerate(vectors):
        unknown = (set(vec.inputs) - set(input_types)) | (set(vec.expected) - output_names)
        if unknown:
            out.ok = False
            out.failed.append({"vector": idx, "reason": f"tensors not in the model: {sorted(unknown)}"})
            continue
        feeds = {
            name: np.asarray(value, dtype=_ORT_DTYPES.get(input_types[name], np.float32))
            for name, value in vec.inputs.items()
        }
        try:
            got = sess.run(list(vec.expected), feeds)
        except Exception as exc:
            out.ok = False
            out.failed.append({"vector": idx, "reason": f"inference failed: {exc}"[:300]})
            continue
        for name, actual in zip(vec.expected, got, strict=True):
            want = np.asarray(vec.expected[name], dtype=np.float64)
            have = np.asarray(actual, dtype=np.float64)
            if want.shape != have.shape:
                out.ok = False
                out.failed.append(
                    {"vector": idx, "output": name, "reason": f"shape {have.shape} != {want.shape}"}
                )
                continue
            err = float(np.max(np.abs(want - have))) if want.size else 0.0
            out.max_abs_error = max(out.max_abs_error, err)
            if not err <= vec.tolerance:  # NaN fails too
                out.ok = False
                out.failed.append(
                    {"vector": idx, "output": name, "max_abs_error": err, "tolerance": vec.tolerance}
                )
    return out
