"""The routing RNG (canary slot shuffle, mirror sample) is injectable through every path that makes a router.

A router made with an RNG of its own choosing (the OS's) makes a canary trial unrepeatable: the slots a
request lands on, and with them every verdict, change from run to run. The seam existed on ``Router``
only; the repository, the canary driver and the serving service built routers without it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deployment.manifest import ModuleManifest
from deployment.router import Router
from deployment.sample_models import linear_classifier
from deployment.serving import ManagedServing, ModelRepository
from deployment.sessions import load_session
from sre_agent.config import AgentSettings
from sre_agent.services.serving import ServingPlane
from sre_core.paths import StatePaths

BLOB = linear_classifier(seed=0)


def _factory(seed: int, asked: list[str]) -> Callable[[str], random.Random]:
    def make(name: str) -> random.Random:
        asked.append(name)
        return random.Random(f"{seed}:{name}")

    return make


def _answers(router: Router) -> list[str]:
    """Which version answers each of 400 requests with a 5 % canary mirroring 10 %."""
    router.start_canary(load_session(BLOB, name="m", version="2"), mirror_share=0.1)
    router.set_weight(0.05)
    x = {"input": np.zeros((1, 16), np.float32)}
    out = [router.infer(x).version for _ in range(400)]
    snap = router.snapshot()
    return [*out, f"mirrored={snap.pair_counts('2')[0]}"]


def _via_repository(seed: int, asked: list[str], _tmp: Path) -> Router:
    return ModelRepository(rng=_factory(seed, asked)).add(load_session(BLOB, name="m", version="1"))


def _via_driver(seed: int, asked: list[str], tmp: Path) -> Router:
    art = tmp / f"m-{seed}-{len(asked)}.onnx"
    art.write_bytes(BLOB)
    paths = StatePaths(tmp / f"state-{seed}-{len(asked)}")
    serving = ManagedServing(paths, ModelRepository(rng=_factory(seed, asked)))
    return serving.serve("m", art, ModuleManifest(name="m", version="1"))


def _via_service(seed: int, asked: list[str], tmp: Path) -> Router:
    paths = StatePaths(tmp / f"plane-{seed}-{len(asked)}")
    plane = ServingPlane(AgentSettings(state_dir=paths.root), paths, routing_rng=_factory(seed, asked))
    art = tmp / f"p-{seed}-{len(asked)}.onnx"
    art.write_bytes(BLOB)
    return plane.serving.serve("m", art, ModuleManifest(name="m", version="1"))


def test_every_router_construction_path_uses_the_injected_rng(tmp_path: Path) -> None:
    runs = {}
    for path in (_via_repository, _via_driver, _via_service):
        asked: list[str] = []
        first = _answers(path(7, asked, tmp_path))
        again = _answers(path(7, asked, tmp_path))
        other = _answers(path(8, asked, tmp_path))
        assert asked == ["m", "m", "m"], path.__name__  # one RNG per router, made for the model's name
        assert first == again, path.__name__  # same seed: the same slots and the same mirror sample
        assert first != other, path.__name__
        assert first[:400].count("2") == 20  # the exact 5 % share, positions shuffled
        runs[path.__name__] = first
    assert len({tuple(r) for r in runs.values()}) == 1  # all paths build the same router from the seed


def test_an_explicit_seed_still_wins_over_the_repository_rng() -> None:
    asked: list[str] = []
    repo = ModelRepository(rng=_factory(1, asked))
    a = _answers(repo.add(load_session(BLOB, name="m", version="1"), seed=5))
    b = _answers(Router("m", load_session(BLOB, name="m", version="1"), seed=5))
    assert a == b and asked == []
