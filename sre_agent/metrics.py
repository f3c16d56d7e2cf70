"""The device's ``/metrics`` (OpenMetrics): jobs, serving, canaries, verification, uplink backlog.

Everything is read at scrape time from the running daemon's own objects, given as callables (each may
be None when that part does not run); nothing is counted twice or kept in globals. Served on the admin
API and on the serving port (so Prometheus can scrape ``http://<serving host:port>/metrics``).

Families (all prefixed ``sre_agent_``): ``job_runs``/``job_failures`` (counters, per job),
``serving_requests``/``serving_errors`` (counters, per model and version), ``canary_weight``,
``canary_step``, ``canary_samples`` and ``canary_phase`` (per module), ``verification_check`` (1 per
check and latest status), ``uplink_backlog_batches``/``_bytes``/``_unsealed_rows``,
``uplink_oldest_unacked_seconds``, ``uplink_since_last_ack_seconds``, ``telemetry_rows`` (counter per
table and outcome: produced, uploaded, folded, dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sre_core.paths import StatePaths

__all__ = ["DeviceMetricSources", "device_metrics"]

_log = logging.getLogger(__name__)

VERIFICATION_SQL = (
    "SELECT json_extract_string(body, '$.check') AS check_name, "
    "json_extract_string(body, '$.status') AS status "
    "FROM verification_results QUALIFY row_number() OVER "
    "(PARTITION BY json_extract_string(body, '$.check') ORDER BY ts DESC) = 1"
)


@dataclass
class DeviceMetricSources:
    """Where each family comes from; None leaves that family out."""

    paths: StatePaths
    jobs: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None
    routers: Callable[[], Mapping[str, Any]] | None = None
    telemetry_status: Callable[[], Mapping[str, Any]] | None = None
    query: Callable[[str], list[tuple[Any, ...]]] | None = None


def _safe(part: str, fn: Callable[[], Iterable[Metric]]) -> list[Metric]:
    """One part failing (e.g. telemetry not open yet) leaves the others in the scrape."""
    try:
        return list(fn())
    except Exception:
        _log.warning("metrics: %s unavailable", part, exc_info=True)
        return []


def device_metrics(src: DeviceMetricSources) -> list[Metric]:
    """Every family the sources can give now."""
    out: list[Metric] = []
    if src.jobs is not None:
        out += _safe("jobs", lambda: _jobs(src.jobs() if src.jobs else {}))
    if src.routers is not None:
        out += _safe("serving", lambda: _serving(src.routers() if src.routers else {}))
    out += _safe("canary", lambda: _canaries(src.paths))
    if src.query is not None:
        q = src.query
        out += _safe("verification", lambda: _verification(q(VERIFICATION_SQL)))
    if src.telemetry_status is not None:
        out += _safe("uplink", lambda: _uplink(src.telemetry_status() if src.telemetry_status else {}))
    return out


def _jobs(jobs: Mapping[str, Mapping[str, Any]]) -> Iterable[Metric]:
    runs = CounterMetricFamily("sre_agent_job_runs", "Successful runs of a daemon job.", labels=["job"])
    fails = CounterMetricFamily("sre_agent_job_failures", "Failed runs of a daemon job.", labels=["job"])
    for name, st in sorted(jobs.items()):
        runs.add_metric([name], float(st.get("runs", 0)))
        fails.add_metric([name], float(st.get("failures", 0)))
    return [runs, fails]


def _serving(routers: Mapping[str, Any]) -> Iterable[Metric]:
    req = CounterMetricFamily(
        "sre_agent_serving_requests", "Inference requests answered.", labels=["model", "version"]
    )
    err = CounterMetricFamily(
        "sre_agent_serving_errors", "Inference requests that failed.", labels=["model", "version"]
    )
    for name, router in sorted(routers.items()):
        snap = router.snapshot()
        for version in sorted(set(snap.versions) | set(snap.pinned)):
            st = snap.served(version)
            req.add_metric([name, version], float(st.requests))
            err.add_metric([name, version], float(st.errors))
    return [req, err]


def _canaries(paths: StatePaths) -> Iterable[Metric]:
    from deployment.serving import canary_progress

    labels = ["module", "candidate"]
    weight = GaugeMetricFamily(
        "sre_agent_canary_weight", "Share of traffic on the canary (0..1).", labels=labels
    )
    step = GaugeMetricFamily("sre_agent_canary_step", "Current canary step (1-based).", labels=labels)
    samples = GaugeMetricFamily("sre_agent_canary_samples", "Samples in the current step.", labels=labels)
    phase = GaugeMetricFamily(
        "sre_agent_canary_phase", "1 for the canary's current phase.", labels=[*labels, "phase"]
    )
    for p in canary_progress(paths):
        key = [str(p.get("module", "")), str(p.get("candidate", ""))]
        weight.add_metric(key, float(p.get("weight") or 0.0))
        step.add_metric(key, float(p.get("step") or 0))
        samples.add_metric(key, float(p.get("samples") or 0))
        phase.add_metric([*key, str(p.get("phase", ""))], 1.0)
    return [weight, step, samples, phase]


def _verification(rows: list[tuple[Any, ...]]) -> Iterable[Metric]:
    fam = GaugeMetricFamily(
        "sre_agent_verification_check", "1 for each check's latest status.", labels=["check", "status"]
    )
    for check, status in sorted((str(r[0]), str(r[1])) for r in rows if r[0] is not None):
        fam.add_metric([check, status], 1.0)
    return [fam]


def _uplink(info: Mapping[str, Any]) -> Iterable[Metric]:
    b = info.get("backlog", {})
    out: list[Metric] = []
    for key, name, doc in (
        ("outbox_batches", "sre_agent_uplink_backlog_batches", "Sealed batches waiting for the hub."),
        ("outbox_bytes", "sre_agent_uplink_backlog_bytes", "Bytes of sealed batches waiting for the hub."),
        ("unsealed_rows", "sre_agent_uplink_unsealed_rows", "Rows not yet sealed into a batch."),
        (
            "oldest_unacked_age_s",
            "sre_agent_uplink_oldest_unacked_seconds",
            "Age of the oldest unacked batch.",
        ),
        ("since_last_ack_s", "sre_agent_uplink_since_last_ack_seconds", "Seconds since the hub last acked."),
    ):
        value = b.get(key)
        if value is not None:
            out.append(GaugeMetricFamily(name, doc, value=float(value)))
    rows = CounterMetricFamily(
        "sre_agent_telemetry_rows", "Telemetry rows by table and outcome.", labels=["table", "outcome"]
    )
    for table, t in sorted(info.get("tables", {}).items()):
        for outcome in ("produced", "uploaded", "folded", "dropped"):
            if t.get(outcome) is not None:
                rows.add_metric([table, outcome], float(t[outcome]))
    out.append(rows)
    return out
