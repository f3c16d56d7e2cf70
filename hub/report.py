"""The hub report: one self-contained HTML page with plots, from a hub repository and its fleet lake.

``sre-hub report --repo DIR --html OUT``. Read-only. Sources: the signed desired states (releases, via
:func:`hub.dora.publications`), the fleet lake under ``<repo>/fleet/lake`` (what devices uploaded:
``audit`` for canary steps, gates and chaos verdicts, ``metrics`` for serving latency and error rate per
version and the devices' uplink backlog), the ingest receipts (when batches arrived: the hub's view of
each device's sync SLO), escalations with their signed decisions, and DORA figures
(:func:`hub.dora.compute_dora`).

Plots are inline SVG from :mod:`sre_core.svg` (nothing external; see there for why hand-written).

Public API::

    collect_hub(repo) -> HubData
    render_hub(data) -> str
    write_hub_report(repo, out) -> Path
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sre_core.atomic import atomic_write_text
from sre_core.audit_plots import canary_plots, chaos_plots, error_rates, record_time
from sre_core.errors import InputError
from sre_core.svg import bar_chart, html_table, line_chart, page

__all__ = ["SYNC_OBJECTIVE_S", "HubData", "collect_hub", "render_hub", "write_hub_report"]

MAX_ROWS = 500_000
MAX_RECEIPTS = 100_000
SYNC_OBJECTIVE_S = 2 * 86400.0
"""The hub's sync SLO per device: some batch received within this long (the device-side default)."""


@dataclass
class HubData:
    """What the page shows."""

    repo: str
    t0: float | None = None
    now: float = 0.0
    publications: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[tuple[float, str, str, str, float]] = field(default_factory=list)
    receipts: list[dict[str, Any]] = field(default_factory=list)
    escalations: list[dict[str, Any]] = field(default_factory=list)
    dora: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _lake_rows(lake: Path, table: str, sql_tail: str, cols: str) -> list[tuple[Any, ...]]:
    d = lake / f"table={table}"
    if not d.is_dir() or not any(d.glob("*/*.parquet")):
        return []
    import duckdb

    glob = str(d / "*" / "*.parquet").replace("'", "''")
    con = duckdb.connect()
    try:
        return con.execute(
            f"SELECT {cols} FROM read_parquet('{glob}', hive_partitioning = true, "  # noqa: S608
            f"union_by_name = true) {sql_tail} LIMIT ?",
            [MAX_ROWS],
        ).fetchall()
    finally:
        con.close()


def collect_hub(repo: Path) -> HubData:
    """Read a hub repository (and its fleet lake) into :class:`HubData`.

    Raises:
        InputError: ``repo`` is not a hub repository.
    """
    repo = Path(repo)
    if not (repo / "repo.json").is_file():
        raise InputError(f"report on {repo}", "not a hub repository (no repo.json)", "pass --repo DIR")
    from hub.repository import HubRepository

    data = HubData(repo=str(repo), now=datetime.now(UTC).timestamp())
    hub = HubRepository(repo)
    try:
        from hub.dora import compute_dora, publications
        from hub.rollouts import ReportStore

        data.publications = [
            {"channel": p.channel, "module": p.module, "version": p.version, "issued": p.issued.timestamp()}
            for p in publications(hub)
        ]
        data.dora = compute_dora(hub, ReportStore(repo / "fleet")).to_dict()
    except Exception as exc:  # DORA needs the rollout modules; the rest of the page does not
        data.notes.append(f"DORA figures unavailable: {type(exc).__name__}: {exc}"[:300])
    fleet = repo / "fleet"
    try:
        from hub.fleetdb import FleetDB

        fdb = FleetDB(fleet)
        data.devices = [d.to_dict() for d in fdb.devices()]
        for r in fdb.receipts(MAX_RECEIPTS):
            r["received_s"] = datetime.fromisoformat(str(r["received"])).timestamp()
            data.receipts.append(r)
    except Exception as exc:
        data.notes.append(f"hub store unreadable: {type(exc).__name__}: {exc}"[:300])
    lake = fleet / "lake"
    try:
        for ts, event, dev, d in _lake_rows(
            lake,
            "audit",
            "WHERE event LIKE 'canary.%' OR event LIKE 'chaos.%' OR event LIKE 'escalation.%' ORDER BY ts",
            "epoch_us(ts), event, device_id, data",
        ):
            when = datetime.fromtimestamp(int(ts) / 1e6, UTC)
            data.audit.append({"ts": when, "event": event, "device_id": dev, "data": d})
        data.metrics = [
            (int(ts) / 1e6, str(dev), str(name), str(series), float(v))
            for ts, dev, name, series, v in _lake_rows(
                lake,
                "metrics",
                "WHERE name LIKE 'serving.%' OR name LIKE 'uplink.backlog%' ORDER BY ts",
                "epoch_us(ts), device_id, name, series, value",
            )
        ]
    except Exception as exc:
        data.notes.append(f"fleet lake partly unreadable: {type(exc).__name__}: {exc}"[:300])
    try:
        from hub.operators import HubEscalations

        data.escalations = list(HubEscalations(repo).load().values())
    except Exception as exc:
        data.notes.append(f"escalations unreadable: {type(exc).__name__}: {exc}"[:300])
    times = (
        [p["issued"] for p in data.publications]
        + [record_time(r) for r in data.audit]
        + [m[0] for m in data.metrics]
        + [r["received_s"] for r in data.receipts]
    )
    data.t0 = min(times) if times else None
    return data


def _rel(data: HubData, t: float) -> float:
    return t - (data.t0 or t)


def _releases(data: HubData) -> str:
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for p in sorted(data.publications, key=lambda p: p["issued"]):
        key = f"{p['channel']}/{p['module']}"
        series[key].append((_rel(data, p["issued"]), float(len(series[key]) + 1)))
    rows = [
        (p["channel"], p["module"], p["version"], f"{_rel(data, p['issued']):.1f}") for p in data.publications
    ]
    return line_chart(
        series, "versions released (signed desired states)", "versions", step=True
    ) + html_table(("channel", "module", "version", "t (s)"), rows)


def _label(dev: str, series: str) -> str:
    kv = dict(p.split("=", 1) for p in series.split(",") if "=" in p)
    return f"{dev[-6:]} {kv.get('version', '')} {kv.get('slot', '')}".strip()


def _serving(data: HubData) -> str:
    p95: dict[str, list[tuple[float, float]]] = defaultdict(list)
    counts: list[tuple[float, str, str, float]] = []
    for t, dev, name, series, v in data.metrics:
        x, label = _rel(data, t), _label(dev, series)
        if name == "serving.latency_p95_s":
            p95[label].append((x, v * 1000))
        elif name in ("serving.requests", "serving.errors"):
            counts.append((x, label, name.removeprefix("serving."), v))
    rate = error_rates(counts)
    return line_chart(p95, "fleet inference latency p95 per device, version and slot", "ms") + line_chart(
        rate, "fleet inference error rate per device, version and slot", "% of requests"
    )


def _uplink(data: HubData) -> str:
    backlog: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t, dev, name, _series, v in data.metrics:
        if name == "uplink.backlog_rows":
            backlog[f"{dev[-6:]} backlog rows"].append((_rel(data, t), v))
    arrived: dict[str, list[tuple[float, float]]] = defaultdict(list)
    totals: dict[str, float] = defaultdict(float)
    for r in sorted(data.receipts, key=lambda r: r["received_s"]):
        dev = str(r.get("device_id", "?"))
        totals[dev] += float(r.get("rows") or 0)
        arrived[f"{dev[-6:]} rows received"].append((_rel(data, r["received_s"]), totals[dev]))
    return line_chart(
        backlog, "device uplink backlog (as reported once the link was back)", "rows", step=True
    ) + line_chart(arrived, "telemetry rows received at the hub (cumulative)", "rows", step=True)


def _slos(data: HubData) -> str:
    last: dict[str, float] = {}
    for r in data.receipts:
        dev = str(r.get("device_id", "?"))
        last[dev] = max(last.get(dev, 0.0), r["received_s"])
    for d in data.devices:
        last.setdefault(str(d.get("device_id", "?")), 0.0)
    bars, rows = [], []
    for dev, t in sorted(last.items()):
        age = data.now - t if t else None
        met = age is not None and age <= SYNC_OBJECTIVE_S
        share = (age / SYNC_OBJECTIVE_S * 100) if age is not None else 100.0
        bars.append((dev[-12:], share, "#2ca02c" if met else "#d62728"))
        rows.append(
            (
                dev,
                "never" if age is None else f"{age:.0f}",
                f"{SYNC_OBJECTIVE_S:.0f}",
                "met" if met else "MISSED",
            )
        )
    return bar_chart(
        bars, "sync SLO: time since last batch, % of objective (green: met)", "% of objective"
    ) + (html_table(("device", "seconds since last batch", "objective (s)", "status"), rows))


def _escalations(data: HubData) -> str:
    counts: dict[str, int] = defaultdict(int)
    rows = []
    for e in data.escalations:
        c = e.get("content") or {}
        decided = ", ".join(e.get("hub_decisions") or []) or "-"
        status = str(e.get("status", "?"))
        counts[status if decided == "-" else f"{status} (signed at hub)"] += 1
        rows.append(
            (
                e.get("id"),
                e.get("device_id"),
                status,
                str(c.get("what", ""))[:80],
                c.get("proposed_action"),
                decided,
            )
        )
    return bar_chart(
        [(k, float(v), None) for k, v in sorted(counts.items())], "escalations", "count"
    ) + html_table(("id", "device", "status (last upload)", "what", "proposed", "hub decisions"), rows)


def _dora(data: HubData) -> str:
    if not data.dora:
        return '<p class="empty">' + html.escape("; ".join(data.notes)) + "</p>"
    rows = [(k, json.dumps(v, default=str)) for k, v in data.dora.items() if k != "per_release"]
    per = data.dora.get("per_release") or []
    return html_table(("figure", "value"), rows) + html_table(
        ("channel", "module", "version", "exposed", "failed", "committed"),
        [
            (
                p.get("channel"),
                p.get("module"),
                p.get("version"),
                p.get("exposed"),
                p.get("failed"),
                p.get("committed"),
            )
            for p in per
        ],
    )


def render_hub(data: HubData) -> str:
    """The HTML page for :class:`HubData`."""
    sub = (
        f"hub {data.repo} · {len(data.devices)} enrolled device(s) · {len(data.receipts)} batches received · "
        f"generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC} · times: seconds since the first record"
    )
    if data.notes:
        sub += " · notes: " + "; ".join(data.notes)
    sections = [
        ("Releases", _releases(data)),
        (
            "Canaries across the fleet: steps and gate figures",
            canary_plots(data.audit, data.t0, label_device=True),
        ),
        ("Serving across the fleet: latency and error rate per slot", _serving(data)),
        ("Uplink: backlog and arrivals", _uplink(data)),
        ("SLOs", _slos(data)),
        ("Chaos verdicts", chaos_plots(data.audit, data.t0)),
        ("Escalations", _escalations(data)),
        ("DORA", _dora(data)),
    ]
    return page("sre-hub fleet report", sections, sub)


def write_hub_report(repo: Path, out: Path) -> Path:
    """Collect, render and write the report atomically; returns ``out``."""
    html = render_hub(collect_hub(repo))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, html)
    return out
