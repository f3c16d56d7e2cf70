"""Fleet benchmark: hub polling capacity and fleet convergence on intermittent links.

Prints ONE JSON object:

- ``polling``: requests/s the hub (``sre-hub serve`` in a child process, loopback) answers for
  up-to-date devices polling ``timestamp.json`` with ``If-None-Match`` (304, no body), against full
  GETs of the same file in the same run (``ratio_conditional_vs_full``).
- ``convergence_model``: ``--devices`` (default 1,000) devices with links up ``--link-up`` (20 %) of the
  rounds, converging on a release through a rollout (waves 10/50/100, automatic gates): the real hub
  :class:`RolloutService` (gates, halt rule, signed desired states) and the real device decision
  (:func:`deployment.rollout.resolve`: membership, rollout state), with the transport and the install
  taken as instant. Reports rounds, simulated seconds (rounds x ``--interval``), wall seconds, and the
  same fleet with links always up (``ratio_vs_always_connected``).
- ``convergence_real``: ``--real`` (default 100) devices doing everything for real over loopback HTTP
  (TUF pull, slots, reconcile, signed reports), same link model; rounds, simulated and wall seconds.

Usage: ``python benchmarks/fleet.py [--devices 1000] [--link-up 0.2] [--real 100] [--poll-seconds 3]``
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from deployment.manifest import ModuleManifest  # noqa: E402
from deployment.rollout import resolve  # noqa: E402
from hub.repository import HubRepository  # noqa: E402
from hub.rollouts import RolloutService, RolloutSpec  # noqa: E402
from sre_core.clock import FakeClock  # noqa: E402
from sre_core.http_server import free_port  # noqa: E402


def _scratch() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="fleet-bench-", dir=shm if shm.is_dir() else None))


# ---------------------------------------------------------------------------- polling
def bench_polling(tmp: Path, seconds: float, threads: int) -> dict[str, Any]:
    repo = HubRepository.init(tmp / "poll-repo", channels=("stable",))
    f = tmp / "m.bin"
    f.write_bytes(b"x" * 4096)
    repo.publish("stable", f, ModuleManifest(name="clf", version="1.0", mode="file", filename="m.bin"))
    repo.release("stable", "clf", "1.0")
    port = free_port()
    exe = Path(sys.executable).parent / "sre-hub"
    proc = subprocess.Popen(
        [str(exe), "serve", "--repo", str(repo.dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metadata/timestamp.json"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the hub did not start")
            time.sleep(0.1)
        etag = httpx.get(url, timeout=5).headers["etag"]
        size = len(httpx.get(url, timeout=5).content)

        def run(conditional: bool) -> tuple[float, int, int]:
            counts = [0] * threads
            wrong = [0] * threads
            stop = time.monotonic() + seconds

            def worker(i: int) -> None:
                headers = {"If-None-Match": etag} if conditional else {}
                want = 304 if conditional else 200
                with httpx.Client(timeout=5) as c:
                    while time.monotonic() < stop:
                        r = c.get(url, headers=headers)
                        counts[i] += 1
                        wrong[i] += r.status_code != want

            ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
            t0 = time.monotonic()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return sum(counts) / (time.monotonic() - t0), sum(counts), sum(wrong)

        cond_rps, cond_n, cond_bad = run(True)
        full_rps, full_n, full_bad = run(False)
    finally:
        proc.terminate()
        proc.wait(10)
    return {
        "conditional_rps": round(cond_rps, 1),
        "full_rps": round(full_rps, 1),
        "ratio_conditional_vs_full": round(cond_rps / full_rps, 3) if full_rps else None,
        "requests": cond_n + full_n,
        "unexpected_status": cond_bad + full_bad,
        "timestamp_bytes_saved_per_poll": size,
        "client_threads": threads,
        "seconds_each": seconds,
    }


# ---------------------------------------------------------------------------- model convergence
def _model(tmp: Path, n: int, link_up: float, interval_s: int, seed: int, max_rounds: int) -> dict[str, Any]:
    clock = FakeClock()
    repo = HubRepository.init(tmp, channels=("stable",), clock=clock)
    for v in ("1.0", "2.0"):
        f = tmp / f"m-{v}.bin"
        f.write_bytes(v.encode() * 64)
        repo.publish("stable", f, ModuleManifest(name="clf", version=v, mode="file", filename="m.bin"))
    repo.release("stable", "clf", "1.0")
    svc = RolloutService(repo, clock=clock)
    rng = random.Random(seed)
    ids = [f"dev-{i:05d}" for i in range(n)]
    current: dict[str, str | None] = dict.fromkeys(ids, "1.0")
    svc.start(RolloutSpec(channel="stable", module="clf", version="2.0", soak_s=interval_s, min_devices=5))
    t0 = time.monotonic()
    rounds = 0
    ds = repo.desired_state("stable")
    while rounds < max_rounds:
        rounds += 1
        clock.advance(timedelta(seconds=interval_s))
        for dev in ids:
            if rng.random() >= link_up or ds is None:
                continue
            want = resolve(ds, dev, {"clf": current[dev]}).modules.get("clf")
            if want is not None:
                current[dev] = want.version
            report = {"device_id": dev, "channel": "stable", "safe_mode": False,
                      "modules": {"clf": {"version": current[dev], "phase": "idle", "bad": []}}}  # fmt: skip
            if svc.observe(report):
                ds = repo.desired_state("stable")
        if svc.tick("stable"):
            ds = repo.desired_state("stable")
        if all(v == "2.0" for v in current.values()):
            break
    r = svc.current("stable")
    return {
        "devices": n,
        "link_up": link_up,
        "converged": all(v == "2.0" for v in current.values()),
        "rounds": rounds,
        "simulated_s": rounds * interval_s,
        "wall_s": round(time.monotonic() - t0, 2),
        "rollout_state": r.state if r else None,
        "wave_events": [h["event"] for h in r.history] if r else [],
    }


def bench_model(tmp: Path, n: int, link_up: float, interval_s: int, seed: int) -> dict[str, Any]:
    slow = _model(tmp / "m20", n, link_up, interval_s, seed, 400)
    fast = _model(tmp / "m100", n, 1.0, interval_s, seed, 400)
    slow["always_connected_rounds"] = fast["rounds"]
    slow["ratio_vs_always_connected"] = round(slow["rounds"] / fast["rounds"], 2) if fast["rounds"] else None
    return slow


# ---------------------------------------------------------------------------- real convergence
def bench_real(tmp: Path, n: int, link_up: float, interval_s: int) -> dict[str, Any]:
    from fleet_sim import MODULE, FleetSim

    t0 = time.monotonic()
    with FleetSim(tmp / "real", n, link_up=link_up) as sim:
        setup = time.monotonic() - t0
        sim.publish("1.0.0", release=True)
        sim.round(step_s=interval_s, up=set(range(n)))
        sim.publish("2.0.0")
        sim.service.start(
            RolloutSpec(channel="stable", module=MODULE, version="2.0.0", soak_s=interval_s, min_devices=3)
        )
        t1 = time.monotonic()
        passes = 0
        rounds = 0
        while rounds < 200:
            rounds += 1
            passes += sim.round(step_s=interval_s).passes
            if all(sim.version_of(d) == "2.0.0" for d in sim.devices):
                break
        wall = time.monotonic() - t1
        return {
            "devices": n,
            "link_up": link_up,
            "converged": all(sim.version_of(d) == "2.0.0" for d in sim.devices),
            "rounds": rounds,
            "simulated_s": rounds * interval_s,
            "wall_s": round(wall, 2),
            "device_syncs": passes,
            "syncs_per_s": round(passes / wall, 1) if wall else None,
            "setup_s": round(setup, 2),
            "rollout_state": sim.rollout().state,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--link-up", type=float, default=0.2)
    ap.add_argument("--interval", type=int, default=300, help="simulated seconds per round (poll interval)")
    ap.add_argument("--real", type=int, default=100, help="devices in the real-HTTP simulation (0: skip)")
    ap.add_argument("--poll-seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    tmp = _scratch()
    try:
        out: dict[str, Any] = {"benchmark": "fleet"}
        out["polling"] = bench_polling(tmp, a.poll_seconds, a.threads)
        out["convergence_model"] = bench_model(tmp, a.devices, a.link_up, a.interval, a.seed)
        if a.real:
            out["convergence_real"] = bench_real(tmp, a.real, a.link_up, a.interval)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
