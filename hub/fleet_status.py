"""The operator's view of the fleet: devices, versions, last sync, drift SLOs, safe mode, escalations.

Public API::

    fleet_status(service, sync_slo_s=86400, site_max_age_s=3600) -> dict
        built from enrolled devices + latest reports; ``sites``: each regional hub's last sync age,
        backlog, in-sync flag and drift-SLO breach (see :mod:`hub.sites`)

Open escalations: the larger of what the device reports and the open escalations it uploaded (the
telemetry lake, :class:`hub.operators.HubEscalations`). Drift SLOs per device: time since its last
successful sync (against ``sync_slo_s``) and version drift (a module whose version is neither the
channel's baseline nor the candidate of the rollout in progress).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from hub.fleetdb import FleetDB
from hub.rollouts import RolloutService

__all__ = ["fleet_status"]


def fleet_status(
    service: RolloutService, sync_slo_s: int = 86400, site_max_age_s: float = 3600.0
) -> dict[str, Any]:
    """A JSON-ready summary of the fleet (see the module docstring)."""
    now = service.clock.now()
    reports = service.reports.all()
    enrolled = {d.device_id: d for d in FleetDB(service.fleet_dir, service.clock).devices()}
    channels: dict[str, Any] = {}
    allowed: dict[str, dict[str, set[str]]] = {}
    for ch in service.repo.channels:
        ds = service.repo.desired_state(ch)
        r = service.current(ch)
        ok: dict[str, set[str]] = {m: {dm.version} for m, dm in (ds.modules.items() if ds else [])}
        if r is not None and r.state not in {"completed", "reverted"}:
            ok.setdefault(r.spec.module, set()).add(r.spec.version)
        allowed[ch] = ok
        channels[ch] = {
            "serial": ds.serial if ds else None,
            "modules": {m: dm.version for m, dm in ds.modules.items()} if ds else {},
            "rollout": None
            if r is None
            else {
                "id": r.id,
                "module": r.spec.module,
                "version": r.spec.version,
                "state": r.state,
                "percent": r.percent,
            },
            "recalls": len(ds.recalls) if ds else 0,
        }
    escalations = _open_escalations(service)
    devices: list[dict[str, Any]] = []
    versions: dict[str, Counter[str]] = {}
    for dev in sorted(set(enrolled) | set(reports)):
        rep = reports.get(dev, {})
        rec = enrolled.get(dev)
        last_sync = rep.get("last_sync")
        age = None
        if isinstance(last_sync, str):
            age = max(0, int((now - datetime.fromisoformat(last_sync)).total_seconds()))
        mods = {m: f.get("version") for m, f in (rep.get("modules") or {}).items() if isinstance(f, dict)}
        for m, v in mods.items():
            versions.setdefault(m, Counter())[str(v)] += 1
        ok = allowed.get(str(rep.get("channel")), {})
        drift = sorted(m for m, v in mods.items() if m in ok and v not in ok[m])
        devices.append(
            {
                "device_id": dev,
                "channel": rep.get("channel"),
                "versions": mods,
                "last_sync": last_sync,
                "sync_age_s": age,
                "sync_slo_ok": age is not None and age <= sync_slo_s,
                "drift": drift,
                "safe_mode": bool(rep.get("safe_mode")),
                "trust": rep.get("trust"),
                "open_escalations": max(int(rep.get("open_escalations") or 0), escalations.get(dev, 0)),
                "revoked": bool(rec.revoked) if rec else False,
                "reported": bool(rep),
            }
        )
    summary = {
        "devices": len(devices),
        "enrolled": len(enrolled),
        "reporting": sum(1 for d in devices if d["reported"]),
        "sync_slo_s": sync_slo_s,
        "sync_slo_breaches": sum(1 for d in devices if d["reported"] and not d["sync_slo_ok"]),
        "drifting": sum(1 for d in devices if d["drift"]),
        "safe_mode": sum(1 for d in devices if d["safe_mode"]),
        "open_escalations": sum(d["open_escalations"] for d in devices),
        "versions": {m: dict(c.most_common()) for m, c in sorted(versions.items())},
    }
    from hub.sites import SiteRegistry, current_desired, current_timestamp

    sites = SiteRegistry(service.store, service.clock).rows(
        current_timestamp(service.repo.dir), site_max_age_s, current_desired(service.repo)
    )
    summary["sites"] = len(sites)
    summary["sites_out_of_sync"] = sum(1 for x in sites if not x["in_sync"])
    summary["site_sync_breaches"] = sum(1 for x in sites if x["breach"])
    return {
        "time": now.isoformat(),
        "summary": summary,
        "channels": channels,
        "devices": devices,
        "sites": sites,
    }


def _open_escalations(service: RolloutService) -> Counter[str]:
    """device -> escalations uploaded through telemetry that are still open (the review queue)."""
    from hub.operators import HubEscalations

    out: Counter[str] = Counter()
    try:
        docs = HubEscalations(service.repo.dir, service.clock).load()
    except Exception:  # a damaged lake must not take the fleet view down; the count is then a floor
        return out
    for doc in docs.values():
        if doc.get("status") == "open":
            out[str(doc.get("device_id"))] += 1
    return out
