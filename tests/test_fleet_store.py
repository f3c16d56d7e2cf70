"""The hub at fleet scale: state in SQLite (default) and a real PostgreSQL, shared by processes.

How each promise would break, and the test that catches it:
- enrolments/revocations lost by concurrent read-modify-write of one file -> 25 real CLI processes;
- a gate opened twice by racing ticks and approvals -> threads racing ``tick``/``approve(wave=1)``;
- replays accepted by another replica (nonces per process) -> two apps sharing only the database;
- hostile batches breaking fleet-wide views -> each refused, and query / escalations / status still work.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pg_support import pg_server, pg_url  # noqa: F401 (fixtures)

from deployment.manifest import ModuleManifest
from hub.fleetdb import FleetDB
from hub.ingest import ingest_routes
from hub.lake import Lake
from hub.repository import HubRepository
from hub.rollouts import RolloutService, RolloutSpec
from hub.server import build_hub_app
from hub.store import ENV_DATABASE_URL, open_store
from sre_core.clock import FakeClock, SystemClock
from sre_core.http_server import ServerThread
from sre_core.signing import sign_request

HUB = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main(sys.argv[1:]))"]


def _pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return str(request.getfixturevalue("pg_url"))


def _env(url: str) -> dict[str, str]:
    return {**os.environ, ENV_DATABASE_URL: url, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


@pytest.mark.slow
def test_25_concurrent_enrolments_and_revocations_are_all_kept(tmp_path: Path, db_url: str) -> None:
    repo = tmp_path / "repo"
    (repo / "fleet").mkdir(parents=True)
    open_store(db_url)  # migrate once up front (concurrent first opens also serialise, but slower)
    keys = {f"dev-{i:02d}": Ed25519PrivateKey.generate() for i in range(25)}
    for d, k in keys.items():
        (tmp_path / f"{d}.pem").write_text(_pem(k))
    procs = [
        subprocess.Popen([*HUB, "devices", "enroll", "--repo", str(repo), "--id", d, "--key",
                          str(tmp_path / f"{d}.pem")], env=_env(db_url), stderr=subprocess.PIPE)
        for d in keys
    ]  # fmt: skip
    assert all(p.wait(600) == 0 for p in procs), [p.stderr.read() for p in procs if p.stderr]
    revoked = sorted(keys)[::3]
    procs = [
        subprocess.Popen([*HUB, "devices", "revoke", "--repo", str(repo), d], env=_env(db_url))
        for d in revoked
    ]
    assert all(p.wait(600) == 0 for p in procs)
    fleet = FleetDB(repo / "fleet", store=open_store(db_url))
    got = {r.device_id: r.revoked for r in fleet.devices()}
    assert sorted(got) == sorted(keys)  # none lost
    assert sorted(d for d, rev in got.items() if rev) == revoked  # every printed "revoked" holds


def _repo(tmp: Path, clock: FakeClock) -> HubRepository:
    repo = HubRepository.init(tmp / "repo", channels=("stable",), clock=clock)
    for v in ("1.0", "2.0"):
        f = tmp / f"clf-{v}.bin"
        f.write_bytes(v.encode() * 10)
        repo.publish("stable", f, ModuleManifest(name="clf", version=v, mode="file", filename="m.bin"))
    repo.release("stable", "clf", "1.0")
    return repo


def _report(dev: str, version: str, bad: list[str] | None = None) -> dict[str, Any]:
    return {
        "device_id": dev, "channel": "stable", "safe_mode": False, "last_sync": None,
        "modules": {"clf": {"version": version, "phase": "idle", "bad": bad or []}}, "ledger": {},
    }  # fmt: skip


def test_gate_opens_exactly_once_under_racing_ticks_and_approvals(tmp_path: Path, db_url: str) -> None:
    clock = FakeClock()
    repo = _repo(tmp_path, clock)
    store = open_store(db_url)
    svc = RolloutService(repo, clock=clock, store=store)
    svc.start(RolloutSpec(channel="stable", module="clf", version="2.0", waves=[50, 100], soak_s=0,
                          min_devices=1, gates=["auto"]))  # fmt: skip
    # a second "replica": its own service object over the same database and repository
    other = RolloutService(HubRepository(repo.dir, clock), clock=clock, store=store)
    for i in range(40):
        svc.reports.put({**_report(f"d{i}", "1.0"), "received_at": clock.now().isoformat()})
    rid = svc.current("stable").id  # type: ignore[union-attr]
    from deployment.rollout import is_member

    member = next(f"d{i}" for i in range(40) if is_member(f"d{i}", rid, 50))
    r0 = svc.current("stable")
    assert r0 is not None
    # count one member healthy on the candidate without evaluating the gate: the racers below do that
    svc._count(r0, member, {**_report(member, "2.0"), "received_at": clock.now().isoformat()})
    errors: list[BaseException] = []

    def race(s: RolloutService, n: int) -> None:
        try:
            if n % 2:
                s.tick("stable")
            else:
                try:
                    s.approve("stable", "op", wave=1)
                except Exception as exc:
                    if "not the next one" not in str(exc) and "already open" not in str(exc):
                        raise
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(svc if n % 3 else other, n)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    r = svc.current("stable")
    assert r is not None and r.wave == 1 and r.state == "running"
    opened = [h for h in r.history if h.get("wave") == 1]
    assert len(opened) == 1, r.history  # exactly one gate passage


@pytest.mark.slow
def test_counters_stay_exact_when_one_devices_reports_race_through_two_replicas(
    tmp_path: Path, db_url: str
) -> None:
    """Each device reports twice at once, through two replicas, in opposite orders (old then new version
    on one, new then old on the other), while ticks and approvals race. However the transactions
    interleave, every device's counted flags must be those of the report stored last, and the
    counters must be the sums of those flags: storing a report and counting it is one state change."""
    from hub.rollouts import device_flags
    from hub.store._schema import rollout_members

    clock = FakeClock()
    repo = _repo(tmp_path, clock)
    store = open_store(db_url)
    svc = RolloutService(repo, clock=clock, store=store)
    other = RolloutService(HubRepository(repo.dir, clock), clock=clock, store=store)
    devs = [f"d{i:02d}" for i in range(24)]
    for d in devs:
        svc.reports.put({**_report(d, "1.0"), "received_at": clock.now().isoformat()})
    svc.start(RolloutSpec(channel="stable", module="clf", version="2.0", waves=[10, 50, 100], soak_s=0,
                          min_devices=1, gates=["manual", "manual"]))  # fmt: skip
    clock.advance(1)  # reports from now on count as reachable
    errors: list[BaseException] = []

    def send(s: RolloutService, order: list[str]) -> None:
        try:
            for _ in range(3):
                for d in devs:
                    for v in order:
                        s.observe(_report(d, v))
        except BaseException as exc:
            errors.append(exc)

    def operate() -> None:
        try:
            for _ in range(6):
                svc.tick("stable")
                try:
                    other.approve("stable", "op", wave=1)
                except Exception as exc:
                    if "already open" not in str(exc) and "not the next one" not in str(exc):
                        raise
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=send, args=(svc, ["1.0", "2.0"])),
        threading.Thread(target=send, args=(other, ["2.0", "1.0"])),
        threading.Thread(target=send, args=(other, ["1.0", "2.0"])),
        threading.Thread(target=operate),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    r = svc.current("stable")
    assert r is not None and r.wave == 1
    assert len([h for h in r.history if h.get("wave") == 1]) == 1, r.history
    stored = svc.reports.all()
    with store.tx() as conn:
        counted = {row.device_id: int(row.flags) for row in conn.execute(
            rollout_members.select().where(rollout_members.c.rollout_id == r.id))}  # fmt: skip
    expected = {d: device_flags(r, d, stored[d]) for d in devs if svc._wave(r, d) < len(r.spec.waves)}
    assert {d: counted.get(d, 0) for d in expected} == expected
    for w in svc._counters(r):
        members = [d for d in expected if svc._wave(r, d) == w.index]
        assert w.on_candidate == sum(1 for d in members if expected[d] & 4), w
        assert w.members_known == sum(1 for d in members if expected[d] & 1), w


def test_a_report_stored_between_anothers_store_and_count_is_the_one_counted(
    tmp_path: Path, db_url: str
) -> None:
    """The interleaving the race above can hit, made certain: replica 1 stores a device's report (on
    the candidate), replica 2 then stores and counts a newer one (back on the old version), and only
    then does replica 1 count. The device's counted flags must be those of the stored report."""
    from hub.rollouts import ON_CANDIDATE, ReportStore, device_flags

    clock = FakeClock()
    repo = _repo(tmp_path, clock)
    store = open_store(db_url)
    between: list[Any] = []

    class Interleaved(ReportStore):  # the one-method seam: run the other replica right after a store
        def put(self, report: dict[str, Any]) -> dict[str, Any] | None:
            prev = super().put(report)
            while between:
                between.pop()()
            return prev

    svc = RolloutService(repo, clock=clock, store=store, reports=Interleaved(repo.dir / "fleet", store))
    other = RolloutService(HubRepository(repo.dir, clock), clock=clock, store=store)
    svc.start(RolloutSpec(channel="stable", module="clf", version="2.0", waves=[100], soak_s=0,
                          min_devices=10**6))  # fmt: skip
    between.append(lambda: other.observe(_report("d01", "1.0")))
    svc.observe(_report("d01", "2.0"))
    r = svc.current("stable")
    assert r is not None
    stored = svc.reports.get("d01")
    assert stored is not None and stored["modules"]["clf"]["version"] == "1.0"
    (w,) = svc._counters(r)
    assert (w.members_known, w.on_candidate) == (1, 0)
    assert not device_flags(r, "d01", stored) & ON_CANDIDATE


def _batch(device: str, table: str, rows: pa.Table, meta_device: str | None = None) -> bytes:
    rows = rows.replace_schema_metadata({"sre.table": table, "sre.device": meta_device or device})
    buf = io.BytesIO()
    pq.write_table(rows, buf, compression="zstd")
    return buf.getvalue()


def _metrics(device: str, ts: list[datetime], devcol: str | None = None) -> pa.Table:
    n = len(ts)
    return pa.table({
        "seq": pa.array(range(n), pa.int64()),
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "name": ["cpu"] * n, "series": [""] * n, "value": pa.array([1.0] * n, pa.float64()),
        "device_id": [devcol or device] * n,
    })  # fmt: skip


def _post(url: str, key: Ed25519PrivateKey, dev: str, body: bytes) -> httpx.Response:
    import hashlib

    bid = hashlib.sha256(body).hexdigest()[:40]
    full = f"{url}/v1/telemetry/batches/{bid}"
    hdrs = sign_request("POST", full, body, key, dev, int(time.time()), secrets.token_hex(16))
    return httpx.post(full, content=body, headers=hdrs, timeout=30)


@pytest.mark.slow
def test_hostile_batches_are_refused_and_fleet_views_keep_working(tmp_path: Path) -> None:
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",))
    fleet_dir = repo.dir / "fleet"
    fleet = FleetDB(fleet_dir, SystemClock())
    key = Ed25519PrivateKey.generate()
    fleet.enroll("dev-a", _pem(key))
    fleet.enroll("dev-b", _pem(Ed25519PrivateKey.generate()))
    now = datetime.now(UTC)
    app = build_hub_app(repo.dir, extra_routes=ingest_routes(fleet_dir, fleet=fleet, max_body_bytes=4 << 20))
    with ServerThread(app) as server:
        url = server.url
        # a good batch spanning midnight lands in two day partitions (each row under its own day)
        day0 = datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC)
        ok = _post(
            url,
            key,
            "dev-a",
            _batch("dev-a", "metrics", _metrics("dev-a", [day0, day0 + timedelta(seconds=2)])),
        )
        assert ok.status_code == 200, ok.text
        assert fleet.lake.partitions("metrics") == ["date=2026-12-01", "date=2026-12-02"]
        hostile = {
            "unknown table": _batch("dev-a", "gossip", _metrics("dev-a", [now])),
            "keyword name": _batch("dev-a", "select", _metrics("dev-a", [now])),
            "mistyped rows": _batch("dev-a", "metrics", _metrics("dev-a", [now]).set_column(
                4, "value", pa.array(["high"], pa.string()))),
            "0 rows": _batch("dev-a", "metrics", _metrics("dev-a", [])),
            "foreign device rows": _batch("dev-a", "metrics", _metrics("dev-a", [now], devcol="dev-b")),
            "foreign device meta": _batch("dev-a", "metrics", _metrics("dev-a", [now]), meta_device="dev-b"),
            "extra column": _batch(
                "dev-a", "metrics", _metrics("dev-a", [now]).append_column("x", pa.array([1]))),
            "escalation body not an object": _batch("dev-a", "escalations", pa.table({
                "seq": pa.array([0], pa.int64()), "ts": pa.array([now], pa.timestamp("us", tz="UTC")),
                "body": ["[1, 2"], "device_id": ["dev-a"]})),
        }  # fmt: skip
        ts_type = pa.timestamp("us", tz="UTC")
        huge = '{"x": "' + "A" * (300 << 20) + '"}'
        bomb_rows = pa.table({"seq": pa.array([0], pa.int64()), "ts": pa.array([now], ts_type),
                              "body": [huge], "device_id": ["dev-a"]})  # fmt: skip
        bomb = _batch("dev-a", "triage_decisions", bomb_rows)
        assert len(bomb) < 4 << 20  # small on the wire, 300 MiB once decompressed
        del bomb_rows
        hostile["compression bomb"] = bomb
        for what, body in hostile.items():
            r = _post(url, key, "dev-a", body)
            assert r.status_code == 400, (what, r.status_code, r.text)
        # oversized: refused from the declared length, before the body is read or the signature checked
        big = b"x" * (5 << 20)
        r = httpx.post(f"{url}/v1/telemetry/batches/{'0' * 40}", content=big, timeout=30)
        assert r.status_code == 413
        # unsigned with a length under the limit: refused before the body is buffered
        r = httpx.post(f"{url}/v1/telemetry/batches/{'0' * 40}", content=b"x" * 1000, timeout=30)
        assert (r.status_code, r.json()["refused"]) == (401, "unsigned")
    assert fleet.tables() == ["metrics"]
    assert fleet.query("SELECT count(*) AS n FROM metrics WHERE date >= DATE '2026-12-01'").to_pylist() == [
        {"n": 2}
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for cmd in (["query", "--repo", str(repo.dir), "SELECT count(*) FROM metrics"],
                ["escalations", "list", "--repo", str(repo.dir)],
                ["fleet", "status", "--repo", str(repo.dir)]):  # fmt: skip
        done = subprocess.run([*HUB, *cmd], env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, (cmd, done.stderr)


def test_compaction_bounds_files_per_partition_and_keeps_rows(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    base = datetime(2026, 12, 1, 12, tzinfo=UTC)
    for i in range(30):
        lake.write("metrics", f"b{i:03d}", _metrics("d", [base + timedelta(hours=i)]))
    assert len(lake.files("metrics")) == 30
    before = lake.connect().sql("SELECT count(*), min(date), max(date) FROM metrics").fetchall()
    out = lake.compact(max_files=1)
    assert out["partitions_merged"] == 2 and len(lake.files("metrics")) == 2
    assert lake.connect().sql("SELECT count(*), min(date), max(date) FROM metrics").fetchall() == before


def test_compaction_streams_row_groups_and_unions_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merging is streamed (several row groups, not one table in memory); a file lacking a column
    (an older schema) reads it as nulls, and every row and value survives."""
    import pyarrow.parquet as pq

    import hub.lake

    monkeypatch.setattr(hub.lake, "COMPACT_ROWS", 25)  # a row group per ~25 rows: the streaming path
    lake = Lake(str(tmp_path / "lake"))
    base = datetime(2026, 12, 1, 12, tzinfo=UTC)
    for i in range(12):
        rows = _metrics(f"d{i}", [base + timedelta(minutes=i * 10 + k) for k in range(10)])
        lake.write("metrics", f"b{i:03d}", rows.drop_columns(["series"]) if i % 3 == 0 else rows)
    sql = "SELECT count(*), count(series), sum(value), count(DISTINCT device_id) FROM metrics"
    before = lake.connect().sql(sql).fetchall()
    assert lake.compact(max_files=1) == {"partitions_merged": 1, "files_removed": 12}
    (merged,) = lake.files("metrics")
    assert pq.ParquetFile(merged).metadata.num_row_groups >= 4
    assert lake.connect().sql(sql).fetchall() == before == [(120, 80, before[0][2], 12)]
    assert [p.name for p in (tmp_path / "lake").rglob(".tmp-*")] == []


def test_replicas_share_replay_protection_and_reports(tmp_path: Path, db_url: str) -> None:
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",))
    store = open_store(db_url)
    key = Ed25519PrivateKey.generate()
    apps = []
    for _ in range(2):  # two replicas: separate FleetDB objects and nonce caches, one database
        fleet = FleetDB(repo.dir / "fleet", SystemClock(), store=store, lake=Lake(str(tmp_path / "lake")))
        apps.append(
            ServerThread(
                build_hub_app(repo.dir, extra_routes=ingest_routes(repo.dir / "fleet", fleet=fleet))
            ).start()
        )
    try:
        FleetDB(repo.dir / "fleet", store=store).enroll("dev-a", _pem(key))
        body = _batch("dev-a", "metrics", _metrics("dev-a", [datetime.now(UTC)]))
        import hashlib

        path = f"/v1/telemetry/batches/{hashlib.sha256(body).hexdigest()[:40]}"
        hdrs = sign_request("POST", apps[0].url + path, body, key, "dev-a", int(time.time()), "n-1")
        assert httpx.post(apps[0].url + path, content=body, headers=hdrs).status_code == 200
        # the same signed request replayed at the other replica (same Host as the signature names)
        r = httpx.post(apps[1].url + path, content=body, headers={**hdrs, "host": apps[0].url.split("//")[1]})
        assert (r.status_code, r.json().get("refused")) == (401, "replayed")
        for i in range(10):
            b = _batch("dev-a", "metrics", _metrics("dev-a", [datetime.now(UTC) + timedelta(seconds=i)]))
            assert _post(apps[i % 2].url, key, "dev-a", b).status_code == 200
        st = FleetDB(repo.dir / "fleet", store=store).state("dev-a")
        assert st["batches"] == 11 and st["rows"] == {"metrics": 11}  # exact counters across replicas
    finally:
        for a in apps:
            a.stop()


class _RoundRobin:
    """A TCP load balancer on one address: each new connection goes to the next backend."""

    def __init__(self, backends: list[int]) -> None:
        import socket

        from sre_core.http_server import free_port

        self.port = free_port()
        self.backends = backends
        self.n = 0
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            port = self.backends[self.n % len(self.backends)]
            self.n += 1
            upstream = socket.create_connection(("127.0.0.1", port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
def test_two_serve_processes_behind_one_address_agree(tmp_path: Path, db_url: str) -> None:
    from sre_core.http_server import free_port

    repo = HubRepository.init(tmp_path / "repo", channels=("stable",))
    (repo.dir / "hub.toml").write_text(f'[store]\ndatabase_url = "{db_url}"\n')
    store = open_store(db_url)
    key = Ed25519PrivateKey.generate()
    FleetDB(repo.dir / "fleet", store=store).enroll("dev-a", _pem(key))
    ports = [free_port(), free_port()]
    env = {k: v for k, v in _env(db_url).items() if k != ENV_DATABASE_URL}  # from hub.toml this time
    procs = [
        subprocess.Popen([*HUB, "serve", "--repo", str(repo.dir), "--port", str(p)], env=env) for p in ports
    ]
    lb = _RoundRobin(ports)
    try:
        for p in ports:
            for _ in range(600):
                try:
                    if httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
        url = f"http://127.0.0.1:{lb.port}"
        sent = []
        for i in range(10):
            body = _batch("dev-a", "metrics", _metrics("dev-a", [datetime.now(UTC) + timedelta(seconds=i)]))
            sent.append(body)
            r = _post(url, key, "dev-a", body)
            assert r.status_code == 200 and r.json()["status"] == "stored", r.text
        import hashlib

        body = sent[0]
        full = f"{url}/v1/telemetry/batches/{hashlib.sha256(body).hexdigest()[:40]}"
        hdrs = sign_request("POST", full, body, key, "dev-a", int(time.time()), "once")
        answers = [
            httpx.post(full, content=body, headers=hdrs, timeout=30) for _ in range(4)
        ]  # both replicas
        assert answers[0].status_code == 200
        assert [(a.status_code, a.json().get("refused")) for a in answers[1:]] == [(401, "replayed")] * 3
        for v in ("1.0", "2.0", "2.0"):  # device reports through the balancer, alternating replicas
            doc = json.dumps(_report("dev-a", v)).encode()
            rh = sign_request("POST", f"{url}/v1/fleet/reports", doc, key, "dev-a", int(time.time()),
                              secrets.token_hex(8), {"content-type": "application/json"})  # fmt: skip
            assert (
                httpx.post(f"{url}/v1/fleet/reports", content=doc, headers=rh, timeout=30).status_code == 200
            )
        st = FleetDB(repo.dir / "fleet", store=store).state("dev-a")
        assert st["batches"] == 10 and st["rows"] == {"metrics": 10}  # exact counters
        from hub.rollouts import ReportStore

        got = ReportStore(repo.dir / "fleet", store).get("dev-a")
        assert got is not None and got["modules"]["clf"]["version"] == "2.0"
        assert lb.n >= 16  # every request went through the one address, spread over both processes
    finally:
        lb.close()
        for proc in procs:
            proc.terminate()
            proc.wait(60)
