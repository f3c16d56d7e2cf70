"""Canary error evidence is discordant: client-chosen inputs can neither force nor hide a verdict.

How one would break it, and what each test holds:
- send inputs that fail inside ONNX Runtime on both versions while the canary answers: they must not
  count as canary errors (an identical candidate is promoted), nor as incumbent errors when they land on
  the incumbent (its baseline, and so the relative margin, cannot be inflated);
- a candidate answering NaN where the incumbent answers finite values: a canary error, and the client
  gets the incumbent's answer;
- watch which version answers and predict the canary's next slot: the slots are shuffled by the
  injected RNG (exact share per block, no fixed period).

Real ONNX Runtime sessions on models built here; the canary's clock is a FakeClock.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deployment.canary import CanaryConfig, Phase, StepConfig
from deployment.router import Router
from deployment.sample_models import erroring_classifier, linear_classifier
from deployment.serving import CanaryRun
from deployment.sessions import load_session
from sre_core.clock import FakeClock
from sre_core.telemetry import MemorySink

POISON = 10.0  # feature 0 far above every threshold here: the erroring graph fails inside ONNX Runtime


def erroring(threshold: float) -> bytes:
    return erroring_classifier(seed=0, hidden_layers=1, error_threshold=threshold)


def nan_above(threshold: float) -> bytes:
    """``linear_classifier(seed=0)`` whose outputs are NaN for rows with ``input[:, 0] > threshold``."""
    model = onnx.load_from_string(linear_classifier(seed=0, hidden_layers=1))
    g = model.graph
    for node in g.node:
        node.output[:] = ["_clean" if o == "probabilities" else o for o in node.output]
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "_s0"),
            numpy_helper.from_array(np.array([1], np.int64), "_s1"),
            numpy_helper.from_array(np.array([1], np.int64), "_ax"),
            numpy_helper.from_array(np.array(threshold, np.float32), "_thr"),
            numpy_helper.from_array(np.array(np.nan, np.float32), "_nan"),
            numpy_helper.from_array(np.array(0.0, np.float32), "_zero"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Slice", ["input", "_s0", "_s1", "_ax"], ["_col"]),
            helper.make_node("Greater", ["_col", "_thr"], ["_tail"]),
            helper.make_node("Where", ["_tail", "_nan", "_zero"], ["_poison"]),
            helper.make_node("Add", ["_clean", "_poison"], ["probabilities"]),
        ]
    )
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def benign(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"input": np.clip(rng.normal(size=(1, 16)), -2.0, 2.0).astype(np.float32)}


def poison() -> dict[str, np.ndarray]:
    x = np.zeros((1, 16), np.float32)
    x[0, 0] = POISON
    return {"input": x}


def test_failures_on_both_versions_count_for_neither_wherever_they_land() -> None:
    blob = erroring(3.0)
    router = Router("m", load_session(blob, name="m", version="1"), seed=0)
    router.start_canary(load_session(blob, name="m", version="2"), mirror_share=0.3)
    for weight in (1.0, 0.0, 0.5):  # all on the canary, all on the incumbent, split
        router.set_weight(weight)
        for _ in range(100):
            with contextlib.suppress(Exception):
                router.infer(poison())
    snap = router.snapshot()
    for v in ("1", "2"):
        assert snap.stats(v).errors > 0  # telemetry still sees every failure
        assert snap.stats(v).evidence().errors == 0  # but none is evidence against either version
    # A failure only the canary has is the canary's: discordant evidence still counts.
    router.start_canary(load_session(erroring(1.0), name="m", version="3"), mirror_share=0.0)
    router.set_weight(1.0)
    x = np.zeros((1, 16), np.float32)
    x[0, 0] = 2.0  # fails on "3" only
    assert router.infer({"input": x}).version == "1"  # answered by the incumbent
    assert router.snapshot().stats("3").evidence().errors == 1


def test_nan_where_the_incumbent_is_finite_is_a_canary_error_answered_by_the_incumbent() -> None:
    router = Router("m", load_session(linear_classifier(seed=0, hidden_layers=1), name="m", version="1"))
    router.start_canary(load_session(nan_above(1.0), name="m", version="2"), mirror_share=0.0)
    router.set_weight(1.0)
    x = np.zeros((1, 16), np.float32)
    x[0, 0] = 3.0
    answer = router.infer({"input": x})
    assert answer.version == "1" and np.isfinite(answer.outputs["probabilities"]).all()
    assert router.snapshot().stats("2").evidence().errors == 1
    assert router.infer({"input": np.zeros((1, 16), np.float32)}).version == "2"  # finite: its own
    # NaN on both versions is a failure of neither.
    router.replace_active(load_session(nan_above(1.0), name="m", version="4"))
    router.start_canary(load_session(nan_above(1.0), name="m", version="3"), mirror_share=1.0)
    router.infer({"input": x})
    snap = router.snapshot()
    assert snap.stats("3").evidence().errors == 0 and snap.stats("4").evidence().errors == 0


def test_canary_slots_are_shuffled_by_the_injected_rng_with_an_exact_share() -> None:
    blob = linear_classifier(seed=0)

    def slots(rng: random.Random) -> list[int]:
        router = Router("m", load_session(blob, name="m", version="1"), rng=rng)
        router.start_canary(load_session(blob, name="m", version="2"), mirror_share=0.0)
        router.set_weight(0.05)
        z = {"input": np.zeros((1, 16), np.float32)}
        return [i for i in range(2000) if router.infer(z).version == "2"]

    a = slots(random.Random(1))
    assert len(a) == 100  # exactly 5 % of every 100 requests
    gaps = {b - c for b, c in zip(a[1:], a, strict=False)}
    assert len(gaps) > 10  # no period to learn (a counter gives one gap, 20)
    assert slots(random.Random(1)) == a and slots(random.Random(2)) != a  # the RNG decides


class Unshuffled(random.Random):
    """An RNG seam that leaves the canary's slots in place: the last ones of every block (of 20 at
    5 %), so the test knows them as well as a client watching a counter-based router did."""

    def shuffle(self, x: object) -> None:  # type: ignore[override]
        return None


def test_inputs_failing_on_both_versions_at_the_known_canary_slots_do_not_ban_an_identical_one() -> None:
    """The red-team attack with perfect knowledge of the slots: 60 poison requests on the 5 % canary."""
    blob = erroring(3.0)
    sink = MemorySink()
    router = Router("m", load_session(blob, name="m", version="1"), sink, rng=Unshuffled(3))
    clock = FakeClock()
    cfg = CanaryConfig(steps=(StepConfig(0.05, 300, 600), StepConfig(1.0, 300, 600)), soak_s=5.0)
    run = CanaryRun("m", router, load_session(blob, name="m", version="2"), cfg, clock, sink)
    run.start()
    rng = np.random.default_rng(4)
    for tick in range(1000):
        if run.controller.final:
            break
        for i in range(100):  # five blocks of 20 per tick; the canary's slot is the last of each
            attack = tick < 12 and i % 20 == 19
            with contextlib.suppress(Exception):
                router.infer(poison() if attack else benign(rng))
        clock.advance(0.5)
        run.tick()
    assert run.phase is Phase.PROMOTED, (run.last, run.controller.history)
    assert router.snapshot().stats("2").shared >= 60
