"""Soak: the real ``sre-agent run`` under inference traffic with periodic injected faults; is RSS flat?

A hub on loopback, a provisioned device, the daemon as a child process (intervals shortened through its
own settings, as in ``tests/test_live_faults.py``) and a client sending a request every ~20 ms. After a
canary-free update (so a standby exists), faults alternate every ``--fault-every`` seconds:

- ``corrupt``: 16 bytes of the standby slot's model overwritten from outside, restored 4 s later;
- ``probe``: a new version of a file module whose health probe is refused (rolled back, marked bad).

A fault counts as handled when the audit trail shows the daemon's reaction within ``--fault-every``
seconds (for ``corrupt`` an incident opened or recurring, a triage decision or a slot repaired; for
``probe`` the rollback). The daemon's RSS and CPU (psutil, the daemon process only) are sampled every
2 s; the slope is a least-squares fit over the samples after the warm-up (the first 10 % of the run).

Run: ``python benchmarks/soak.py [--seconds 600] [--fault-every 30]``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

EXE = Path(sys.executable).parent / "sre-agent"


def _events(audit: Path) -> list[dict[str, Any]]:
    if not audit.exists():
        return []
    out = []
    for line in audit.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _wait(pred: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({proc.returncode}) waiting for {what}")
        try:
            if pred():
                return
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def _slope_per_min(samples: list[tuple[float, float]]) -> float:
    import numpy as np

    if len(samples) < 3:
        return 0.0
    t = np.array([s[0] for s in samples]) / 60.0
    y = np.array([s[1] for s in samples])
    return float(np.polyfit(t, y, 1)[0])


def run(work: Path, seconds: float, fault_every: float) -> dict[str, Any]:
    import httpx
    import numpy as np
    import onnx
    import psutil
    import yaml

    from deployment.manifest import CanarySpec, CanaryStep, ModuleManifest, ProbeSpec
    from deployment.sample_models import linear_classifier
    from deployment.slots import SlotManager
    from hub.fleetdb import FleetDB
    from hub.ingest import ingest_routes
    from hub.repository import HubRepository
    from hub.server import build_hub_app
    from sre_agent.provision import provision
    from sre_core.audit import AuditLog
    from sre_core.clock import SystemClock
    from sre_core.http_server import ServerThread, free_port
    from sre_core.identity import load_identity
    from sre_core.paths import StatePaths

    clock = SystemClock()
    repo = HubRepository.init(work / "hub", channels=("stable",), clock=clock)
    fleet = FleetDB(repo.dir / "fleet", clock)
    hub = ServerThread(
        build_hub_app(repo.dir, extra_routes=ingest_routes(repo.dir / "fleet", clock=clock, fleet=fleet))
    ).start()
    paths = StatePaths(work / "dev")
    provision(paths, root=repo.metadata_dir / "1.root.json", hub=hub.url, channel="stable", clock=clock)
    ident = load_identity(paths)
    fleet.enroll(ident.device_id, ident.public_pem)
    (paths.policies / "verification.yaml").write_text(
        yaml.safe_dump(
            {
                "defaults": {"interval_s": 300, "jitter_s": 0, "max_parallel": 1},
                "checks": {"integrity.slots": {"interval_s": 2, "jitter_s": 0, "timeout_s": 30}},
            }
        )
    )

    canary = CanarySpec(  # short steps (the shipped ones want thousands of samples); only the error and
        steps=[CanaryStep(weight_pct=w, min_samples=20, max_duration_s=60) for w in (50, 100)],
        soak_s=0.0,  # divergence gates judge on a loaded machine
        mirror_share=0.5,
        max_p95_latency_ratio=10.0,
        max_error_rate_increase=0.05,
    )

    def publish(module: str, version: str, blob: bytes, mode: str, probes: list[ProbeSpec]) -> None:
        f = work / f"{module}-{version}.bin"
        f.write_bytes(blob)
        manifest = ModuleManifest(
            name=module,
            version=version,
            mode=mode,  # type: ignore[arg-type]
            canary=canary if mode == "managed" else None,
            probes=probes,
        )
        repo.publish("stable", f, manifest)
        repo.release("stable", module, version)

    v1 = linear_classifier(seed=1)
    publish("clf", "1.0", v1, "managed", [])
    publish("cfg", "1.0", b"threshold=0.5\n" * 8, "file", [])
    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRE_AGENT_")}
    env |= {
        "SRE_AGENT_LLM__ENABLED": "false",
        "SRE_AGENT_CHAOS__ENABLED": "false",
        "SRE_AGENT_SERVING__PORT": str(port),
        "SRE_AGENT_HUB__PULL_INTERVAL_S": "5",
        "SRE_AGENT_HUB__PULL_JITTER_S": "0",
        "SRE_AGENT_DAEMON__ESCALATIONS_INTERVAL_S": "1",
        "SRE_AGENT_DAEMON__SLO_INTERVAL_S": "5",
        "SRE_AGENT_UPLINK__INTERVAL_S": "2",
        "SRE_AGENT_LOG_FORMAT": "json",
    }
    log = (work / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [str(EXE), "run", "--state", str(paths.root), "--heartbeat", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    served: dict[str, int] = {}
    errors = [0]
    stop = threading.Event()

    def client() -> None:
        x = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32).ravel().tolist()
        body = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": x}]}
        with httpx.Client(timeout=5.0) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"http://127.0.0.1:{port}/v2/models/clf/infer", json=body)
                    if r.status_code == 200:
                        v = str(r.json().get("model_version"))
                        served[v] = served.get(v, 0) + 1
                    elif served:
                        errors[0] += 1
                except httpx.HTTPError:
                    if served:
                        errors[0] += 1
                stop.wait(0.02)

    slots = SlotManager(paths, AuditLog(paths.audit_log))
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: the probe's connection is refused
    faults: list[dict[str, Any]] = []
    samples: list[tuple[float, float, float]] = []
    try:
        threading.Thread(target=client, name="client", daemon=True).start()
        _wait(lambda: served.get("1.0"), 180, "clf 1.0 served", proc)
        model = onnx.load_from_string(v1)
        model.doc_string = "1.1"
        publish("clf", "1.1", model.SerializeToString(), "managed", [])
        _wait(
            lambda: slots.status("clf").standby is not None and slots.status("clf").active.version == "1.1",  # type: ignore[union-attr]
            180,
            "clf 1.1 active with 1.0 standby",
            proc,
        )
        daemon = psutil.Process(proc.pid)
        daemon.cpu_percent(None)
        t_start = time.monotonic()
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.is_set():
                try:
                    rss = daemon.memory_info().rss / 2**20
                    cpu = daemon.cpu_percent(None)
                except psutil.Error:
                    return
                samples.append((time.monotonic() - t_start, rss, cpu))
                stop_sampling.wait(2.0)

        sampler = threading.Thread(target=sample, name="sampler", daemon=True)
        sampler.start()
        n = 0
        while time.monotonic() - t_start < seconds:
            kind = "corrupt" if n % 2 == 0 else "probe"
            mark = len(_events(paths.audit_log))
            t0 = time.monotonic()
            row: dict[str, Any] = {"kind": kind, "at_s": round(t0 - t_start, 1)}
            if kind == "corrupt":
                standby = slots.status("clf").standby
                if standby is None:
                    row["skipped"] = "no standby"
                else:
                    target = standby.artifact_path
                    original = target.read_bytes()
                    with target.open("r+b") as f:
                        f.seek(64)
                        f.write(b"\xff" * 16)
                    time.sleep(4.0)
                    if target.exists() and target.read_bytes() != original:
                        target.write_bytes(original)  # the restore, from outside
                    want: tuple[str, ...] = (
                        "incident.opened",
                        "incident.recurred",
                        "triage.decision",
                        "slot.repaired",
                    )
            else:
                version = f"2.{n}"
                probe = ProbeSpec(
                    kind="http", url=f"http://127.0.0.1:{refused.getsockname()[1]}/healthz", timeout_s=1
                )
                publish("cfg", version, f"threshold=0.{n}\n".encode() * 8, "file", [probe])
                want = ("slot.rolled_back",)
                row["version"] = version
            handled = None
            while time.monotonic() - t0 < fault_every and "skipped" not in row:
                new = _events(paths.audit_log)[mark:]
                hit = [
                    e
                    for e in new
                    if e["event"] in want
                    and (kind == "corrupt" or e["data"].get("away_version") == row.get("version"))
                ]
                if hit and handled is None:
                    handled = time.monotonic() - t0
                    row["reaction"] = hit[0]["event"]
                if proc.poll() is not None:
                    raise SystemExit(f"the daemon exited ({proc.returncode})")
                time.sleep(0.5)
            row["handled_after_s"] = None if handled is None else round(handled, 2)
            faults.append(row)
            n += 1
        stop_sampling.set()
        sampler.join(5)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait(30)
        else:
            rc = proc.returncode
        refused.close()
        hub.stop()
        log.close()
    warm = [(t, r) for t, r, _ in samples if t >= seconds * 0.1]
    cpus = [c for _, _, c in samples[1:]]
    rss = [r for _, r, _ in samples]
    injected = [f for f in faults if "skipped" not in f]
    return {
        "seconds": seconds,
        "samples": len(samples),
        "rss_mb_start": round(rss[0], 1) if rss else None,
        "rss_mb_end": round(rss[-1], 1) if rss else None,
        "rss_mb_max": round(max(rss), 1) if rss else None,
        "rss_slope_mb_per_min": round(_slope_per_min(warm), 3),
        "rss_slope_mb_per_min_whole_run": round(_slope_per_min([(t, r) for t, r, _ in samples]), 3),
        # a plateau shows as a last-half slope well below the warm slope
        "rss_slope_mb_per_min_last_half": round(
            _slope_per_min([(t, r) for t, r, _ in samples if t >= seconds / 2]), 3
        ),
        "rss_mb_mean_by_quarter": [
            round(sum(q) / len(q), 1) if q else None
            for q in (
                [r for t, r, _ in samples if k * seconds / 4 <= t < (k + 1) * seconds / 4] for k in range(4)
            )
        ],
        "cpu_percent_mean": round(sum(cpus) / len(cpus), 1) if cpus else None,
        "cpu_percent_max": round(max(cpus), 1) if cpus else None,
        "faults_injected": len(injected),
        "faults_handled": sum(1 for f in injected if f["handled_after_s"] is not None),
        "faults_by_kind": {
            k: {
                "injected": sum(1 for f in injected if f["kind"] == k),
                "handled": sum(1 for f in injected if f["kind"] == k and f["handled_after_s"] is not None),
            }
            for k in ("corrupt", "probe")
        },
        "max_handled_after_s": max((f["handled_after_s"] or 0.0 for f in injected), default=None),
        "requests_served": served,
        "request_errors": errors[0],
        "daemon_exit_code": rc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--fault-every", type=float, default=30.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sre-soak-") as d:
        print(json.dumps(run(Path(d), args.seconds, args.fault_every)))


if __name__ == "__main__":
    main()
