"""End to end over a real hub on loopback: publish -> TUF pull -> reconcile -> commit, an operator
rollback, then the signed desired state expires offline (safe mode) and a fresh release brings the
device back.

Manifests here carry no probes: TUF canonical JSON refuses floats, and ProbeSpec's timeouts are floats,
so the hub cannot yet publish a manifest with probes (reported to the hub/pull owner). Probe-driven
rollback is covered against verified artifacts built in tests (test_reconcile.py).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from _trust_support import make_env

from deployment.manifest import ModuleManifest
from deployment.reconcile import Reconciler
from deployment.safemode import read_safe_mode
from deployment.sample_models import linear_classifier
from sre_agent.provision import provision
from sre_core.audit import AuditLog


def test_hub_publish_pull_reconcile_rollback_and_expiry(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        clock, repo, paths = env.clock, env.repo, env.paths
        factory = tmp_path / "safe.onnx"
        factory.write_bytes(linear_classifier(seed=99))
        provision(paths, safe_modules=[f"clf={factory}"], clock=clock)

        def publish(version: str, seed: int, days: int = 14) -> bytes:
            data = linear_classifier(seed=seed)
            f = tmp_path / f"clf-{version}.onnx"
            f.write_bytes(data)
            repo.publish("stable", f, ModuleManifest(name="clf", version=version, mode="file"))
            repo.release("stable", "clf", version, expires_in=timedelta(days=days))
            return data

        served = paths.module("clf") / "current" / "model.onnx"
        rec = Reconciler(paths, env.puller().pull, clock)
        v1 = publish("1.0.0", 1, days=3)
        r1 = rec.run_once()
        assert r1.trust == "fresh" and [o.result for o in r1.outcomes] == ["committed"]
        assert served.read_bytes() == v1
        v2 = publish("2.0.0", 2, days=3)
        (o,) = rec.run_once().outcomes
        assert o.result == "committed" and o.previous == "1.0.0" and served.read_bytes() == v2

        # An operator rolls 2.0.0 back: 1.0.0 is served and 2.0.0 is never reinstalled from the hub.
        rec.slots.rollback("clf", reason="customer complaint", actor="operator")
        assert served.read_bytes() == v1
        (o,) = rec.run_once().outcomes
        assert o.result == "refused" and served.read_bytes() == v1

        # The hub goes quiet; the signed desired state (3 days) expires: safe mode, by trusted time.
        import socket

        with socket.socket() as s:  # a port nothing listens on: the link is down
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        rec.source = env.puller(source=dead).pull
        clock.advance(timedelta(days=2))
        r = rec.run_once()
        assert not r.safe_mode and not r.online and served.read_bytes() == v1
        clock.advance(timedelta(days=1, seconds=1))
        r = rec.run_once()
        assert r.safe_mode and read_safe_mode(paths).reason == "expired"
        assert served.read_bytes() == factory.read_bytes()

        # A fresh release arrives: leave safe mode and install it.
        rec.source = env.puller().pull
        repo.timestamp()
        v3 = publish("3.0.0", 3)
        r = rec.run_once()
        assert r.trust == "fresh"
        assert not r.safe_mode and [o.result for o in r.outcomes] == ["committed"]
        assert served.read_bytes() == v3

        events = [x.event for x in AuditLog(paths.audit_log).records()]
        steps = ["pull.verified", "slot.installed", "slot.flipped", "probe.completed", "slot.rolled_back"]
        steps += ["reconcile.refused", "safe_mode.entered", "safe_mode.left", "slot.committed"]
        for step in steps:
            assert step in events, step
        assert AuditLog(paths.audit_log).verify()[1] is None
    finally:
        env.server.stop()
