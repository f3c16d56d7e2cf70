"""A/B slots: install, flip, commit, rollback, bad digests, tar bundles, recovery, safe view, canary seam."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from deployment.lifecycle import RESUME, TRANSITIONS, Event, IllegalTransitionError, Phase, next_phase
from deployment.slots import SlotError, SlotManager, SlotRefusedError
from policies.deployment import DeploymentPolicy
from sre_agent.provision import provision
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock
from sre_core.paths import StatePaths
from tests.deploy_helpers import make_artifact, make_tar


@pytest.fixture
def slots(state: StatePaths, clock: FakeClock) -> SlotManager:
    return SlotManager(state, AuditLog(state.audit_log, clock), clock)


def events(state: StatePaths) -> list[str]:
    return [r.event for r in AuditLog(state.audit_log).records()]


def served_bytes(slots: SlotManager, module: str) -> bytes:
    return slots.served_path(module).read_bytes()


def test_install_flip_commit_and_last_known_good(
    slots: SlotManager, state: StatePaths, tmp_path: Path
) -> None:
    v1 = make_artifact(tmp_path / "cas", "clf", "1.0", b"model-one")
    v2 = make_artifact(tmp_path / "cas", "clf", "2.0", b"model-two")
    view = slots.install(v1)
    assert view.slot == "a" and view.version == "1.0"
    assert slots.status("clf").active is None  # installed, not yet active
    assert not (state.module("clf") / "current").exists()
    slots.flip("clf")
    assert slots.status("clf").phase is Phase.PROBING
    slots.commit("clf")
    assert served_bytes(slots, "clf") == b"model-one"
    slots.install(v2)
    st = slots.status("clf")
    assert st.active is not None and st.active.version == "1.0"
    assert st.standby is not None and st.standby.version == "2.0" and st.standby.slot == "b"
    assert served_bytes(slots, "clf") == b"model-one"  # installing never touches what is served
    slots.flip("clf")
    slots.commit("clf")
    st = slots.status("clf")
    assert served_bytes(slots, "clf") == b"model-two"
    assert st.active is not None and st.active.slot == "b"
    assert st.last_known_good == {"version": "1.0", "sha256": v1.sha256, "slot": "a"}
    # A rollback drill that keeps the version good swaps last-known-good too; swapping back restores it.
    slots.rollback("clf", reason="drill", actor="chaos", mark_bad=False)
    assert served_bytes(slots, "clf") == b"model-one"
    assert slots.status("clf").last_known_good == {"version": "2.0", "sha256": v2.sha256, "slot": "b"}
    slots.rollback("clf", reason="drill", actor="chaos", mark_bad=False)
    st = slots.status("clf")
    assert served_bytes(slots, "clf") == b"model-two" and not st.bad
    assert os.readlink(st.current_link) == "b"
    assert slots.verify_slot("clf", "a").ok and slots.verify_slot("clf", "b").ok
    assert AuditLog(state.audit_log).verify() == (len(events(state)), None)
    assert events(state).count("slot.flipped") == 2 and events(state).count("slot.committed") == 2


def test_operator_rollback_marks_bad_until_cleared(
    slots: SlotManager, state: StatePaths, tmp_path: Path
) -> None:
    v1 = make_artifact(tmp_path / "cas", "clf", "1.0", b"one")
    v2 = make_artifact(tmp_path / "cas", "clf", "2.0", b"two")
    for v in (v1, v2):
        slots.install(v)
        slots.flip("clf")
        slots.commit("clf")
    slots.rollback("clf", reason="operator says so", actor="operator")
    st = slots.status("clf")
    assert served_bytes(slots, "clf") == b"one"
    assert v2.sha256 in st.bad and st.bad[v2.sha256]["reason"] == "operator says so"
    # The standby still holds 2.0 but it is bad: neither flip nor reinstall may bring it back.
    with pytest.raises(SlotRefusedError):
        slots.flip("clf")
    with pytest.raises(SlotRefusedError, match="marked bad"):
        slots.install(v2)
    assert "slot.install_refused" in events(state)
    assert slots.clear_bad("clf", v2.sha256[:12]) == [v2.sha256]
    slots.flip("clf")
    slots.commit("clf")
    assert served_bytes(slots, "clf") == b"two"


def test_rollback_without_previous_is_refused(slots: SlotManager, tmp_path: Path) -> None:
    slots.install(make_artifact(tmp_path / "cas", "clf", "1.0", b"one"))
    with pytest.raises(SlotRefusedError, match="no previous version"):
        slots.rollback("clf", reason="x")


def test_tampered_cache_is_refused_and_nothing_changes(
    slots: SlotManager, state: StatePaths, tmp_path: Path
) -> None:
    v1 = make_artifact(tmp_path / "cas", "clf", "1.0", b"one")
    slots.install(v1)
    slots.flip("clf")
    slots.commit("clf")
    v2 = make_artifact(tmp_path / "cas", "clf", "2.0", b"two")
    v2.path.write_bytes(b"evil")  # the cache was corrupted after verification
    with pytest.raises(SlotError, match="not the signed"):
        slots.install(v2)
    st = slots.status("clf")
    assert st.standby is None and st.phase is Phase.IDLE
    assert served_bytes(slots, "clf") == b"one"
    assert not (state.module("clf") / "b").exists() and not (state.module("clf") / ".staging").exists()
    assert "slot.install_failed" in events(state)


def test_tar_bundle_install_and_rehash_detects_corruption(slots: SlotManager, tmp_path: Path) -> None:
    bundle = make_tar({"model.onnx": b"weights", "config/labels.txt": b"cat\ndog\n"}, gz=True)
    art = make_artifact(tmp_path / "cas", "bundle", "1.0", bundle, format="tar")
    view = slots.install(art)
    assert (view.path / "config" / "labels.txt").read_bytes() == b"cat\ndog\n"
    assert view.artifact_path == view.path / "model.onnx"
    assert set(view.record.files) == {"model.onnx", "config/labels.txt"}
    assert slots.verify_slot("bundle", "a").ok
    (view.path / "config" / "labels.txt").write_bytes(b"cat\nfox\n")
    (view.path / "extra.bin").write_bytes(b"x")
    check = slots.verify_slot("bundle", "a")
    assert not check.ok
    assert any("labels.txt" in p and "sha256" in p for p in check.problems)
    assert any("extra.bin" in p for p in check.problems)


def _evil_tar(kind: str) -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:

        def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)

        add(tarfile.TarInfo("ok.txt"), b"fine")
        if kind == "symlink":
            i = tarfile.TarInfo("link")
            i.type, i.linkname = tarfile.SYMTYPE, "/etc/passwd"
            add(i)
        elif kind == "hardlink":
            i = tarfile.TarInfo("hard")
            i.type, i.linkname = tarfile.LNKTYPE, "ok.txt"
            add(i)
        elif kind == "absolute":
            add(tarfile.TarInfo("/tmp/evil"), b"x")
        elif kind == "dotdot":
            add(tarfile.TarInfo("a/../../evil"), b"x")
        elif kind == "device":
            i = tarfile.TarInfo("dev")
            i.type, i.devmajor, i.devminor = tarfile.CHRTYPE, 1, 3
            add(i)
        elif kind == "fifo":
            i = tarfile.TarInfo("fifo")
            i.type = tarfile.FIFOTYPE
            add(i)
        elif kind == "bomb":
            add(tarfile.TarInfo("zeros"), bytes(8 << 20))  # 8 MiB of zeros gzip to ~8 KiB
        elif kind == "members":
            for n in range(20):
                add(tarfile.TarInfo(f"f{n}"), b"x")
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind", ["symlink", "hardlink", "absolute", "dotdot", "device", "fifo", "bomb", "members"]
)
def test_extraction_refusals_leave_nothing(
    state: StatePaths, clock: FakeClock, tmp_path: Path, kind: str
) -> None:
    policy = DeploymentPolicy.model_validate({"extract": {"max_members": 10, "max_ratio": 50}})
    slots = SlotManager(state, AuditLog(state.audit_log, clock), clock, policy)
    art = make_artifact(tmp_path / "cas", "bundle", "1.0", _evil_tar(kind), format="tar")
    with pytest.raises(SlotRefusedError) as exc:
        slots.install(art)
    assert exc.value.exit_code == 2
    mdir = state.module("bundle")
    assert not (mdir / "a").exists() and not (mdir / ".staging").exists()
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()
    st = slots.status("bundle")
    assert st.standby is None and st.phase is Phase.IDLE
    assert events(state)[-1] == "slot.install_failed"


def _write_state(state: StatePaths, module: str, **changes: object) -> None:
    f = state.module(module) / "state.json"
    d = json.loads(f.read_text())
    d.update(changes)
    f.write_text(json.dumps(d))


def test_recover_discards_interrupted_install(slots: SlotManager, state: StatePaths, tmp_path: Path) -> None:
    v1 = make_artifact(tmp_path / "cas", "clf", "1.0", b"one")
    slots.install(v1)
    slots.flip("clf")
    slots.commit("clf")
    mdir = state.module("clf")
    # What kill -9 in the middle of an install leaves: phase installing, half a slot, a staging dir.
    _write_state(state, "clf", phase="installing", op={"kind": "install", "slot": "b", "sha256": "ab" * 32})
    (mdir / "b").mkdir()
    (mdir / "b" / "model.onnx").write_bytes(b"tw")
    (mdir / ".staging" / "tree").mkdir(parents=True)
    (mdir / ".state.json.x.tmp").write_text("{")
    done = SlotManager(state, AuditLog(state.audit_log), FakeClock()).recover("clf")
    assert "discarded" in done
    assert not (mdir / "b").exists() and not (mdir / ".staging").exists()
    assert not (mdir / ".state.json.x.tmp").exists()
    st = slots.status("clf")
    assert st.phase is Phase.IDLE and st.standby is None and served_bytes(slots, "clf") == b"one"


@pytest.mark.parametrize("stored", ["flipping_before_rename", "flipping_after_rename", "probing"])
def test_recover_resolves_pending_flip_to_previous(
    slots: SlotManager, state: StatePaths, tmp_path: Path, stored: str
) -> None:
    v1 = make_artifact(tmp_path / "cas", "clf", "1.0", b"one")
    v2 = make_artifact(tmp_path / "cas", "clf", "2.0", b"two")
    slots.install(v1)
    slots.flip("clf")
    slots.commit("clf")
    slots.install(v2)
    slots.flip("clf")  # now probing 2.0
    mdir = state.module("clf")
    if stored == "flipping_before_rename":
        _write_state(state, "clf", phase="flipping", active="a")
        (mdir / "current").unlink()
        (mdir / "current").symlink_to("a")
    elif stored == "flipping_after_rename":
        _write_state(state, "clf", phase="flipping", active="a")  # link already says b
    SlotManager(state, AuditLog(state.audit_log), FakeClock()).recover("clf")
    st = slots.status("clf")
    assert st.phase is Phase.IDLE
    assert served_bytes(slots, "clf") == b"one"
    assert v2.sha256 not in st.bad  # interrupted is not the same as failed
    assert st.standby is not None and st.standby.version == "2.0"  # kept verified for a retry
    assert st.last_known_good is None
    with pytest.raises(SlotRefusedError, match="never committed"):
        slots.rollback("clf", reason="operator", actor="operator")  # 2.0 was never judged good
    assert AuditLog(state.audit_log).verify()[1] is None


def test_repeated_interruptions_mark_the_version_bad(
    state: StatePaths, clock: FakeClock, tmp_path: Path
) -> None:
    policy = DeploymentPolicy.model_validate({"max_resumes": 2})
    slots = SlotManager(state, AuditLog(state.audit_log, clock), clock, policy)
    v1 = make_artifact(tmp_path / "cas", "clf", "1.0", b"one")
    v2 = make_artifact(tmp_path / "cas", "clf", "2.0", b"two")
    slots.install(v1)
    slots.flip("clf")
    slots.commit("clf")
    slots.install(v2)
    for n in range(2):
        slots.flip("clf")  # ... and the process dies while probing
        slots.recover("clf")
        assert (v2.sha256 in slots.status("clf").bad) == (n == 1)
    assert served_bytes(slots, "clf") == b"one"


def test_lifecycle_table_is_complete_and_strict() -> None:
    assert set(RESUME) == set(Phase)
    assert all(RESUME[p] in Phase for p in Phase)
    reachable = {Phase.IDLE}
    for _ in Phase:
        reachable |= {dst for (src, _e), dst in TRANSITIONS.items() if src in reachable}
    assert reachable == set(Phase)
    with pytest.raises(IllegalTransitionError):
        next_phase(Phase.INSTALLING, Event.FLIP)
    assert next_phase(Phase.PROBING, Event.PROBES_FAILED) is Phase.ROLLING_BACK


def test_refused_operations_in_wrong_phase(slots: SlotManager, tmp_path: Path) -> None:
    slots.install(make_artifact(tmp_path / "cas", "clf", "1.0", b"one"))
    slots.flip("clf")
    with pytest.raises(SlotRefusedError, match="probing"):
        slots.install(make_artifact(tmp_path / "cas", "clf", "2.0", b"two"))
    with pytest.raises(SlotRefusedError):
        slots.begin_canary("clf")


def test_safe_module_is_served_and_left(state: StatePaths, clock: FakeClock, tmp_path: Path) -> None:
    safe_file = tmp_path / "factory.onnx"
    safe_file.write_bytes(b"factory-safe")
    provision(state, safe_modules=[f"clf={safe_file}"], clock=clock)
    slots = SlotManager(state, AuditLog(state.audit_log, clock), clock)
    slots.install(make_artifact(tmp_path / "cas", "clf", "1.0", b"one"))
    slots.flip("clf")
    slots.commit("clf")
    assert slots.enter_safe("clf", reason="test")
    st = slots.status("clf")
    assert st.phase is Phase.SAFE and st.serving == "safe"
    assert served_bytes(slots, "clf") == b"factory-safe"
    assert (state.module("clf") / "current" / "model.onnx").read_bytes() == b"factory-safe"
    with pytest.raises(SlotRefusedError):
        slots.install(make_artifact(tmp_path / "cas", "clf", "2.0", b"two"))
    slots.recover("clf")  # a restart keeps serving the safe module
    assert served_bytes(slots, "clf") == b"factory-safe"
    slots.leave_safe("clf")
    assert served_bytes(slots, "clf") == b"one"
    assert not slots.enter_safe("other", reason="x")  # no safe module provisioned for it


def test_canary_seam_promote_and_abort(slots: SlotManager, state: StatePaths, tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    for v in (make_artifact(cas, "clf", "1.0", b"one"),):
        slots.install(v)
        slots.flip("clf")
        slots.commit("clf")
    slots.install(make_artifact(cas, "clf", "2.0", b"two"))
    view = slots.begin_canary("clf")
    assert view.version == "2.0" and slots.status("clf").phase is Phase.CANARY
    assert served_bytes(slots, "clf") == b"one"  # the canary never moves `current`
    slots.promote_canary("clf", evidence={"steps": 5})
    assert served_bytes(slots, "clf") == b"two" and slots.status("clf").phase is Phase.IDLE
    v3 = make_artifact(cas, "clf", "3.0", b"three")
    slots.install(v3)
    slots.begin_canary("clf")
    slots.abort_canary("clf", reason="too few samples", mark_bad=False)  # inconclusive: may run again
    assert v3.sha256 not in slots.status("clf").bad
    slots.begin_canary("clf")
    slots.abort_canary("clf", reason="p95 latency ratio 2.1")
    st = slots.status("clf")
    assert served_bytes(slots, "clf") == b"two" and v3.sha256 in st.bad
    assert {"canary.started", "canary.aborted"} <= set(events(state))


def test_start_rehash_never_serves_a_corrupt_active_slot(
    slots: SlotManager, state: StatePaths, tmp_path: Path
) -> None:
    cas = tmp_path / "cas"
    for v in (make_artifact(cas, "clf", "1.0", b"one"), make_artifact(cas, "clf", "2.0", b"two")):
        slots.install(v)
        slots.flip("clf")
        slots.commit("clf")
    (state.module("clf") / "b" / "model.onnx").write_bytes(b"tw0")  # bit rot in the active slot
    done = slots.recover("clf")
    assert "failed its re-hash" in done
    st = slots.status("clf")
    assert served_bytes(slots, "clf") == b"one" and st.active is not None and st.active.version == "1.0"
    # The copy is emptied and its version marked bad: the incident that would block it may die with
    # the process, so a later pass never reinstalls and canaries it blindly (an operator clears it).
    assert st.standby is None and set(st.bad) == {hashlib.sha256(b"two").hexdigest()}
    assert "slot.corrupt" in events(state)
    # Both copies corrupt: nothing is served rather than unverified bytes.
    (state.module("clf") / "a" / "model.onnx").write_bytes(b"0ne")
    slots.recover("clf")
    assert slots.status("clf").active is None and not (state.module("clf") / "current").exists()
