"""No model load holds a reconcile pass: the first version of a model, and a reload after a rollback.

A candidate's load already ran in its canary's thread (``tests/test_serving_slow_load.py``). Two other
loads ran on the caller's thread: the FIRST version of a managed model (nothing served yet) was loaded
inside the reconcile pass that installed it, and a version to go back to whose session had been unloaded
(``unload_standby``) was loaded by ``sync`` inside the daemon's pull-reconcile job and inside the
rollback action. A long load of module A then held the reconcile of every other module, and the job.

How each guarantee could be broken, and what here would catch it:
- load the first version inside the pass (the old code): no pass completes while its load is held
  open, so another module's release is never handled -> "reconcile passes stopped" fails;
- move the load off the pass but flip the slot (or serve) before the load returns: status shows it
  active while nothing serves, or an unverified/unloaded version is active -> the slot's active and
  the HTTP answers for the module are checked while the load is held;
- load something other than the verified slot's bytes, or skip the re-hash: bytes changed in the slot
  while the load is held would be served -> ``test_..._changed_while_loading_...`` corrupts them and
  expects a refusal (marked bad, ``canary.aborted`` audited), never an answer;
- let a newer release wait behind the load (join the loading thread in the pass) -> passes stop again
  once the newer release arrives; or serve the superseded version when its load returns -> the client
  must never get an answer from it, and it must not be marked bad;
- lose the module from status while it loads -> ``sre-agent status`` (``device_status``) and the
  daemon's admin status must list it as loading;
- reload a rolled-back-to version inside the rollback action or the pass -> the action must return and
  passes must complete with the reload held, the version rolled away from answering meanwhile, and
  successive passes must not start a second load of the same version.

The loads are held open through the driver's load seam (``ManagedServing.load``) until the test releases
them, so "while it loads" is a certainty, not a race. The serving plane is the daemon's own
(``ServingPlane``, its ``reconcile_pass`` as the pull-reconcile job) under the daemon's real scheduler,
with clients over HTTP. No wall-clock thresholds: waits are bounded only so a failure ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import onnx

from deployment.artifacts import VerifiedArtifact
from deployment.manifest import CanarySpec, CanaryStep, ModuleManifest
from deployment.sample_models import linear_classifier
from deployment.sessions import ModelSession
from sre_agent.cli.slots import device_status
from sre_agent.config import AgentSettings
from sre_agent.daemon import Daemon, JobSpec
from sre_agent.handlers import DaemonHandlers
from sre_agent.incidents import Incident, IncidentKind
from sre_agent.services.serving import ServingPlane
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock
from sre_core.http_server import free_port
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from tests.deploy_helpers import StaticSource, make_artifact

SPEC = CanarySpec(  # never finishes on its own: the test ends it
    steps=[CanaryStep(weight_pct=10, min_samples=10**9, max_duration_s=3600)], soak_s=0, mirror_share=0.2
)
BOUND_S = 60.0  # a generous bound on waits that succeed within milliseconds when nothing blocks
BODY = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


def _art(tmp_path: Path, module: str, version: str, seed: int = 0) -> VerifiedArtifact:
    model = onnx.load_from_string(linear_classifier(seed=seed, hidden_layers=1))
    model.doc_string = f"{module} {version}"  # the same model under a new digest per version
    blob = bytes(model.SerializeToString())
    return make_artifact(tmp_path / "cas", module, version, blob, mode="managed", canary=SPEC)


def loading_models(state: StatePaths) -> list[dict[str, Any]]:
    """What ``sre-agent status`` shows as loading."""
    return list(device_status(state).get("loading") or [])


def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@dataclass
class Held:
    """Holds the loads of ``held`` (module, version) pairs open until :attr:`release` is set."""

    held: set[tuple[str, str]]
    loading: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    loads: list[tuple[str, str]] = field(default_factory=list)
    before_release: Callable[[], None] | None = None

    def wrap(self, plane: ServingPlane) -> None:
        real = plane.serving.load

        def load(
            module: str, artifact: Path, manifest: ModuleManifest, sha256: str | None = None
        ) -> ModelSession:
            self.loads.append((module, manifest.version))
            if (module, manifest.version) in self.held:
                self.loading.set()
                assert self.release.wait(BOUND_S * 4), "the test never released the load"
            return real(module, artifact, manifest, sha256)

        plane.serving.load = load  # type: ignore[method-assign]


class Rig:
    """The daemon's serving plane with a pull-reconcile job, another job, and HTTP clients."""

    def __init__(self, state: StatePaths, src: StaticSource, clock: SystemClock) -> None:
        settings = AgentSettings(state_dir=state.root)
        serving = settings.serving.model_copy(update={"port": free_port("127.0.0.1")})
        self.state = state
        self.sink = MemorySink()
        self.audit = AuditLog(state.audit_log, clock)
        self.plane = ServingPlane(
            settings.model_copy(update={"serving": serving}), state, src, canary_interval_s=0.02,
            sink=self.sink, audit=self.audit, clock=clock,
        )  # fmt: skip
        self.passes: list[dict[str, Any]] = []
        self.other = 0
        self.answered: dict[tuple[str, str], int] = {}
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.daemon = Daemon(
            state, clock, self.audit,
            jobs=[JobSpec("pull-reconcile", self._pass, 0.05), JobSpec("other", self._other, 0.05)],
            heartbeat_interval_s=0.05,
        )  # fmt: skip

    def _pass(self) -> None:  # the daemon's pull-reconcile job with a serving plane
        self.passes.append(self.plane.reconcile_pass())

    def _other(self) -> None:
        self.other += 1

    def client(self, module: str, must_answer: bool) -> None:
        def loop() -> None:
            with httpx.Client(base_url=self.plane.url, timeout=30) as http:
                while not self._stop.is_set():
                    r = http.post(f"/v2/models/{module}/infer", json=BODY)
                    if r.status_code == 200:
                        key = (module, r.json()["model_version"])
                        self.answered[key] = self.answered.get(key, 0) + 1
                    elif must_answer:
                        self.failed.append(f"{module}: {r.status_code} {r.text[:200]}")
                    else:
                        time.sleep(0.005)  # not served yet (404): ask again

        worker = threading.Thread(target=loop, daemon=True)
        worker.start()
        self._workers.append(worker)

    def n(self, module: str, version: str) -> int:
        return self.answered.get((module, version), 0)

    def keeps_going(self, what: str, module: str, version: str) -> None:
        """Passes complete, the other job runs and ``module`` ``version`` answers, three times over."""
        n_pass, n_other, n_ans = len(self.passes), self.other, self.n(module, version)
        _until(lambda: len(self.passes) >= n_pass + 3, f"reconcile passes stopped {what}")
        _until(lambda: self.other >= n_other + 3, f"the daemon's other jobs stopped {what}")
        _until(lambda: self.n(module, version) >= n_ans + 50, f"{module} {version} stopped answering {what}")

    def served(self, module: str) -> str | None:
        router = self.plane.repository.get(module)
        return router.routing.active.version if router is not None else None

    def close(self, held: Held) -> None:
        held.release.set()
        self.daemon.stop("test over")
        self._stop.set()
        for w in self._workers:
            w.join(BOUND_S)
        self.plane.stop()


def test_a_first_version_loads_off_the_reconcile_pass_and_a_newer_release_supersedes_it(
    state: StatePaths, tmp_path: Path
) -> None:
    clock = SystemClock()
    src = StaticSource(clock, [_art(tmp_path, "clf", "1.0")])
    rig = Rig(state, src, clock)
    held = Held({("big", "1.0")})
    held.wrap(rig.plane)
    rig.plane.start()
    try:
        rig.plane.reconcile_pass()
        _until(lambda: rig.served("clf") == "1.0", "clf 1.0 was never served")
        rig.client("clf", must_answer=True)
        rig.client("big", must_answer=False)
        src.set([_art(tmp_path, "clf", "1.0"), _art(tmp_path, "big", "1.0", seed=1)], serial=2)
        rig.daemon.start()
        assert held.loading.wait(BOUND_S), "big 1.0 never started loading"

        # While big 1.0 (its first version) loads: the loop goes on, clf answers, big is shown loading,
        # and nothing of big is active or served.
        rig.keeps_going("while the first version of another module loads", "clf", "1.0")
        assert [o["result"] for o in rig.passes[-1]["reconcile"]["outcomes"]] == ["canary", "noop"]
        st = rig.plane.slots.status("big")
        assert st.active is None and st.phase.value == "canary"
        assert rig.served("big") is None and rig.n("big", "1.0") == 0
        shown = [(m["module"], m["version"], m["kind"]) for m in loading_models(state)]
        assert shown == [("big", "1.0", "first version")]
        assert [m["module"] for m in rig.plane.serving.loading()] == ["big"]  # the admin API's status

        # Another module's release is handled meanwhile: clf 2.0 goes to its canary.
        src.set([_art(tmp_path, "clf", "2.0"), _art(tmp_path, "big", "1.0", seed=1)], serial=3)
        _until(
            lambda: (
                (r := rig.plane.repository.get("clf")) is not None
                and r.routing.canary is not None
                and r.routing.canary.version == "2.0"
            ),
            "clf 2.0 was never canaried while big 1.0 loaded",
        )
        # A newer release of big while 1.0 still loads: no pass waits for the load.
        src.set([_art(tmp_path, "clf", "2.0"), _art(tmp_path, "big", "2.0", seed=1)], serial=4)
        rig.keeps_going("when a newer release arrived during a first version's load", "clf", "1.0")
        assert not held.release.is_set() and rig.plane.slots.status("big").active is None
        held.release.set()
        # 1.0 finishes loading, sees it was superseded and is dropped; 2.0 loads and serves.
        _until(lambda: rig.served("big") == "2.0", "big 2.0 was never served after 1.0's load ended")
        _until(lambda: rig.n("big", "2.0") > 0, "big 2.0 never answered")
        _until(lambda: not loading_models(state), "a finished load is still shown as loading")
    finally:
        rig.close(held)
    assert not rig.failed, rig.failed[:3]
    assert rig.n("big", "1.0") == 0  # the superseded version never answered
    st = rig.plane.slots.status("big")
    assert st.active is not None and st.active.version == "2.0"
    assert not any(b["version"] == "1.0" for b in st.bad.values())  # superseded, not judged
    cancelled = [r.data for r in rig.audit.records() if r.event == "canary.cancelled"]
    assert any(d.get("module") == "big" and "pre-empted by desired version 2.0" in str(d) for d in cancelled)
    assert held.loads.count(("big", "1.0")) == 1


def test_a_first_version_changed_while_loading_is_refused_off_the_pass(
    state: StatePaths, tmp_path: Path
) -> None:
    clock = SystemClock()
    src = StaticSource(clock, [_art(tmp_path, "clf", "1.0")])
    rig = Rig(state, src, clock)
    held = Held({("big", "1.0")})
    held.wrap(rig.plane)
    rig.plane.start()
    big = _art(tmp_path, "big", "1.0", seed=1)
    try:
        rig.plane.reconcile_pass()
        _until(lambda: rig.served("clf") == "1.0", "clf 1.0 was never served")
        rig.client("clf", must_answer=True)
        rig.client("big", must_answer=False)
        src.set([_art(tmp_path, "clf", "1.0"), big], serial=2)
        rig.daemon.start()
        assert held.loading.wait(BOUND_S), "big 1.0 never started loading"
        rig.keeps_going("while the first version of another module loads", "clf", "1.0")
        (slot_file,) = [p for p in state.module("big").glob("[ab]/*") if p.name != "state.json"]
        data = bytearray(slot_file.read_bytes())  # one byte flipped in the verified slot, from outside
        data[len(data) // 2] ^= 0xFF
        slot_file.write_bytes(bytes(data))
        held.release.set()
        _until(lambda: big.sha256 in rig.plane.slots.status("big").bad, "the changed bytes were not refused")
        rig.keeps_going("after a refused first version", "clf", "1.0")
        _until(
            lambda: any(
                o["module"] == "big" and o["result"] == "refused"
                for o in rig.passes[-1]["reconcile"]["outcomes"]
            ),
            "the refused version was not refused by the next passes",
        )
    finally:
        rig.close(held)
    assert not rig.failed, rig.failed[:3]
    assert rig.served("big") is None and rig.n("big", "1.0") == 0  # never served
    st = rig.plane.slots.status("big")
    assert st.active is None and st.phase.value == "idle"
    aborted = [r.data for r in rig.audit.records() if r.event == "canary.aborted"]
    assert any(d["module"] == "big" and d["marked_bad"] and "does not load" in d["reason"] for d in aborted)


def test_a_rollback_to_an_unloaded_version_reloads_it_off_the_pass_and_the_action(
    state: StatePaths, tmp_path: Path
) -> None:
    clock = SystemClock()
    one, two = _art(tmp_path, "clf", "1.0"), _art(tmp_path, "clf", "2.0")
    src = StaticSource(clock, [two])
    rig = Rig(state, src, clock)
    for art in (one, two):  # 2.0 active, 1.0 the last-known-good whose session is not loaded
        rig.plane.slots.install(art)
        rig.plane.slots.flip("clf")
        rig.plane.slots.commit("clf")
    held = Held({("clf", "1.0")})
    held.wrap(rig.plane)
    rig.plane.start()
    handlers = DaemonHandlers(
        state, clock, rig.audit, rig.sink, slots=lambda: rig.plane.slots, plane=rig.plane
    )
    inc = Incident(
        id="inc-1", kind=IncidentKind.VERIFICATION_FAILURE, module="clf", version="2.0",
        opened_at=clock.now(), title="wrong answers",
    )  # fmt: skip
    acted: list[str] = []
    try:
        assert rig.served("clf") == "2.0" and rig.plane.repository.get("clf").routing.standby is None  # type: ignore[union-attr]
        rig.client("clf", must_answer=True)
        rig.daemon.start()
        rig.keeps_going("before the rollback", "clf", "2.0")
        action = threading.Thread(target=lambda: acted.append(handlers.rollback(inc)), daemon=True)
        action.start()  # the responder's thread, as triage would run it
        assert held.loading.wait(BOUND_S), "the rolled-back-to version never started loading"
        _until(lambda: bool(acted), "the rollback action waited for the reload")
        rig.keeps_going("while the rolled-back-to version reloads", "clf", "2.0")
        assert [(m["module"], m["version"], m["kind"]) for m in loading_models(state)] == [
            ("clf", "1.0", "reload")
        ]
        assert rig.plane.slots.status("clf").active.version == "1.0"  # type: ignore[union-attr]
        held.release.set()
        _until(lambda: rig.served("clf") == "1.0", "the reloaded version never served")
        _until(lambda: rig.n("clf", "1.0") > 0, "clf 1.0 never answered")
        _until(lambda: not loading_models(state), "a finished reload is still shown as loading")
    finally:
        rig.close(held)
    assert not rig.failed, rig.failed[:3]
    assert held.loads.count(("clf", "1.0")) == 1  # successive passes did not start a second load
    assert acted and "now serves 1.0" in acted[0]
