"""The device report: one self-contained HTML page with plots, from a device's state directory.

``sre-agent report --state DIR --html OUT``. Reads, never writes, the state: the audit trail
(``audit.jsonl``: canary steps and gate figures, chaos verdicts, escalation steps), the telemetry store
(``telemetry.duckdb``, opened read-only: serving latency and error rate per slot, uplink backlog, SLO
metrics, the books), the escalation files and the chaos escalation packets. DuckDB lets no second process
open a file the daemon holds, so while the daemon runs the telemetry comes through its admin API (the same
read-only SELECTs), and from the file when no daemon runs.

Plots are inline SVG made by :mod:`sre_core.svg` (why hand-written: see there). Public API::

    collect_device(state) -> DeviceData
    render_device(data) -> str                  (the HTML)
    write_device_report(state, out) -> Path
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sre_core.atomic import atomic_write_text
from sre_core.audit_plots import canary_plots, chaos_plots, error_rates, record_time
from sre_core.errors import SreError
from sre_core.paths import StatePaths
from sre_core.svg import bar_chart, html_table, line_chart, page

__all__ = ["DeviceData", "collect_device", "render_device", "write_device_report"]

MAX_AUDIT_LINES = 200_000
MAX_METRIC_ROWS = 500_000
MAX_QUERY_ROWS = 10_000  # the admin API's cap per query: more rows are averaged into time buckets


@dataclass
class DeviceData:
    """Everything the page shows, already reduced to plottable values."""

    state: str
    device_id: str = ""
    t0: float | None = None
    audit: list[dict[str, Any]] = field(default_factory=list)
    audit_intact: bool | None = None
    metrics: list[tuple[float, str, str, float]] = field(default_factory=list)
    books: list[dict[str, Any]] = field(default_factory=list)
    telemetry_note: str = ""
    telemetry_failed: bool = False  # the database exists but could not be read (locked, damaged)
    escalations: list[dict[str, Any]] = field(default_factory=list)
    chaos_packets: list[dict[str, Any]] = field(default_factory=list)
    slos: list[dict[str, Any]] = field(default_factory=list)


def _read_audit(paths: StatePaths) -> tuple[list[dict[str, Any]], bool | None]:
    if not paths.audit_log.exists():
        return [], None
    from sre_core.audit import AuditLog

    out: list[dict[str, Any]] = []
    with paths.audit_log.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= MAX_AUDIT_LINES:
                break
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "event" in rec and "ts" in rec:
                out.append(rec)
    _, broken = AuditLog(paths.audit_log).verify()
    return out, broken is None


_METRIC_FILTER = "(name LIKE 'serving.%' OR name LIKE 'uplink.%' OR name LIKE 'slo.%') AND isfinite(value)"

Query = Callable[[str], list[tuple[Any, ...]]]


def _admin_query(client: Any) -> Query:
    """Run one SELECT through the daemon's admin API (it holds the DuckDB file)."""

    def run(sql: str) -> list[tuple[Any, ...]]:
        resp = client.post("/telemetry/query", json={"sql": sql})
        if resp.status_code != 200:
            raise SreError("query the daemon", str(resp.json().get("error", resp.status_code)))
        doc = resp.json()
        return [tuple(r[c] for c in doc["columns"]) for r in doc["rows"]]

    return run


def _metric_rows(q: Query, limit: int) -> list[tuple[Any, ...]]:
    """The plotted metrics, averaged into time buckets when there are more than ``limit`` rows.

    The SQL is built from constants and integers only (S608 below).
    """
    n, series, lo, hi = q(
        "SELECT count(*) AS n, count(DISTINCT name || '|' || series) AS s, min(epoch_us(ts)) AS lo, "  # noqa: S608
        f"max(epoch_us(ts)) AS hi FROM metrics WHERE {_METRIC_FILTER}"
    )[0]
    if not n:
        return []
    if n <= limit:
        return q(
            f"SELECT epoch_us(ts) AS t, name, series, value FROM metrics WHERE {_METRIC_FILTER} ORDER BY ts"  # noqa: S608
        )
    bucket = max(1, -(-(int(hi) - int(lo) + 1) * int(series) // int(limit * 0.9)))
    return q(
        f"SELECT (epoch_us(ts) // {bucket}) * {bucket} AS t, name, series, avg(value) AS value FROM metrics "  # noqa: S608
        f"WHERE {_METRIC_FILTER} GROUP BY 1, 2, 3 ORDER BY 1 LIMIT {limit}"
    )


def _read_telemetry(paths: StatePaths, data: DeviceData) -> None:
    """Telemetry through the running daemon's admin API, else from the file (read-only)."""
    from sre_agent.admin import admin_client

    client = admin_client(paths)
    if client is not None:  # the daemon holds the file: DuckDB lets no second process open it
        try:
            _read_with(_admin_query(client), paths, data, MAX_QUERY_ROWS)
        except SreError as exc:
            data.telemetry_note = f"telemetry unavailable from the running daemon: {exc.why or exc.message}"
            data.telemetry_failed = True
        finally:
            client.close()
        return
    db = paths.telemetry_db
    if not db.exists():
        data.telemetry_note = "no telemetry database yet"
        return
    from sre_agent.telemetry.store import open_readonly

    try:
        con = open_readonly(db)
    except SreError as exc:
        data.telemetry_note = f"telemetry unavailable: {exc.why or exc.message}"
        data.telemetry_failed = True
        return
    try:
        _read_with(lambda sql: con.execute(sql).fetchall(), paths, data, MAX_METRIC_ROWS)
    finally:
        con.close()


def _read_with(q: Query, paths: StatePaths, data: DeviceData, limit: int) -> None:
    try:
        rows = _metric_rows(q, limit)
        data.metrics = [(int(r[0]) / 1e6, str(r[1]), str(r[2]), float(r[3])) for r in rows]
        books = q("SELECT tbl, produced, uploaded, folded, dropped FROM books ORDER BY tbl")
        data.books = [
            {"table": b[0], "produced": b[1], "uploaded": b[2], "folded": b[3], "dropped": b[4]}
            for b in books
        ]
        ob = q("SELECT count(*) AS n, coalesce(sum(rows), 0) AS r, min(epoch_us(created)) AS t FROM outbox")[
            0
        ]
        kv_rows = q("SELECT v FROM kv WHERE k = 'last_ack_us'")
        kv = kv_rows[0] if kv_rows else None
    except SreError:
        raise
    except Exception as exc:  # an older or partial schema: show what we have
        data.telemetry_note = f"telemetry partly unreadable: {type(exc).__name__}: {exc}"[:300]
        data.telemetry_failed = True
        return
    data.slos = _slos(paths, ob, kv)


def _slos(paths: StatePaths, outbox: Any, kv: Any) -> list[dict[str, Any]]:
    from sre_agent.slo import evaluate_slos

    def us(v: Any) -> datetime | None:
        return datetime.fromtimestamp(int(v) / 1e6, UTC) if v is not None else None

    from deployment.policy_modules import active_policy_issued

    issued = active_policy_issued(paths)  # the active signed policy module (None: factory policy only)
    now = datetime.now(UTC)
    oldest = us(outbox[2]) if outbox and outbox[0] else None
    last_ack = us(kv[0]) if kv else None
    return [r.to_dict() for r in evaluate_slos(now, oldest, last_ack, issued)]


def collect_device(state: Path) -> DeviceData:
    """Read a device state directory into :class:`DeviceData` (read-only)."""
    paths = StatePaths(Path(state))
    if not paths.root.is_dir():
        from sre_core.errors import InputError

        raise InputError(f"report on {paths.root}", "no such state directory", "pass --state DIR")
    data = DeviceData(state=str(paths.root))
    ident = paths.root / "identity" / "device_id"
    if ident.exists():
        data.device_id = ident.read_text(encoding="utf-8").strip()
    data.audit, data.audit_intact = _read_audit(paths)
    _read_telemetry(paths, data)
    esc_dir = paths.root / "escalations"
    for p in sorted(esc_dir.glob("esc-*.json"))[:1000] if esc_dir.is_dir() else []:
        try:
            data.escalations.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    pk_dir = paths.run / "chaos" / "escalations"
    for p in sorted(pk_dir.glob("*.json"))[:1000] if pk_dir.is_dir() else []:
        try:
            data.chaos_packets.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    times = [record_time(r) for r in data.audit] + [m[0] for m in data.metrics]
    data.t0 = min(times) if times else None
    return data


# ------------------------------------------------------------------------------------------ sections


def _rel(data: DeviceData, t: float) -> float:
    return t - (data.t0 or t)


def _canary_section(data: DeviceData) -> str:
    return canary_plots(data.audit, data.t0)


def _series_label(series: str, keys: tuple[str, ...] = ("slot", "version")) -> str:
    kv = dict(p.split("=", 1) for p in series.split(",") if "=" in p)
    return " ".join(kv.get(k, "") for k in keys).strip() or series or "all"


def _serving_section(data: DeviceData) -> str:
    p95: dict[str, list[tuple[float, float]]] = defaultdict(list)
    counts: list[tuple[float, str, str, float]] = []
    for t, name, series, value in data.metrics:
        label = _series_label(series)
        x = _rel(data, t)
        if name == "serving.latency_p95_s":
            p95[label].append((x, value * 1000))
        elif name in ("serving.requests", "serving.errors"):
            counts.append((x, label, name.removeprefix("serving."), value))
    rate = error_rates(counts)
    note = f'<p class="empty">{html.escape(data.telemetry_note)}</p>' if data.telemetry_note else ""
    return (
        note
        + line_chart(p95, "inference latency p95 per slot and version", "ms")
        + line_chart(rate, "inference error rate per slot and version", "% of requests")
    )


def _uplink_section(data: DeviceData) -> str:
    backlog: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t, name, _series, value in data.metrics:
        if name in ("uplink.backlog_rows", "uplink.backlog_batches"):
            backlog[name.removeprefix("uplink.")].append((_rel(data, t), value))
    books = html_table(
        ("table", "produced", "uploaded", "folded", "dropped"),
        [(b["table"], b["produced"], b["uploaded"], b["folded"], b["dropped"]) for b in data.books],
    )
    return line_chart(backlog, "uplink backlog (outbox not yet acknowledged)", "count", step=True) + books


def _slo_section(data: DeviceData) -> str:
    bars = []
    rows = []
    for s in data.slos:
        v, obj = s.get("value"), float(s["objective"])
        share = (float(v) / obj * 100) if v is not None and obj else 0.0
        bars.append((str(s["name"]), share, "#2ca02c" if s["met"] else "#d62728"))
        rows.append(
            (s["name"], "-" if v is None else f"{float(v):.1f}", obj, "met" if s["met"] else "MISSED")
        )
    return bar_chart(bars, "drift SLOs: value as % of objective (green: met)", "% of objective") + html_table(
        ("SLO", "value", "objective", "status"), rows
    )


def _chaos_section(data: DeviceData) -> str:
    return chaos_plots(data.audit, data.t0)


def _escalation_section(data: DeviceData) -> str:
    rows = []
    status_counts: dict[str, int] = defaultdict(int)
    for e in data.escalations:
        c = e.get("content") or {}
        status = str(e.get("status", "?"))
        status_counts[status] += 1
        rows.append(
            (
                e.get("id"),
                status,
                c.get("what", "")[:80],
                c.get("proposed_action"),
                len(e.get("history") or []),
            )
        )
    for p in data.chaos_packets:
        status_counts["chaos packet"] += 1
        rows.append(
            (p.get("experiment_hash", "")[:23], "chaos packet", p.get("title") or p.get("kind"), "run?", 0)
        )
    bars = [(k, float(v), None) for k, v in sorted(status_counts.items())]
    return bar_chart(bars, "escalations by status", "count") + html_table(
        ("id", "status", "what", "proposed", "history"), rows
    )


def render_device(data: DeviceData) -> str:
    """The HTML page for :class:`DeviceData`."""
    intact = {True: "intact", False: "BROKEN", None: "absent"}[data.audit_intact]
    sub = (
        f"device {data.device_id or '?'} · state {data.state} · {len(data.audit)} audit records (chain "
        f"{intact}) · generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC} · "
        "times: seconds since the first record"
    )
    sections = [
        ("Canary: steps and gate figures over time", _canary_section(data)),
        ("Serving: latency and error rate per slot", _serving_section(data)),
        ("Uplink backlog and telemetry books", _uplink_section(data)),
        ("SLOs", _slo_section(data)),
        ("Chaos verdicts", _chaos_section(data)),
        ("Escalations", _escalation_section(data)),
    ]
    return page("sre-agent device report", sections, sub)


def write_device_report(state: Path, out: Path) -> Path:
    """Collect, render and write the report atomically; returns ``out``."""
    html = render_device(collect_device(state))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, html)
    return out
