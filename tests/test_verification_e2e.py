"""The whole path on loopback: a hub publishes real ONNX models, the device pulls and reconciles them into
A/B slots, and the verification harness judges what is installed, including the trust horizon of the
signed desired state it holds.

The manifests here carry no golden spec: TUF's canonical JSON refuses floats, so a manifest with golden
vectors cannot be published as a target's ``custom`` yet (reported to the hub owner); golden vectors are
exercised on slots installed through ``deployment.slots`` in the other verification tests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from _trust_support import HubEnv, make_env

from deployment.manifest import ModuleManifest
from deployment.reconcile import Reconciler
from deployment.sample_models import linear_classifier
from policies.verification import load_verification_policy
from sre_core.telemetry import MemorySink
from verification import Harness, Status
from verification.adapters import build_context


@pytest.fixture
def env(tmp_path: Path) -> Iterator[HubEnv]:
    e = make_env(tmp_path, channels=("stable",))
    try:
        yield e
    finally:
        e.server.stop()


def _publish(env: HubEnv, version: str, seed: int) -> None:
    model = linear_classifier(8, 3, seed=seed)
    f = env.tmp / f"clf-{version}.onnx"
    f.write_bytes(model)
    manifest = ModuleManifest(name="clf", version=version, mode="file")  # no daemon: no canary here
    env.repo.publish("stable", f, manifest)
    env.repo.release("stable", "clf", version, expires_in=timedelta(days=14))


@pytest.mark.slow
def test_pulled_and_reconciled_modules_verify_and_the_trust_horizon_runs_out(env: HubEnv) -> None:
    # Puller and Reconciler each open their own AuditLog on the same file (as separate processes would):
    # the chain must stay one chain, which the audit check below verifies.
    for version, seed in (("1.0.0", 1), ("1.1.0", 2)):
        _publish(env, version, seed)
        report = Reconciler(env.paths, env.puller().pull, clock=env.clock).run_once()
        assert report.trust == "fresh", report

    policy = load_verification_policy()
    sink = MemorySink()
    harness = Harness(policy, sink=sink, gates_dir=env.paths.root / "gates")
    ctx = build_context(env.paths, policy, clock=env.clock)
    assert {(s.role, s.version) for s in ctx.slots} == {("active", "1.1.0"), ("standby", "1.0.0")}
    assert ctx.desired_expires is not None
    results = {r.check: r for r in harness.run_once(ctx)}
    for name in ("integrity.slots", "integrity.audit_chain", "trust.horizon", "trust.clock"):
        assert results[name].status is Status.PASS, (name, results[name].summary)
    # The standby loads into a real session, but without golden vectors its behaviour is unproven.
    assert results["rollback.readiness"].status is Status.WARN
    assert results["model.golden"].status is Status.INCONCLUSIVE

    # A corrupted standby on the pulled device is caught.
    standby = next(s for s in ctx.slots if s.role == "standby")
    standby.artifact.write_bytes(b"\0" * 64)
    broken = {r.check: r for r in harness.run_once(build_context(env.paths, policy, clock=env.clock))}
    assert broken["integrity.slots"].status is Status.FAIL
    assert broken["rollback.readiness"].status is Status.FAIL

    env.clock.advance(timedelta(days=13))  # offline: 1 day left
    late = harness.run_once(build_context(env.paths, policy, clock=env.clock), only="trust.horizon")[0]
    assert late.status is Status.WARN
    env.clock.advance(timedelta(days=2))  # past the signed expiry
    expired = harness.run_once(build_context(env.paths, policy, clock=env.clock), only="trust.horizon")[0]
    assert expired.status is Status.FAIL and "expired" in expired.summary
    assert any(e[0] == "incident" and e[3]["check"] == "trust.horizon" for e in sink.events)
