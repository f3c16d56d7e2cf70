"""20 canaries of each kind under the default policy, on real sessions under client threads.

The real router and controller run in process with real ONNX Runtime sessions while two client threads
send requests as fast as they can (the loaded 2-core machine is part of the test). Only time in the
controller is fake: it advances half a second per 200 requests served (a device at 400 requests/s),
so the policy's soak and step limits are counted in traffic, not in how loaded the machine happens to
be; every sample the gates judge is a real measurement. Under the default policy (steps 1, 5,
25, 50, 100 %, 300 samples, 10 % mirroring, error floor 0.2 points + 50 %, median paired latency ratio
1.5): identical candidates of two sizes must be promoted and 2x slower or 1 %-error candidates aborted,
in every run (5 runs per identical kind here, 20 per bad kind; the benchmark runs 20 of each).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import Any

import onnx
import pytest

from deployment.canary import CanaryConfig, Phase
from deployment.router import InferenceError, Router
from deployment.sample_models import (
    doubled_classifier,
    erroring_classifier,
    erroring_inputs,
    linear_classifier,
)
from deployment.serving import CanaryRun
from deployment.sessions import load_session
from policies.deployment import load_deployment_policy
from sre_core.clock import FakeClock
from sre_core.telemetry import NullSink

RUNS = {"promote": 5, "abort": 20}  # benchmarks/serving.py --canary runs 20 of every kind
REQUESTS_PER_TICK = 200
TINY: dict[str, Any] = {"hidden_layers": 2}
MEDIUM: dict[str, Any] = {"hidden_layers": 4, "hidden_size": 256}  # ~0.8 MiB of weights


def relabel(blob: bytes, note: str) -> bytes:
    model = onnx.load_from_string(blob)
    model.doc_string = note
    return bytes(model.SerializeToString())


def default_config() -> CanaryConfig:
    policy = load_deployment_policy()
    return CanaryConfig.from_spec(None, policy.canary_steps, policy.canary)


def trial(incumbent: bytes, candidate: bytes, seed: int, max_ticks: int = 100_000) -> tuple[Phase, str]:
    """One canary to its end under two client threads; returns the final phase and the reason."""
    router = Router("m", load_session(incumbent, name="m", version="1"), NullSink(), seed=seed)
    clock = FakeClock()
    run = CanaryRun(
        "m", router, load_session(candidate, name="m", version="2"), default_config(), clock, NullSink()
    )
    inputs = [{"input": x} for x in erroring_inputs(seed)]  # exactly 1 % above the erroring threshold
    stop = threading.Event()
    served = [0, 0]

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            with contextlib.suppress(InferenceError):  # only if the incumbent itself failed
                router.infer(inputs[i % len(inputs)])
            i += 7
            served[k] += 1

    workers = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
    for w in workers:
        w.start()
    try:
        run.start()
        mark = 0
        for _ in range(max_ticks):
            if run.controller.final:
                break
            while sum(served) < mark + REQUESTS_PER_TICK and all(w.is_alive() for w in workers):
                stop.wait(0.001)
            mark = sum(served)
            clock.advance(0.5)
            run.tick()
    finally:
        stop.set()
        for w in workers:
            w.join(10)
    return run.phase, run.controller.reason


KINDS = {
    "identical-tiny": (linear_classifier(**TINY), relabel(linear_classifier(**TINY), "2"), Phase.PROMOTED),
    "identical-medium": (
        linear_classifier(**MEDIUM),
        relabel(linear_classifier(**MEDIUM), "2"),
        Phase.PROMOTED,
    ),
    # 3 extra copies make the tiny model 2.0x slower per call (its fixed per-call cost does not grow)
    "2x-slower": (linear_classifier(**TINY), doubled_classifier(**TINY, copies=3), Phase.ABORTED),
    # input[:, 0] > 2.326 on exactly 1 % of the inputs: 1 % of requests fail inside ONNX Runtime
    "1%-errors": (
        linear_classifier(**TINY),
        erroring_classifier(error_threshold=2.326, **TINY),
        Phase.ABORTED,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_default_policy_decides_every_run_right(kind: str) -> None:
    incumbent, candidate, expected = KINDS[kind]
    runs = RUNS["promote" if expected is Phase.PROMOTED else "abort"]
    outcomes: Counter[Phase] = Counter()
    reasons = []
    for seed in range(runs):
        phase, reason = trial(incumbent, candidate, seed)
        outcomes[phase] += 1
        if phase is not expected:
            reasons.append(reason)
    assert outcomes[expected] == runs, (dict(outcomes), reasons[:3])
