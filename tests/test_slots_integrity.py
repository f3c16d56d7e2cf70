"""Nothing whose bytes differ from the signed digest ever serves or becomes active.

How we break it: overwrite bytes of a slot (one role at a time: the standby about to be canaried or
flipped, the canary's slot mid-canary, the last-known-good a rollback goes back to, the active slot
found at start) right before the transition that would serve them, and after a kill -9 of a real
process that held the canary. Every transition re-hashes the slot against the digests recorded at
install, refuses with an audit entry and marks the version bad.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from deployment.canary import Phase as CanaryPhase
from deployment.lifecycle import Phase
from deployment.manifest import CanarySpec, CanaryStep
from deployment.reconcile import Reconciler
from deployment.sample_models import linear_classifier
from deployment.serving import ManagedServing, ModelRepository
from deployment.slots import SlotCheck, SlotManager, SlotRecord, SlotRefusedError
from sre_agent.provision import provision
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock, SystemClock
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from tests.deploy_helpers import StaticSource, make_artifact

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def slots(state: StatePaths, clock: FakeClock) -> SlotManager:
    return SlotManager(state, AuditLog(state.audit_log, clock), clock)


def events(state: StatePaths) -> list[str]:
    return [r.event for r in AuditLog(state.audit_log).records()]


def corrupt(state: StatePaths, module: str, slot: str, filename: str = "model.onnx") -> None:
    """Flip one byte in place (same length, same name: only a re-hash can tell)."""
    p = state.module(module) / slot / filename
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def two_committed(slots: SlotManager, tmp_path: Path) -> tuple[str, str]:
    """1.0 then 2.0 committed: 2.0 active in slot b, 1.0 the last-known-good in slot a."""
    shas = []
    for v, data in (("1.0", b"model-one" * 50), ("2.0", b"model-two" * 50)):
        art = make_artifact(tmp_path / "cas", "clf", v, data)
        slots.install(art)
        slots.flip("clf")
        slots.commit("clf")
        shas.append(art.sha256)
    return shas[0], shas[1]


def test_canary_start_refuses_a_standby_corrupted_after_install(
    slots: SlotManager, state: StatePaths, tmp_path: Path
) -> None:
    make = make_artifact
    slots.install(make(tmp_path / "cas", "clf", "1.0", b"one" * 100))
    slots.flip("clf")
    slots.commit("clf")
    v2 = make(tmp_path / "cas", "clf", "2.0", b"two" * 100)
    slots.install(v2)
    corrupt(state, "clf", "b")
    with pytest.raises(SlotRefusedError, match="re-hash"):
        slots.begin_canary("clf")
    st = slots.status("clf")
    assert st.phase is Phase.IDLE and st.active is not None and st.active.version == "1.0"
    assert v2.sha256 in st.bad and os.readlink(st.current_link) == "a"
    assert "slot.activation_refused" in events(state) and "canary.started" not in events(state)
    # The next reconcile's idempotent install keeps the standby, but the digest is refused now.
    with pytest.raises(SlotRefusedError, match="marked bad"):
        slots.install(v2)


def test_promote_refuses_a_canary_slot_corrupted_mid_canary(
    slots: SlotManager, state: StatePaths, tmp_path: Path
) -> None:
    slots.install(make_artifact(tmp_path / "cas", "clf", "1.0", b"one" * 100))
    slots.flip("clf")
    slots.commit("clf")
    v2 = make_artifact(tmp_path / "cas", "clf", "2.0", b"two" * 100)
    slots.install(v2)
    slots.begin_canary("clf")
    corrupt(state, "clf", "b")  # the candidate was loaded from verified bytes; the disk changed since
    with pytest.raises(SlotRefusedError, match="re-hash"):
        slots.promote_canary("clf")
    st = slots.status("clf")
    assert st.phase is Phase.CANARY  # the driver aborts it (as it does for any refused flip)
    assert st.active is not None and st.active.version == "1.0" and os.readlink(st.current_link) == "a"
    assert v2.sha256 in st.bad
    slots.abort_canary("clf", "flip refused", mark_bad=False)
    st = slots.status("clf")
    assert st.phase is Phase.IDLE and v2.sha256 in st.bad  # an inconclusive abort does not clear it
    assert "slot.flipped" not in events(state)[-4:]


def test_file_mode_flip_refuses_a_corrupt_standby(
    slots: SlotManager, state: StatePaths, tmp_path: Path
) -> None:
    two_committed(slots, tmp_path)
    v3 = make_artifact(tmp_path / "cas", "clf", "3.0", b"three" * 100)
    slots.install(v3)
    corrupt(state, "clf", "a")
    with pytest.raises(SlotRefusedError, match="re-hash"):
        slots.flip("clf")
    st = slots.status("clf")
    assert st.phase is Phase.IDLE and st.active is not None and st.active.version == "2.0"
    assert v3.sha256 in st.bad and os.readlink(st.current_link) == "b"


def test_operator_rollback_refuses_a_corrupt_last_known_good(
    slots: SlotManager, state: StatePaths, tmp_path: Path
) -> None:
    v1, v2 = two_committed(slots, tmp_path)
    corrupt(state, "clf", "a")
    with pytest.raises(SlotRefusedError, match="re-hash"):
        slots.rollback("clf", reason="operator", actor="operator")
    st = slots.status("clf")
    assert st.active is not None and st.active.version == "2.0" and os.readlink(st.current_link) == "b"
    assert v1 in st.bad and v2 not in st.bad and st.last_known_good is None
    assert "slot.activation_refused" in events(state) and "slot.rolled_back" not in events(state)


def test_agent_rollback_never_goes_back_to_corrupt_bytes(
    slots: SlotManager, state: StatePaths, tmp_path: Path
) -> None:
    _, v2 = two_committed(slots, tmp_path)
    v3 = make_artifact(tmp_path / "cas", "clf", "3.0", b"three" * 100)
    slots.install(v3)
    slots.flip("clf")  # 3.0 probing in slot a; 2.0 (slot b) is what a failed probe goes back to
    corrupt(state, "clf", "b")
    slots.rollback("clf", reason="probe failed")
    st = slots.status("clf")
    assert st.phase is Phase.IDLE and st.active is None and not st.current_link.is_symlink()
    assert v2 in st.bad and v3.sha256 in st.bad
    assert "slot.activation_refused" in events(state)


def test_kill_9_while_probing_then_corrupt_previous_resolves_to_nothing_served(
    state: StatePaths, clock: FakeClock, tmp_path: Path
) -> None:
    slots = SlotManager(state, AuditLog(state.audit_log, clock), clock)
    _, v2 = two_committed(slots, tmp_path)
    slots.install(make_artifact(tmp_path / "cas", "clf", "3.0", b"three" * 100))
    slots.flip("clf")  # "killed" here: state.json says probing
    corrupt(state, "clf", "b")
    again = SlotManager(state, AuditLog(state.audit_log, clock), clock)
    again.recover("clf")
    st = again.status("clf")
    assert st.active is None and not st.current_link.is_symlink() and v2 in st.bad


def test_start_up_fallback_marks_the_corrupt_active_version_bad(
    slots: SlotManager, state: StatePaths, clock: FakeClock, tmp_path: Path
) -> None:
    v1, v2 = two_committed(slots, tmp_path)
    corrupt(state, "clf", "b")
    again = SlotManager(state, AuditLog(state.audit_log, clock), clock)
    again.recover("clf")
    st = again.status("clf")
    assert st.active is not None and st.active.version == "1.0" and os.readlink(st.current_link) == "a"
    assert v2 in st.bad  # the next reconcile must not reinstall and canary the same digest blindly
    assert v1 not in st.bad


def test_start_up_with_both_slots_corrupt_serves_nothing_and_marks_both(
    slots: SlotManager, state: StatePaths, clock: FakeClock, tmp_path: Path
) -> None:
    v1, v2 = two_committed(slots, tmp_path)
    corrupt(state, "clf", "a")
    corrupt(state, "clf", "b")
    again = SlotManager(state, AuditLog(state.audit_log, clock), clock)
    again.recover("clf")
    st = again.status("clf")
    assert st.active is None and not st.current_link.is_symlink()
    assert v1 in st.bad and v2 in st.bad


# ------------------------------------------------------------------ through reconcile and the canary
SPEC = CanarySpec(
    steps=[CanaryStep(weight_pct=w, min_samples=40, max_duration_s=120) for w in (50, 100)],
    soak_s=0.1,
    mirror_share=0.2,
    max_p95_latency_ratio=3.0,
    max_error_rate_increase=0.05,
)

_CHILD = """
import os, sys, time
from pathlib import Path
from deployment.slots import SlotManager
from sre_agent.provision import provision
from sre_core.audit import AuditLog
from sre_core.paths import StatePaths
paths = StatePaths(Path(sys.argv[1]))
slots = SlotManager(paths, AuditLog(paths.audit_log))
slots.begin_canary("clf")
print("canary", flush=True)
time.sleep(120)
"""


def _managed(state: StatePaths, audit: AuditLog, sink: MemorySink) -> ManagedServing:
    return ManagedServing(
        state, ModelRepository(sink), clock=SystemClock(), sink=sink, audit=audit, interval_s=0.05
    )


def test_kill_9_mid_canary_then_corrupt_standby_is_never_canaried_again(
    state: StatePaths, tmp_path: Path
) -> None:
    """The process holding the canary dies by SIGKILL; the standby is corrupted before the restart.

    The restarted reconcile's install is idempotent (standby already holds the digest), so only the
    canary start's re-hash stands between the corrupt bytes and live traffic.
    """
    clock = SystemClock()
    sink = MemorySink()
    audit = AuditLog(state.audit_log, clock)
    cas = tmp_path / "cas"
    base = linear_classifier(seed=0, hidden_layers=1)
    v1 = make_artifact(cas, "clf", "1.0", base, mode="managed", canary=SPEC)
    v2 = make_artifact(
        cas, "clf", "2.0", linear_classifier(seed=1, hidden_layers=1), mode="managed", canary=SPEC
    )
    serving = _managed(state, audit, sink)
    src = StaticSource(clock, [v1])
    Reconciler(state, src, clock, audit=audit, canary=serving, telemetry=sink).run_once()
    serving.wait("clf", 60)  # the first version loads in the background
    SlotManager(state, audit, clock).install(v2)  # the pass that installed 2.0 ...
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(state.root)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "canary"
        corrupt(state, "clf", "b")  # ... and, while the canary holder is down, the standby rots
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL

    serving2 = _managed(state, audit, sink)
    rec = Reconciler(state, src, clock, audit=audit, canary=serving2, telemetry=sink)
    try:
        rec.recover()
        serving2.sync(rec.slots)
        router = serving2.repository.get("clf")
        assert router is not None and router.routing.active.version == "1.0"
        src.set([v2], serial=2)
        (outcome,) = rec.run_once().outcomes
        assert outcome.result == "failed" and "re-hash" in outcome.reason
        assert not serving2.busy("clf") and router.routing.canary is None
        st = rec.slots.status("clf")
        assert st.active is not None and st.active.version == "1.0" and v2.sha256 in st.bad
        (outcome,) = rec.run_once().outcomes
        assert outcome.result == "refused"
    finally:
        serving2.stop()
        serving.stop()
    assert "slot.activation_refused" in [r.event for r in audit.records()]


def test_recall_of_a_canaried_version_makes_the_recall_target_last_known_good(
    state: StatePaths, tmp_path: Path
) -> None:
    clock = SystemClock()
    sink = MemorySink()
    audit = AuditLog(state.audit_log, clock)
    cas = tmp_path / "cas"
    v1 = make_artifact(
        cas, "clf", "1.0", linear_classifier(seed=0, hidden_layers=1), mode="managed", canary=SPEC
    )
    relabelled = onnx.load_from_string(linear_classifier(seed=0, hidden_layers=1))
    relabelled.doc_string = "2.0"
    v2 = make_artifact(cas, "clf", "2.0", relabelled.SerializeToString(), mode="managed", canary=SPEC)
    serving = _managed(state, audit, sink)
    src = StaticSource(clock, [v1])
    rec = Reconciler(state, src, clock, audit=audit, canary=serving, telemetry=sink)
    rec.run_once()
    serving.wait("clf", 60)  # the first version loads in the background
    router = serving.repository.get("clf")
    assert router is not None
    stop = threading.Event()

    def traffic() -> None:
        rng = np.random.default_rng(0)
        for _ in range(5_000_000):
            if stop.is_set():
                return
            router.infer({"input": rng.normal(size=(1, 16)).astype(np.float32)})
            stop.wait(0.0002)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        src.set([v2], serial=2)
        assert rec.run_once().outcomes[0].result == "canary"
        assert serving.wait("clf", 120) is CanaryPhase.PROMOTED
        src.set([v1], serial=3)
        src.desired = src.desired.model_copy(
            update={
                "recalls": [
                    {
                        "id": "rc-1",
                        "module": "clf",
                        "withdrawn": ["2.0"],
                        "to_version": "1.0",
                        "to_target": v1.target,
                        "reason": "bad release",
                    }
                ]
            }
        )
        # A recall is a rollback: committed at once, never canaried against the recalled 2.0.
        assert rec.run_once().outcomes[0].result == "committed"
        serving.sync(rec.slots)
        assert router.routing.active.version == "1.0"
    finally:
        stop.set()
        worker.join(10)
        serving.stop()
    st = rec.slots.status("clf")
    assert st.active is not None and st.active.version == "1.0" and v2.sha256 in st.bad
    assert st.last_known_good == {"version": "1.0", "sha256": v1.sha256, "slot": st.active.slot}
    with pytest.raises(SlotRefusedError):  # nothing to go back to: 2.0 is recalled
        rec.slots.rollback("clf", reason="operator", actor="operator")


def test_leaving_safe_mode_re_hashes_the_slot_that_serves_again(
    state: StatePaths, clock: FakeClock, tmp_path: Path
) -> None:
    safe_file = tmp_path / "factory.onnx"
    safe_file.write_bytes(b"factory-safe")
    provision(state, safe_modules=[f"clf={safe_file}"], clock=clock)
    slots = SlotManager(state, AuditLog(state.audit_log, clock), clock)
    _, v2 = two_committed(slots, tmp_path)
    assert slots.enter_safe("clf", reason="expired")
    corrupt(state, "clf", "b")  # the active slot rots while the factory module serves
    slots.leave_safe("clf")
    st = slots.status("clf")
    assert st.active is not None and st.active.version == "1.0" and os.readlink(st.current_link) == "a"
    assert slots.served_path("clf").read_bytes() == b"model-one" * 50 and v2 in st.bad


class _CountingSlots(SlotManager):
    """Counts re-hashes (one-method seam): the cost must stay one hash of one slot per transition."""

    hashed: list[str]

    def _verify(self, module: str, slot: str, rec: SlotRecord | None) -> SlotCheck:
        self.hashed.append(slot)
        return super()._verify(module, slot, rec)


def test_each_transition_hashes_one_slot_once(state: StatePaths, clock: FakeClock, tmp_path: Path) -> None:
    slots = _CountingSlots(state, AuditLog(state.audit_log, clock), clock)
    slots.hashed = []
    two_committed(slots, tmp_path)
    slots.install(make_artifact(tmp_path / "cas", "clf", "3.0", b"three" * 100))
    steps: dict[str, Callable[[], object]] = {
        "canary start": lambda: slots.begin_canary("clf"),
        "promote": lambda: slots.promote_canary("clf"),
        "operator rollback": lambda: slots.rollback("clf", reason="drill", actor="chaos", mark_bad=False),
        "restart": lambda: slots.recover("clf"),
    }
    for name, step in steps.items():
        slots.hashed = []
        step()
        assert len(slots.hashed) == 1, name


def test_first_version_whose_bytes_change_while_loading_is_aborted_not_served(
    state: StatePaths, tmp_path: Path
) -> None:
    """No incumbent: the driver promotes after loading; a change between canary start and promote is
    refused by the promote's re-hash, and the driver ends the canary instead of leaving it open."""
    clock = SystemClock()
    sink = MemorySink()
    audit = AuditLog(state.audit_log, clock)
    slots = SlotManager(state, audit, clock)
    v1 = make_artifact(tmp_path / "cas", "clf", "1.0", linear_classifier(seed=0), mode="managed", canary=SPEC)
    slots.install(v1)
    view = slots.begin_canary("clf")
    corrupt(state, "clf", "a")
    serving = _managed(state, audit, sink)
    serving.start("clf", view, slots)
    serving.wait("clf", 60)  # loaded in the background
    st = slots.status("clf")
    assert st.phase is Phase.IDLE and st.active is None and v1.sha256 in st.bad
    assert serving.repository.get("clf") is None
