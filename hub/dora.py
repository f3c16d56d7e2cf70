"""DORA metrics for the sovereign edge, from signed publications and what devices report.

Public API::

    publications(repo) -> list[Publication]       (channel, module, version, issued) first signed
    compute_dora(repo, reports, window_days=30, now=None) -> DoraReport   .to_dict()

Definitions (each from evidence the hub holds, not from hub-side guesses):

- Deployment frequency: module versions that first appeared in a channel's *signed* desired state
  (as the baseline or as a rollout candidate), per day over the window. The hub keeps every signed
  desired state (consistent snapshots), so the history is the signed record itself.
- Lead time: publication (the desired state's ``issued``) -> the device committed the version (device
  ledger). The part the device was disconnected is reported separately (``link_gap_s``, measured by the
  device: time since its previous successful sync, capped at the time since publication), so a fleet on
  a 20 % link is not blamed for the link.
- Change failure rate: devices whose local health gate rolled the version back / devices exposed to it
  (installed it), plus the share of releases that failed: at least one such device, or a rollout of it
  halted, aborted (canary abort at fleet level) or reverted, or a recall withdrew it.
- MTTR: the device's local flip time from the failed version back to the previous one (from its
  audit trail); recovery does not wait for the hub.
- Time to restore: from a release's failure at the hub (rollout halted, aborted or reverted, or a recall;
  the earliest in the window) until every affected device (one serving the version at that moment)
  stopped serving it (the ledger's ``left_at``), per failed release; devices still on it are counted
  as ``unrestored`` and keep that release's restore open (not in the summary).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from deployment.manifest import DesiredState
from deployment.rollout import rollout_of
from hub.repository import DESIRED_STATE, HubRepository
from hub.rollouts import ReportStore

__all__ = ["DoraReport", "Publication", "compute_dora", "publications"]


Key = tuple[str, str, str]
_FAILED = {"fail_limit": "halted", "abort_keep": "aborted", "abort_revert": "reverted"}


@dataclass(frozen=True)
class Publication:
    channel: str
    module: str
    version: str
    issued: datetime
    serial: int


def publications(repo: HubRepository) -> list[Publication]:
    """First signed appearance of each (channel, module, version), oldest first."""
    first: dict[tuple[str, str, str], Publication] = {}
    for ch in repo.channels:
        d = repo.targets_dir / ch
        if not d.is_dir():
            continue
        docs = []
        for p in d.glob(f"*.{DESIRED_STATE}"):
            try:
                docs.append(DesiredState.model_validate_json(p.read_bytes()))
            except ValueError:
                continue
        for ds in sorted(docs, key=lambda x: x.serial):
            seen = [(m, dm.version) for m, dm in ds.modules.items()]
            ro = rollout_of(ds)
            if ro is not None:
                seen.append((ro.module, ro.version))
            for m, v in seen:
                first.setdefault((ch, m, v), Publication(ch, m, v, ds.issued, ds.serial))
    return sorted(first.values(), key=lambda p: p.issued)


def _when(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class DoraReport:
    window_days: int
    deployments: int
    deployment_frequency_per_day: float
    lead_time_s: dict[str, float | None] = field(default_factory=dict)
    lead_time_connected_s: dict[str, float | None] = field(default_factory=dict)
    disconnected_s: dict[str, float | None] = field(default_factory=dict)
    device_deployments: int = 0
    exposures: int = 0
    failures: int = 0
    change_failure_rate: float | None = None
    releases_with_failures: int = 0
    release_failure_rate: float | None = None
    mttr_ms: dict[str, float | None] = field(default_factory=dict)
    time_to_restore_s: dict[str, float | None] = field(default_factory=dict)
    unrestored_devices: int = 0
    per_release: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _summary(values: list[float]) -> dict[str, float | None]:
    return {
        "n": float(len(values)),
        "median": statistics.median(values) if values else None,
        "p90": _pct(values, 0.9),
        "max": max(values) if values else None,
    }


def _hub_failures(
    repo: HubRepository, reports: ReportStore, since: datetime
) -> tuple[dict[Key, set[str]], dict[Key, datetime]]:
    """Releases the hub itself saw fail (a canary/rollout halted, aborted or reverted, or recalled),
    and when each first failed (where the hub recorded the time)."""
    import json

    from sqlalchemy import select

    from hub.rollouts import Rollout
    from hub.store._schema import recalls as recalls_t
    from hub.store._schema import rollouts as rollouts_t

    out: dict[Key, set[str]] = {}
    first: dict[Key, datetime] = {}

    def failed_at(key: Key, at: Any) -> None:
        when = _when(at)
        if when is not None and when >= since and (key not in first or when < first[key]):
            first[key] = when

    with reports.store.tx() as conn:
        bodies = conn.execute(select(rollouts_t.c.body)).scalars().all()
        recall_bodies = conn.execute(select(recalls_t.c.body)).scalars().all()
    for body in bodies:
        r = Rollout.model_validate_json(body)
        key = (r.spec.channel, r.spec.module, r.spec.version)
        for h in r.history:
            why = _FAILED.get(str(h.get("event")))
            if why is not None and str(h.get("at", "")) >= since.isoformat():
                out.setdefault(key, set()).add(why)
                failed_at(key, h.get("at"))
    for ch in repo.channels:
        ds = repo.desired_state(ch)
        for rc in ds.recalls if ds else []:
            for v in rc.get("withdrawn", []):
                out.setdefault((ch, str(rc.get("module")), str(v)), set()).add("recalled")
    for raw in recall_bodies:
        doc = json.loads(raw)
        for v in doc.get("withdrawn", []):
            failed_at((str(doc.get("channel")), str(doc.get("module")), str(v)), doc.get("at"))
    return out, first


def _restores(
    reports: list[dict[str, Any]], failed_at: dict[Key, datetime]
) -> tuple[dict[Key, float | None], dict[Key, int]]:
    """Per failed release: seconds from its failure until the last affected device left it (None while
    one is still on it), and how many affected devices are still on it."""
    worst: dict[Key, float] = {}
    open_: dict[Key, int] = {}
    for key, at in failed_at.items():
        ch, module, version = key
        for rep in reports:
            if rep.get("channel") != ch:
                continue
            e = (rep.get("ledger") or {}).get(f"{module}@{version}")
            if not isinstance(e, dict):
                continue
            try:
                served = _when(e.get("committed_at")) or _when(e.get("rolled_back_at"))
                left = _when(e.get("left_at")) or _when(e.get("rolled_back_at"))
            except (TypeError, ValueError):
                continue
            now_on = ((rep.get("modules") or {}).get(module) or {}).get("version") == version
            if served is None and not now_on:
                continue  # never served it
            if left is not None and left < at and not now_on:
                continue  # gone before the failure: not affected
            worst.setdefault(key, 0.0)
            if now_on or left is None:
                open_[key] = open_.get(key, 0) + 1
            else:
                worst[key] = max(worst[key], (left - at).total_seconds())
    return {k: (None if open_.get(k) else v) for k, v in worst.items()}, open_


def compute_dora(
    repo: HubRepository, reports: ReportStore, window_days: int = 30, now: datetime | None = None
) -> DoraReport:
    """DORA figures over the last ``window_days`` (see the module docstring)."""
    now = now or repo.clock.now()
    since = now - timedelta(days=window_days)
    pubs = publications(repo)
    recent = [p for p in pubs if p.issued >= since]
    by_key = {(p.channel, p.module, p.version): p for p in pubs}
    lead: list[float] = []
    connected: list[float] = []
    disconnected: list[float] = []
    flips: list[float] = []
    per: dict[tuple[str, str, str], dict[str, int]] = {}
    for rep in reports.all().values():
        ch = str(rep.get("channel"))
        for e in (rep.get("ledger") or {}).values():
            if not isinstance(e, dict):
                continue
            key = (ch, str(e.get("module")), str(e.get("version")))
            pub = by_key.get(key)
            if pub is None or pub.issued < since:
                continue
            stats = per.setdefault(key, {"exposed": 0, "failed": 0, "committed": 0})
            try:
                committed = _when(e.get("committed_at"))
                rolled_back = _when(e.get("rolled_back_at"))
                seen_at = _when(e.get("seen_at"))
            except (TypeError, ValueError):
                continue  # a malformed entry counts for nothing
            stats["exposed"] += int(committed is not None or rolled_back is not None)
            if rolled_back is not None:
                stats["failed"] += 1
                if isinstance(e.get("flip_ms"), int):
                    flips.append(float(e["flip_ms"]))
            elif committed is not None:
                stats["committed"] += 1
                total = (committed - pub.issued).total_seconds()
                seen = (seen_at - pub.issued).total_seconds() if seen_at else 0.0
                gap = e.get("link_gap_s")
                off = min(float(gap), max(seen, 0.0)) if isinstance(gap, int) else 0.0
                lead.append(max(total, 0.0))
                disconnected.append(off)
                connected.append(max(total - off, 0.0))
    exposures = sum(s["exposed"] for s in per.values())
    failures = sum(s["failed"] for s in per.values())
    hub_failed, failed_at = _hub_failures(repo, reports, since)
    restore, unrestored = _restores(list(reports.all().values()), failed_at)
    for key in hub_failed:
        if key in by_key and by_key[key].issued >= since:
            per.setdefault(key, {"exposed": 0, "failed": 0, "committed": 0})
    failed_releases = sum(1 for k, s in per.items() if s["failed"] or k in hub_failed)
    return DoraReport(
        window_days=window_days,
        deployments=len(recent),
        deployment_frequency_per_day=round(len(recent) / max(window_days, 1), 4),
        lead_time_s=_summary(lead),
        lead_time_connected_s=_summary(connected),
        disconnected_s=_summary(disconnected),
        device_deployments=sum(s["committed"] for s in per.values()),
        exposures=exposures,
        failures=failures,
        change_failure_rate=round(failures / exposures, 4) if exposures else None,
        releases_with_failures=failed_releases,
        release_failure_rate=round(failed_releases / len(per), 4) if per else None,
        mttr_ms=_summary(flips),
        time_to_restore_s=_summary([v for v in restore.values() if v is not None]),
        unrestored_devices=sum(unrestored.values()),
        per_release=[
            {
                "channel": k[0],
                "module": k[1],
                "version": k[2],
                **v,
                "issued": by_key[k].issued.isoformat(),
                "hub_failure": sorted(hub_failed.get(k, set())),
                "failed_at": failed_at[k].isoformat() if k in failed_at else None,
                "time_to_restore_s": restore.get(k),
                "unrestored": unrestored.get(k, 0),
            }
            for k, v in sorted(per.items())
        ],
    )
