"""A tiered fleet on loopback: one root hub, regional hubs (the real :class:`hub.regional.RegionalHub`,
stepped synchronously and served over HTTP), in-process devices, and links the simulation opens and cuts.

Links:

- each site's uplink (regional hub <-> root, and a device's direct fallback to the root, which crosses
  the same uplink) is a :class:`LinkGate`, a loopback TCP proxy in front of the root that counts the
  bytes it carries each way and refuses connections (and cuts open ones) while it is down;
- each device's own link is a :class:`DeviceLink`, an httpx transport that raises ``ConnectError``
  while the link is down and can lose the answer to an upload after the hub processed it (the case
  that makes a device re-send a batch to the next hub).

Devices are real: a provisioned state directory, an enrolled identity, :class:`deployment.pull.Puller`
with ``[regional, root-through-the-uplink]``, the :class:`deployment.reconcile.Reconciler` (file mode),
a DuckDB telemetry store and :class:`sre_agent.uplink.Uplink` with the same hub list. Shared by
tests/test_fleet_tiers.py and ``benchmarks/fleet.py --tiers``.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from deployment.artifacts import PullResult
from deployment.manifest import ModuleManifest
from deployment.pull import Puller
from deployment.reconcile import Reconciler
from deployment.rollout import device_report, send_report
from hub.fleet_api import fleet_routes
from hub.fleetdb import FleetDB
from hub.ingest import ingest_routes
from hub.regional import RegionalConfig, RegionalHub, build_regional_app
from hub.repository import HubRepository
from hub.rollouts import RolloutService
from hub.server import build_hub_app
from hub.sites import SiteRegistry, site_routes
from policies.telemetry import TelemetryPolicy
from policies.trust import TrustPolicy
from sre_agent.provision import provision
from sre_agent.telemetry import Store, TelemetryWriter
from sre_agent.uplink import Uplink
from sre_core.clock import FakeClock, SystemClock
from sre_core.http_server import ServerThread
from sre_core.identity import load_identity
from sre_core.paths import StatePaths

MODULE = "clf"
CHANNEL = "stable"


class LinkGate:
    """A loopback TCP proxy to ``upstream_port`` that is a link: ``up`` or not, bytes counted each way.

    Setting ``up = False`` refuses new connections and cuts the open ones (keep-alive connections
    made while the link was up must not outlive it).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.bytes_down = 0  # root -> site
        self.bytes_up = 0  # site -> root
        self.refused = 0
        self._up = True
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self._up

    @up.setter
    def up(self, value: bool) -> None:
        with self._lock:
            was, self._up = self._up, value
            live = list(self._live) if was and not value else []
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.up = False
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                self.refused += 1
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if not self._up:
                        break
                    if down:
                        self.bytes_down += len(data)
                    else:
                        self.bytes_up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:
            client.close()
            return
        with self._lock:
            self._live.update((client, upstream))
        t = threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True)
        t.start()
        self._pump(upstream, client, True)
        t.join(10)
        with self._lock:
            self._live.difference_update((client, upstream))
        client.close()
        upstream.close()


class DeviceLink(httpx.BaseTransport):
    """A device's own link as an httpx transport: ``up`` or not; ``lose_answer()`` decides whether the
    answer to a POST is lost after the hub processed it (the device then sees a read timeout)."""

    def __init__(self, lose_answer: Callable[[], bool] | None = None) -> None:
        self.up = True
        self.lose_answer = lose_answer or (lambda: False)
        self.lost = 0
        self._inner: httpx.HTTPTransport | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("the device's link is down", request=request)
        if self._inner is None:  # plain HTTP on loopback: no CA bundle to load (~50 ms each time)
            self._inner = httpx.HTTPTransport(verify=False)
        resp = self._inner.handle_request(request)
        if request.method == "POST" and self.lose_answer():
            resp.read()
            resp.close()
            self.lost += 1
            raise httpx.ReadTimeout("the answer was lost on the way back", request=request)
        return resp

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None


@dataclass
class Root:
    repo: HubRepository
    svc: RolloutService
    fleet: FleetDB
    sites: SiteRegistry
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class TierDevice:
    index: int
    site: Site
    paths: StatePaths
    device_id: str
    link: DeviceLink
    rng: random.Random
    rec: Reconciler | None = None
    flat: bool = False  # pull from the root through the uplink only (the no-tier baseline)
    reported: str | None = None
    batches: dict[str, int] = field(default_factory=dict)  # batch id -> rows, as sealed
    pending: int = 0
    acked_via: dict[str, int] = field(default_factory=lambda: {"regional": 0, "root": 0})


@dataclass
class Site:
    name: str
    hub: RegionalHub
    server: ServerThread
    gate: LinkGate
    rng: random.Random
    devices: list[TierDevice] = field(default_factory=list)
    cut: bool = False  # the uplink is held down (the simulation cut it)

    @property
    def url(self) -> str:
        return self.server.url


def _telemetry_policy() -> TelemetryPolicy:
    return TelemetryPolicy.model_validate({"outbox": {"max_unacked_batches": 1000}})


class TieredSim:
    """The root, ``sites`` regional hubs and ``per_site`` devices each. Use as a context manager."""

    def __init__(
        self,
        tmp: Path,
        sites: int = 3,
        per_site: int = 10,
        uplink_up: float = 0.2,
        device_up: float = 0.95,
        answer_loss: float = 0.1,
        artifact_bytes: int = 64 * 1024,
        seed: int = 7,
    ) -> None:
        self.tmp = Path(tmp)
        self.uplink_up = uplink_up
        self.device_up = device_up
        self.artifact_bytes = artifact_bytes
        self.rng = random.Random(seed)
        self.clock = FakeClock(SystemClock().now().replace(microsecond=0) - timedelta(hours=2))
        self.root = self._root()
        self.sites: list[Site] = []
        self._closers: list[Callable[[], None]] = [self.root.server.stop]
        self.rounds = 0
        try:
            for s in range(sites):
                self.sites.append(self._site(f"site-{s}", random.Random(f"site-{s}-{seed}")))
            for site in self.sites:
                for _ in range(per_site):
                    self._device(site, len(self.devices), answer_loss, seed)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _root(self) -> Root:
        repo = HubRepository.init(self.tmp / "root", channels=(CHANNEL,), clock=self.clock)
        svc = RolloutService(repo, clock=self.clock)
        fleet = FleetDB(svc.fleet_dir, self.clock, store=svc.store)
        routes = [
            *ingest_routes(svc.fleet_dir, clock=self.clock, fleet=fleet),
            *fleet_routes(repo.dir, svc, self.clock, fleet),
            *site_routes(repo.dir, svc.store, self.clock),
        ]
        server = ServerThread(build_hub_app(repo.dir, routes)).start()
        return Root(repo, svc, fleet, SiteRegistry(svc.store, self.clock), server)

    def _site(self, name: str, rng: random.Random) -> Site:
        gate = LinkGate(int(self.root.url.rsplit(":", 1)[1]))
        self._closers.append(gate.close)
        token = self.root.sites.add(name)
        conf = RegionalConfig(
            upstream=gate.url,
            root=self.root.repo.metadata_dir / "1.root.json",
            state=self.tmp / name,
            site=name,
            site_token=token,
        )
        hub = RegionalHub(conf, clock=self.clock)
        self._closers.append(hub.close)
        server = ServerThread(build_regional_app(hub)).start()
        self._closers.append(server.stop)
        return Site(name, hub, server, gate, rng)

    @property
    def devices(self) -> list[TierDevice]:
        return [d for s in self.sites for d in s.devices]

    def _device(self, site: Site, index: int, answer_loss: float, seed: int) -> TierDevice:
        paths = StatePaths(self.tmp / "dev" / f"d{index:04d}")
        provision(
            paths,
            root=self.root.repo.metadata_dir / "1.root.json",
            hub=site.url,
            channel=CHANNEL,
            clock=self.clock,
        )
        ident = load_identity(paths)
        self.root.fleet.enroll(ident.device_id, ident.public_pem)
        rng = random.Random(f"device-{index}-{seed}")  # string seeds: independent streams
        link = DeviceLink(lambda: rng.random() < answer_loss)
        d = TierDevice(index, site, paths, ident.device_id, link, rng)
        d.rec = Reconciler(paths, lambda: self._pull(d), self.clock, disk_free=lambda _p: 1 << 40)
        site.devices.append(d)
        return d

    def _pull(self, d: TierDevice) -> PullResult:
        policy = TrustPolicy(max_stalled_attempts=1)
        if d.flat:
            puller = Puller(
                d.paths, d.site.gate.url, CHANNEL, clock=self.clock, policy=policy, transport=d.link
            )
        else:
            puller = Puller(
                d.paths,
                d.site.url,
                CHANNEL,
                clock=self.clock,
                policy=policy,
                fallbacks=[d.site.gate.url],  # the root, across the site's uplink
                transport=d.link,
            )
        return puller.pull_or_held()

    def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()

    def __enter__(self) -> TieredSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ root side
    def publish(self, version: str, release: bool = True) -> str:
        """Publish ``artifact_bytes`` random bytes as a file-mode module version (and release it)."""
        f = self.tmp / f"{MODULE}-{version}.bin"
        f.write_bytes(os.urandom(self.artifact_bytes))
        man = ModuleManifest(name=MODULE, version=version, mode="file", filename="model.bin")
        pub = self.root.repo.publish(CHANNEL, f, man)
        if release:
            self.root.repo.release(CHANNEL, MODULE, version)
        return pub.target

    def root_timestamp_version(self) -> int:
        return int(self.root.repo._load("timestamp").signed.version)

    # ------------------------------------------------------------------ telemetry
    def write_telemetry(self, rows: int = 40, devices: list[TierDevice] | None = None) -> list[str]:
        """Each device records ``rows`` metric rows and seals them into a batch (the outbox).
        Returns the new batch ids."""
        new: list[str] = []
        for d in self.devices if devices is None else devices:
            store = Store(d.paths.telemetry_db, _telemetry_policy(), self.clock, d.device_id)
            try:
                w = TelemetryWriter(store, enforce=False)
                start = int(self.clock.now().timestamp() * 1e6)
                w.write_metrics(
                    [start + i * 1000 for i in range(rows)],
                    ["serving.latency_p95_s"] * rows,
                    [f"device={d.index}"] * rows,
                    [0.01 * i for i in range(rows)],
                )
                w.flush()
                for b in store.seal():
                    d.batches[b.batch_id] = b.rows
                    new.append(b.batch_id)
                d.pending = len(store.pending())
            finally:
                store.close()
        return new

    def _flush(self, d: TierDevice) -> None:
        store = Store(d.paths.telemetry_db, _telemetry_policy(), self.clock, d.device_id)
        client = httpx.Client(transport=d.link, timeout=10)
        try:
            up = Uplink(
                store, load_identity(d.paths), [d.site.url, d.site.gate.url], self.clock, client=client
            )
            report = up.flush(max_attempts=1, seal=False)
            d.pending = report.pending_after
            d.acked_via["regional"] += report.by_hub.get(d.site.url, 0)
            d.acked_via["root"] += report.by_hub.get(d.site.gate.url, 0)
        finally:
            client.close()
            store.close()

    # ------------------------------------------------------------------ rounds
    def version_of(self, d: TierDevice) -> str | None:
        assert d.rec is not None
        st = d.rec.slots.status(MODULE)
        return st.active.version if st.active else None

    def versions(self, site: Site | None = None) -> dict[str | None, int]:
        out: dict[str | None, int] = {}
        for d in site.devices if site else self.devices:
            v = self.version_of(d)
            out[v] = out.get(v, 0) + 1
        return out

    def step_regionals(self, force_up: bool | None = None) -> None:
        for site in self.sites:
            if site.cut:
                site.gate.up = False
            elif force_up is not None:
                site.gate.up = force_up
            else:
                site.gate.up = site.rng.random() < self.uplink_up
            site.hub.sync_once()

    def step_devices(self, force_up: bool = False, pulls: bool = True) -> None:
        for d in self.devices:
            d.link.up = force_up or d.rng.random() < self.device_up
            if not d.link.up:
                continue
            if d.pending:
                self._flush(d)
            if not pulls:
                continue
            assert d.rec is not None
            report = d.rec.run_once()
            version = self.version_of(d)
            if report.online and version != d.reported:
                client = httpx.Client(transport=d.link, timeout=10)
                with contextlib.suppress(httpx.HTTPError):
                    doc = device_report(d.paths, CHANNEL, self.clock)
                    send_report([d.site.url, d.site.gate.url], d.paths, doc, self.clock, client)
                    d.reported = version
                client.close()

    def round(
        self,
        step_s: int = 60,
        regionals: bool = True,
        uplinks: bool | None = None,
        devices_up: bool = False,
        on_synced: Callable[[], Any] | None = None,
        pulls: bool = True,
    ) -> None:
        """One round: the clock moves; each regional hub syncs (its uplink up with ``uplink_up``, or
        ``uplinks`` forced); ``on_synced`` runs; each device whose link is up syncs once."""
        self.clock.advance(timedelta(seconds=step_s))
        self.rounds += 1
        if regionals:
            self.step_regionals(uplinks)
        if on_synced is not None:
            on_synced()
        self.step_devices(devices_up, pulls)
        self.root.svc.tick(CHANNEL)

    def uplink_bytes(self) -> tuple[int, int]:
        """(down, up) bytes over every site's uplink so far."""
        return sum(s.gate.bytes_down for s in self.sites), sum(s.gate.bytes_up for s in self.sites)

    def served_version(self, site: Site) -> int:
        st = site.hub.mirror.served_timestamp()
        return int(st["version"]) if st else 0


# ---------------------------------------------------------------------- the scenario (test + benchmark)
@dataclass
class Phase:
    """What one release (or recall) did."""

    name: str
    version: str
    rounds: int = 0
    uplink_down_bytes: int = 0
    uplink_up_bytes: int = 0
    target_bytes_over_uplinks: int = 0  # the regional hubs' target downloads (``bytes_from_upstream``)
    cut_at_round: dict[str, int] = field(default_factory=dict)  # site -> round its uplink was cut
    updated_while_cut: dict[str, int] = field(default_factory=dict)  # site -> devices updated after
    converged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "rounds": self.rounds,
            "uplink_down_bytes": self.uplink_down_bytes,
            "uplink_up_bytes": self.uplink_up_bytes,
            "target_bytes_over_uplinks": self.target_bytes_over_uplinks,
            "sites_cut": len(self.cut_at_round),
            "updated_while_cut": sum(self.updated_while_cut.values()),
            "converged": self.converged,
        }


def _at(sim: TieredSim, version: str) -> Callable[[], bool]:
    return lambda: all(sim.version_of(d) == version for d in sim.devices)


def tiered_phase(sim: TieredSim, name: str, version: str, issue: Callable[[], Any], max_rounds: int) -> Phase:
    """Issue a release or recall at the root, then run rounds (uplinks up ``uplink_up`` of the time).
    As soon as a site's regional hub serves the new signed state, that site's uplink is cut and stays
    cut: its devices must converge from the regional hub alone."""
    ph = Phase(name, version)
    down0, up0 = sim.uplink_bytes()
    tgt0 = sum(s.hub.mirror.bytes_from_upstream for s in sim.sites)
    issue()
    want = sim.root_timestamp_version()

    def cut() -> None:
        for site in sim.sites:
            if not site.cut and sim.served_version(site) >= want:
                site.cut = True
                site.gate.up = False
                ph.cut_at_round[site.name] = sim.rounds
                ph.updated_while_cut[site.name] = sum(sim.version_of(d) != version for d in site.devices)

    done = _at(sim, version)
    for _ in range(max_rounds):
        sim.round(on_synced=cut)
        ph.rounds += 1
        if done():
            ph.converged = True
            break
    down1, up1 = sim.uplink_bytes()
    ph.uplink_down_bytes, ph.uplink_up_bytes = down1 - down0, up1 - up0
    ph.target_bytes_over_uplinks = sum(s.hub.mirror.bytes_from_upstream for s in sim.sites) - tgt0
    for site in sim.sites:
        site.cut = False
    return ph


def flat_phase(sim: TieredSim, version: str, max_rounds: int) -> Phase:
    """The no-tier baseline: every device pulls the release from the root itself (across its site's
    uplink, held up); the regional hubs are idle."""
    ph = Phase("flat-release", version)
    for d in sim.devices:
        d.flat = True
    for site in sim.sites:
        site.gate.up = True
    down0, up0 = sim.uplink_bytes()
    sim.publish(version)
    done = _at(sim, version)
    for _ in range(max_rounds):
        sim.round(regionals=False)
        ph.rounds += 1
        if done():
            ph.converged = True
            break
    down1, up1 = sim.uplink_bytes()
    ph.uplink_down_bytes, ph.uplink_up_bytes = down1 - down0, up1 - up0
    for d in sim.devices:
        d.flat = False
    return ph


def lake_rows_by_batch(sim: TieredSim) -> dict[str, int]:
    """Rows per batch id in the root's lake (files are named by batch id; a day split adds up)."""
    import pyarrow.parquet as pq

    lake = sim.root.fleet.lake
    out: dict[str, int] = {}
    for table in lake.tables():
        for rel in lake.files(table):
            name = Path(rel).stem
            out[name] = out.get(name, 0) + pq.read_metadata(Path(lake.root) / rel).num_rows
    return out


def drain_telemetry(sim: TieredSim, max_rounds: int) -> dict[str, Any]:
    """Rounds (uplinks up ``uplink_up`` of the time) until every sealed batch landed at the root."""
    expected = {b: n for d in sim.devices for b, n in d.batches.items()}
    rounds = 0
    for _ in range(max_rounds):
        landed = {r["batch_id"] for r in sim.root.fleet.receipts()}
        if expected.keys() <= landed:
            break
        sim.round(pulls=False)  # the devices only upload (their pulls are the phases' business)
        rounds += 1
    receipts = sim.root.fleet.receipts()
    per_batch: dict[str, int] = {}
    for r in receipts:
        per_batch[r["batch_id"]] = per_batch.get(r["batch_id"], 0) + 1
    lake = lake_rows_by_batch(sim)
    return {
        "rounds": rounds,
        "batches": len(expected),
        "rows": sum(expected.values()),
        "landed_batches": sum(1 for b in expected if per_batch.get(b) == 1),
        "receipts_more_than_once": sum(1 for n in per_batch.values() if n > 1),
        "lake_rows_match": sum(1 for b, n in expected.items() if lake.get(b) == n),
        "lake_rows": sum(lake.get(b, 0) for b in expected),
        "answers_lost": sum(d.link.lost for d in sim.devices),
        "acked_by_regional": sum(d.acked_via["regional"] for d in sim.devices),
        "acked_by_root_directly": sum(d.acked_via["root"] for d in sim.devices),
        "unexpected_in_lake": sorted(set(lake) - set(expected)),
        "regional_backlog_after": sum(s.hub.relay.backlog() for s in sim.sites),  # reports etc. in backoff
    }


def cross_tier_retry(sim: TieredSim) -> dict[str, Any]:
    """A batch the regional hub stored but whose answer was lost: the device sends it to the root
    directly (its uplink is up), then the regional hub forwards its own copy. It must land once."""
    site = sim.sites[0]
    d = site.devices[0]
    site.gate.up, d.link.up = True, True
    (batch,) = sim.write_telemetry(devices=[d])
    losses = iter([True])
    before = dict(d.acked_via)
    d.link.lose_answer = lambda: next(losses, False)
    sim._flush(d)
    queued_at_regional = site.hub.relay.backlog()
    forwarded = site.hub.forward_up().to_dict()
    landed = [r for r in sim.root.fleet.receipts() if r["batch_id"] == batch]
    return {
        "answer_lost_then_sent_to_root": d.acked_via["root"] - before["root"] == 1,
        "regional_also_held_it": queued_at_regional >= 1,
        "regional_forward": forwarded,
        "receipts_at_root": len(landed),
        "lake_rows": lake_rows_by_batch(sim).get(batch, 0),
        "rows": d.batches[batch],
    }


def run_scenario(sim: TieredSim, max_rounds: int = 60) -> dict[str, Any]:
    """Baseline 1.0, telemetry sealed, then a tiered release (2.0), a recall (2.0 -> 1.0), telemetry
    drained, and the no-tier baseline release (3.0). Returns the figures."""
    sim.publish("1.0")
    done = _at(sim, "1.0")
    for _ in range(10):
        sim.round(uplinks=True, devices_up=True)
        if done():
            break
    if not done():
        raise AssertionError(f"the starting release did not converge: {sim.versions()}")
    sim.write_telemetry()
    release = tiered_phase(sim, "release", "2.0", lambda: sim.publish("2.0"), max_rounds)
    recall = tiered_phase(
        sim,
        "recall",
        "1.0",
        lambda: sim.root.svc.recall(CHANNEL, MODULE, ["2.0"], "1.0", reason="field defect"),
        max_rounds,
    )
    telemetry = drain_telemetry(sim, max_rounds)
    retry = cross_tier_retry(sim)
    flat = flat_phase(sim, "3.0", max_rounds)
    sites = len(sim.sites)
    per_site = release.target_bytes_over_uplinks / sites / sim.artifact_bytes
    return {
        "sites": sites,
        "devices": len(sim.devices),
        "uplink_up_share": sim.uplink_up,
        "device_link_up_share": sim.device_up,
        "artifact_bytes": sim.artifact_bytes,
        "release": release.to_dict(),
        "recall": recall.to_dict(),
        "flat_release": flat.to_dict(),
        "telemetry": telemetry,
        "cross_tier_retry": retry,
        "artifact_copies_per_site_per_release": round(per_site, 3),
        "uplink_bytes_per_release_tiered": release.uplink_down_bytes,
        "uplink_bytes_per_release_flat": flat.uplink_down_bytes,
        "flat_over_tiered_ratio": round(flat.uplink_down_bytes / max(release.uplink_down_bytes, 1), 2),
        "goal": "one artifact copy per site per release",
    }
