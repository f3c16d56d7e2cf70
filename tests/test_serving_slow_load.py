"""A model load never blocks the reconcile loop or serving.

A candidate's load is held open through the driver's load seam (``ManagedServing.load``) until the test
releases it, so "while it loads" is a certainty, not a race. Meanwhile, with the daemon's scheduler
running a pull-reconcile job and another job, and a client sending inference over HTTP:
- the incumbent keeps answering;
- reconcile passes keep completing (each returns at once: the candidate loads in the canary's thread);
- the daemon's other jobs keep running;
- a newer release arriving while the candidate still loads does not hold a reconcile pass until the load
  ends (it used to wait in ``preempt`` for the loading thread); once the load ends the old candidate is
  cancelled, not marked bad, and the newer version is canaried.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import onnx

from deployment.canary import Phase
from deployment.manifest import CanarySpec, CanaryStep, ModuleManifest
from deployment.oip import create_app
from deployment.reconcile import Reconciler
from deployment.sample_models import linear_classifier
from deployment.serving import ManagedServing, ModelRepository
from deployment.sessions import ModelSession
from policies.deployment import CanaryPolicy
from sre_agent.daemon import Daemon, JobSpec
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock
from sre_core.http_server import ServerThread
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from tests.deploy_helpers import StaticSource, make_artifact

SPEC = CanarySpec(  # never finishes on its own: the test ends it
    steps=[CanaryStep(weight_pct=10, min_samples=10**9, max_duration_s=3600)], soak_s=0, mirror_share=0.2
)
BOUND_S = 60.0  # a generous bound on waits that succeed within milliseconds when nothing blocks


def _art(tmp_path: Path, version: str):  # type: ignore[no-untyped-def]
    model = onnx.load_from_string(linear_classifier(seed=0, hidden_layers=1))
    model.doc_string = version  # the same model under a new digest per version (a rebuilt release)
    blob = bytes(model.SerializeToString())
    return make_artifact(tmp_path / "cas", "clf", version, blob, mode="managed", canary=SPEC)


class HeldLoads(ManagedServing):
    """The driver with its load seam held open for ``held`` versions until :attr:`release` is set."""

    held: set[str]
    loading: threading.Event
    release: threading.Event

    def load(
        self, module: str, artifact: Path, manifest: ModuleManifest, sha256: str | None = None
    ) -> ModelSession:
        if manifest.version in self.held:
            self.loading.set()
            assert self.release.wait(BOUND_S * 4), "the test never released the load"
        return super().load(module, artifact, manifest, sha256)


def _until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_slow_candidate_load_blocks_neither_serving_nor_reconcile_nor_other_jobs(
    state: StatePaths, tmp_path: Path
) -> None:
    clock = SystemClock()
    sink = MemorySink()
    audit = AuditLog(state.audit_log, clock)
    repo = ModelRepository(sink)
    serving = HeldLoads(
        state, repo, clock=clock, sink=sink, audit=audit, interval_s=0.02, policy=CanaryPolicy()
    )
    serving.held, serving.loading, serving.release = {"2.0"}, threading.Event(), threading.Event()
    src = StaticSource(clock, [_art(tmp_path, "1.0")])
    rec = Reconciler(state, src, clock, audit=audit, canary=serving, telemetry=sink)
    rec.run_once()
    assert serving.wait("clf", BOUND_S) is Phase.PROMOTED  # the first version loads off the pass too
    assert repo.get("clf") is not None and repo.get("clf").routing.active.version == "1.0"  # type: ignore[union-attr]

    passes: list[dict[str, Any]] = []

    def pull_reconcile() -> None:  # what the daemon's pull-reconcile job does with the serving plane
        passes.append(rec.run_once().to_dict())
        serving.sync(rec.slots)

    other = {"runs": 0}

    def other_job() -> None:
        other["runs"] += 1

    answered: dict[str, int] = {}
    failed = {"n": 0}
    stop_clients = threading.Event()
    body = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}

    with ServerThread(create_app(repo)) as server:

        def client() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while not stop_clients.is_set():
                    r = http.post("/v2/models/clf/infer", json=body)
                    if r.status_code == 200:
                        v = r.json()["model_version"]
                        answered[v] = answered.get(v, 0) + 1
                    else:
                        failed["n"] += 1

        worker = threading.Thread(target=client, daemon=True)
        worker.start()
        daemon = Daemon(
            state,
            clock,
            audit,
            jobs=[JobSpec("pull-reconcile", pull_reconcile, 0.05), JobSpec("other", other_job, 0.05)],
            heartbeat_interval_s=0.05,
        )
        src.set([_art(tmp_path, "2.0")], serial=2)
        daemon.start()
        try:
            assert serving.loading.wait(BOUND_S), "the candidate never started loading"
            # While 2.0 loads: passes complete, other jobs run, the incumbent answers.
            n_pass, n_other, n_ans = len(passes), other["runs"], answered.get("1.0", 0)
            _until(lambda: len(passes) >= n_pass + 3, "reconcile passes stopped while a candidate loads")
            _until(lambda: other["runs"] >= n_other + 3, "the daemon's other jobs stopped")
            _until(lambda: answered.get("1.0", 0) >= n_ans + 50, "inference stopped while a candidate loads")
            assert passes[-1]["outcomes"][0]["result"] == "canary", passes[-1]
            # A newer release while 2.0 still loads: the pass must not wait for the load. (A canary that
            # ticks once a minute makes a wait for the loading thread obvious; back to 0.02 s below.)
            serving.interval_s = 60.0
            src.set([_art(tmp_path, "3.0")], serial=3)
            n_pass = len(passes)
            _until(lambda: len(passes) >= n_pass + 3, "a newer release held reconcile behind the load")
            n_ans = answered.get("1.0", 0)
            _until(lambda: answered.get("1.0", 0) >= n_ans + 50, "inference stopped")
            assert not serving.release.is_set()  # all of the above happened with 2.0 still loading
            assert rec.slots.status("clf").active.version == "1.0"  # type: ignore[union-attr]
            serving.interval_s = 0.02
            serving.release.set()
            # 2.0 finishes loading, sees it was pre-empted and is cancelled; 3.0 is canaried.
            _until(
                lambda: serving.busy("clf") and serving._candidates.get("clf") == "3.0",
                "the newer version was never canaried after the old candidate's load ended",
            )
        finally:
            serving.release.set()
            daemon.stop("test over")
            stop_clients.set()
            worker.join(BOUND_S)
            serving.stop()
    assert failed["n"] == 0
    st = rec.slots.status("clf")
    assert not any(b["version"] == "2.0" for b in st.bad.values())  # pre-empted, not judged
    cancelled = [r.data for r in audit.records() if r.event == "canary.cancelled"]
    assert any("pre-empted by desired version 3.0" in str(d) for d in cancelled), cancelled
