"""Red team for contained ingest: one enrolled device must not break the hub's fleet-wide views.

A real ``sre-hub serve`` child process on 127.0.0.1, devices enrolled with ``sre-hub devices enroll``
and real Ed25519 keys, and hostile but correctly signed uploads built the way a device builds batches
(zstd Parquet with ``sre.table``/``sre.device`` in the file metadata). After every attack the hub must
have refused it (4xx with a message) or stored it safely, and ``sre-hub query`` (a select over a known
table with a date filter), ``sre-hub escalations list`` and ``sre-hub fleet status`` must still exit 0
with the right answers. Oversized and compression-bomb bodies must not grow the hub process's RSS by
more than the body cap plus a margin (psutil; no wall-clock thresholds).

Written from the public documentation and the device side only (docs/fleet.md "Contained ingest",
docs/telemetry.md, ``sre_agent/uplink.py``, ``sre_core/telemetry_schema.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from telemetry_support import device, small_policy

from hub.cli import main as hub_main
from sre_agent.telemetry import Store, TelemetryWriter
from sre_agent.uplink import BATCH_PATH
from sre_core.clock import SystemClock
from sre_core.http_server import free_port
from sre_core.identity import DeviceIdentity
from sre_core.signing import sign_request
from sre_core.telemetry_schema import TS, table

pytestmark = pytest.mark.slow

MiB = 1 << 20
BASE_ROWS = 40  # baseline metrics rows of device A, all today, name "base"
RSS_MARGIN = 96 * MiB  # allocator slack, imports done lazily on the first big request, etc.
DECODED_CAP = 256 * MiB  # docs/fleet.md: uncompressed size declared in the Parquet footer
BODY_CAP_GUESS = 64 * MiB  # the docs say "413 above the limit" without the number (see the report)
DECODE_BUDGET = 128 * MiB  # docs/fleet.md: decoding memory shared by all requests of a hub process


def _exe(prog: str) -> str:
    return str(Path(sys.executable).parent / prog)


@dataclass
class HubProc:
    repo: Path
    url: str
    proc: subprocess.Popen[str]
    a: DeviceIdentity  # the attacker (enrolled, valid keys)
    b: DeviceIdentity  # enrolled, revoked later
    c: DeviceIdentity  # an honest neighbour whose id the attacker claims
    today: date
    esc_id: str
    base_bid: str

    @property
    def rss(self) -> int:
        """Resident bytes now (psutil)."""
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def start_peak(self) -> int:
        """Reset the kernel's RSS high-water mark (``clear_refs`` 5) and return the RSS now.

        Freed buffers go back to the OS, so RSS after a request misses a transient copy: the peak counts.
        """
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self.rss

    def peak(self) -> int:
        """The RSS high-water mark since :meth:`start_peak` (``VmHWM``), never below the RSS now."""
        for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if ln.startswith("VmHWM:"):
                return max(int(ln.split()[1]) * 1024, self.rss)
        return self.rss


def _encode(rows: pa.Table, table_name: str, meta_device: str) -> bytes:
    rows = rows.replace_schema_metadata({"sre.table": table_name, "sre.device": meta_device})
    buf = io.BytesIO()
    pq.write_table(rows, buf, compression="zstd")
    return buf.getvalue()


def _bid(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:40]


def _metrics(
    device_id: str, ts: list[datetime], name: str = "attack", value: list[float] | None = None
) -> pa.Table:
    n = len(ts)
    return pa.table(
        {
            "seq": pa.array(range(1, n + 1), pa.int64()),
            "ts": pa.array(ts, TS),
            "name": pa.array([name] * n, pa.string()),
            "series": pa.array(["core=0"] * n, pa.string()),
            "value": pa.array(value if value is not None else [1.0] * n, pa.float64()),
            "device_id": pa.array([device_id] * n, pa.string()),
        }
    )


def _records(device_id: str, bodies: list[str]) -> pa.Table:
    n = len(bodies)
    now = datetime.now(UTC)
    return pa.table(
        {
            "seq": pa.array(range(1, n + 1), pa.int64()),
            "ts": pa.array([now] * n, TS),
            "body": pa.array(bodies, pa.string()),
            "device_id": pa.array([device_id] * n, pa.string()),
        }
    )


def _signed_headers(
    url: str, body: bytes, ident: DeviceIdentity, extra: dict[str, str] | None = None
) -> dict[str, str]:
    headers = {"content-type": "application/octet-stream", "content-length": str(len(body)), **(extra or {})}
    return sign_request(
        "POST",
        url,
        body,
        ident.private_key,
        ident.device_id,
        int(time.time()),
        secrets.token_hex(16),
        headers,
    )


def _post(
    hub: HubProc,
    body: bytes,
    ident: DeviceIdentity | None = None,
    bid: str | None = None,
    extra: dict[str, str] | None = None,
) -> httpx.Response:
    url = f"{hub.url}{BATCH_PATH}{bid or _bid(body)}"
    ident = ident or hub.a
    return httpx.post(url, content=body, headers=_signed_headers(url, body, ident, extra), timeout=120)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """One ``sre-hub`` command in process (the same entry point as the console script)."""
    capsys.readouterr()
    rc = hub_main([*args, "--json"])
    out = capsys.readouterr()
    try:
        doc = json.loads(out.out) if out.out.strip() else None
    except json.JSONDecodeError:
        doc = None
    return rc, doc, out.err


def _views_still_work(hub: HubProc, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(hub.repo)
    sql = (
        "SELECT count(*) AS n, min(device_id) AS d FROM metrics "  # noqa: S608
        f"WHERE name = 'base' AND date = DATE '{hub.today.isoformat()}'"
    )
    rc, doc, err = _cli(capsys, "query", "--repo", repo, sql)
    assert rc == 0, err
    assert doc["rows"] == [{"n": BASE_ROWS, "d": hub.a.device_id}], doc
    rc, doc, err = _cli(
        capsys, "query", "--repo", repo, "SELECT count(*) AS n FROM metrics WHERE date >= DATE '2000-01-01'"
    )
    assert rc == 0, err
    assert doc["rows"][0]["n"] >= BASE_ROWS
    rc, doc, err = _cli(capsys, "escalations", "list", "--repo", repo)
    assert rc == 0, err
    assert hub.esc_id in [e.get("id") for e in doc["escalations"]], doc
    rc, doc, err = _cli(capsys, "fleet", "status", "--repo", repo)
    assert rc == 0, err
    assert doc["summary"]["enrolled"] >= 2, doc


def _refused(r: httpx.Response, *words: str) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    text = r.text.lower()
    assert text.strip(), "a refusal must say why"
    if words:
        assert any(w in text for w in words), (words, r.text[:300])


def _escalation_batch(root: Path, ident: DeviceIdentity, claim: str | None = None) -> tuple[str, bytes]:
    """A real escalation, recorded by the device's writer and sealed as the device seals it."""
    from policies.triage import default_triage_policy
    from sre_agent.escalations import EscalationStore
    from sre_agent.triage import TriageEngine
    from sre_agent.triage_eval import load_cases
    from sre_core.audit import AuditLog

    clock = SystemClock()
    store = Store(root / "esc.duckdb", small_policy(), clock, ident.device_id)
    w = TelemetryWriter(store, enforce=False)
    esc_store = EscalationStore(
        root / "escalations",
        AuditLog(root / "audit.jsonl", clock),
        clock,
        device_id=claim or ident.device_id,
        telemetry=w,
    )
    cases = {c.name: c for c in load_cases(Path(__file__).parent / "triage_cases")}
    incident = cases["pf-active-nolkg"].incident
    esc = esc_store.create(incident, TriageEngine(default_triage_policy()).decide(incident))
    w.flush()
    (b,) = [x for x in store.seal() if x.table == "escalations"]
    payload = store.payload(b.batch_id)
    store.close()
    return esc.id, payload


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProc]:
    root = tmp_path_factory.mktemp("redteam")
    repo = root / "hub"
    assert hub_main(["init", "--repo", str(repo)]) == 0  # in process: the console scripts run at the end
    idents = []
    for name in ("a", "b", "c"):
        paths, ident = device(root / name)
        pub = paths.root / "identity" / "device_ed25519.pub.pem"
        assert (
            hub_main(["devices", "enroll", "--repo", str(repo), "--id", ident.device_id, "--key", str(pub)])
            == 0
        )
        idents.append(ident)
    port = free_port()
    proc = subprocess.Popen(
        [_exe("sre-hub"), "serve", "--repo", str(repo), "--port", str(port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"127.0.0.1:{port}" in line, line
        now = datetime.now(UTC)
        a, b, c = idents
        esc_id, esc_payload = _escalation_batch(root, c)  # the honest neighbour's escalation
        base = _encode(_metrics(a.device_id, [now] * BASE_ROWS, name="base"), "metrics", a.device_id)
        h = HubProc(repo, f"http://127.0.0.1:{port}", proc, a, b, c, now.date(), esc_id, _bid(base))
        for body, who in ((base, a), (esc_payload, c)):
            r = _post(h, body, ident=who)
            assert r.status_code == 200 and r.json()["status"] == "stored", r.text
        yield h
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_baseline_views(hub: HubProc, capsys: pytest.CaptureFixture[str]) -> None:
    _views_still_work(hub, capsys)


# --- table names ------------------------------------------------------------------------------------

HOSTILE_TABLES = [
    "nope_table",
    "select",
    "../x",
    "a/b",
    "métrics",
    "metrics\u202e",
    "metrics;drop table metrics",
    "",
]


@pytest.mark.parametrize("name", HOSTILE_TABLES)
def test_unknown_and_hostile_table_names_are_refused(
    hub: HubProc, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    now = datetime.now(UTC)
    body = _encode(_metrics(hub.a.device_id, [now] * 3), name, hub.a.device_id)
    r = _post(hub, body)
    _refused(r, "table")
    assert not (hub.repo.parent / "x").exists() and not (hub.repo / "x").exists()
    lake_dirs = {p.name for p in hub.repo.rglob("table=*")}
    assert all(d.removeprefix("table=") in ("metrics", "escalations") for d in lake_dirs), lake_dirs
    _views_still_work(hub, capsys)
    if name == "nope_table":
        rc, _, _err = _cli(capsys, "query", "--repo", str(hub.repo), "SELECT * FROM nope_table")
        assert rc == 2, "an unknown table must not become a queryable table"


# --- columns and rows -------------------------------------------------------------------------------


def _mistyped(ident: DeviceIdentity) -> pa.Table:
    t = _metrics(ident.device_id, [datetime.now(UTC)] * 3)
    return t.set_column(t.schema.get_field_index("value"), "value", pa.array(["1.0", "x", "2"], pa.string()))


def _ts_as_text(ident: DeviceIdentity) -> pa.Table:
    t = _metrics(ident.device_id, [datetime.now(UTC)] * 3)
    return t.set_column(t.schema.get_field_index("ts"), "ts", pa.array(["2026-01-01"] * 3, pa.string()))


def _extra(ident: DeviceIdentity) -> pa.Table:
    t = _metrics(ident.device_id, [datetime.now(UTC)] * 3)
    return t.append_column("date", pa.array(["not-a-date"] * 3, pa.string()))


def _missing(ident: DeviceIdentity) -> pa.Table:
    return _metrics(ident.device_id, [datetime.now(UTC)] * 3).drop_columns(["value"])


def _no_device_col(ident: DeviceIdentity) -> pa.Table:
    return _metrics(ident.device_id, [datetime.now(UTC)] * 3).drop_columns(["device_id"])


def _empty(ident: DeviceIdentity) -> pa.Table:
    return _metrics(ident.device_id, [])


def _recast(col: str, typ: pa.DataType) -> Callable[[DeviceIdentity], pa.Table]:
    def build(ident: DeviceIdentity) -> pa.Table:
        t = _metrics(ident.device_id, [datetime.now(UTC)] * 3)
        i = t.schema.get_field_index(col)
        return t.set_column(i, col, t.column(col).cast(typ))

    return build


def _null_device(ident: DeviceIdentity) -> pa.Table:
    t = _metrics(ident.device_id, [datetime.now(UTC)] * 3)
    i = t.schema.get_field_index("device_id")
    return t.set_column(i, "device_id", pa.array([ident.device_id, None, ident.device_id], pa.string()))


def _duplicate_column(ident: DeviceIdentity) -> pa.Table:
    t = _metrics(ident.device_id, [datetime.now(UTC)] * 3)
    return t.append_column("value", pa.array(["x"] * 3))


BAD_ROWS: dict[str, Callable[[DeviceIdentity], pa.Table]] = {
    "ts-nanoseconds": _recast("ts", pa.timestamp("ns", tz="UTC")),
    "ts-naive": _recast("ts", pa.timestamp("us")),
    "value-float32": _recast("value", pa.float32()),
    "seq-as-int32": _recast("seq", pa.int32()),
    "null-device-id": _null_device,
    "duplicate-column": _duplicate_column,
    "mistyped-value": _mistyped,
    "ts-as-text": _ts_as_text,
    "extra-date-column": _extra,
    "missing-column": _missing,
    "no-device-id-column": _no_device_col,
    "zero-rows": _empty,
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_schema_violations_are_refused(hub: HubProc, capsys: pytest.CaptureFixture[str], case: str) -> None:
    body = _encode(BAD_ROWS[case](hub.a), "metrics", hub.a.device_id)
    _refused(_post(hub, body))
    _views_still_work(hub, capsys)


@pytest.mark.parametrize("where", ["column", "metadata", "both", "mixed"])
def test_rows_claiming_another_device_are_refused(
    hub: HubProc, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    now = datetime.now(UTC)
    victim, me = hub.c.device_id, hub.a.device_id
    col = victim if where in ("column", "both") else me
    t = _metrics(col, [now] * 4, name="forged")
    if where == "mixed":
        t = t.set_column(
            t.schema.get_field_index("device_id"), "device_id", pa.array([me, victim, me, victim])
        )
    meta = victim if where in ("metadata", "both") else me
    _refused(_post(hub, _encode(t, "metrics", meta)))
    rc, doc, err = _cli(
        capsys,
        "query",
        "--repo",
        str(hub.repo),
        f"SELECT count(*) AS n FROM metrics WHERE device_id = '{victim}'",  # noqa: S608
    )
    assert rc == 0 and doc["rows"] == [{"n": 0}], (doc, err)
    _views_still_work(hub, capsys)


def test_rows_spanning_several_days_land_under_their_own_days(
    hub: HubProc, capsys: pytest.CaptureFixture[str]
) -> None:
    start = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    ts = [start + timedelta(hours=h) for h in range(0, 72, 6)]  # 12 rows over 4 UTC days
    body = _encode(_metrics(hub.a.device_id, ts, name="span"), "metrics", hub.a.device_id)
    r = _post(hub, body)
    assert r.status_code == 200, r.text
    rc, doc, err = _cli(
        capsys,
        "query",
        "--repo",
        str(hub.repo),
        "SELECT CAST(date AS VARCHAR) AS d, count(*) AS n FROM metrics WHERE name = 'span' "
        "AND CAST(ts AS DATE) = date GROUP BY 1 ORDER BY 1",
    )
    assert rc == 0, err
    want: dict[str, int] = {}
    for t in ts:
        want[t.date().isoformat()] = want.get(t.date().isoformat(), 0) + 1
    assert {row["d"]: row["n"] for row in doc["rows"]} == want
    rc, doc, err = _cli(
        capsys,
        "query",
        "--repo",
        str(hub.repo),
        "SELECT count(*) AS n FROM metrics WHERE name = 'span' AND date = DATE '2026-03-02'",
    )
    assert rc == 0 and doc["rows"] == [{"n": want["2026-03-02"]}], (doc, err)
    _views_still_work(hub, capsys)


def _null_ts(ident: DeviceIdentity) -> pa.Table:
    t = _metrics(ident.device_id, [datetime.now(UTC)] * 2, name="nullts")
    return t.set_column(t.schema.get_field_index("ts"), "ts", pa.array([None, datetime.now(UTC)], TS))


WEIRD_VALUES: dict[str, Callable[[DeviceIdentity], pa.Table]] = {
    "null-ts": _null_ts,
    "far-future": lambda i: _metrics(
        i.device_id, [datetime(9999, 12, 31, 23, 59, tzinfo=UTC)], name="future"
    ),
    "far-past": lambda i: _metrics(i.device_id, [datetime(1, 1, 1, tzinfo=UTC)], name="past"),
    "epoch": lambda i: _metrics(i.device_id, [datetime(1970, 1, 1, tzinfo=UTC)], name="epoch"),
    "nan-inf": lambda i: _metrics(
        i.device_id, [datetime.now(UTC)] * 3, name="naninf", value=[float("nan"), float("inf"), float("-inf")]
    ),
}


@pytest.mark.parametrize("case", list(WEIRD_VALUES))
def test_odd_but_typed_values_are_refused_or_stored_safely(
    hub: HubProc, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    t = WEIRD_VALUES[case](hub.a)
    r = _post(hub, _encode(t, "metrics", hub.a.device_id))
    if r.status_code == 200:
        name = t.column("name")[0].as_py()
        rc, doc, err = _cli(
            capsys,
            "query",
            "--repo",
            str(hub.repo),
            f"SELECT count(*) AS n FROM metrics WHERE name = '{name}'",  # noqa: S608
        )
        assert rc == 0 and doc["rows"] == [{"n": t.num_rows}], (doc, err)
    else:
        _refused(r)
    _views_still_work(hub, capsys)


def test_huge_string_is_refused_or_stored_safely(hub: HubProc, capsys: pytest.CaptureFixture[str]) -> None:
    n = 4
    t = pa.table(
        {
            "seq": pa.array(range(1, n + 1), pa.int64()),
            "ts": pa.array([datetime.now(UTC)] * n, TS),
            "level": pa.array(["info"] * n),
            "logger": pa.array(["x" * (2 * MiB)] * n),
            "message": pa.array(["\u202e\x1b[2J" + "y" * (8 * MiB)] * n),
            "device_id": pa.array([hub.a.device_id] * n),
        }
    )
    assert [f.name for f in t.schema][1:-1] == [f.name for f in table("logs").schema]
    before = hub.start_peak()
    r = _post(hub, _encode(t, "logs", hub.a.device_id))
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:300]
    grew = hub.peak() - before
    assert grew < DECODED_CAP + RSS_MARGIN, f"RSS grew {grew / MiB:.0f} MiB for 40 MiB of strings"
    _views_still_work(hub, capsys)


# --- escalations body -------------------------------------------------------------------------------

BAD_ESCALATIONS = {
    "json-array": "[1, 2, 3]",
    "json-string": '"esc-0000000000000000"',
    "not-json": "{this is not json",
    "mistyped-fields": json.dumps({"id": 5, "status": ["open"], "content": "x", "document": 7}),
    "document-mistyped": json.dumps(
        {"id": "esc-0123456789abcdef", "status": "open", "document": '{"id": 3}'}
    ),
    "null": "null",
}


@pytest.mark.parametrize("case", list(BAD_ESCALATIONS))
def test_mistyped_escalations_never_break_escalations_list(
    hub: HubProc, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    body = _encode(_records(hub.a.device_id, [BAD_ESCALATIONS[case]]), "escalations", hub.a.device_id)
    r = _post(hub, body)
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:300]
    if case in ("json-array", "json-string", "not-json", "null"):
        _refused(r)  # docs/fleet.md: record bodies are JSON objects
    _views_still_work(hub, capsys)


# --- replay and revocation --------------------------------------------------------------------------


def test_replayed_request_is_refused_and_lands_nothing_twice(
    hub: HubProc, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    body = _encode(_metrics(hub.a.device_id, [now] * 5, name="replay"), "metrics", hub.a.device_id)
    url = f"{hub.url}{BATCH_PATH}{_bid(body)}"
    headers = _signed_headers(url, body, hub.a)
    first = httpx.post(url, content=body, headers=headers, timeout=30)
    assert first.status_code == 200, first.text
    again = httpx.post(url, content=body, headers=headers, timeout=30)
    _refused(again, "replay")
    rc, doc, err = _cli(
        capsys, "query", "--repo", str(hub.repo), "SELECT count(*) AS n FROM metrics WHERE name = 'replay'"
    )
    assert rc == 0 and doc["rows"] == [{"n": 5}], (doc, err)
    _views_still_work(hub, capsys)


def test_revoked_device_upload_is_refused(hub: HubProc, capsys: pytest.CaptureFixture[str]) -> None:
    r = subprocess.run(
        [_exe("sre-hub"), "devices", "revoke", "--repo", str(hub.repo), hub.b.device_id],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    body = _encode(
        _metrics(hub.b.device_id, [datetime.now(UTC)] * 2, name="revoked"), "metrics", hub.b.device_id
    )
    resp = _post(hub, body, ident=hub.b)
    assert resp.status_code == 403, resp.text
    _refused(resp, "revoked")
    _views_still_work(hub, capsys)


# --- sizes and bombs --------------------------------------------------------------------------------


def _raw_post(
    hub: HubProc, path: str, headers: dict[str, str], chunks: Iterator[bytes]
) -> tuple[int | None, str]:
    """Stream a body over a raw socket; the hub may answer and close early. Returns (status, text)."""
    host, port = hub.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=120)
    try:
        head = f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        s.sendall((head + "\r\n").encode())
        try:
            for c in chunks:
                s.sendall(c)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < 64 * 1024:
                got = s.recv(65536)
                if not got:
                    break
                data += got
                if b"\r\n\r\n" in data:
                    hdr, _, rest = data.partition(b"\r\n\r\n")
                    cl = [ln for ln in hdr.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                    if cl and len(rest) >= int(cl[0].split(b":")[1]):
                        break
        except (ConnectionResetError, TimeoutError):
            pass
    finally:
        s.close()
    if not data.startswith(b"HTTP/1.1 "):
        return None, data.decode(errors="replace")
    return int(data.split(b" ")[1]), data.partition(b"\r\n\r\n")[2].decode(errors="replace")


def _repeat(chunk: bytes, total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        part = chunk[: total - sent]
        sent += len(part)
        yield part


def test_unsigned_oversized_body_is_refused_before_it_is_buffered(
    hub: HubProc, capsys: pytest.CaptureFixture[str]
) -> None:
    size = 96 * MiB
    before = hub.start_peak()
    status, text = _raw_post(
        hub,
        f"{BATCH_PATH}{'ab' * 20}",
        {"content-type": "application/octet-stream", "content-length": str(size)},
        _repeat(b"\0" * MiB, size),
    )
    grew = hub.peak() - before
    assert status is not None and 400 <= status < 500, (status, text[:300])
    assert grew < BODY_CAP_GUESS + RSS_MARGIN, (
        f"RSS grew {grew / MiB:.0f} MiB for an unsigned {size / MiB:.0f} MiB body"
    )
    _views_still_work(hub, capsys)


def test_chunked_body_without_length_is_refused(hub: HubProc, capsys: pytest.CaptureFixture[str]) -> None:
    body = _encode(
        _metrics(hub.a.device_id, [datetime.now(UTC)] * 2, name="chunked"), "metrics", hub.a.device_id
    )
    url = f"{hub.url}{BATCH_PATH}{_bid(body)}"
    headers = _signed_headers(url, body, hub.a)
    headers.pop("content-length")
    r = httpx.post(url, content=iter([body]), headers=headers, timeout=30)  # chunked transfer encoding
    _refused(r)
    assert r.status_code == 411, r.text
    _views_still_work(hub, capsys)


def test_signed_oversized_body_is_refused_with_413(hub: HubProc, capsys: pytest.CaptureFixture[str]) -> None:
    size = 300 * MiB
    body = b"\0" * size
    path = f"{BATCH_PATH}{_bid(body)}"
    headers = _signed_headers(hub.url + path, body, hub.a)
    before = hub.start_peak()
    status, text = _raw_post(hub, path, headers, (body[i : i + MiB] for i in range(0, size, MiB)))
    grew = hub.peak() - before
    del body
    assert status == 413, (status, text[:300])
    assert grew < BODY_CAP_GUESS + RSS_MARGIN, (
        f"RSS grew {grew / MiB:.0f} MiB for a signed {size / MiB:.0f} MiB body"
    )
    _views_still_work(hub, capsys)


def _gzip_bomb(total: int) -> bytes:
    """Concatenated gzip members (RFC 1952 allows several) of 64 MiB of zeros each."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = z.compress(b"\0" * (64 * MiB)) + z.flush()
    return member * (total // (64 * MiB))


def _zstd_bomb(total: int) -> bytes:
    return bytes(pa.compress(b"\0" * total, codec="zstd", asbytes=True))


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_http_compression_bomb_is_refused_without_expanding(
    hub: HubProc, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    body = _gzip_bomb(1024 * MiB) if encoding == "gzip" else _zstd_bomb(256 * MiB)
    before = hub.start_peak()
    r = _post(hub, body, extra={"content-encoding": encoding})
    grew = hub.peak() - before
    _refused(r)
    assert grew < BODY_CAP_GUESS + RSS_MARGIN, (
        f"RSS grew {grew / MiB:.0f} MiB for a {len(body)} B {encoding} bomb"
    )
    _views_still_work(hub, capsys)


def _parquet_bomb(ident: DeviceIdentity, total: int, tag: str = "", page_rows: int | None = None) -> bytes:
    """A logs batch declaring ``total`` uncompressed bytes in zstd pages of one repeated byte.

    Rows of 1 MiB messages, 32 to a row group; each page holds the whole row group's messages, or
    ``page_rows`` of them.
    """
    schema = pa.schema(
        [pa.field("seq", pa.int64()), *table("logs").schema, pa.field("device_id", pa.string())],
        metadata={"sre.table": "logs", "sre.device": ident.device_id},
    )
    buf = io.BytesIO()
    per = 32
    line = tag + "a" * MiB
    pages: dict[str, Any] = {"write_batch_size": page_rows, "data_page_size": 1} if page_rows else {}
    with pq.ParquetWriter(buf, schema, compression="zstd", use_dictionary=False, **pages) as w:
        for g in range(total // (per * MiB)):
            w.write_table(
                pa.table(
                    {
                        "seq": pa.array(range(g * per + 1, g * per + per + 1), pa.int64()),
                        "ts": pa.array([datetime.now(UTC)] * per, TS),
                        "level": pa.array(["info"] * per),
                        "logger": pa.array(["bomb"] * per),
                        "message": pa.array([line] * per),
                        "device_id": pa.array([ident.device_id] * per),
                    },
                    schema=schema,
                )
            )
    return buf.getvalue()


def test_parquet_decompression_bomb_is_refused_without_expanding(
    hub: HubProc, capsys: pytest.CaptureFixture[str]
) -> None:
    body = _parquet_bomb(hub.a, 1024 * MiB)
    assert len(body) < 8 * MiB
    before = hub.start_peak()
    r = _post(hub, body)
    grew = hub.peak() - before
    _refused(r)
    assert grew < BODY_CAP_GUESS + RSS_MARGIN, (
        f"RSS grew {grew / MiB:.0f} MiB for a {len(body)} B Parquet bomb"
    )
    _views_still_work(hub, capsys)


# --- the console scripts, once, as an operator runs them -------------------------------------------


def test_zz_console_scripts_still_work_after_the_attacks(hub: HubProc) -> None:
    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_exe("sre-hub"), *a, "--json"], capture_output=True, text=True, timeout=120, check=False
        )

    q = run(
        "query",
        "--repo",
        str(hub.repo),
        f"SELECT count(*) AS n FROM metrics WHERE name = 'base' AND date = DATE '{hub.today.isoformat()}'",  # noqa: S608
    )
    assert q.returncode == 0 and json.loads(q.stdout)["rows"] == [{"n": BASE_ROWS}], q.stderr
    e = run("escalations", "list", "--repo", str(hub.repo))
    assert e.returncode == 0 and hub.esc_id in e.stdout, e.stderr
    f = run("fleet", "status", "--repo", str(hub.repo))
    assert f.returncode == 0 and hub.a.device_id in f.stdout, f.stderr
    assert hub.proc.poll() is None, "the hub process died"


def test_batch_just_under_the_decoded_cap_stays_within_it(
    hub: HubProc, capsys: pytest.CaptureFixture[str]
) -> None:
    """Accepted as documented (<= 256 MiB declared); the hub's memory must stay near that cap."""
    body = _parquet_bomb(hub.a, 224 * MiB)
    before = hub.start_peak()
    r = _post(hub, body)
    grew = hub.peak() - before
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:300]
    assert grew < DECODED_CAP + RSS_MARGIN, (
        f"RSS grew {grew / MiB:.0f} MiB for a {len(body)} B batch of 224 MiB decoded"
    )
    _views_still_work(hub, capsys)


CONCURRENT = 6  # hostile uploads at once: together they would decode 6 x 160 MiB


@pytest.mark.parametrize("page_rows", [None, 1])
def test_concurrent_batches_under_the_decoded_cap_do_not_multiply_memory(
    hub: HubProc, page_rows: int | None
) -> None:
    """Uploads at once, each under every documented cap: decoding memory stays within the shared budget.

    Each batch holds 160 MiB of 1 MiB values in tiny zstd pages (32 MiB pages, or one value a page); a
    request alone may decode dozens of rows at a time. The hub must reserve what decoding can take
    before decoding it, so however many such requests arrive together the process grows by the decode
    budget (plus slack), not by a multiple.
    """
    from concurrent.futures import ThreadPoolExecutor

    bodies = [
        _parquet_bomb(hub.a, 160 * MiB, tag=f"{page_rows}-{i}", page_rows=page_rows)
        for i in range(CONCURRENT)
    ]
    before = hub.start_peak()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        codes = [r.status_code for r in pool.map(lambda b: _post(hub, b), bodies)]
    grew = hub.peak() - before
    assert all(c in (200, 503) or 400 <= c < 500 for c in codes), codes
    assert grew < DECODE_BUDGET + RSS_MARGIN, (
        f"RSS grew {grew / MiB:.0f} MiB for {CONCURRENT} x {len(bodies[0])} B batches ({codes})"
    )


# --- ids, attestations, escalations of others -----------------------------------------------------


@pytest.mark.parametrize("bid", ["..%2f..%2fevil", "..%2F..%2Fevil.parquet", "e" * 4000, "%00evil", "base"])
def test_hostile_batch_ids_are_refused(hub: HubProc, capsys: pytest.CaptureFixture[str], bid: str) -> None:
    body = _encode(
        _metrics(hub.a.device_id, [datetime.now(UTC)] * 2, name="badid"), "metrics", hub.a.device_id
    )
    if bid == "base":  # a real id of another, already landed batch
        bid = hub.base_bid
    r = _post(hub, body, bid=bid)
    _refused(r)
    assert "duplicate" not in r.text
    assert not list(hub.repo.parent.rglob("*evil*"))
    rc, doc, err = _cli(
        capsys, "query", "--repo", str(hub.repo), "SELECT count(*) AS n FROM metrics WHERE name = 'badid'"
    )
    assert rc == 0 and doc["rows"] == [{"n": 0}], (doc, err)
    _views_still_work(hub, capsys)


def test_more_rows_than_the_documented_maximum_are_refused(
    hub: HubProc, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 1_000_001
    now = datetime.now(UTC)
    t = pa.table(
        {
            "seq": pa.array(range(1, n + 1), pa.int64()),
            "ts": pa.array([now] * n, TS),
            "name": pa.array(["toomany"] * n),
            "series": pa.array([""] * n),
            "value": pa.array([0.0] * n, pa.float64()),
            "device_id": pa.array([hub.a.device_id] * n),
        }
    )
    _refused(_post(hub, _encode(t, "metrics", hub.a.device_id)))
    _views_still_work(hub, capsys)


def _attestation(signer: DeviceIdentity, subject: str, predicate: Any) -> bytes:
    from sre_core.signing import DEVICE_STATE_PREDICATE, INTOTO_PAYLOAD_TYPE, INTOTO_STATEMENT, dsse_sign

    def canon(o: Any) -> bytes:
        return json.dumps(o, sort_keys=True, separators=(",", ":")).encode()

    stmt = {
        "_type": INTOTO_STATEMENT,
        "subject": [{"name": subject, "digest": {"sha256": hashlib.sha256(canon(predicate)).hexdigest()}}],
        "predicateType": DEVICE_STATE_PREDICATE,
        "predicate": predicate,
    }
    return canon(dsse_sign(signer.private_key, signer.device_id, INTOTO_PAYLOAD_TYPE, canon(stmt)))


ODD_ATTESTATIONS: dict[str, Callable[[HubProc], bytes]] = {
    "mistyped-predicate": lambda h: _attestation(
        h.a, h.a.device_id, {"modules": "pwned", "safe_mode": "yes", "time": 5}
    ),
    "predicate-list": lambda h: _attestation(h.a, h.a.device_id, ["pwned"]),
    "modules-mistyped": lambda h: _attestation(
        h.a,
        h.a.device_id,
        {
            "time": "2026-11-23T10:00:00+00:00",
            "policy_version": "pwned@1",
            "trust_status": "verified",
            "audit_head": "ab" * 32,
            "safe_mode": False,
            "modules": {"clf": {"version": 2, "digest": None}},
        },
    ),
    "subject-is-neighbour": lambda h: _attestation(
        h.a,
        h.c.device_id,
        {
            "time": "2026-11-23T10:00:00+00:00",
            "policy_version": "pwned@1",
            "trust_status": "verified",
            "audit_head": "ab" * 32,
            "safe_mode": True,
            "modules": {},
        },
    ),
}


@pytest.mark.parametrize("case", list(ODD_ATTESTATIONS))
def test_odd_attestations_never_break_fleet_views(
    hub: HubProc, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    from sre_agent.uplink import ATTEST_PATH

    body = ODD_ATTESTATIONS[case](hub)
    url = f"{hub.url}{ATTEST_PATH}{_bid(body)}"
    r = httpx.post(url, content=body, headers=_signed_headers(url, body, hub.a), timeout=30)
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:300]
    if case == "subject-is-neighbour":
        _refused(r)
    rc, doc, err = _cli(capsys, "devices", "list", "--repo", str(hub.repo))
    assert rc == 0, err
    neighbour = [d for d in doc["devices"] if d["device_id"] == hub.c.device_id]
    assert neighbour and "pwned" not in json.dumps(neighbour), neighbour
    if r.status_code == 200:  # stored: what operators see must have the documented types
        (me,) = [d for d in doc["devices"] if d["device_id"] == hub.a.device_id]
        assert me["safe_mode"] in (None, True, False), me
        assert me["attested"] is None or isinstance(me["attested"], str), me
    _views_still_work(hub, capsys)


def test_escalation_claiming_a_neighbours_id_or_device_is_not_shown_as_theirs(
    hub: HubProc, capsys: pytest.CaptureFixture[str]
) -> None:
    root = hub.repo.parent / "spoof"
    root.mkdir(exist_ok=True)
    spoof_id, spoof = _escalation_batch(root, hub.a, claim=hub.c.device_id)
    r = _post(hub, spoof)
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:300]
    # and a row reusing the honest escalation's id with another status
    forged = json.dumps(
        {"id": hub.esc_id, "status": "rejected", "device_id": hub.c.device_id, "document": "{}"}
    )
    r2 = _post(hub, _encode(_records(hub.a.device_id, [forged]), "escalations", hub.a.device_id))
    assert r2.status_code == 200 or 400 <= r2.status_code < 500, r2.text[:300]
    rc, doc, err = _cli(capsys, "escalations", "list", "--repo", str(hub.repo))
    assert rc == 0, err
    mine = [e for e in doc["escalations"] if e.get("id") == hub.esc_id]
    assert len(mine) == 1 and mine[0].get("status") == "open", mine
    spoofed = [e for e in doc["escalations"] if e.get("id") == spoof_id]
    assert all(hub.c.device_id not in json.dumps(e.get("device_id", e.get("device", ""))) for e in spoofed), (
        spoofed
    )
    _views_still_work(hub, capsys)


@pytest.mark.parametrize("dev_id", ["../../evil", "a/b", "x'; DROP TABLE devices; --", ""])
def test_enrolling_a_hostile_device_id_is_refused_or_harmless(
    hub: HubProc, capsys: pytest.CaptureFixture[str], dev_id: str
) -> None:
    _, ident = device(hub.repo.parent / f"odd{abs(hash(dev_id))}")
    rc, _, _err = _cli(
        capsys, "devices", "enroll", "--repo", str(hub.repo), "--id", dev_id, "--key", ident.public_pem
    )
    assert rc in (0, 2)
    assert not list(hub.repo.parent.rglob("*evil*"))
    if dev_id in ("../../evil", "a/b", ""):
        assert rc == 2, f"device id {dev_id!r} was enrolled"
    _views_still_work(hub, capsys)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _lying_footer_bomb(ident: DeviceIdentity, total: int) -> bytes:
    """A Parquet bomb whose footer understates each column chunk's ``total_uncompressed_size``.

    Thrift compact: ColumnMetaData field 6 (i64, header byte 0x16) follows field 5; the real value is
    replaced by the smallest one of the same varint length, so the file stays readable.
    """
    body = _parquet_bomb(ident, total, tag="lie")
    md = pq.ParquetFile(io.BytesIO(body)).metadata
    start = len(body) - 8 - int.from_bytes(body[-8:-4], "little")
    footer = body[start:-8]
    sizes = {
        md.row_group(i).column(j).total_uncompressed_size
        for i in range(md.num_row_groups)
        for j in range(md.num_columns)
    }
    for v in sorted(sizes):
        if v < MiB:
            continue
        n = len(_varint(2 * v))
        footer = footer.replace(b"\x16" + _varint(2 * v), b"\x16" + _varint(2 * (1 << (7 * (n - 1) - 1))))
    return body[:start] + footer + body[-8:]


def test_parquet_bomb_with_a_lying_footer_is_refused_without_expanding(
    hub: HubProc, capsys: pytest.CaptureFixture[str]
) -> None:
    body = _lying_footer_bomb(hub.a, 512 * MiB)
    md = pq.ParquetFile(io.BytesIO(body)).metadata
    declared = sum(
        md.row_group(i).column(j).total_uncompressed_size
        for i in range(md.num_row_groups)
        for j in range(md.num_columns)
    )
    assert declared < 64 * MiB and len(body) < 4 * MiB  # the footer claims little; the pages hold 512 MiB
    before = hub.start_peak()
    r = _post(hub, body)
    grew = hub.peak() - before
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:300]
    assert grew < DECODED_CAP + RSS_MARGIN, (
        f"RSS grew {grew / MiB:.0f} MiB for a {len(body)} B batch ({r.status_code})"
    )
    _refused(r)
    _views_still_work(hub, capsys)
