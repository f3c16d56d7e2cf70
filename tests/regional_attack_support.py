"""A hostile tier between a real root hub and real devices, for tests/test_regional_redteam.py.

:class:`HostileTier` is a loopback HTTP relay (starlette under uvicorn) that stands where a regional hub
stands: devices poll and upload through it, it forwards to the root. Each knob is one capability of an
attacker who owns the tier (edit what goes down, serve a frozen copy, capture, edit, drop, hold and
replay what goes up, acknowledge without forwarding). It forwards the ``Host`` header unchanged, so a
device's signature over the target URI still verifies at the root when nothing was altered.

:class:`Site` is the root hub (TUF repository, fleet API, ingest; one clock) with the tier in front and
``n`` devices behind it: real Puller, Reconciler (file-mode slots), telemetry Store + Uplink,
EscalationStore, all pointed at the tier.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deployment.manifest import ModuleManifest, ProbeSpec
from deployment.pull import Puller
from deployment.reconcile import Reconciler
from deployment.rollout import device_report, send_report
from hub.approvals_api import approval_routes
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
from sre_agent.escalations import EscalationStore, escalations_dir
from sre_agent.provision import provision
from sre_agent.telemetry import Store, TelemetryWriter
from sre_agent.uplink import RetryPolicy, Uplink, receipt_root
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock
from sre_core.http_server import ServerThread
from sre_core.identity import DeviceIdentity, load_identity
from sre_core.paths import StatePaths

__all__ = ["MODULE", "Device", "HostileTier", "Site", "Up"]

MODULE = "clf"
_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


@dataclass
class Up:
    """One request as the tier received it (method, path with query, headers, body)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def with_body(self, body: bytes) -> Up:
        """The same request (same signed headers) carrying another body."""
        return Up(self.method, self.path, self.headers, body)


DownRule = tuple[str, Callable[[bytes], bytes]]
UpRule = Callable[[Up], "Up | None"]


class HostileTier:
    """A relay to ``upstream`` that tampers as told. Use as a context manager (starts/stops uvicorn).

    Knobs (plain attributes, change them between steps):
        down: ``(path regex, transform)`` pairs applied to GET response bodies (conditional headers of
            those requests are dropped so the root answers with the body).
        frozen: a directory holding ``metadata/`` and ``targets/``: GETs under those prefixes are served
            from it (what a tier that stopped following the root serves), never from the root.
        up: applied to each upload (POST) before forwarding; returning None drops it.
        inject: paths answered 200 with these bytes whatever the upstream has (e.g. a next root version).
        not_modified: paths answered ``304 Not Modified`` whatever the upstream has (a conditional freeze).
        requests / captured: every request / every upload as received (headers included).
        fake_ack: answer every POST ``200 {"status": "stored"}`` without forwarding.
        hold: keep every POST in :attr:`held` (answered 503 ``Retry-After``) instead of forwarding.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.down: list[DownRule] = []
        self.frozen: Path | None = None
        self.inject: dict[str, bytes] = {}
        self.not_modified: set[str] = set()
        self.up: UpRule | None = None
        self.fake_ack = False
        self.hold = False
        self.held: list[Up] = []
        self.captured: list[Up] = []
        self.requests: list[Up] = []
        self.seen: list[tuple[str, str, int]] = []
        self._client = httpx.Client(timeout=30.0)
        self.server = ServerThread(
            Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])
        )

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> HostileTier:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self._client.close()

    def freeze(self, repo_dir: Path, into: Path) -> Path:
        """Copy the root's signed files now and serve that copy from now on (returns the copy)."""
        for part in ("metadata", "targets"):
            shutil.copytree(Path(repo_dir) / part, into / part, dirs_exist_ok=True)
        self.frozen = into
        return into

    def forward(self, up: Up) -> httpx.Response:
        """Send ``up`` to the root as it is (the tier's replay capability)."""
        headers = [(k, v) for k, v in up.headers if k.lower() not in _HOP]
        if up.method == "POST":
            headers.append(("content-length", str(len(up.body))))
        return self._client.request(up.method, self.upstream + up.path, headers=headers, content=up.body)

    async def _handle(self, request: Request) -> Response:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        up = Up(request.method, path, list(request.headers.items()), await request.body())
        resp = await run_in_threadpool(self._answer, up)
        self.seen.append((up.method, request.url.path, resp.status_code))
        return resp

    def _answer(self, up: Up) -> Response:
        self.requests.append(up)
        if up.method == "POST":
            self.captured.append(up)
            if self.fake_ack:
                return JSONResponse({"status": "stored"})
            if self.hold:
                self.held.append(up)
                return JSONResponse({"error": "busy"}, status_code=503, headers={"Retry-After": "30"})
            if self.up is not None:
                changed = self.up(up)
                if changed is None:
                    return JSONResponse({"status": "stored"})
                up = changed
        elif up.path in self.not_modified:
            return Response(status_code=304)
        elif up.path in self.inject:
            return Response(self.inject[up.path], media_type="application/octet-stream")
        elif self.frozen is not None and up.path.startswith(("/metadata/", "/targets/")):
            f = self.frozen / up.path.split("?", 1)[0].lstrip("/")
            if not f.is_file() or ".." in up.path:
                return Response(status_code=404)
            return Response(f.read_bytes(), media_type="application/octet-stream")
        rules = [fn for pat, fn in self.down if up.method == "GET" and re.search(pat, up.path)]
        if rules:
            drop = {"if-none-match", "if-range", "range"}
            up = Up(up.method, up.path, [(k, v) for k, v in up.headers if k.lower() not in drop], b"")
        r = self.forward(up)
        body = r.content
        for fn in rules if r.status_code == 200 else []:
            body = fn(body)
        headers = {
            k: v for k, v in r.headers.items() if k.lower() not in _HOP and not (rules and k == "etag")
        }
        return Response(body, status_code=r.status_code, headers=headers)


@dataclass
class Device:
    """One device behind the tier."""

    paths: StatePaths
    ident: DeviceIdentity
    puller: Puller
    rec: Reconciler
    store: Store
    writer: TelemetryWriter
    uplink: Uplink
    escalations: EscalationStore
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.ident.device_id

    def version(self) -> str | None:
        st = self.rec.slots.status(MODULE)
        return st.active.version if st.active else None

    def audit_events(self) -> list[str]:
        log = self.paths.audit_log
        return [json.loads(ln)["event"] for ln in log.read_text().splitlines()] if log.exists() else []

    def held(self) -> bytes | None:
        p = self.paths.trust / "held.json"
        return p.read_bytes() if p.exists() else None


class Site:
    """A root hub (repository + fleet API + ingest) on loopback, a :class:`HostileTier` in front, devices.

    Call :meth:`close` (or use as a context manager).
    """

    def __init__(
        self, tmp: Path, n: int = 2, channels: tuple[str, ...] = ("stable", "beta"), regional: bool = False
    ) -> None:
        self.tmp = Path(tmp)
        # Near real time: signatures carry `created` from this clock and the root checks them against it.
        self.clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
        self.channel = channels[0]
        self.repo = HubRepository.init(self.tmp / "root", channels=channels, clock=self.clock)
        self.service = RolloutService(self.repo, clock=self.clock)
        self.fleet = FleetDB(self.service.fleet_dir, self.clock, store=self.service.store)
        routes = [
            *fleet_routes(self.repo.dir, self.service, self.clock, self.fleet),
            *ingest_routes(self.service.fleet_dir, clock=self.clock, fleet=self.fleet),
            *site_routes(self.repo.dir, self.service.store, self.clock),
            *approval_routes(self.repo.dir, self.fleet, self.clock),
        ]
        self.root = ServerThread(build_hub_app(self.repo.dir, routes)).start()
        self.regional: RegionalHub | None = None
        self.regional_server: ServerThread | None = None
        upstream = self.root.url
        self.sites = SiteRegistry(self.service.store, self.clock)
        self.view_token = "site-view-" + secrets.token_hex(16)  # the site's own fleet-status view
        if regional:
            token = self.sites.add("site-a")
            conf = RegionalConfig(upstream=self.root.url, root=self.repo.metadata_dir / "1.root.json",
                                  state=self.tmp / "regional", site="site-a", site_token=token,
                                  view_token=self.view_token)  # fmt: skip
            self.regional = RegionalHub(conf, clock=self.clock)
            self.regional_server = ServerThread(build_regional_app(self.regional)).start()
            upstream = self.regional_server.url
        self.tier = HostileTier(upstream).__enter__()
        self.devices = [self._device(i) for i in range(n)]
        self.roster()

    def _device(self, i: int) -> Device:
        paths = StatePaths(self.tmp / "dev" / f"d{i}")
        root = self.repo.metadata_dir / "1.root.json"
        provision(paths, root=root, hub=self.tier.url, channel=self.channel, clock=self.clock)
        ident = load_identity(paths)
        self.fleet.enroll(ident.device_id, ident.public_pem)
        puller = Puller(paths, self.tier.url, self.channel, clock=self.clock,
                        policy=TrustPolicy(max_stalled_attempts=1))  # fmt: skip
        rec = Reconciler(paths, puller.pull, self.clock, disk_free=lambda _p: 1 << 40)
        policy = TelemetryPolicy.model_validate(
            {"total_bytes": 400 << 20, "outbox": {"bytes": 32 << 20, "max_unacked_batches": 1000}}
        )
        store = Store(paths.telemetry_db, policy, self.clock, ident.device_id)
        writer = TelemetryWriter(store, enforce=False)
        uplink = Uplink(store, ident, self.tier.url, self.clock, retry=RetryPolicy(base_s=0.01, max_s=0.02),
                        receipt_root=receipt_root(paths))  # fmt: skip
        esc = EscalationStore(escalations_dir(paths), AuditLog(paths.audit_log, self.clock), self.clock,
                              device_id=ident.device_id, telemetry=writer)  # fmt: skip
        return Device(paths, ident, puller, rec, store, writer, uplink, esc)

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for d in self.devices:
            d.uplink.close()
            d.store.close()
        self.tier.__exit__()
        if self.regional_server is not None:
            self.regional_server.stop()
        if self.regional is not None:
            self.regional.close()
        self.root.stop()

    # ------------------------------------------------------------------ root side
    def publish(
        self, version: str, release: bool = True, channel: str | None = None, bad: bool = False
    ) -> str:
        """Publish a small file-mode module version (and release it); returns its target path.
        ``bad``: its probe can never pass (devices roll it back)."""
        ch = channel or self.channel
        f = self.tmp / f"{MODULE}-{version}-{ch}.bin"
        f.write_bytes(f"model {version} {ch}\n".encode() * 64)
        probes = (
            [ProbeSpec(kind="file", path=str(self.tmp / "never"), attempts=1, timeout_s=1)] if bad else []
        )
        man = ModuleManifest(name=MODULE, version=version, mode="file", filename="model.bin", probes=probes)
        pub = self.repo.publish(ch, f, man)
        if release:
            self.repo.release(ch, MODULE, version)
        return pub.target

    @property
    def served_dir(self) -> Path:
        """The repository directory devices are served from (the regional mirror's, or the root's)."""
        return self.regional.mirror.repo_dir if self.regional is not None else self.repo.dir

    def roster(self) -> None:
        """The regional hub mirrors the root's device roster now (after an enrolment)."""
        if self.regional is not None:
            assert self.regional.relay.refresh_roster()

    def forward(self) -> Any:
        """One store-and-forward round of the regional hub (None without one)."""
        return self.regional.forward_up() if self.regional is not None else None

    def target_file(self, target: str, channel: str | None = None) -> Path:
        ch = channel or self.channel
        tf = self.repo.channel_targets(ch)[target]
        return self.repo.targets_dir / ch / f"{tf.hashes['sha256']}.{target.split('/', 1)[1]}"

    def status(self) -> dict[str, Any]:
        from hub.fleet_status import fleet_status

        return fleet_status(self.service)

    def device_status(self, d: Device) -> dict[str, Any]:
        return next(x for x in self.status()["devices"] if x["device_id"] == d.id)

    def lake_rows(self, table: str = "metrics") -> dict[str, int]:
        """device id -> rows of ``table`` in the root lake."""
        if table not in self.fleet.tables():
            return {}
        sql = f"SELECT device_id, count(*) AS n FROM {table} GROUP BY device_id"  # noqa: S608
        return {r["device_id"]: int(r["n"]) for r in self.fleet.query(sql).to_pylist()}

    # ------------------------------------------------------------------ device side
    def sync(self, d: Device) -> Any:
        """The regional hub's down-sync (when there is one), then one reconcile pass and a signed report
        through the tier (returns the reconcile report)."""
        self.clock.advance(timedelta(seconds=1))  # reports are ordered by their signed time
        if self.regional is not None:
            self.regional.sync_down()
        rep = d.rec.run_once()
        body = device_report(d.paths, self.channel, self.clock)
        d.reports.append(body)
        try:
            send_report(self.tier.url, d.paths, body, self.clock)
        except httpx.HTTPError:
            pass
        self.forward()
        return rep
