"""A fleet on loopback: a real hub (TUF repository + fleet API over HTTP) and N in-process devices.

Each device has its own state directory, identity (enrolled at the hub), real :class:`Puller` and
:class:`Reconciler` (file mode, small artifacts) and an intermittent link: in each simulated round a
device whose link is down simply skips the round. Shared by tests/test_fleet_sim.py and
benchmarks/fleet.py.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from deployment.manifest import ModuleManifest, ProbeSpec
from deployment.pull import Puller
from deployment.reconcile import Reconciler
from deployment.rollout import device_report, send_report
from hub.fleet_api import fleet_routes
from hub.fleetdb import FleetDB
from hub.repository import HubRepository
from hub.rollouts import Rollout, RolloutService
from hub.server import build_hub_app
from policies.trust import TrustPolicy
from sre_agent.provision import provision
from sre_core.clock import FakeClock, SystemClock
from sre_core.http_server import ServerThread
from sre_core.identity import load_identity
from sre_core.paths import StatePaths

MODULE = "clf"


@dataclass
class SimDevice:
    index: int
    paths: StatePaths
    device_id: str
    rec: Reconciler
    link_up: float
    rng: random.Random
    passes: int = 0
    reports: int = 0


@dataclass
class RoundStats:
    up: int = 0
    passes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    report_errors: int = 0


class FleetSim:
    """The hub and ``n`` devices. Call :meth:`close` (or use as a context manager)."""

    def __init__(
        self, tmp: Path, n: int, link_up: float = 0.5, seed: int = 7, channel: str = "stable"
    ) -> None:
        self.tmp = Path(tmp)
        # Near real time: operator CLI commands (separate processes) sign with the system clock.
        self.clock = FakeClock(SystemClock().now().replace(microsecond=0) - timedelta(hours=3))
        self.channel = channel
        self.repo = HubRepository.init(self.tmp / "repo", channels=(channel,), clock=self.clock)
        self.service = RolloutService(self.repo, clock=self.clock)
        self.fleet = FleetDB(self.service.fleet_dir, self.clock)
        routes = fleet_routes(self.repo.dir, self.service, self.clock, self.fleet)
        self.server = ServerThread(build_hub_app(self.repo.dir, routes)).start()
        self.client = httpx.Client(timeout=10.0)
        root = self.repo.metadata_dir / "1.root.json"
        self.devices: list[SimDevice] = []
        policy = TrustPolicy(max_stalled_attempts=1)
        for i in range(n):
            paths = StatePaths(self.tmp / "dev" / f"d{i:04d}")
            provision(paths, root=root, hub=self.url, channel=channel, clock=self.clock)
            ident = load_identity(paths)
            self.fleet.enroll(ident.device_id, ident.public_pem)
            puller = Puller(paths, self.url, channel, clock=self.clock, policy=policy)
            rec = Reconciler(paths, puller.pull, self.clock, disk_free=lambda _p: 1 << 40)
            self.devices.append(
                SimDevice(i, paths, ident.device_id, rec, link_up, random.Random(seed * 100003 + i))
            )

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> FleetSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()
        self.server.stop()

    # ------------------------------------------------------------------ hub side
    def publish(self, version: str, bad: bool = False, release: bool = False) -> str:
        """Publish a small file-mode module version; ``bad``: its probe can never pass."""
        f = self.tmp / f"{MODULE}-{version}.bin"
        f.write_bytes(f"model {version}\n".encode() * 16)
        probes = []
        if bad:
            probes = [ProbeSpec(kind="file", path=str(self.tmp / "never-ready"), attempts=1, timeout_s=1)]
        man = ModuleManifest(name=MODULE, version=version, mode="file", filename="model.bin", probes=probes)
        pub = self.repo.publish(self.channel, f, man)
        if release:
            self.repo.release(self.channel, MODULE, version)
        return pub.target

    def rollout(self) -> Rollout:
        """The channel's newest rollout (there must be one)."""
        r = self.service.current(self.channel)
        assert r is not None
        return r

    # ------------------------------------------------------------------ device side
    def version_of(self, d: SimDevice) -> str | None:
        st = d.rec.slots.status(MODULE)
        return st.active.version if st.active else None

    def versions(self) -> Counter[str | None]:
        return Counter(self.version_of(d) for d in self.devices)

    def sync(self, d: SimDevice, stats: RoundStats) -> None:
        report = d.rec.run_once()
        d.passes += 1
        stats.passes += 1
        for o in report.outcomes:
            stats.outcomes[o.result] += 1
        try:
            send_report(
                self.url, d.paths, device_report(d.paths, self.channel, self.clock), self.clock, self.client
            )
            d.reports += 1
        except httpx.HTTPError:
            stats.report_errors += 1

    def round(
        self, step_s: int = 60, up: set[int] | None = None, down: set[int] | None = None, tick: bool = True
    ) -> RoundStats:
        """One simulated round: the clock moves ``step_s``; each device whose link is up syncs once.

        ``up`` forces those devices online; ``down`` keeps those offline; the rest draw from their link.
        """
        self.clock.advance(timedelta(seconds=step_s))
        stats = RoundStats()
        for d in self.devices:
            online = d.rng.random() < d.link_up
            if up is not None and d.index in up:
                online = True
            if down is not None and d.index in down:
                online = False
            if not online:
                continue
            stats.up += 1
            self.sync(d, stats)
        if tick:
            self.service.tick(self.channel)
        return stats

    def run_until(self, done: Any, max_rounds: int, **kw: Any) -> int:
        """Rounds until ``done()`` is true (returns the count; raises after ``max_rounds``)."""
        for i in range(1, max_rounds + 1):
            self.round(**kw)
            if done():
                return i
        raise AssertionError(f"not done after {max_rounds} rounds: {self.versions()}")
