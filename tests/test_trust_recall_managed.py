"""A recall rolls a managed model to its target at once, as RAUC/Mender roll back, and the target becomes
the last-known-good.

How to break it: `sre-hub recall --withdraw 2.0 --to 1.0` while 2.0 serves. Before, the device
installed 1.0 into the standby and *canaried it against the recalled 2.0*: the known-bad version kept
serving while the canary ran, and its verdict compared the target with the very build the fleet had
withdrawn (a recalled build that looks "better" on latency could even block the recall).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from deployment.canary import Phase
from deployment.manifest import CanarySpec, CanaryStep, ModuleManifest
from deployment.pull import Puller
from deployment.reconcile import Reconciler
from deployment.sample_models import linear_classifier
from deployment.serving import ManagedServing, ModelRepository
from hub.repository import HubRepository
from hub.server import build_hub_app
from sre_agent.provision import provision
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock
from sre_core.http_server import ServerThread
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink

Run = Callable[..., subprocess.CompletedProcess[str]]
SPEC = CanarySpec(
    steps=[CanaryStep(weight_pct=100, min_samples=30, max_duration_s=60)],
    soak_s=0.0,
    max_p95_latency_ratio=50.0,  # identical shapes on a shared box: latency is not what is judged here
    max_error_rate_increase=0.05,
)


@pytest.mark.slow
def test_a_recall_rolls_a_managed_model_to_its_target_without_a_canary(tmp_path: Path, run_cli: Run) -> None:
    clock = SystemClock()
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=clock)
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    paths = StatePaths(tmp_path / "dev")
    provision(paths, root=repo.metadata_dir / "1.root.json", hub=server.url, channel="stable", clock=clock)
    sink = MemorySink()
    audit = AuditLog(paths.audit_log, clock)
    serving = ManagedServing(
        paths, ModelRepository(sink), clock=clock, sink=sink, audit=audit, interval_s=0.02
    )

    def release(version: str) -> None:  # the same weights, other bytes: the canary's gates pass
        model = onnx.load_from_string(linear_classifier(seed=0))
        model.doc_string = version
        f = tmp_path / f"clf-{version}.onnx"
        f.write_bytes(model.SerializeToString())
        repo.publish("stable", f, ModuleManifest(name="clf", version=version, canary=SPEC))
        repo.release("stable", "clf", version)

    pull = lambda: Puller(paths, server.url, "stable", clock=clock, audit=audit).pull()  # noqa: E731
    rec = Reconciler(paths, pull, clock, audit=audit, canary=serving, telemetry=sink)
    stop = threading.Event()
    try:
        release("1.0")
        assert [o.result for o in rec.run_once().outcomes] == ["canary"]  # first version: promoted
        assert serving.wait("clf", 120) is Phase.PROMOTED  # it loads in the background (585d77d)
        router = serving.repository.get("clf")
        assert router is not None and router.routing.active.version == "1.0"

        def traffic() -> None:
            x = {"input": np.ones((1, 16), dtype=np.float32)}
            for _ in range(1_000_000):
                if stop.is_set():
                    return
                router.infer(x)
                stop.wait(0.0005)

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        release("2.0")
        assert [o.result for o in rec.run_once().outcomes] == ["canary"]
        assert serving.wait("clf", 120) is Phase.PROMOTED
        assert router.routing.active.version == "2.0"

        r = run_cli("sre-hub", "recall", "--repo", str(repo.dir), "--channel", "stable", "--module", "clf",
                    "--withdraw", "2.0", "--to", "1.0", "--reason", "bad outputs")  # fmt: skip
        assert r.returncode == 0, r.stderr
        (o,) = rec.run_once().outcomes
        assert (o.result, o.version) == ("committed", "1.0"), o  # promptly: no canary against 2.0
        st = rec.slots.status("clf")
        assert st.active is not None and st.active.version == "1.0" and st.phase.value == "idle"
        assert st.last_known_good is not None and st.last_known_good["version"] == "1.0"
        assert any(b["version"] == "2.0" for b in st.bad.values())
        serving.sync(rec.slots)  # what the daemon does right after each pass
        assert router.routing.active.version == "1.0" and router.routing.canary is None
        assert not serving.busy("clf")
        # An operator rollback cannot revive the recalled build; the next pass changes nothing.
        with pytest.raises(Exception, match="marked bad"):
            rec.slots.rollback("clf", reason="operator", actor="operator")
        assert [o.result for o in rec.run_once().outcomes] == ["noop"]
        events = [r.event for r in audit.records()]
        assert "slot.recalled" in events and "recall.rolled_back" in events
    finally:
        stop.set()
        serving.stop()
        server.stop()
