"""A canary that judges like with like, counts only routed traffic, and retries within bounds.

How each promise could be broken, and the test that would catch it:
- a client pins its requests to the canary version and forces a verdict -> pinned requests are refused by
  default, and when the policy allows pinning they are answered but never counted;
- a 0.5 %-error version slips under an absolute margin of 1 point -> the relative margin with a 0.2-point
  floor fails it;
- an identical model serving 1 % of traffic looks slower (colder caches) and is banned -> the latency
  gate compares paired runs of the same requests; an identical model is not judged slower, a 2x one is;
- an inconclusive canary restarts at every pass for ever -> backoff, then a cap and an incident;
- a newer release waits behind a running canary's whole step -> it pre-empts the canary cleanly;
- a candidate too big for the device's memory is loaded anyway -> memory admission refuses it first.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from deployment.canary import CanaryConfig, Phase, judge_error_rate, judge_latency
from deployment.manifest import CanarySpec, CanaryStep, ModuleManifest
from deployment.reconcile import Reconciler
from deployment.router import PinRefusedError, Router, VersionStats
from deployment.sample_models import doubled_classifier, linear_classifier
from deployment.serving import ManagedServing, ModelRepository, canary_progress
from deployment.sessions import load_session
from policies.deployment import CanaryPolicy, load_deployment_policy
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock, SystemClock
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from tests.deploy_helpers import StaticSource, make_artifact

BIG: dict[str, Any] = {"n_features": 64, "hidden_layers": 6, "hidden_size": 512}  # ~5 MiB of weights


def x(rng: np.random.Generator, n: int = 16, rows: int = 1) -> dict[str, np.ndarray]:
    return {"input": rng.normal(size=(rows, n)).astype(np.float32)}


# -- only routed traffic is evidence ----------------------------------------------------------------
def test_pinned_requests_are_refused_by_default_and_never_counted_when_allowed() -> None:
    blob = linear_classifier(seed=0)
    rng = np.random.default_rng(0)
    router = Router("m", load_session(blob, name="m", version="1"), seed=1)
    router.start_canary(load_session(blob, name="m", version="2"), mirror_share=0.0)
    with pytest.raises(PinRefusedError):
        router.infer(x(rng), pin="2")
    assert router.infer(x(rng), pin="1").version == "1"  # the incumbent may be pinned
    router.start_canary(load_session(blob, name="m", version="2"), mirror_share=0.0, allow_pin=True)
    for _ in range(60):
        assert router.infer(x(rng, rows=64), pin="2").version == "2"
    snap = router.snapshot()
    assert snap.stats("2").requests == 0 and snap.stats("1").requests == 0  # no routed evidence
    assert snap.served("2").requests == 60  # but answered and visible to telemetry


# -- error gate: relative margin with a small absolute floor ------------------------------------------
def test_half_a_percent_of_errors_fails_against_a_clean_incumbent_under_the_default_policy() -> None:
    cfg = CanaryConfig.from_spec(None, policy=load_deployment_policy().canary)
    canary = VersionStats(requests=20_000, errors=100)  # 0.5 %
    incumbent = VersionStats(requests=200_000, errors=0)
    verdict = judge_error_rate(
        canary, incumbent, cfg.max_error_rate_increase, 0.01, None, relative=cfg.error_rate_relative
    )
    assert verdict.verdict == "fail"
    same = VersionStats(requests=20_000, errors=200)  # 1 % next to a 1 % incumbent: within the margin
    noisy = VersionStats(requests=200_000, errors=2_000)
    ok = judge_error_rate(
        same, noisy, cfg.max_error_rate_increase, 0.01, 0.01, relative=cfg.error_rate_relative
    )
    assert ok.verdict == "pass"


def test_manifest_values_win_only_when_set() -> None:
    policy = CanaryPolicy(max_error_rate_increase=0.002, max_p95_latency_ratio=1.5)
    assert CanaryConfig.from_spec(CanarySpec(), policy=policy).max_error_rate_increase == 0.002
    explicit = CanarySpec(max_error_rate_increase=0.03)
    assert CanaryConfig.from_spec(explicit, policy=policy).max_error_rate_increase == 0.03
    # a manifest that travelled as JSON has every field present: the unset ones (None) defer to the policy
    sent = ModuleManifest(name="m", version="1", canary=CanarySpec(mirror_share=0.2))
    wire = ModuleManifest.model_validate_json(sent.model_dump_json())
    cfg = CanaryConfig.from_spec(wire.canary, policy=policy)
    assert cfg.max_error_rate_increase == 0.002 and cfg.mirror_share == 0.2


# -- latency: paired, so a cold 1 % canary is judged like with like ---------------------------------
def _load_paired(candidate: bytes, seconds_of_requests: int, threads: int = 2) -> Router:
    """Two client threads push requests through a 1 % canary with 10 % mirroring (real sessions)."""
    router = Router("m", load_session(linear_classifier(**BIG), name="m", version="1"), seed=3)
    router.start_canary(load_session(candidate, name="m", version="2"), mirror_share=0.1)
    router.set_weight(0.01)
    inputs = [x(np.random.default_rng(i), 64) for i in range(64)]

    def client(k: int) -> None:
        for i in range(seconds_of_requests):
            router.infer(inputs[(i + k) % len(inputs)])

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return router


@pytest.mark.slow
def test_identical_model_on_a_small_share_is_not_slower_and_a_doubled_one_is() -> None:
    cfg = CanaryConfig()
    same = _load_paired(linear_classifier(**BIG), 3000).snapshot().paired_stats("2")
    slow = _load_paired(doubled_classifier(**BIG), 3000).snapshot().paired_stats("2")
    assert same.n >= 100 and slow.n >= 100
    a = 0.01
    assert judge_latency(same, cfg.max_p95_latency_ratio, a, a).verdict == "pass", same.ratio.quantile(0.5)
    assert judge_latency(slow, cfg.max_p95_latency_ratio, a, a).verdict == "fail", slow.ratio.quantile(0.5)


# -- bounded attempts, pre-emption, memory admission (real slots, real reconcile) --------------------
SPEC_SLOW = CanarySpec(
    steps=[CanaryStep(weight_pct=10, min_samples=10**9, max_duration_s=0.3)],  # can never pass: inconclusive
    soak_s=0,
    mirror_share=0.2,
)


def _setup(
    state: StatePaths, tmp_path: Path, policy: CanaryPolicy, clock: FakeClock | SystemClock
) -> tuple[ManagedServing, Reconciler, StaticSource, MemorySink, AuditLog]:
    sink = MemorySink()
    audit = AuditLog(state.audit_log, clock)
    serving = ManagedServing(
        state, ModelRepository(sink), clock=clock, sink=sink, audit=audit, interval_s=0.02, policy=policy
    )
    src = StaticSource(clock, [_art(tmp_path, "1.0", CanarySpec())])  # the model every later version is
    rec = Reconciler(state, src, clock, audit=audit, canary=serving, telemetry=sink)
    rec.run_once()
    serving.wait("clf", 60)  # the first version loads in the background
    return serving, rec, src, sink, audit


def _art(tmp_path: Path, version: str, spec: CanarySpec, blob: bytes | None = None):  # type: ignore[no-untyped-def]
    if blob is None:  # the same model under a new digest per version (a rebuilt release)
        model = onnx.load_from_string(linear_classifier(seed=0, hidden_layers=1))
        model.doc_string = version
        blob = bytes(model.SerializeToString())
    return make_artifact(tmp_path / "cas", "clf", version, blob, mode="managed", canary=spec)


def test_inconclusive_canary_backs_off_then_gives_up_with_an_incident(
    state: StatePaths, tmp_path: Path
) -> None:
    clock = FakeClock()
    policy = CanaryPolicy(max_attempts=2, retry_backoff_s=60)
    serving, rec, src, sink, audit = _setup(state, tmp_path, policy, clock)
    src.set([_art(tmp_path, "2.0", SPEC_SLOW)], serial=2)
    results = []
    for attempt in range(2):
        (outcome,) = rec.run_once().outcomes
        assert outcome.result == "canary", outcome
        # the step can never pass: time runs out (fake clock) and the canary ends inconclusive
        done = None
        for _ in range(1000):
            clock.advance(1.0)
            done = serving.wait("clf", 0.05)
            if done is not None:
                break
        assert done is Phase.INCONCLUSIVE
        (held,) = rec.run_once().outcomes
        results.append(held)
        if attempt == 0:
            assert held.result == "blocked" and "backing off" in held.reason
            clock.advance(61)
    assert results[1].result == "blocked" and "not retried" in results[1].reason
    incidents = [e for e in sink.events if e[0] == "incident"]
    assert len(incidents) == 1 and "not retried" in incidents[0][1]
    clock.advance(10**6)
    (still,) = rec.run_once().outcomes
    assert still.result == "blocked"  # capped for good, until a newer version arrives
    src.set([_art(tmp_path, "3.0", SPEC_SLOW)], serial=3)
    (fresh,) = rec.run_once().outcomes
    assert fresh.result == "canary"
    serving.stop()
    st = rec.slots.status("clf")
    assert not st.bad  # nothing was shown wrong with any of them
    assert "canary.gave_up" in [r.event for r in audit.records()]


def test_a_newer_desired_version_pre_empts_a_running_canary(state: StatePaths, tmp_path: Path) -> None:
    clock = SystemClock()
    serving, rec, src, _sink, audit = _setup(state, tmp_path, CanaryPolicy(), clock)
    long = CanarySpec(steps=[CanaryStep(weight_pct=10, min_samples=10**9, max_duration_s=3600)], soak_s=0)
    src.set([_art(tmp_path, "2.0", long)], serial=2)
    (outcome,) = rec.run_once().outcomes
    assert outcome.result == "canary"
    router = serving.repository.get("clf")
    assert router is not None
    for _ in range(2000):  # the candidate loads in the background
        if router.routing.canary is not None:
            break
        threading.Event().wait(0.01)
    assert router.routing.canary is not None and router.routing.canary.version == "2.0"
    (again,) = rec.run_once().outcomes
    assert again.result == "canary" and again.reason == "canary in progress"  # same version: keeps going
    src.set([_art(tmp_path, "3.0", long)], serial=3)
    (outcome,) = rec.run_once().outcomes
    assert outcome.result == "canary" and outcome.version == "3.0"
    try:
        st = rec.slots.status("clf")
        assert not st.bad  # the pre-empted version is not marked bad
        cancelled = [r for r in audit.records() if r.event == "canary.cancelled"]
        assert len(cancelled) == 1 and "pre-empted by desired version 3.0" in str(cancelled[0].data)
        for _ in range(2000):
            if router.routing.canary is not None and router.routing.canary.version == "3.0":
                break
            threading.Event().wait(0.01)
        assert router.routing.canary is not None and router.routing.canary.version == "3.0"
    finally:
        serving.stop()


def test_memory_admission_refuses_an_oversized_candidate(state: StatePaths, tmp_path: Path) -> None:
    clock = SystemClock()
    policy = CanaryPolicy(memory_budget_mb=40)  # the incumbent (~16 MiB estimated) fits; a 20 MiB one not
    serving, rec, src, sink, _audit = _setup(state, tmp_path, policy, clock)
    huge = linear_classifier(n_features=64, hidden_layers=5, hidden_size=1024)
    src.set([_art(tmp_path, "2.0", CanarySpec(), huge)], serial=2)
    (outcome,) = rec.run_once().outcomes
    assert outcome.result == "canary"
    for _ in range(2000):
        if not serving.busy("clf"):
            break
        threading.Event().wait(0.01)
    router = serving.repository.get("clf")
    assert router is not None and router.routing.canary is None
    st = rec.slots.status("clf")
    assert st.active is not None and st.active.version == "1.0" and not st.bad
    incidents = [e for e in sink.events if e[0] == "incident"]
    assert incidents and "budget" in incidents[0][1]
    (held,) = rec.run_once().outcomes
    assert held.result == "blocked" and "memory" in held.reason
    assert not canary_progress(state, "clf")  # no canary ever started


def test_unload_standby_frees_the_last_known_good_and_a_rollback_reloads_it(
    state: StatePaths, tmp_path: Path
) -> None:
    clock = SystemClock()
    serving, rec, src, _sink, _audit = _setup(state, tmp_path, CanaryPolicy(unload_standby=True), clock)
    quick = CanarySpec(
        steps=[CanaryStep(weight_pct=100, min_samples=100, max_duration_s=120)],
        soak_s=0,
        mirror_share=0.5,
        max_p95_latency_ratio=3.0,
        max_error_rate_increase=0.05,
    )
    router = serving.repository.get("clf")
    assert router is not None
    stop = threading.Event()

    def traffic() -> None:
        rng = np.random.default_rng(0)
        for _ in range(2_000_000):
            if stop.is_set():
                return
            router.infer(x(rng))
            stop.wait(0.0002)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        src.set([_art(tmp_path, "2.0", quick)], serial=2)
        (outcome,) = rec.run_once().outcomes
        assert outcome.result == "canary"
        assert serving.wait("clf", 120) is Phase.PROMOTED
    finally:
        stop.set()
        worker.join(10)
        serving.stop()
    assert router.routing.active.version == "2.0" and router.routing.standby is None  # freed
    rec.slots.rollback("clf", reason="test")
    done = serving.sync(rec.slots)
    assert done == {"clf": "serving 1.0"}  # reloaded from its slot (the MTTR cost the benchmark shows)
    assert router.routing.active.version == "1.0"
