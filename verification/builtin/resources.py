"""Resource headroom: disk, memory and CPU load (psutil) against the policy's reserves."""

from __future__ import annotations

from typing import Any

import psutil

from verification.base import Check, CheckResult, Severity
from verification.context import VerificationContext

__all__ = ["ResourceHeadroomCheck"]

_MB = 1024 * 1024


class ResourceHeadroomCheck(Check):
    """Free disk under the state directory, available memory and load per CPU."""

    name = "resources.headroom"
    description = "disk, memory and CPU headroom against policy reserves"
    severity = Severity.WARNING
    interval_s = 60.0
    timeout_s = 10.0

    def run(self, ctx: VerificationContext) -> CheckResult:
        res = ctx.policy.reserves
        disk = psutil.disk_usage(str(ctx.paths.root))
        mem = psutil.virtual_memory()
        load1 = psutil.getloadavg()[0]
        cpus = psutil.cpu_count() or 1
        m = {
            "disk_free_mb": disk.free / _MB,
            "disk_free_pct": 100.0 - float(disk.percent),
            "memory_available_mb": mem.available / _MB,
            "load_per_cpu": load1 / cpus,
        }
        # (measurement, reserve, True when the measurement must stay at or above the reserve)
        rules = [
            ("disk_free_mb", res.min_free_disk_mb, True),
            ("disk_free_pct", res.min_free_disk_pct, True),
            ("memory_available_mb", res.min_available_memory_mb, True),
            ("load_per_cpu", res.max_load_per_cpu, False),
        ]
        below: list[str] = []
        near: list[str] = []
        for key, reserve, floor in rules:
            value = m[key]
            if (value < reserve) if floor else (value > reserve):
                below.append(f"{key} {value:.1f} {'<' if floor else '>'} {reserve:g}")
            elif floor and value < reserve * (1 + res.warn_margin):
                near.append(f"{key} {value:.1f} near {reserve:g}")
            elif not floor and value > reserve * (1 - res.warn_margin):
                near.append(f"{key} {value:.2f} near {reserve:g}")
        evidence: dict[str, Any] = {
            "path": str(ctx.paths.root),
            **{k: round(v, 2) for k, v in m.items()},
            "reserves": res.model_dump(),
        }
        if below:
            return CheckResult.fail(f"below reserve: {'; '.join(below)}", evidence, **m)
        if near:
            return CheckResult.warn(f"close to reserve: {'; '.join(near)}", evidence, **m)
        return CheckResult.ok(
            f"disk {m['disk_free_mb']:.0f} MB free, memory {m['memory_available_mb']:.0f} MB available, "
            f"load {m['load_per_cpu']:.2f}/cpu",
            evidence,
            **m,
        )
