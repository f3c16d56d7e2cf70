"""Crash consistency: kill -9 of real pull + reconcile processes at random moments, then restart.

The harness lives in ``benchmarks/crash.py`` (the benchmark runs 1,000 trials); see its docstring.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_harness", REPO / "benchmarks" / "crash.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kill_9_quick_sample(tmp_path: Path) -> None:
    res = _harness().run_trials(tmp_path, trials=25, seed=3)
    assert res["failures"] == [] and res["ok"] == 25 and res["pulls_refused_after_restart"] == 0


@pytest.mark.slow
def test_kill_9_during_pull_install_and_flip_always_restarts_on_a_verified_version(tmp_path: Path) -> None:
    res = _harness().run_trials(tmp_path, trials=80, seed=7)
    assert res["failures"] == [] and res["ok"] == 80 and res["violations"] == 0
    hit = res["phases_at_kill"]
    # The kills landed inside the pull and inside installs, flips, probes, not only between passes.
    assert (
        hit.get("installing", 0) + hit.get("flipping", 0) + hit.get("probing", 0) + hit.get("rolling_back", 0)
        > 0
    )
    assert sum(n for step, n in res["pull_step_at_kill"].items() if step.startswith("pull:")) > 0
    ev = res["audit_events"]
    assert ev["slot.install_discarded"] + ev["slot.flip_resolved"] > 0
    assert ev["slot.committed"] > 0 and ev["pull.verified"] > 0  # rollbacks: ~4 % of trials, not asserted
