"""Each built-in check on real artifacts: ONNX models in real sessions, real DuckDB files, the real audit
trail, psutil against policy reserves."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import onnxruntime as ort
import pytest

from deployment.manifest import GoldenSpec, ModuleManifest, TensorStats
from deployment.sample_models import linear_classifier
from policies.verification import ResourceReserves, VerificationPolicy, load_verification_policy
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock
from sre_core.paths import StatePaths
from verification import SlotView, Status, VerificationContext
from verification.builtin import (
    AuditChainCheck,
    ClockSanityCheck,
    GoldenVectorsCheck,
    InputDriftCheck,
    OutputDriftCheck,
    ResourceHeadroomCheck,
    RollbackReadinessCheck,
    SlotDigestCheck,
    TelemetryDbCheck,
    TrustHorizonCheck,
)
from verification.builtin.drift import baseline_stats
from verification.golden import make_golden

N_FEATURES, N_CLASSES = 6, 3
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _baseline(seed: int = 1, n: int = 2000) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, N_FEATURES)).astype(np.float32)


def _install(paths: StatePaths, module: str, slot: str, role: str, version: str, seed: int) -> SlotView:
    model = linear_classifier(N_FEATURES, N_CLASSES, seed=seed)
    manifest = ModuleManifest(name=module, version=version, golden=make_golden(model, _baseline()))
    d = paths.module(module) / slot
    d.mkdir(parents=True)
    (d / manifest.filename).write_bytes(model)
    return SlotView(module, slot, role, d, version, hashlib.sha256(model).hexdigest(), manifest)  # type: ignore[arg-type]


@pytest.fixture
def policy() -> VerificationPolicy:
    return load_verification_policy()


@pytest.fixture
def device(state: StatePaths, policy: VerificationPolicy) -> VerificationContext:
    """One model module: version 2 active in slot b, version 1 standby in slot a."""
    active = _install(state, "clf", "b", "active", "2.0", seed=2)
    standby = _install(state, "clf", "a", "standby", "1.0", seed=1)
    return VerificationContext(paths=state, policy=policy, clock=FakeClock(NOW), slots=[active, standby])


def _with(ctx: VerificationContext, **changes: object) -> VerificationContext:
    from dataclasses import replace

    return replace(ctx, **changes)  # type: ignore[arg-type]


# -- model behaviour ---------------------------------------------------------------------------------


def test_golden_vectors_pass_on_both_slots(device: VerificationContext) -> None:
    res = GoldenVectorsCheck().run(device)
    assert res.status is Status.PASS
    assert set(res.evidence) == {"clf/active", "clf/standby"}
    assert res.evidence["clf/active"]["vectors"] == 4
    assert res.measurements["max_abs_error"] <= 1e-4


def test_golden_vectors_catch_a_model_with_changed_weights(device: VerificationContext) -> None:
    active = device.slot("clf", "active")
    assert active is not None
    # Replace the active model by a different (valid) one: loads fine, behaves differently.
    active.artifact.write_bytes(linear_classifier(N_FEATURES, N_CLASSES, seed=99))
    res = GoldenVectorsCheck().run(device)
    assert res.status is Status.FAIL
    assert "clf/active" in res.summary and "clf/standby" not in res.summary
    failed = res.evidence["clf/active"]["failed"]
    assert failed and failed[0]["max_abs_error"] > failed[0]["tolerance"]


# -- data integrity ----------------------------------------------------------------------------------


def test_slot_digests_detect_a_corrupted_slot(device: VerificationContext) -> None:
    assert SlotDigestCheck().run(device).status is Status.PASS
    standby = device.slot("clf", "standby")
    assert standby is not None
    data = bytearray(standby.artifact.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    standby.artifact.write_bytes(bytes(data))
    res = SlotDigestCheck().run(device)
    assert res.status is Status.FAIL
    assert res.measurements["corrupted"] == 1
    assert res.modules == ("clf",)
    assert res.evidence["clf/standby"]["ok"] is False
    assert res.evidence["clf/active"]["ok"] is True


def _telemetry_db(path: Path) -> None:
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE metrics AS SELECT range AS ts, 'cpu' || (range % 7)::VARCHAR AS name, "
        "random() AS value FROM range(150000)"
    )
    con.execute("CHECKPOINT")
    con.close()


def test_duckdb_integrity_passes_then_detects_corruption(device: VerificationContext, tmp_path: Path) -> None:
    db = tmp_path / "telemetry.duckdb"
    _telemetry_db(db)
    ctx = _with(device, telemetry_db=db)
    ok = TelemetryDbCheck().run(ctx)
    assert ok.status is Status.PASS
    assert ok.evidence["tables"] == {"main.metrics": 150000}
    size = db.stat().st_size
    with db.open("r+b") as fh:  # scribble over a data block in the middle of the file
        fh.seek(size // 2)
        fh.write(b"\xa5" * 256)
    bad = TelemetryDbCheck().run(ctx)
    assert bad.status is Status.FAIL
    assert "checksum" in bad.evidence["error"].lower() or "corrupt" in bad.evidence["error"].lower()


def test_duckdb_check_uses_the_daemons_connection_when_given(
    device: VerificationContext, tmp_path: Path
) -> None:
    db = tmp_path / "held.duckdb"
    _telemetry_db(db)
    held = duckdb.connect(str(db))  # the "daemon" holds the file
    try:
        res = TelemetryDbCheck().run(
            _with(device, telemetry_db=db, telemetry_query=lambda sql: held.cursor().execute(sql).fetchall())
        )
        assert res.status is Status.PASS
        assert res.measurements["rows"] == 150000
    finally:
        held.close()


def test_audit_chain_detects_an_edited_record(device: VerificationContext) -> None:
    log = AuditLog(device.paths.audit_log, clock=device.clock)
    for i in range(5):
        log.append("slot.installed", module="clf", n=i)
    ok = AuditChainCheck().run(device)
    assert ok.status is Status.PASS and ok.measurements["records"] == 5
    lines = device.paths.audit_log.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"n": 2', '"n": 7')
    device.paths.audit_log.write_text("".join(lines))
    bad = AuditChainCheck().run(device)
    assert bad.status is Status.FAIL
    assert bad.evidence["line"] == 3
    assert bad.evidence["verified_records"] == 2


# -- rollback readiness --------------------------------------------------------------------------------


def test_rollback_ready_with_a_good_standby(device: VerificationContext) -> None:
    res = RollbackReadinessCheck().run(device)
    assert res.status is Status.PASS
    assert res.evidence["clf"]["ready"] is True
    assert res.evidence["clf"]["golden"]["vectors"] == 4


def test_rollback_not_ready_when_the_standby_will_not_load(device: VerificationContext) -> None:
    standby = device.slot("clf", "standby")
    assert standby is not None
    # A standby whose bytes match its recorded digest but are not a loadable model: only a real session
    # can tell.
    junk = b"\x08\x07" + b"not an onnx graph" * 40
    standby.artifact.write_bytes(junk)
    broken = _with(standby, sha256=hashlib.sha256(junk).hexdigest())
    with pytest.raises(Exception):
        ort.InferenceSession(str(standby.artifact), providers=["CPUExecutionProvider"])
    ctx = _with(device, slots=[device.slot("clf", "active"), broken])
    res = RollbackReadinessCheck().run(ctx)
    assert res.status is Status.FAIL
    assert "does not load" in res.evidence["clf"]["reason"]
    assert SlotDigestCheck().run(ctx).status is Status.PASS  # intact bytes, still not ready


def test_rollback_not_ready_without_standby_or_with_a_corrupted_one(device: VerificationContext) -> None:
    active = device.slot("clf", "active")
    res = RollbackReadinessCheck().run(_with(device, slots=[active]))
    assert res.status is Status.FAIL and "no standby" in res.evidence["clf"]["reason"]
    standby = device.slot("clf", "standby")
    assert standby is not None
    standby.artifact.write_bytes(standby.artifact.read_bytes()[:-10])
    res = RollbackReadinessCheck().run(device)
    assert res.status is Status.FAIL and "not intact" in res.evidence["clf"]["reason"]


# -- drift ---------------------------------------------------------------------------------------------


def test_input_drift_psi(device: VerificationContext) -> None:
    rng = np.random.default_rng(7)
    same = rng.normal(0.0, 1.0, (1000, N_FEATURES))
    ok = InputDriftCheck().run(_with(device, input_samples={"clf": {"input": same}}))
    assert ok.status is Status.PASS, ok.summary
    drifted = same.copy()
    drifted[:, 3] = rng.normal(1.5, 1.0, 1000)  # one sensor shifted
    bad = InputDriftCheck().run(_with(device, input_samples={"clf": {"input": drifted}}))
    assert bad.status is Status.FAIL
    ev = bad.evidence["clf/input"]
    assert ev["method"] == "psi" and ev["feature"] == 3 and ev["max"] > ev["limit"]


def test_input_drift_ks_when_only_moments_ship(state: StatePaths, policy: VerificationPolicy) -> None:
    view = _install(state, "clf", "a", "active", "1.0", seed=1)
    assert view.manifest is not None and view.manifest.golden is not None
    moments = TensorStats(mean=[0.0] * N_FEATURES, std=[1.0] * N_FEATURES)
    golden = GoldenSpec(vectors=view.manifest.golden.vectors, input_stats={"input": moments})
    view = _with(view, manifest=view.manifest.model_copy(update={"golden": golden}))
    rng = np.random.default_rng(3)
    ctx = VerificationContext(paths=state, policy=policy, clock=FakeClock(NOW), slots=[view])
    ok = InputDriftCheck().run(
        _with(ctx, input_samples={"clf": {"input": rng.normal(0, 1, (800, N_FEATURES))}})
    )
    assert ok.status is Status.PASS and ok.evidence["clf/input"]["method"] == "ks"
    scaled = rng.normal(0, 2.5, (800, N_FEATURES))  # same mean, wider spread
    bad = InputDriftCheck().run(_with(ctx, input_samples={"clf": {"input": scaled}}))
    assert bad.status is Status.FAIL


def test_input_drift_with_too_few_samples_is_inconclusive(device: VerificationContext) -> None:
    few = np.random.default_rng(0).normal(5.0, 1.0, (20, N_FEATURES))
    res = InputDriftCheck().run(_with(device, input_samples={"clf": {"input": few}}))
    assert res.status is Status.INCONCLUSIVE


def test_output_divergence_from_the_fleet(device: VerificationContext) -> None:
    active = device.slot("clf", "active")
    assert active is not None
    sess = ort.InferenceSession(str(active.artifact), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(11)
    live = sess.run(None, {"input": rng.normal(0, 1, (1500, N_FEATURES)).astype(np.float32)})[0]
    ok = OutputDriftCheck().run(_with(device, output_samples={"clf": live}))
    assert ok.status is Status.PASS, ok.summary
    # The same model on a population the fleet does not see: its class mix moves away from the fleet's.
    shifted = sess.run(None, {"input": rng.normal(3, 1, (1500, N_FEATURES)).astype(np.float32)})[0]
    bad = OutputDriftCheck().run(_with(device, output_samples={"clf": shifted}))
    assert bad.status is Status.FAIL
    assert bad.measurements["max_js"] > device.policy.drift.output_js_max


def test_baseline_stats_shape() -> None:
    st = baseline_stats(_baseline(), bins=10)
    assert st.fractions is not None and st.bins is not None
    assert len(st.fractions) == N_FEATURES and len(st.fractions[0]) == len(st.bins) - 1
    assert all(abs(sum(f) - 1.0) < 1e-9 for f in st.fractions)


# -- trust horizon and clock -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "status"),
    [
        (timedelta(days=10), Status.PASS),
        (timedelta(days=1), Status.WARN),
        (timedelta(hours=2), Status.FAIL),
        (timedelta(hours=-1), Status.FAIL),
    ],
)
def test_trust_horizon(device: VerificationContext, left: timedelta, status: Status) -> None:
    res = TrustHorizonCheck().run(_with(device, desired_expires=NOW + left))
    assert res.status is status
    assert res.measurements["horizon_s"] == pytest.approx(left.total_seconds())


def test_trust_horizon_uses_trusted_time_not_a_wound_back_clock(device: VerificationContext) -> None:
    expires = NOW + timedelta(days=10)
    # The wall clock says 10 days left, but the device has seen a signed time 11 days later.
    res = TrustHorizonCheck().run(
        _with(device, desired_expires=expires, trusted_floor=NOW + timedelta(days=11))
    )
    assert res.status is Status.FAIL


def test_clock_sanity(device: VerificationContext) -> None:
    clock = FakeClock(NOW)
    check = ClockSanityCheck()
    assert check.run(_with(device, clock=clock)).status is Status.PASS
    clock.advance(60)
    assert check.run(_with(device, clock=clock)).status is Status.PASS
    clock.set(NOW + timedelta(hours=5))  # the wall clock jumps 5 h while 0 s passed
    stepped = check.run(_with(device, clock=clock))
    assert stepped.status is Status.WARN and stepped.measurements["step_s"] > 3600
    reset = ClockSanityCheck().run(_with(device, clock=FakeClock(datetime(2000, 1, 1, tzinfo=UTC))))
    assert reset.status is Status.FAIL and "RTC" in reset.summary
    behind = ClockSanityCheck().run(_with(device, trusted_floor=NOW + timedelta(days=2)))
    assert behind.status is Status.FAIL and behind.measurements["lag_s"] > 86400


# -- resources ----------------------------------------------------------------------------------------------


def test_disk_below_reserve(device: VerificationContext) -> None:
    res = ResourceHeadroomCheck().run(device)
    free = res.measurements["disk_free_mb"]
    assert free > 0 and "disk_free_mb" not in res.summary
    # Set the reserve above the free space instead of filling the disk.
    tight = device.policy.model_copy(
        update={"reserves": ResourceReserves(min_free_disk_mb=free * 2 + 1024, min_free_disk_pct=0)}
    )
    bad = ResourceHeadroomCheck().run(_with(device, policy=tight))
    assert bad.status is Status.FAIL
    assert "disk_free_mb" in bad.summary
    assert bad.evidence["reserves"]["min_free_disk_mb"] == free * 2 + 1024


def test_sample_recorder_is_bounded_and_ordered_and_feeds_the_drift_check(
    device: VerificationContext,
) -> None:
    from verification import SampleRecorder

    rec = SampleRecorder(max_rows=500)
    rng = np.random.default_rng(5)
    for i in range(7):  # 7 x 100 rows into 500: the first 200 are overwritten
        batch = rng.normal(0, 1, (100, N_FEATURES))
        batch[:, 0] = np.arange(i * 100, (i + 1) * 100)
        rec.observe("clf", {"input": batch}, outputs=np.zeros((100, N_CLASSES)))
    ins, outs = rec.snapshot()
    kept = ins["clf"]["input"]
    assert kept.shape == (500, N_FEATURES) and outs["clf"].shape == (500, N_CLASSES)
    assert kept[:, 0].tolist() == list(range(200, 700))  # oldest first, newest last

    rec.clear()
    rec.observe("clf", {"input": rng.normal(2.0, 1, (400, N_FEATURES))})
    ins, _ = rec.snapshot()
    res = InputDriftCheck().run(_with(device, input_samples=ins))
    assert res.status is Status.FAIL and res.modules == ("clf",)


def test_duckdb_held_by_another_process_is_inconclusive_not_corrupt(
    device: VerificationContext, tmp_path: Path
) -> None:
    import subprocess
    import sys

    db = tmp_path / "daemon.duckdb"
    _telemetry_db(db)
    code = f"import duckdb, sys\nc = duckdb.connect({str(db)!r})\nprint('held', flush=True)\nsys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        res = TelemetryDbCheck().run(_with(device, telemetry_db=db))
        assert res.status is Status.INCONCLUSIVE
        assert "another process" in res.summary
    finally:
        holder.communicate(timeout=30)


def test_inputs_full_of_nan_fail_the_drift_check(device: VerificationContext) -> None:
    x = np.random.default_rng(2).normal(0, 1, (600, N_FEATURES))
    x[::10, 2] = np.nan  # a sensor dropping out on 10 % of the requests
    res = InputDriftCheck().run(_with(device, input_samples={"clf": {"input": x}}))
    assert res.status is Status.FAIL
    assert res.evidence["clf/input"]["non_finite_rows"] == 60
    x[::10, 2] = 0.0
    x[0, 1] = np.inf  # one bad row in 600 is within the policy's share and dropped from the statistics
    ok = InputDriftCheck().run(_with(device, input_samples={"clf": {"input": x}}))
    assert ok.status is Status.PASS and ok.evidence["clf/input"]["non_finite_rows"] == 1


def test_regressor_outputs_against_the_shipped_output_statistics(
    state: StatePaths, policy: VerificationPolicy
) -> None:
    from deployment.manifest import RuntimeSpec
    from deployment.sample_models import linear_regressor

    model = linear_regressor(N_FEATURES, seed=4)
    d = state.module("reg") / "a"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(model)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(9)
    base = sess.run(None, {"input": rng.normal(0, 1, (2000, N_FEATURES)).astype(np.float32)})[0]
    golden = GoldenSpec(
        output_stats={"value": TensorStats(mean=[float(base.mean())], std=[float(base.std())])}
    )
    manifest = ModuleManifest(
        name="reg", version="1.0", runtime=RuntimeSpec(task="regressor", output_name="value"), golden=golden
    )
    view = SlotView("reg", "a", "active", d, "1.0", hashlib.sha256(model).hexdigest(), manifest)
    ctx = VerificationContext(paths=state, policy=policy, clock=FakeClock(NOW), slots=[view])
    live = sess.run(None, {"input": rng.normal(0, 1, (800, N_FEATURES)).astype(np.float32)})[0]
    ok = OutputDriftCheck().run(_with(ctx, output_samples={"reg": live}))
    assert ok.status is Status.PASS, ok.summary
    skewed = sess.run(None, {"input": rng.normal(0, 3.0, (800, N_FEATURES)).astype(np.float32)})[0]
    bad = OutputDriftCheck().run(_with(ctx, output_samples={"reg": skewed}))
    assert bad.status is Status.FAIL and bad.measurements["max_ks"] > policy.drift.ks_statistic_max
