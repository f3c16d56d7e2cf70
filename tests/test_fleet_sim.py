"""The fleet simulation: 200 devices on intermittent links against a real hub on loopback.

Each device has its own state directory and identity, and runs the real TUF Puller and Reconciler
against the hub over HTTP, then reports (RFC 9421-signed) to the hub's fleet API, which drives the
rollout gates and the halt rule. A device whose link is down skips the round. The state directories
live on /dev/shm when there is one (the simulation measures behaviour, not the disk's fsync).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_sim import MODULE, FleetSim

from hub.dora import compute_dora
from hub.fleet_status import fleet_status
from hub.rollouts import RolloutSpec

N = 200
OFFLINE = set(range(20))  # these devices' links stay down until the catch-up phase


@pytest.fixture
def simdir(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if shm.is_dir():
        d = Path(tempfile.mkdtemp(prefix="fleet-sim-", dir=shm))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


@pytest.mark.slow
def test_fleet_rollout_halt_revert_recall_catch_up(simdir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    with FleetSim(simdir, N, link_up=0.5) as sim:
        svc = sim.service
        sim.publish("1.0.0", release=True)
        sim.publish("2.0.0")
        online = [d for d in sim.devices if d.index not in OFFLINE]

        # --- a good rollout: 10 -> 50 -> 100 %, automatic gates, while 20 devices are unreachable.
        svc.start(RolloutSpec(channel="stable", module=MODULE, version="2.0.0", soak_s=60, min_devices=5))
        rounds = sim.run_until(lambda: sim.rollout().state == "completed", 15, down=OFFLINE)
        r = sim.rollout()
        events = [h["event"] for h in r.history]
        assert events == ["start", "advance", "advance", "complete"], events
        waves_opened = [h.get("percent") for h in r.history if h["event"] == "advance"]
        assert waves_opened == [50, 100]
        assert rounds <= 15
        # Membership was each device's own decision: before completion only members ran 2.0.0.
        assert not r.failed
        # Reachable devices converge (stragglers' links come up at last); unreachable ones never synced.
        for _ in range(3):
            sim.round(down=OFFLINE)
        left = {d.index for d in online if sim.version_of(d) != "2.0.0"}
        sim.round(up=left, down=OFFLINE)
        assert all(sim.version_of(d) == "2.0.0" for d in online)
        assert all(sim.version_of(sim.devices[i]) is None and sim.devices[i].passes == 0 for i in OFFLINE)

        # --- devices that were offline catch up when their links return.
        sim.round(up=OFFLINE, down=set(range(N)) - OFFLINE)
        assert sim.versions() == {"2.0.0": N}

        # --- a bad release (its probe can never pass): halts after the first failed device.
        sim.publish("3.0.0", bad=True)
        svc.start(RolloutSpec(channel="stable", module=MODULE, version="3.0.0", soak_s=60, min_devices=5))
        sim.run_until(lambda: sim.rollout().state == "halted", 10)
        r = sim.rollout()
        assert len(r.failed) == 1 and r.wave == 0
        (failed_id,) = r.failed
        failed_dev = next(d for d in sim.devices if d.device_id == failed_id)
        # It rolled back locally (serving 2.0.0, 3.0.0 marked bad); nobody else started 3.0.0.
        st = failed_dev.rec.slots.status(MODULE)
        assert st.active is not None and st.active.version == "2.0.0"
        assert "3.0.0" in {b["version"] for b in st.bad.values()}
        for _ in range(2):
            sim.round()
        assert sim.versions() == {"2.0.0": N}
        assert sim.rollout().state == "halted" and len(sim.rollout().failed) == 1

        # The operator reverts through the CLI (a separate process on the same repository).
        res = run_cli(
            "sre-hub", "rollout", "abort", "--repo", str(sim.repo.dir), "-c", "stable", "--revert", "--json"
        )
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["state"] == "reverted"
        ds = sim.repo.desired_state("stable")
        assert ds is not None and ds.modules[MODULE].version == "2.0.0"
        sim.round(up=set(range(N)))
        assert sim.versions() == {"2.0.0": N}

        # --- recall 2.0.0 fleet-wide, rolling down to 1.0.0; some links are down when it is issued.
        out = svc.recall("stable", MODULE, ["2.0.0"], "1.0.0", reason="field defect")
        assert out["kind"] == "down"
        for _ in range(3):
            sim.round()
        behind = {d.index for d in sim.devices if sim.version_of(d) != "1.0.0"}
        assert behind, "with 50 % links some devices should still be behind after 3 rounds"
        assert all(sim.devices[i].passes > 0 for i in behind)
        sim.round(up=behind)
        assert sim.versions() == {"1.0.0": N}

        # --- what operators see.
        status = fleet_status(svc)
        assert status["summary"]["reporting"] == N and status["summary"]["versions"][MODULE] == {"1.0.0": N}
        assert status["summary"]["drifting"] == 0
        dora = compute_dora(sim.repo, svc.reports)
        assert dora.deployments == 3  # 1.0.0, 2.0.0 and 3.0.0 were signed into the channel
        assert dora.failures == 1 and dora.exposures >= N
        assert dora.change_failure_rate is not None and 0 < dora.change_failure_rate < 0.01
        assert dora.mttr_ms["n"] == 1.0
        # Devices offline during the 2.0.0 rollout: their disconnected time is reported, not hidden.
        assert dora.disconnected_s["max"] is not None and dora.disconnected_s["max"] > 0
