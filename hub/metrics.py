"""The hub's ``/metrics`` (OpenMetrics): rollouts, the fleet's reported serving state, uplink arrivals.

Read at scrape time from the hub's own services. Families (prefixed ``sre_hub_``):
``rollout_info`` (1 per channel's current rollout, labelled with module, version and state),
``rollout_percent``, ``rollout_wave``, ``rollout_failed_devices``; ``devices`` (enrolled, revoked);
``device_module_version`` (devices reporting each module version: what the fleet serves),
``device_module_phase`` (devices per module and reported phase, e.g. canary, committed, rolled-back),
``devices_safe_mode``, ``device_open_escalations``; ``uplink_batches_landed`` and
``uplink_rows_landed`` (counters of telemetry batches the hub acknowledged).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["hub_metrics"]

_log = logging.getLogger(__name__)


def _safe(part: str, fn: Callable[[], Iterable[Metric]]) -> list[Metric]:
    try:
        return list(fn())
    except Exception:
        _log.warning("metrics: %s unavailable", part, exc_info=True)
        return []


def hub_metrics(service: Any, fleet: Any) -> list[Metric]:
    """Every family: ``service`` is the hub's RolloutService, ``fleet`` its FleetDB."""
    return [
        *_safe("rollouts", lambda: _rollouts(service)),
        *_safe("reports", lambda: _reports(service.reports.all())),
        *_safe("devices", lambda: _devices(fleet.devices())),
        *_safe("uplink", lambda: _uplink(fleet.receipts())),
    ]


def _rollouts(service: Any) -> Iterable[Metric]:
    info = GaugeMetricFamily(
        "sre_hub_rollout_info",
        "1 per channel's current rollout.",
        labels=["channel", "module", "version", "state"],
    )
    percent = GaugeMetricFamily(
        "sre_hub_rollout_percent", "Cumulative fleet share of the open wave.", labels=["channel"]
    )
    wave = GaugeMetricFamily("sre_hub_rollout_wave", "Index of the open wave (0-based).", labels=["channel"])
    failed = GaugeMetricFamily(
        "sre_hub_rollout_failed_devices", "Devices that failed the rollout (open: not acknowledged).",
        labels=["channel", "acknowledged"],
    )  # fmt: skip
    for channel in sorted(service.repo.channels):
        r = service.current(channel)
        if r is None:
            continue
        info.add_metric([channel, r.spec.module, r.spec.version, r.state], 1.0)
        percent.add_metric([channel], float(r.percent))
        wave.add_metric([channel], float(r.wave))
        failed.add_metric([channel, "no"], float(len(r.open_failures)))
        failed.add_metric([channel, "yes"], float(len(set(r.failed) & set(r.acked))))
    return [info, percent, wave, failed]


def _reports(reports: dict[str, dict[str, Any]]) -> Iterable[Metric]:
    versions: Counter[tuple[str, str, str]] = Counter()
    phases: Counter[tuple[str, str, str]] = Counter()
    safe: Counter[str] = Counter()
    escalations: Counter[str] = Counter()
    for rep in reports.values():
        ch = str(rep.get("channel", ""))
        for module, facts in (rep.get("modules") or {}).items():
            if facts.get("version"):
                versions[(ch, module, str(facts["version"]))] += 1
            if facts.get("phase"):
                phases[(ch, module, str(facts["phase"]))] += 1
        safe[ch] += 1 if rep.get("safe_mode") else 0
        escalations[ch] += int(rep.get("open_escalations") or 0)
    v = GaugeMetricFamily(
        "sre_hub_device_module_version",
        "Devices reporting this module version.",
        labels=["channel", "module", "version"],
    )
    for key, n in sorted(versions.items()):
        v.add_metric(list(key), float(n))
    p = GaugeMetricFamily(
        "sre_hub_device_module_phase",
        "Devices per module and reported phase.",
        labels=["channel", "module", "phase"],
    )
    for key, n in sorted(phases.items()):
        p.add_metric(list(key), float(n))
    s = GaugeMetricFamily("sre_hub_devices_safe_mode", "Devices reporting safe mode.", labels=["channel"])
    e = GaugeMetricFamily(
        "sre_hub_device_open_escalations", "Open escalations devices report.", labels=["channel"]
    )
    for ch in sorted(safe):
        s.add_metric([ch], float(safe[ch]))
        e.add_metric([ch], float(escalations[ch]))
    return [v, p, s, e]


def _devices(devices: list[Any]) -> Iterable[Metric]:
    fam = GaugeMetricFamily("sre_hub_devices", "Enrolled devices.", labels=["revoked"])
    revoked = sum(1 for d in devices if getattr(d, "revoked", False))
    fam.add_metric(["no"], float(len(devices) - revoked))
    fam.add_metric(["yes"], float(revoked))
    return [fam]


def _uplink(receipts: list[dict[str, Any]]) -> Iterable[Metric]:
    batches = CounterMetricFamily("sre_hub_uplink_batches_landed", "Telemetry batches acknowledged.")
    rows = CounterMetricFamily("sre_hub_uplink_rows_landed", "Telemetry rows in acknowledged batches.")
    batches.add_metric([], float(len(receipts)))
    rows.add_metric([], float(sum(int(r.get("rows") or 0) for r in receipts)))
    return [batches, rows]
