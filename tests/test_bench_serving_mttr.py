"""The serving benchmark's MTTR step survives a loaded machine.

``make bench`` crashed in this step with ``min() iterable argument is empty`` when, under load, the
traffic thread answered nothing after the cut. Such an iteration is now counted as unanswered, and the
figures of a step with nothing measured are JSON nulls, not a crash or NaN.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serving_bench", REPO / "benchmarks" / "serving.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recovery_with_no_answer_after_the_cut_is_unanswered_not_a_crash() -> None:
    recovery_s = _bench().recovery_s
    assert recovery_s([], 1.0) is None  # the traffic thread never ran after the verdict
    assert recovery_s([(0.5, "good"), (0.9, "bad")], 1.0) is None  # everything before the verdict
    assert recovery_s([(1.1, "bad"), (1.2, "failed")], 1.0) is None  # only the canary answered since
    assert recovery_s([(1.1, "bad"), (1.3, "good"), (1.4, "good")], 1.0) == 1.3 - 1.0
    assert recovery_s([(1.2, "good"), (1.3, "failed"), (1.5, "good-reloaded")], 1.0) == 1.5 - 1.0


def test_mttr_step_runs_and_prints_strict_json(tmp_path: Path) -> None:
    bench = _bench()
    blob = bench.model_bytes()
    path = tmp_path / "model.onnx"
    path.write_bytes(blob)
    res = bench.mttr(blob, path, 1)
    json.dumps(res, allow_nan=False)
    assert res["iterations"] == 1 and res["unanswered"] <= 2
    empty = bench._ms([], 0.5)
    assert empty is None
