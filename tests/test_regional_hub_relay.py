"""Upward through a regional hub: device batches and reports stored durably at the site, forwarded with the
device signatures intact, verified again at the root, landed exactly once (also across a kill -9)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from telemetry_support import device, metric_columns, small_policy

from deployment.rollout import REPORT_PATH
from hub.approvals_api import approval_routes
from hub.fleet_api import fleet_routes, issue_operator_token
from hub.fleetdb import FleetDB
from hub.ingest import BATCH_PATH, ingest_routes
from hub.regional import RegionalConfig, RegionalHub, build_regional_app
from hub.repository import HubRepository
from hub.rollouts import RolloutService
from hub.server import build_hub_app
from hub.sites import RELAY_URI_HEADER, SiteRegistry, site_routes
from sre_agent.telemetry import Store, TelemetryWriter
from sre_core.clock import SystemClock
from sre_core.http_server import ServerThread, free_port
from sre_core.identity import DeviceIdentity
from sre_core.receipts import verify_receipt
from sre_core.signing import sign_request


@dataclass
class Root:
    repo: HubRepository
    fleet: FleetDB
    svc: RolloutService
    server: ServerThread
    token: str
    hold: threading.Event  # while clear, answers to relayed batches are held (the batch is landed)

    @property
    def url(self) -> str:
        return self.server.url

    def receipts(self) -> list[dict[str, Any]]:
        return self.fleet.receipts()


def _holding(app: Any, hold: threading.Event) -> Any:
    """Delay the answer to a relayed batch until ``hold`` is set (the root has landed it by then)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        relayed = scope["type"] == "http" and any(k.decode() == RELAY_URI_HEADER for k, _ in scope["headers"])

        async def send_later(msg: Any) -> None:
            if relayed and msg["type"] == "http.response.start":
                import anyio

                while not hold.is_set():
                    await anyio.sleep(0.01)
            await send(msg)

        await app(scope, receive, send_later)

    return wrapped


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Root]:
    clock = SystemClock()
    repo = HubRepository.init(tmp_path / "root", channels=("stable",), clock=clock)
    svc = RolloutService(repo, clock=clock)
    fleet = FleetDB(svc.fleet_dir, clock, store=svc.store)
    routes = [
        *ingest_routes(svc.fleet_dir, clock=clock, fleet=fleet),
        *fleet_routes(repo.dir, svc, clock, fleet),
        *site_routes(repo.dir, svc.store, clock),
        *approval_routes(repo.dir, fleet, clock),
    ]
    hold = threading.Event()
    hold.set()
    server = ServerThread(_holding(build_hub_app(repo.dir, routes), hold)).start()
    token = SiteRegistry(svc.store, clock).add("site-a")
    try:
        yield Root(repo, fleet, svc, server, token, hold)
    finally:
        hold.set()
        server.stop()


def _regional(root: Root, tmp: Path, token: str | None = None, **kw: Any) -> RegionalHub:
    conf = RegionalConfig(
        upstream=root.url,
        root=root.repo.metadata_dir / "1.root.json",
        state=tmp / "regional",
        site="site-a",
        site_token=root.token if token is None else token,
        **kw,
    )
    return RegionalHub(conf)


def _enrolled(root: Root, tmp: Path, name: str) -> DeviceIdentity:
    _, ident = device(tmp / name)
    root.fleet.enroll(ident.device_id, ident.public_pem)
    return ident


def _batch(tmp: Path, ident: DeviceIdentity) -> tuple[str, bytes]:
    store = Store(
        tmp / f"{ident.device_id}-{secrets.token_hex(4)}.duckdb",
        small_policy(),
        SystemClock(),
        ident.device_id,
    )
    w = TelemetryWriter(store, enforce=False)
    w.write_table("metrics", metric_columns(int(time.time() * 1e6), 10, 5))
    w.flush()
    (b,) = store.seal()
    payload = store.payload(b.batch_id)
    store.close()
    return b.batch_id, payload


def _post(
    url: str,
    body: bytes,
    ident: DeviceIdentity,
    created: int | None = None,
    ctype: str = "application/octet-stream",
) -> httpx.Response:
    headers = sign_request(
        "POST", url, body, ident.private_key, ident.device_id, created or int(time.time()),
        secrets.token_hex(16), {"content-type": ctype},
    )  # fmt: skip
    return httpx.post(url, content=body, headers=headers, timeout=30)


def _report(ident: DeviceIdentity, when: datetime, version: str) -> bytes:
    doc = {
        "device_id": ident.device_id,
        "channel": "stable",
        "time": when.isoformat(),
        "modules": {"clf": {"version": version}},
    }
    return json.dumps(doc, sort_keys=True).encode()


def test_a_batch_sent_to_the_regional_hub_reaches_the_root_lake_exactly_once(
    root: Root, tmp_path: Path
) -> None:
    ident = _enrolled(root, tmp_path, "dev1")
    hub = _regional(root, tmp_path)
    assert hub.sync_once()["roster"] is True
    batch_id, payload = _batch(tmp_path, ident)
    with ServerThread(build_regional_app(hub)) as regional:
        url = regional.url + BATCH_PATH.format(batch_id=batch_id)
        first = _post(url, payload, ident)
        assert first.status_code == 200 and first.json()["status"] == "queued", first.text
        again = _post(url, payload, ident)  # the device did not see the answer and sends again
        assert again.json()["status"] == "duplicate"
        assert root.receipts() == [] and hub.relay.backlog() == 1  # stored at the site, not yet forwarded
        up = hub.forward_up()
        assert up.forwarded == [f"batch:{batch_id}"] and up.backlog == 0, up
        # the device also reaches the root directly later (fallback) with the same batch: landed once
        direct = _post(root.url + BATCH_PATH.format(batch_id=batch_id), payload, ident)
        assert direct.json()["status"] == "duplicate"
        # and the same batch through the site once more (the device re-sends until it holds the
        # root's receipt): answered with the receipt the root gave the site, nothing forwarded again
        again = _post(url, payload, ident).json()
        assert again["status"] == "duplicate" and hub.relay.backlog() == 0, again
        trusted = root.repo.metadata_dir / "root.json"
        assert verify_receipt(trusted, again["receipt"], ident.device_id, batch_id)
        assert not verify_receipt(trusted, again["receipt"], ident.device_id, "0" * 40)
        assert hub.forward_up().duplicates == []
    assert [r["batch_id"] for r in root.receipts()] == [batch_id]
    assert root.fleet.query("SELECT count(*) AS n FROM metrics").column("n")[0].as_py() == 50


def test_the_regional_hub_refuses_garbage_and_the_root_refuses_what_the_site_cannot_know(
    root: Root, tmp_path: Path
) -> None:
    ident = _enrolled(root, tmp_path, "dev1")
    _, stranger = device(tmp_path / "stranger")
    batch_id, payload = _batch(tmp_path, ident)
    hub = _regional(root, tmp_path, spool_max_bytes=len(payload) + 10)
    with ServerThread(build_regional_app(hub)) as regional:
        url = regional.url + BATCH_PATH.format(batch_id=batch_id)
        # no roster yet: 503 Retry-After, nothing stored (the device keeps its backlog or tries the root)
        no_roster = _post(url, payload, ident)
        assert no_roster.status_code == 503 and no_roster.headers["retry-after"]
        hub.sync_once()
        assert _post(url, payload, stranger).status_code == 401  # not enrolled
        forged = sign_request("POST", url, payload, stranger.private_key, ident.device_id,
                              int(time.time()), "n1", {"content-type": "application/json"})  # fmt: skip
        assert httpx.post(url, content=payload, headers=forged).status_code == 401
        stale = _post(url, payload, ident, created=int(time.time()) - 3600)
        assert stale.status_code == 401 and stale.json()["refused"] == "stale"
        h = sign_request("POST", url, payload, ident.private_key, ident.device_id, int(time.time()), "same",
                         {"content-type": "application/octet-stream"})  # fmt: skip
        assert httpx.post(url, content=payload, headers=h).status_code == 200
        replay = httpx.post(url, content=payload, headers=h)
        assert replay.status_code == 401 and replay.json()["refused"] == "replayed"
        other = regional.url + BATCH_PATH.format(batch_id="0" * 40)
        assert _post(other, payload, ident).status_code == 400  # the id is not the content's hash
        assert hub.relay.backlog() == 1
        # the spool is bounded: above its byte budget the device is told to retry (it keeps the batch)
        second_id, second = _batch(tmp_path, ident)
        full = _post(regional.url + BATCH_PATH.format(batch_id=second_id), second, ident)
        assert full.status_code == 503 and full.headers["retry-after"], full.text
        assert hub.relay.backlog() == 1
        # revoked at the root after the site mirrored its roster: the root refuses it, nothing lands
        root.fleet.revoke(ident.device_id)
        up = hub.forward_up()
        assert up.refused == {f"batch:{batch_id}": 403} and up.backlog == 0, up
    assert root.receipts() == []
    assert [r["status"] for r in hub.relay.refused_items()] == [403]


def test_relayed_requests_need_a_site_token_and_cannot_replay_old_reports(root: Root, tmp_path: Path) -> None:
    ident = _enrolled(root, tmp_path, "dev1")
    hub = _regional(root, tmp_path)
    hub.sync_once()
    t0 = datetime.now(UTC) - timedelta(hours=2)
    with ServerThread(build_regional_app(hub)) as regional:
        old = _report(ident, t0, "1.0")  # held at the site while its uplink is down
        assert _post(regional.url + REPORT_PATH, old, ident, ctype="application/json").status_code == 200
    newer = _report(ident, t0 + timedelta(hours=1), "2.0")  # the device then reached the root directly
    direct = _post(root.url + REPORT_PATH, newer, ident, ctype="application/json")
    assert direct.status_code == 200 and direct.json()["status"] == "stored"
    # the held older report arrives late through the site: a no-op (newest wins), the newer one stays
    up = hub.forward_up()
    assert up.duplicates == [f"report:{hashlib.sha256(old).hexdigest()}"], up
    assert root.svc.reports.get(ident.device_id)["modules"]["clf"]["version"] == "2.0"  # type: ignore[index]
    # a relay header without a valid site token is refused; the site's token cannot claim another site
    body = _report(ident, datetime.now(UTC), "3.0")
    url = root.url + REPORT_PATH
    h = sign_request("POST", "http://site.example" + REPORT_PATH, body, ident.private_key, ident.device_id,
                     int(time.time()), "x1", {"content-type": "application/json"})  # fmt: skip
    bad = httpx.post(url, content=body, headers={**h, RELAY_URI_HEADER: "http://site.example" + REPORT_PATH,
                                                 "authorization": "Bearer sre_site_nope"})  # fmt: skip
    assert bad.status_code == 401 and bad.json()["refused"] == "site-unauthorized"
    other = httpx.post(
        root.url + "/v1/sites/site-b/status",
        json={"backlog": 0},
        headers={"authorization": f"Bearer {root.token}"},
    )
    assert other.status_code == 403


def test_the_site_answers_fleet_status_while_the_root_is_down(root: Root, tmp_path: Path) -> None:
    ident = _enrolled(root, tmp_path, "dev1")
    op = issue_operator_token(root.repo.dir, "alice")
    view = "site-view-" + secrets.token_hex(16)
    hub = _regional(root, tmp_path, view_token=view)
    hub.sync_once()
    assert "operator_token_sha256" not in (tmp_path / "regional" / "roster.json").read_text()
    with ServerThread(build_regional_app(hub)) as regional:
        body = _report(ident, datetime.now(UTC), "1.0")
        assert _post(regional.url + REPORT_PATH, body, ident, ctype="application/json").status_code == 200
        root.server.stop()
        up = hub.forward_up()
        assert not up.online and up.backlog == 1
        assert httpx.get(regional.url + "/v1/fleet/status").status_code == 401
        # a root operator token is no credential at a site (a site must never be handed one)
        rooted = httpx.get(regional.url + "/v1/fleet/status", headers={"authorization": f"Bearer {op}"})
        assert rooted.status_code == 401
        st = httpx.get(regional.url + "/v1/fleet/status", headers={"authorization": f"Bearer {view}"}).json()
        assert st["source"] == "regional" and st["backlog"] == 1 and st["root_unreachable_since"]
        assert st["devices"][ident.device_id]["modules"]["clf"]["version"] == "1.0"


def _start_regional(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    exe = Path(sys.executable).parent / "sre-hub"
    port = free_port()
    proc = subprocess.Popen([str(exe), "regional", *args, "--port", str(port), "--interval", "0.2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(2400):  # bounded: a loaded 2-core box can take a while to start a child
        try:
            if httpx.get(f"{url}/v1/regional/status", timeout=5).json().get("roster"):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the regional hub did not start: {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.slow
def test_kill_9_of_the_regional_hub_mid_forward_lands_the_batch_once(root: Root, tmp_path: Path) -> None:
    ident = _enrolled(root, tmp_path, "dev1")
    token_file = tmp_path / "site.token"
    token_file.write_text(root.token)
    args = ["--upstream", root.url, "--root", str(root.repo.metadata_dir / "1.root.json"),
            "--state", str(tmp_path / "regional"), "--site", "site-a",
            "--site-token-file", str(token_file)]  # fmt: skip
    batch_id, payload = _batch(tmp_path, ident)
    root.hold.clear()  # the root lands the relayed batch but does not answer yet
    proc, url = _start_regional(args)
    try:
        assert _post(url + BATCH_PATH.format(batch_id=batch_id), payload, ident).json()["status"] == "queued"
        for _ in range(2400):  # the forwarder sends it; the root lands it and holds the answer
            if root.receipts():
                break
            time.sleep(0.05)
        assert [r["batch_id"] for r in root.receipts()] == [batch_id]
        os.kill(proc.pid, signal.SIGKILL)  # mid-forward: the site never saw the root's answer
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    root.hold.set()
    proc2, url2 = _start_regional(args)  # restarted on the same state: the batch is still in its spool
    try:
        for _ in range(2400):
            st = httpx.get(f"{url2}/v1/regional/status", timeout=30).json()
            if st["backlog"] == 0:
                break
            time.sleep(0.05)
        assert st["backlog"] == 0, st
    finally:
        proc2.terminate()
        proc2.wait(timeout=30)
    assert [r["batch_id"] for r in root.receipts()] == [batch_id]  # exactly once
    assert root.fleet.query("SELECT count(*) AS n FROM metrics").column("n")[0].as_py() == 50


def test_the_root_shows_each_site_sync_age_backlog_and_in_sync_flag(
    root: Root, tmp_path: Path, run_cli: Any
) -> None:
    from hub.sites import current_timestamp

    hub = _regional(root, tmp_path)
    out = hub.sync_once()
    assert out["reported"] is True and out["down"]["published"], out
    reg = SiteRegistry(root.svc.store)
    (row,) = reg.rows(current_timestamp(root.repo.dir))
    assert row["site"] == "site-a" and row["in_sync"] and not row["breach"] and row["backlog"] == 0, row
    root.repo.timestamp()  # the root moves on; the site has not synced since
    (row,) = reg.rows(current_timestamp(root.repo.dir), max_age_s=0.0)
    assert not row["in_sync"] and row["breach"], row
    cli = run_cli("sre-hub", "sites", "list", "--repo", str(root.repo.dir), "--json")
    assert cli.returncode == 0, cli.stderr
    listed = json.loads(cli.stdout)
    assert listed["sites"][0]["site"] == "site-a" and listed["sites"][0]["in_sync"] is False
    status = run_cli("sre-hub", "fleet", "status", "--repo", str(root.repo.dir))
    assert status.returncode == 0 and "site-a" in status.stdout, status.stderr
    hub.sync_once()
    (row,) = reg.rows(current_timestamp(root.repo.dir))
    assert row["in_sync"], row
    # a site token that was removed can no longer report or forward
    assert run_cli("sre-hub", "sites", "remove", "--repo", str(root.repo.dir), "site-a").returncode == 0
    assert hub.sync_once()["reported"] is False


def _escalated(paths: Any, ident: DeviceIdentity) -> tuple[Any, Any]:
    from policies.triage import default_triage_policy
    from sre_agent.escalations import EscalationStore, escalations_dir
    from sre_agent.triage import TriageEngine
    from sre_agent.triage_eval import load_cases
    from sre_core.audit import AuditLog

    clock = SystemClock()
    store = EscalationStore(escalations_dir(paths), AuditLog(paths.audit_log, clock), clock, ident.device_id)
    case = {c.name: c for c in load_cases(Path(__file__).parent / "triage_cases")}["pf-active-nolkg"]
    return store, store.create(case.incident, TriageEngine(default_triage_policy()).decide(case.incident))


def test_approvals_come_down_through_the_regional_hub_and_from_its_cache_with_the_root_down(
    root: Root, tmp_path: Path
) -> None:
    import yaml

    from hub.operators import HubEscalations, keygen
    from sre_agent.approvals_sync import sync_approvals
    from sre_agent.escalations import EscalationStatus, escalations_dir

    keys = keygen(tmp_path / "ops", "alice")
    roster = tmp_path / "operators.yaml"
    roster.write_text(yaml.safe_dump({"version": 1, "max_ttl_s": 7200, "operators": [keys.entry]}))
    devs = {}
    for name in ("a", "b"):
        paths, ident = device(tmp_path / name)
        root.fleet.enroll(ident.device_id, ident.public_pem)
        store, esc = _escalated(paths, ident)
        HubEscalations(root.repo.dir).decide(
            esc.id, key_path=keys.key_path, operator="alice", decision="approve", roster_path=roster,
            sources=[escalations_dir(paths)],
        )  # fmt: skip
        devs[name] = (paths, ident, store, esc)
    hub = _regional(root, tmp_path)
    hub.sync_once()
    with ServerThread(build_regional_app(hub)) as regional:
        paths, ident, store, esc = devs["a"]
        got = sync_approvals([regional.url, root.url], paths, store, roster)
        assert got.hub == regional.url and got.applied == [esc.id], got
        assert store.get(esc.id).status == EscalationStatus.APPROVED
        # device b asks while it has no roster yet: nothing applied, but the site now holds its approvals
        paths, ident, store, esc = devs["b"]
        early = sync_approvals([regional.url], paths, store, tmp_path / "missing.yaml")
        assert early.applied == [] and early.errors, early
        root.server.stop()
        # a decision altered at the site is refused by the device (operator signature), nothing changes
        from sqlalchemy import select, update

        from hub.regional._relay import approvals_cache

        with hub.relay.engine.begin() as conn:
            (body,) = conn.execute(
                select(approvals_cache.c.body).where(approvals_cache.c.device_id == ident.device_id)
            ).one()
            forged = json.dumps({**json.loads(body), "reason": "site says so"})
            conn.execute(update(approvals_cache).where(approvals_cache.c.body == body).values(body=forged))
        bad = sync_approvals([regional.url], paths, store, roster)
        assert bad.applied == [] and esc.id in bad.refused, bad
        assert store.get(esc.id).status == EscalationStatus.OPEN
        with hub.relay.engine.begin() as conn:
            conn.execute(update(approvals_cache).where(approvals_cache.c.body == forged).values(body=body))
        late = sync_approvals([regional.url], paths, store, roster)  # the root is down: from the site's cache
        assert late.applied == [esc.id], late
        assert store.get(esc.id).status == EscalationStatus.APPROVED
