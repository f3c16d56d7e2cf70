"""The bytes hashed are the bytes ONNX Runtime loads.

How to break it: the slot manager re-hashes the standby at ``begin_canary`` and again at the flip, but
the serving plane then loaded the model *by path*. Whoever can write the slot directory swaps the file
after the hash, lets ORT read it, and swaps the signed bytes back before the flip's re-hash: the
swapped model serves, and every later hash passes. The test's hook (a subclass overriding ``load``,
in the test only) swaps exactly in that window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployment.manifest import ModuleManifest
from deployment.reconcile import Reconciler
from deployment.sample_models import linear_classifier
from deployment.serving import ManagedServing, ModelRepository
from deployment.sessions import ModelSession, SessionError, load_session
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from tests.deploy_helpers import StaticSource, make_artifact

GOOD = linear_classifier(seed=0)
EVIL = linear_classifier(seed=7)
X = {"input": np.ones((1, 16), dtype=np.float32)}


class SwapInLoad(ManagedServing):
    """Writes EVIL over the standby's model file around the session load (the check-to-load window)."""

    swap_back = True

    def load(
        self, module: str, artifact: Path, manifest: ModuleManifest, sha256: str | None = None
    ) -> ModelSession:
        (target,) = self.paths.module(module).glob(f"[ab]/{manifest.filename}")  # the first install
        target.write_bytes(EVIL)
        try:
            return super().load(module, artifact, manifest, sha256)
        finally:
            if self.swap_back:
                target.write_bytes(GOOD)


def _outputs(model: bytes) -> Any:
    return load_session(model, name="m", version="0").run(X)


@pytest.mark.parametrize("swap_back", [True, False])
def test_bytes_swapped_between_the_hash_and_the_load_never_serve(
    state: StatePaths, tmp_path: Path, swap_back: bool
) -> None:
    clock = SystemClock()
    sink = MemorySink()
    audit = AuditLog(state.audit_log, clock)
    serving = SwapInLoad(state, ModelRepository(sink), clock=clock, sink=sink, audit=audit, interval_s=0.05)
    serving.swap_back = swap_back
    art = make_artifact(tmp_path / "cas", "clf", "1.0", GOOD, mode="managed")
    rec = Reconciler(state, StaticSource(clock, [art]), clock, audit=audit, canary=serving, telemetry=sink)
    rec.run_once()
    serving.wait("clf", 60)  # the first version loads in the background
    router = serving.repository.get("clf")
    evil = _outputs(EVIL)
    if router is not None:  # whatever serves is the signed model, never the swapped one
        served = router.routing.active.run(X)
        assert not np.allclose(served["probabilities"], evil["probabilities"])
        assert np.allclose(served["probabilities"], _outputs(GOOD)["probabilities"])
    st = rec.slots.status("clf")
    if not swap_back:  # the file stays swapped: refused and marked bad, nothing serves
        assert router is None and st.active is None and art.sha256 in st.bad


def test_load_session_refuses_bytes_that_do_not_match_the_expected_digest(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "model.onnx"
    f.write_bytes(EVIL)
    with pytest.raises(SessionError, match="sha256"):
        load_session(f, name="m", version="1", expected_sha256=hashlib.sha256(GOOD).hexdigest())
    sess = load_session(GOOD, name="m", version="1", expected_sha256=hashlib.sha256(GOOD).hexdigest())
    assert sess.run(X)["probabilities"].shape == (1, 4)
