"""Budget decisions as a pure function: table statistics + now + policy in, a :class:`Plan` out.

The store executes plans; this module does no I/O. Order of giving things up, per class:

- any class over budget first loses local copies of rows already sealed (they are in the outbox or at
  the hub, so nothing is lost);
- metrics: raw samples older than ``raw_max_age_s`` fold into 1-minute buckets, 1-minute rows older than
  ``minute_max_age_s`` fold into 1-hour buckets, 1-hour rows older than ``hour_max_age_s`` are dropped;
  over bytes, the tier holding the most bytes is tightened (fold sooner) before any 1-hour row goes;
- logs: past ``max_age_s`` dropped; over bytes, oldest debug first, then info, warning, error;
- events and records: past ``max_age_s`` or over bytes, oldest first;
- essential (audit, escalations, verification results): never dropped; over the reserve the store raises
  an incident and flags "stop non-essential work";
- outbox over bytes: oldest non-essential batches are evicted (their rows count as dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from policies.telemetry import TelemetryPolicy
from sre_agent.telemetry.schema import TABLES

__all__ = ["Fold", "Plan", "TableStats", "plan_enforcement"]

MINUTE_US = 60_000_000
HOUR_US = 3600 * 1_000_000
#: After trimming, aim this far under a budget so the next pass is not immediately over again.
HEADROOM = 0.8

# Derived from the schema, so a table added there is budgeted by its class without an edit here.
_RECORDS = tuple(n for n, t in TABLES.items() if t.cls == "records")
_ESSENTIAL = tuple(n for n, t in TABLES.items() if t.cls == "essential")


@dataclass(frozen=True)
class TableStats:
    """What the planner needs to know about one table."""

    name: str
    rows: int
    unsealed: int
    bytes: int
    min_us: int | None
    max_us: int | None


@dataclass(frozen=True)
class Fold:
    """Fold unsealed ``src`` rows with ts < ``cutoff_us`` into ``bucket`` rollups in ``dst``."""

    src: str
    dst: str
    cutoff_us: int
    bucket: str


@dataclass
class Plan:
    """Actions for one enforcement pass."""

    folds: list[Fold] = field(default_factory=list)
    drop_before: dict[str, int] = field(default_factory=dict)
    remove_sealed_before: dict[str, int] = field(default_factory=dict)
    drop_logs: int = 0
    evict_outbox_bytes: int = 0

    @property
    def empty(self) -> bool:
        return not (
            self.folds
            or self.drop_before
            or self.remove_sealed_before
            or self.drop_logs
            or self.evict_outbox_bytes
        )


def _floor(us: int, step: int) -> int:
    return us - us % step


def _older(s: TableStats, cut: int) -> bool:
    return s.min_us is not None and s.min_us < cut


def _tightened_cut(s: TableStats, now_us: int, keep: float, step: int) -> int | None:
    """A cutoff keeping roughly the newest ``keep`` share of ``s``'s time span."""
    if s.min_us is None or s.rows == 0:
        return None
    span = max(now_us - s.min_us, step)
    cut = _floor(now_us - int(span * keep), step)
    return cut if cut > s.min_us else _floor(s.min_us, step) + step


def plan_enforcement(stats: dict[str, TableStats], now_us: int, policy: TelemetryPolicy) -> Plan:
    """Decide one pass of folds and drops. Pure: no I/O, no clock."""
    plan = Plan()
    m = policy.metrics
    raw, mins, hours = stats["metrics"], stats["metrics_1m"], stats["metrics_1h"]

    # Age rules.
    raw_cut = _floor(now_us - int(m.raw_max_age_s * 1e6), MINUTE_US)
    min_cut = _floor(now_us - int(m.minute_max_age_s * 1e6), HOUR_US)
    hour_cut = now_us - int(m.hour_max_age_s * 1e6)
    if _older(raw, raw_cut):
        plan.folds.append(Fold("metrics", "metrics_1m", raw_cut, "minute"))
    if _older(mins, min_cut):
        plan.folds.append(Fold("metrics_1m", "metrics_1h", min_cut, "hour"))
    if _older(hours, hour_cut):
        plan.drop_before["metrics_1h"] = hour_cut
    age_rules = [("logs", policy.logs.max_age_s), ("events", policy.events.max_age_s)]
    age_rules += [(name, policy.records.max_age_s) for name in _RECORDS]
    for name, age in age_rules:
        cut = now_us - int(age * 1e6)
        if _older(stats[name], cut):
            plan.drop_before[name] = cut

    # Byte rules.
    metric_bytes = raw.bytes + mins.bytes + hours.bytes
    if metric_bytes > m.bytes:
        sealed = [s for s in (raw, mins, hours) if s.rows > s.unsealed]
        if sealed:
            for s in sealed:
                plan.remove_sealed_before[s.name] = now_us + 1
        else:
            keep = m.bytes * HEADROOM / metric_bytes
            biggest = max((raw, mins, hours), key=lambda s: s.bytes)
            if biggest is raw and (tc := _tightened_cut(raw, now_us, keep, MINUTE_US)) is not None:
                plan.folds.append(Fold("metrics", "metrics_1m", max(tc, raw_cut), "minute"))
            elif biggest is mins and (tc := _tightened_cut(mins, now_us, keep, HOUR_US)) is not None:
                plan.folds.append(Fold("metrics_1m", "metrics_1h", max(tc, min_cut), "hour"))
            elif (tc := _tightened_cut(hours, now_us, keep, HOUR_US)) is not None:
                plan.drop_before["metrics_1h"] = max(tc, plan.drop_before.get("metrics_1h", 0))

    logs = stats["logs"]
    if logs.bytes > policy.logs.bytes and logs.rows:
        if logs.rows > logs.unsealed:
            plan.remove_sealed_before["logs"] = now_us + 1
        else:
            plan.drop_logs = math.ceil(logs.rows * (1 - policy.logs.bytes * HEADROOM / logs.bytes))

    for names, budget in ((("events",), policy.events.bytes), (_RECORDS, policy.records.bytes)):
        used = sum(stats[n].bytes for n in names)
        if used <= budget:
            continue
        for n in names:
            s = stats[n]
            if s.rows > s.unsealed:
                plan.remove_sealed_before[n] = now_us + 1
            elif (tc := _tightened_cut(s, now_us, budget * HEADROOM / used, 1)) is not None:
                plan.drop_before[n] = max(tc, plan.drop_before.get(n, 0))

    essential = sum(stats[n].bytes for n in _ESSENTIAL)
    if essential > policy.essential.reserved_bytes:
        for n in _ESSENTIAL:
            if stats[n].rows > stats[n].unsealed:
                plan.remove_sealed_before[n] = now_us + 1

    outbox = stats["outbox"].bytes
    if outbox > policy.outbox.bytes:
        plan.evict_outbox_bytes = outbox - int(policy.outbox.bytes * HEADROOM)
    return plan
