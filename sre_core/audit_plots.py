"""Plots of audit-trail records (canary steps and gates, chaos verdicts), shared by the device and hub
reports. Records are audit dicts (``ts``, ``event``, ``data``; the hub's lake adds ``device_id``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sre_core.svg import bar_chart, html_table, line_chart

__all__ = ["VERDICT_COLOR", "canary_plots", "chaos_plots", "error_rates", "record_data", "record_time"]

VERDICT_COLOR = {"run": "#2ca02c", "passed": "#2ca02c", "escalate": "#ff7f0e", "reject": "#d62728"}


def error_rates(
    samples: Sequence[tuple[float, str, str, float]],
) -> dict[str, list[tuple[float, float]]]:
    """Error rate (%) per label from time-ordered ``(x, label, "requests"|"errors", value)`` samples.

    The router writes a ``serving.requests`` and then a ``serving.errors`` sample per flush, each with
    its own timestamp: an errors sample pairs with the latest unpaired requests sample of its label.
    """
    pending: dict[str, tuple[float, float]] = {}
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for x, label, kind, value in sorted(samples, key=lambda s: s[0]):
        if kind == "requests":
            pending[label] = (x, value)
        elif kind == "errors" and label in pending:
            x0, n = pending.pop(label)
            if n > 0:
                out[label].append((x0, value / n * 100))
    return out


def record_time(r: Mapping[str, Any]) -> float:
    """The record's ``ts`` as POSIX seconds."""
    v = r["ts"]
    return v.timestamp() if isinstance(v, datetime) else datetime.fromisoformat(str(v)).timestamp()


def record_data(r: Mapping[str, Any]) -> dict[str, Any]:
    """The record's ``data`` (a JSON string in the lake, a dict in ``audit.jsonl``)."""
    d = r.get("data")
    if isinstance(d, str):
        try:
            d = json.loads(d)
        except ValueError:
            return {}
    return dict(d) if isinstance(d, dict) else {}


def canary_plots(records: Sequence[Mapping[str, Any]], t0: float | None, label_device: bool = False) -> str:
    """Canary weight per step and the error-rate / latency gate figures over time, plus a table."""
    weights: dict[str, list[tuple[float, float]]] = defaultdict(list)
    err: dict[str, list[tuple[float, float]]] = defaultdict(list)
    lat: dict[str, list[tuple[float, float]]] = defaultdict(list)
    rows = []
    for r in records:
        ev = str(r["event"])
        if not ev.startswith("canary."):
            continue
        d = record_data(r)
        v = str(d.get("version") or "?")
        if label_device and r.get("device_id"):
            v = f"{str(r['device_id'])[-6:]} {v}"
        t = record_time(r) - (t0 or 0.0)
        if ev in ("canary.step", "canary.promoted", "canary.gate_failed", "canary.aborted"):
            if "weight" in d:
                weights[f"{v} weight %"].append((t, float(d["weight"]) * 100))
            elif ev == "canary.aborted":
                weights[f"{v} weight %"].append((t, 0.0))
            for g in d.get("gates") or []:
                if g.get("gate") == "error_rate" and "canary_rate" in g:
                    err[f"{v} canary"].append((t, float(g["canary_rate"]) * 100))
                    err[f"{v} incumbent"].append((t, float(g.get("incumbent_rate") or 0) * 100))
                if g.get("gate") == "latency" and "canary_p95_s" in g:
                    lat[f"{v} canary"].append((t, float(g["canary_p95_s"]) * 1000))
                    lat[f"{v} incumbent"].append((t, float(g.get("incumbent_p95_s") or 0) * 1000))
        if ev in ("canary.started", "canary.promoted", "canary.aborted", "canary.gate_failed"):
            rows.append((f"{t:.1f}", ev, v, d.get("reason") or d.get("incumbent") or ""))
    return (
        line_chart(weights, "canary weight per step", "% of requests", step=True)
        + line_chart(err, "error-rate gate: canary vs incumbent", "error rate %")
        + line_chart(lat, "latency gate: p95 canary vs incumbent", "ms")
        + html_table(("t (s)", "event", "version", "detail"), rows)
    )


def chaos_plots(records: Sequence[Mapping[str, Any]], t0: float | None) -> str:
    """Counts of pre-flight and run verdicts, plus a table of each."""
    counts: dict[str, int] = defaultdict(int)
    rows = []
    for r in records:
        d = record_data(r)
        if r["event"] == "chaos.preflight":
            counts[f"pre-flight {d.get('verdict')}"] += 1
            rows.append(
                (f"{record_time(r) - (t0 or 0.0):.1f}", Path(str(d.get("file", ""))).name, "pre-flight",
                 d.get("verdict"), ", ".join(d.get("rules") or []))
            )  # fmt: skip
        elif r["event"] == "chaos.run.finished":
            counts[f"run {d.get('verdict')}"] += 1
            rows.append(
                (f"{record_time(r) - (t0 or 0.0):.1f}", str(d.get("run_id", "")), "run", d.get("verdict"),
                 "; ".join(str(x) for x in d.get("reasons") or []))
            )  # fmt: skip
    bars = [(k, float(v), VERDICT_COLOR.get(k.split()[-1])) for k, v in sorted(counts.items())]
    return bar_chart(bars, "chaos verdicts", "experiments") + html_table(
        ("t (s)", "experiment", "stage", "verdict", "rules / reasons"), rows
    )
