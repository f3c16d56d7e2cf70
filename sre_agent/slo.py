"""Drift SLOs evaluated on the device: how far it has drifted from the fleet while on its own.

- time since last sync: the age of the oldest unacknowledged outbox entry, and the time since the hub
  last acknowledged anything;
- age of the policy module (since it was issued);
- model output divergence from the fleet baseline shipped with the module (Jensen-Shannon distance,
  base 2, between observed and baseline class shares).

Pure functions: values in, verdicts out. The agent reports them as metrics (``slo.*``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sre_core.telemetry import TelemetrySink

__all__ = ["SloResult", "SloTargets", "evaluate_slos", "js_distance", "report_slos"]


@dataclass(frozen=True)
class SloTargets:
    """Objectives (defaults suit a device that syncs at least daily)."""

    max_unacked_age_s: float = 2 * 86400.0
    max_since_ack_s: float = 2 * 86400.0
    max_policy_age_s: float = 30 * 86400.0
    max_divergence: float = 0.1


@dataclass(frozen=True)
class SloResult:
    """One SLO: its value (None = no data) and whether it is met."""

    name: str
    value: float | None
    objective: float
    met: bool

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "value": self.value, "objective": self.objective, "met": self.met}


def js_distance(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two share maps (normalised here)."""
    keys = set(p) | set(q)
    sp, sq = sum(max(v, 0.0) for v in p.values()), sum(max(v, 0.0) for v in q.values())
    if sp <= 0 or sq <= 0:
        return 1.0 if (sp > 0) != (sq > 0) else 0.0
    div = 0.0
    for k in keys:
        a, b = max(p.get(k, 0.0), 0.0) / sp, max(q.get(k, 0.0), 0.0) / sq
        m = (a + b) / 2
        if a > 0:
            div += 0.5 * a * math.log2(a / m)
        if b > 0:
            div += 0.5 * b * math.log2(b / m)
    return math.sqrt(max(div, 0.0))


def evaluate_slos(
    now: datetime,
    oldest_unacked: datetime | None,
    last_ack: datetime | None,
    policy_issued: datetime | None,
    observed_shares: Mapping[str, float] | None = None,
    baseline_shares: Mapping[str, float] | None = None,
    targets: SloTargets | None = None,
) -> list[SloResult]:
    """Evaluate the drift SLOs. A missing input gives value None; "never acked" is not met."""
    t = targets or SloTargets()
    out: list[SloResult] = []
    unacked = (now - oldest_unacked).total_seconds() if oldest_unacked else 0.0
    out.append(
        SloResult("sync.oldest_unacked_age_s", unacked, t.max_unacked_age_s, unacked <= t.max_unacked_age_s)
    )
    since = (now - last_ack).total_seconds() if last_ack else None
    out.append(
        SloResult(
            "sync.since_last_ack_s",
            since,
            t.max_since_ack_s,
            since is not None and since <= t.max_since_ack_s,
        )
    )
    age = (now - policy_issued).total_seconds() if policy_issued else None
    out.append(
        SloResult("policy.age_s", age, t.max_policy_age_s, age is not None and age <= t.max_policy_age_s)
    )
    if observed_shares is not None and baseline_shares:
        d = js_distance(observed_shares, baseline_shares)
        out.append(SloResult("model.divergence_js", d, t.max_divergence, d <= t.max_divergence))
    return out


def report_slos(sink: TelemetrySink, results: list[SloResult], now: datetime) -> None:
    """Write each SLO as metrics ``slo.<name>`` (value) and ``slo.<name>.met`` (1/0)."""
    for r in results:
        if r.value is not None:
            sink.metric(f"slo.{r.name}", r.value, ts=now)
        sink.metric(f"slo.{r.name}.met", 1.0 if r.met else 0.0, ts=now)
