"""Rollback time in file mode: from a failed probe verdict to the previous version active again.

The real reconcile path runs each iteration: install a new version into the standby, flip ``current``,
run its exec probe (which fails), roll back. The clock starts when the probe runner returns its failed
verdict; ``rollback_*`` stops when ``current`` names the previous slot again (renamed, directory
fsynced: what the application serves), ``rollback_recorded_*`` when ``SlotManager.rollback`` returns
(``state.json`` and the audit record fsynced too). Measured in the same run, for comparison: the naive
rollback an agent without
A/B slots does, re-copying the previous artifact from the content cache over the model file (copy,
hash, fsync, rename, fsync dir).

Run: ``python benchmarks/rollback.py [--iterations 200] [--size-mb 16]``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run(work: Path, iterations: int, size_mb: int) -> dict[str, Any]:
    from deployment.artifacts import PullResult, TrustStatus, VerifiedArtifact
    from deployment.manifest import DesiredModule, DesiredState, ModuleManifest
    from deployment.probes import ProbeContext, ProbeReport, ProbeRunner
    from deployment.reconcile import Reconciler
    from policies.deployment import DeploymentPolicy
    from sre_agent.provision import provision
    from sre_core.atomic import fsync_dir
    from sre_core.clock import SystemClock
    from sre_core.paths import StatePaths

    state = StatePaths(work / "state")
    provision(state)
    probe = work / "probes" / "model-ok"
    probe.parent.mkdir()
    probe.write_text('#!/bin/sh\n! grep -q BAD "$SRE_ARTIFACT_PATH"\n')
    probe.chmod(0o755)
    cas = work / "cas"
    cas.mkdir()
    clock = SystemClock()
    probes = [{"kind": "exec", "argv": [str(probe)], "attempts": 1, "timeout_s": 10}]

    def artifact(version: str, head: bytes) -> VerifiedArtifact:
        data = head + os.urandom(size_mb * 2**20 // 2).hex().encode()
        sha = hashlib.sha256(data).hexdigest()
        (cas / sha).write_bytes(data)
        m = ModuleManifest(name="clf", version=version, mode="file", probes=probes)  # type: ignore[arg-type]
        return VerifiedArtifact("clf", version, f"clf/{version}", cas / sha, sha, len(data), m)

    good = artifact("1.0", b"good ")
    bad = artifact("2.0", b"BAD ")
    current = {"art": good}

    def source() -> PullResult:
        a = current["art"]
        now = clock.now()
        from datetime import timedelta

        desired = DesiredState(
            channel="stable",
            serial=time.time_ns() // 1000,
            issued=now - timedelta(minutes=1),
            expires=now + timedelta(days=1),
            modules={"clf": DesiredModule(version=a.version, target=a.target)},
        )
        return PullResult(TrustStatus.FRESH, True, now, desired, {"clf": a})

    policy = DeploymentPolicy.model_validate(
        {"probes": {"exec_allowlist": [str(probe)]}, "flapping": {"max_rollbacks": 1000, "window_s": 1}}
    )
    rec = Reconciler(state, source, clock, policy)
    marks: dict[str, float] = {}

    class TimedRunner(ProbeRunner):
        def run_all(self, specs: Any, ctx: ProbeContext) -> ProbeReport:
            report = super().run_all(specs, ctx)
            marks["verdict"] = time.perf_counter()
            return report

    rec.probes = TimedRunner(policy.probes, clock)
    real_rollback = rec.slots.rollback

    def timed_rollback(*a: Any, **kw: Any) -> Any:
        out = real_rollback(*a, **kw)
        marks["active"] = time.perf_counter()
        return out

    rec.slots.rollback = timed_rollback  # type: ignore[method-assign]
    real_point = rec.slots._point_current

    def timed_point(*a: Any, **kw: Any) -> Any:
        out = real_point(*a, **kw)
        if "verdict" in marks and "served" not in marks:
            marks["served"] = time.perf_counter()  # `current` renamed back and its directory fsynced
        return out

    rec.slots._point_current = timed_point  # type: ignore[method-assign]
    assert [o.result for o in rec.run_once().outcomes] == ["committed"]
    served = state.module("clf") / "current" / "model.onnx"
    flips: list[float] = []
    serving: list[float] = []
    current["art"] = bad
    for _ in range(iterations):
        marks.clear()
        (o,) = rec.run_once().outcomes
        if o.result != "rolled_back" or served.read_bytes()[:5] != b"good ":
            raise RuntimeError(f"expected a rollback to 1.0, got {o.to_dict()}")
        flips.append(marks["active"] - marks["verdict"])
        serving.append(marks["served"] - marks["verdict"])
        rec.slots.clear_bad("clf", bad.sha256, actor="benchmark")

    # Naive: copy the previous artifact back over the served file, verifying its hash.
    naive_dir = work / "naive"
    naive_dir.mkdir()
    target = naive_dir / "model.onnx"
    target.write_bytes(bad.path.read_bytes())
    naive: list[float] = []
    for _ in range(max(10, iterations // 4)):
        t0 = time.perf_counter()
        h = hashlib.sha256()
        tmp = naive_dir / ".model.tmp"
        with good.path.open("rb") as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if h.hexdigest() != good.sha256:
            raise RuntimeError("cache corrupt")
        tmp.replace(target)
        fsync_dir(naive_dir)
        naive.append(time.perf_counter() - t0)
        target.write_bytes(b"BAD")
    ms = 1000.0
    return {
        "iterations": iterations,
        "artifact_mb": size_mb,
        "rollback_median_ms": round(statistics.median(serving) * ms, 3),
        "rollback_p99_ms": round(_p(serving, 0.99) * ms, 3),
        "rollback_recorded_median_ms": round(statistics.median(flips) * ms, 3),
        "rollback_recorded_p99_ms": round(_p(flips, 0.99) * ms, 3),
        "naive_reinstall_median_ms": round(statistics.median(naive) * ms, 3),
        "naive_reinstall_p99_ms": round(_p(naive, 0.99) * ms, 3),
        "naive_to_flip_ratio": round(statistics.median(naive) / statistics.median(serving), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--size-mb", type=int, default=16)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sre-rollback-") as tmp:
        res = run(Path(tmp), args.iterations, args.size_mb)
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
