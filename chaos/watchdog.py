"""The dead man's switch: ``python -m chaos.watchdog LEASE`` clears injected faults if the agent dies.

The runner writes a lease (``<state>/run/chaos.lease``) before the experiment starts and starts this
watchdog in its own session, so it outlives the agent. The watchdog polls: lease gone means the run
ended cleanly (exit); the agent process gone, or the hard deadline long passed (a hung agent), means it
fires: SIGKILL the experiment's process group, undo every fault in the registry, reset the Toxiproxy
API, leave a report in ``<state>/run/chaos/deadman-<run>.json`` (the agent audits it on its next start)
and remove the lease. :func:`recover_stale_lease` does the same on agent start for a lease whose
agent is dead (when even the watchdog was killed, e.g. a power cut).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from chaos.faults import CleanupReport, FaultRegistry, chaos_dir
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog

__all__ = ["POLL_S", "fire", "lease_is_stale", "main", "read_lease", "recover_stale_lease"]

POLL_S = 0.2
SIDE_FILES = ("clock_skew.json", "input_noise.json", "fill.bin")
OVERDUE_MARGIN_S = 30.0
MAX_LIFETIME_S = 6 * 3600.0


def read_lease(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _alive(pid: int, create_time: float | None) -> bool:
    try:
        import psutil

        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 1.0:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def lease_is_stale(lease: dict[str, Any], now_mono: float) -> str | None:
    """Why the lease's run must be cleaned up by someone else (None while its agent is fine)."""
    if not _alive(int(lease.get("agent_pid", 0)), lease.get("agent_create_time")):
        return f"agent pid {lease.get('agent_pid')} is gone"
    deadline = lease.get("hard_deadline_mono")
    if deadline is not None and now_mono > float(deadline) + OVERDUE_MARGIN_S:
        return "the run is far past its hard deadline (agent hung)"
    return None


def cleanup(
    state_root: Path, toxiproxy_url: str | None, timeout_s: float = 3.0, audit: AuditLog | None = None
) -> CleanupReport:
    """Undo every registered fault, then reset the Toxiproxy API (toxics off, proxies kept)."""
    registry = FaultRegistry(state_root)
    report = registry.clear(audit=audit)
    # Side files our actions create are swept even if the registry lost track of them (say it was
    # unreadable): a leftover skew, noise spec or ballast must never outlive its run.
    kept = {str(f.undo.get("path")) for f in registry.list()}
    for name in SIDE_FILES:
        path = chaos_dir(state_root) / name
        if path.exists() and str(path) not in kept:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            report.notes.append(f"swept unregistered {name}")
    if toxiproxy_url:
        from chaos.toxiproxy_client import ToxiproxyClient, ToxiproxyError

        try:
            with ToxiproxyClient(toxiproxy_url, timeout_s=timeout_s) as c:
                c.reset()
            report.proxy_reset = True
        except ToxiproxyError as exc:
            # An unreachable proxy API usually means the proxy died with the agent: no toxics remain.
            report.proxy_reset = False
            report.notes.append(f"proxy reset failed: {exc}")
    return report


def fire(lease_path: Path, lease: dict[str, Any], why: str) -> CleanupReport:
    """Kill the experiment, clean up, report, drop the lease."""
    child = int(lease.get("child_pid") or 0)
    if child > 0 and _alive(child, lease.get("child_create_time")):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, signal.SIGKILL)
    state_root = Path(lease["state_dir"])
    report = cleanup(state_root, lease.get("toxiproxy_url"))
    report.notes.append(why)
    atomic_write_json(
        chaos_dir(state_root) / f"deadman-{lease.get('run_id', 'unknown')}.json",
        {"run_id": lease.get("run_id"), "why": why, "cleanup": report.to_dict(), "lease": lease},
    )
    with contextlib.suppress(FileNotFoundError):
        Path(lease_path).unlink()
    return report


def recover_stale_lease(state_root: Path) -> tuple[dict[str, Any], CleanupReport] | None:
    """On agent start: fire for a lease whose agent is gone. Returns (lease, report) when it fired."""
    path = Path(state_root) / "run" / "chaos.lease"
    lease = read_lease(path)
    if lease is None:
        if path.exists():
            lease = {"state_dir": str(state_root), "run_id": "unreadable-lease"}
            return lease, fire(path, lease, "unreadable lease")
        return None
    why = lease_is_stale(lease, time.monotonic())
    if why is None:
        return None
    return lease, fire(path, lease, why)


def main(argv: list[str]) -> int:
    lease_path = Path(argv[0])
    started = time.monotonic()
    while time.monotonic() - started < MAX_LIFETIME_S:
        lease = read_lease(lease_path)
        if lease is None:
            return 0
        why = lease_is_stale(lease, time.monotonic())
        if why is not None:
            fire(lease_path, lease, "dead man's switch: " + why)
            return 1
        time.sleep(POLL_S)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
