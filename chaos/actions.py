"""Our Chaos Toolkit actions (``provider: {type: python, module: chaos.actions, func: ...}``).

Each action records its undo recipe in the fault registry (``<state>/run/faults.json``) *before* it
injects, so the runner's independent cleanup, the dead man's switch or :func:`clear_faults` can always
take it back. Each one is bounded (duration, size, share) and refuses out-of-range arguments.

Where things are found (Chaos Toolkit ``configuration`` first, then the environment the runner sets):

- ``state_dir`` / ``$SRE_CHAOS_STATE_DIR``: device state directory (required);
- ``toxiproxy_url`` / ``$SRE_CHAOS_TOXIPROXY_URL``: Toxiproxy API (a real server or our fault proxy);
- ``toxiproxy_timeout_s`` / ``$SRE_CHAOS_TOXIPROXY_TIMEOUT_S``: bound on each API call (default 5 s);
- ``uplink_proxy`` / ``$SRE_CHAOS_UPLINK_PROXY``: proxy name of the uplink (default ``uplink``);
- ``uplink_upstream`` / ``$SRE_CHAOS_UPLINK_UPSTREAM``: ``host:port`` of the hub, to create the proxy;
- ``serving_url`` / ``$SRE_CHAOS_SERVING_URL``: base URL of the v2 inference server;
- ``serving_restart`` / ``$SRE_CHAOS_SERVING_RESTART``: JSON argv that starts the serving worker.

The serving worker writes its pid to ``<state>/run/serving.pid``; slot bookkeeping lives in
``<state>/modules/<name>/state.json`` and flips go through ``deployment.slots.SlotManager``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from chaos.faults import FaultRegistry, chaos_dir, undo_fault
from chaos.toxiproxy_client import ToxiproxyClient, ToxiproxyNotFoundError
from sre_core.atomic import atomic_write_bytes, atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock
from sre_core.paths import StatePaths

__all__ = [
    "add_uplink_toxic",
    "clear_faults",
    "corrupt_standby_slot",
    "cut_uplink",
    "degrade_uplink_bandwidth",
    "fill_disk",
    "inject_input_noise",
    "kill_serving_worker",
    "reset_uplink_peer",
    "restart_serving_worker",
    "restore_uplink",
    "rollback_drill",
    "skew_agent_clock",
    "slow_uplink",
    "stress_cpu",
    "timeout_uplink",
]

Configuration = dict[str, Any] | None
MB = 1024 * 1024
MAX_DURATION_S = 3600.0
TOXIC_TYPES = ("latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data")
_clock = SystemClock()


class ChaosActionError(Exception):
    """An action refused its arguments or could not inject its fault (nothing was left injected)."""


# --- configuration -------------------------------------------------------------------------------


def _setting(configuration: Configuration, key: str, default: str | None = None) -> str | None:
    cfg = configuration or {}
    value = cfg.get(key)
    if value is None:
        value = os.environ.get(f"SRE_CHAOS_{key.upper()}")
    return str(value) if value is not None else default


def _state(configuration: Configuration) -> Path:
    s = _setting(configuration, "state_dir")
    if not s:
        raise ChaosActionError(
            "no device state directory: set configuration.state_dir or $SRE_CHAOS_STATE_DIR"
        )
    return Path(s)


def _registry(configuration: Configuration) -> FaultRegistry:
    return FaultRegistry(_state(configuration))


def _toxiproxy_url(configuration: Configuration) -> str:
    url = _setting(configuration, "toxiproxy_url")
    if not url:
        raise ChaosActionError(
            "no Toxiproxy API: set configuration.toxiproxy_url or $SRE_CHAOS_TOXIPROXY_URL "
            "(the runner starts the embedded fault proxy and sets it)"
        )
    return url


def _api_timeout(configuration: Configuration) -> float:
    return float(_setting(configuration, "toxiproxy_timeout_s", "5") or 5)


def _bounded(name: str, value: float, lo: float, hi: float) -> float:
    v = float(value)
    if not lo <= v <= hi:
        raise ChaosActionError(f"{name}={value!r} is outside [{lo}, {hi}]")
    return v


def _expiry(duration_s: float | None) -> str | None:
    if duration_s is None:
        return None
    d = _bounded("duration_s", duration_s, 0.0, MAX_DURATION_S)
    return (_clock.now() + timedelta(seconds=d)).isoformat()


# --- uplink (Toxiproxy API) ------------------------------------------------------------------------


def add_uplink_toxic(
    toxic_type: str,
    attributes: dict[str, Any] | None = None,
    stream: str = "downstream",
    toxicity: float = 1.0,
    proxy: str | None = None,
    toxic_name: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Add any Toxiproxy toxic to the uplink proxy (created from ``uplink_upstream`` when missing)."""
    if toxic_type not in TOXIC_TYPES:
        raise ChaosActionError(f"unknown toxic type {toxic_type!r}; expected one of {TOXIC_TYPES}")
    if stream not in ("upstream", "downstream"):
        raise ChaosActionError(f"stream must be upstream or downstream, not {stream!r}")
    _bounded("toxicity", toxicity, 0.0, 1.0)
    url = _toxiproxy_url(configuration)
    pname = proxy or _setting(configuration, "uplink_proxy", "uplink") or "uplink"
    name = toxic_name or f"chaos_{toxic_type}_{stream}"
    reg = _registry(configuration)
    with ToxiproxyClient(url, timeout_s=_api_timeout(configuration)) as client:
        try:
            client.get_proxy(pname)
        except ToxiproxyNotFoundError:
            upstream = _setting(configuration, "uplink_upstream")
            if not upstream:
                raise
            proxy_fault = reg.record("proxy", pname, {"kind": "proxy", "url": url, "proxy": pname})
            try:
                client.create_proxy(pname, upstream)
            except Exception:
                reg.remove(proxy_fault.id)
                raise
        fault = reg.record(
            f"toxic:{toxic_type}",
            f"{pname}/{name}",
            {"kind": "toxic", "url": url, "proxy": pname, "toxic": name},
            detail={"attributes": attributes or {}, "stream": stream, "toxicity": toxicity},
        )
        try:
            toxic = client.add_toxic(pname, toxic_type, attributes, name, stream, toxicity)
        except Exception:
            reg.remove(fault.id)
            raise
    return {"fault_id": fault.id, "proxy": pname, "toxic": toxic}


def slow_uplink(
    latency_ms: int,
    jitter_ms: int = 0,
    stream: str = "downstream",
    toxicity: float = 1.0,
    proxy: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Add latency (with jitter) to the uplink."""
    _bounded("latency_ms", latency_ms, 0, 600_000)
    _bounded("jitter_ms", jitter_ms, 0, 600_000)
    return add_uplink_toxic(
        "latency",
        {"latency": int(latency_ms), "jitter": int(jitter_ms)},
        stream,
        toxicity,
        proxy,
        configuration=configuration,
    )


def degrade_uplink_bandwidth(
    rate_kbps: int,
    stream: str = "downstream",
    toxicity: float = 1.0,
    proxy: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Cap the uplink bandwidth to ``rate_kbps`` KB/s."""
    _bounded("rate_kbps", rate_kbps, 1, 10_000_000)
    return add_uplink_toxic(
        "bandwidth", {"rate": int(rate_kbps)}, stream, toxicity, proxy, configuration=configuration
    )


def timeout_uplink(
    timeout_ms: int = 0,
    stream: str = "upstream",
    toxicity: float = 1.0,
    proxy: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Black-hole uplink data; close connections after ``timeout_ms`` (0: hold until removed)."""
    _bounded("timeout_ms", timeout_ms, 0, 3_600_000)
    return add_uplink_toxic(
        "timeout", {"timeout": int(timeout_ms)}, stream, toxicity, proxy, configuration=configuration
    )


def reset_uplink_peer(
    timeout_ms: int = 0,
    stream: str = "upstream",
    toxicity: float = 1.0,
    proxy: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Reset uplink connections (TCP RST) after ``timeout_ms``."""
    _bounded("timeout_ms", timeout_ms, 0, 3_600_000)
    return add_uplink_toxic(
        "reset_peer", {"timeout": int(timeout_ms)}, stream, toxicity, proxy, configuration=configuration
    )


def cut_uplink(
    duration_s: float, proxy: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """Sever the uplink for ``duration_s`` seconds (timeout toxic both ways), then restore it.

    The action holds for the duration and removes its toxics itself; the registry still covers an
    interruption in between.
    """
    d = _bounded("duration_s", duration_s, 0.0, MAX_DURATION_S)
    down = timeout_uplink(0, "downstream", 1.0, proxy, configuration)
    up = timeout_uplink(0, "upstream", 1.0, proxy, configuration)
    time.sleep(d)
    reg = _registry(configuration)
    for added in (up, down):
        fault = next((f for f in reg.list() if f.id == added["fault_id"]), None)
        if fault is not None:
            undo_fault(fault, reg.state_root)
            reg.remove(fault.id)
    return {"cut_s": d, "proxy": down["proxy"]}


def restore_uplink(proxy: str | None = None, configuration: Configuration = None) -> dict[str, Any]:
    """Remove every toxic this harness recorded on the uplink proxy (a rollback)."""
    pname = proxy or _setting(configuration, "uplink_proxy", "uplink") or "uplink"
    reg = _registry(configuration)
    removed: list[str] = []
    for f in reg.list():
        if f.undo.get("kind") == "toxic" and f.undo.get("proxy") == pname:
            undo_fault(f, reg.state_root)
            reg.remove(f.id)
            removed.append(str(f.undo.get("toxic")))
    return {"proxy": pname, "removed": removed}


# --- inference input ------------------------------------------------------------------------------


def inject_input_noise(
    share: float,
    sigma: float = 0.5,
    duration_s: float = 60.0,
    seed: int = 0,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Perturb ``share`` of inference requests' inputs with Gaussian noise for ``duration_s``.

    Writes ``<state>/run/chaos/input_noise.json``, which the serving router honours (see
    :func:`chaos.faults.input_noise_spec`); it also expires by itself.
    """
    _bounded("share", share, 0.0, 1.0)
    _bounded("sigma", sigma, 0.0, 1e6)
    path = chaos_dir(_state(configuration)) / "input_noise.json"
    reg = _registry(configuration)
    fault = reg.record("input_noise", "input", {"kind": "remove_file", "path": str(path)})
    spec = {"share": share, "sigma": sigma, "seed": int(seed), "expires_at": _expiry(duration_s)}
    atomic_write_json(path, spec)
    return {"fault_id": fault.id, **spec}


# --- serving worker -------------------------------------------------------------------------------


def _serving_pid(state: Path) -> int:
    pid_file = state / "run" / "serving.pid"
    try:
        return int(pid_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError) as exc:
        raise ChaosActionError(f"no serving worker pid in {pid_file}: {exc}") from exc


def _refuse_agent(pid: int) -> None:
    """Never signal the agent: in the daemon, ``run/serving.pid`` is the agent's own pid."""
    import psutil

    agent = os.environ.get("SRE_CHAOS_AGENT_PID")
    mine = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        mine |= {p.pid for p in psutil.Process().parents()}
    if pid in mine or (agent is not None and agent.isdigit() and pid == int(agent)) or pid <= 1:
        raise ChaosActionError(f"pid {pid} is the agent (or its ancestor); chaos never signals the agent")


def kill_serving_worker(sig: str = "SIGKILL", configuration: Configuration = None) -> dict[str, Any]:
    """Kill the serving worker (pid from ``<state>/run/serving.pid``) with ``sig``.

    The undo restarts it with ``serving_restart`` (a JSON argv) unless a supervisor already did.
    """
    if sig not in ("SIGKILL", "SIGTERM", "SIGINT"):
        raise ChaosActionError(f"sig must be SIGKILL, SIGTERM or SIGINT, not {sig!r}")
    state = _state(configuration)
    pid = _serving_pid(state)
    _refuse_agent(pid)
    restart = _setting(configuration, "serving_restart")
    argv = json.loads(restart) if restart else None
    reg = _registry(configuration)
    fault = reg.record(
        "serving_kill",
        f"pid {pid}",
        {
            "kind": "restart_serving",
            "argv": argv,
            "ready_url": _setting(configuration, "serving_url"),
            "pid_file": str(state / "run" / "serving.pid"),
        },
    )
    try:
        os.kill(pid, getattr(signal, sig))
    except ProcessLookupError as exc:
        reg.remove(fault.id)
        raise ChaosActionError(f"serving worker pid {pid} is not running") from exc
    return {"fault_id": fault.id, "pid": pid, "signal": sig}


def restart_serving_worker(timeout_s: float = 30.0, configuration: Configuration = None) -> dict[str, Any]:
    """Restart the serving worker killed by :func:`kill_serving_worker` and wait until it is ready."""
    _bounded("timeout_s", timeout_s, 0.1, 600)
    reg = _registry(configuration)
    restarted: list[str] = []
    for f in reg.list():
        if f.undo.get("kind") == "restart_serving":
            undo_fault(f, reg.state_root, timeout_s=timeout_s)
            reg.remove(f.id)
            restarted.append(f.id)
    return {"restarted": restarted}


# --- slots ----------------------------------------------------------------------------------------


def _slot_roles(state: Path, module: str) -> tuple[str, str]:
    """(active, standby) slot directory names from ``modules/<module>/state.json``."""
    path = state / "modules" / module / "state.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ChaosActionError(f"cannot read slot state {path}: {exc}") from exc
    active = d.get("active")
    if isinstance(active, dict):
        active = active.get("slot")
    if active not in ("a", "b"):
        raise ChaosActionError(f"{path}: no active slot recorded")
    return str(active), "b" if active == "a" else "a"


def corrupt_standby_slot(
    module: str, nbytes: int = 64, configuration: Configuration = None
) -> dict[str, Any]:
    """Flip ``nbytes`` bytes in the middle of the standby slot's largest file (never the active slot).

    Verification must detect it (digest mismatch) and repair it; the undo restores the original bytes.
    """
    n = int(_bounded("nbytes", nbytes, 1, 1 << 20))
    state = _state(configuration)
    _active, standby = _slot_roles(state, module)
    slot_dir = state / "modules" / module / standby
    files = (
        [p for p in slot_dir.rglob("*") if p.is_file() and not p.is_symlink()] if slot_dir.is_dir() else []
    )
    if not files:
        raise ChaosActionError(f"standby slot {slot_dir} holds no file to corrupt")
    target = max(files, key=lambda p: p.stat().st_size)
    original = target.read_bytes()
    reg = _registry(configuration)
    backup = chaos_dir(state) / "backup" / f"{module}-{standby}-{os.getpid()}-{time.monotonic_ns()}"
    atomic_write_bytes(backup, original, mode=0o600)
    fault = reg.record(
        "standby_corruption",
        str(target),
        {
            "kind": "restore_file",
            "backup": str(backup),
            "target": str(target),
            "mode": target.stat().st_mode & 0o777,
        },
    )
    start = max(0, len(original) // 2 - n // 2)
    data = bytearray(original)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    atomic_write_bytes(target, bytes(data), mode=target.stat().st_mode & 0o777)
    return {"fault_id": fault.id, "file": str(target), "offset": start, "nbytes": min(n, len(data) - start)}


def audit_log_for(state: Path) -> AuditLog:
    """The audit trail chaos activities write to.

    Under the runner that is the run's own side log (``$SRE_CHAOS_AUDIT_LOG``), folded into the main
    trail by the runner afterwards, because a second process appending to ``<state>/audit.jsonl``
    while the agent holds it would fork the hash chain. Under a plain ``chaos run`` it is the main trail.
    """
    side = os.environ.get("SRE_CHAOS_AUDIT_LOG")
    return AuditLog(Path(side) if side else Path(state) / "audit.jsonl")


def _swap(state: Path, module: str, audit: AuditLog | None) -> None:
    """Make the standby of ``module`` active through the slot manager (the version stays good)."""
    from deployment.slots import SlotManager

    mgr = SlotManager(StatePaths(state), audit or audit_log_for(state))
    mgr.rollback(module, reason="chaos rollback drill", actor="chaos", mark_bad=False)


def _flip_to(state: Path, module: str, slot: str, audit: AuditLog | None = None) -> None:
    """Make ``slot`` the active slot of ``module`` (no-op when it already is)."""
    active, _ = _slot_roles(state, module)
    if active != slot:
        _swap(state, module, audit)


def rollback_drill(module: str, hold_s: float = 0.0, configuration: Configuration = None) -> dict[str, Any]:
    """Flip ``module`` to its standby (a rollback), hold ``hold_s``, then flip back."""
    hold = _bounded("hold_s", hold_s, 0.0, MAX_DURATION_S)
    state = _state(configuration)
    original, _ = _slot_roles(state, module)
    reg = _registry(configuration)
    fault = reg.record("rollback_drill", module, {"kind": "flip_back", "module": module, "slot": original})
    t0 = time.monotonic()
    _swap(state, module, None)
    flipped = time.monotonic() - t0
    time.sleep(hold)
    _flip_to(state, module, original)
    reg.remove(fault.id)
    return {"module": module, "flip_s": flipped, "active": original}


# --- agent clock, disk, cpu -----------------------------------------------------------------------


def skew_agent_clock(
    offset_s: float, duration_s: float = 60.0, configuration: Configuration = None
) -> dict[str, Any]:
    """Skew the agent's wall clock by ``offset_s`` for ``duration_s`` (``run/chaos/clock_skew.json``)."""
    _bounded("offset_s", offset_s, -366 * 86400, 366 * 86400)
    path = chaos_dir(_state(configuration)) / "clock_skew.json"
    fault = _registry(configuration).record("clock_skew", "agent", {"kind": "remove_file", "path": str(path)})
    spec = {"offset_s": float(offset_s), "expires_at": _expiry(duration_s)}
    atomic_write_json(path, spec)
    return {"fault_id": fault.id, **spec}


def fill_disk(
    reserve_mb: float,
    max_mb: float = 1024.0,
    path: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Fill the state filesystem until only ``reserve_mb`` MB stay free (at most ``max_mb`` MB written).

    The ballast is ``<state>/run/chaos/fill.bin`` (or ``path``); it is allocated for real
    (``posix_fallocate``), and the undo deletes it.
    """
    reserve = _bounded("reserve_mb", reserve_mb, 0, 1e9) * MB
    cap = _bounded("max_mb", max_mb, 0, 1e7) * MB
    state = _state(configuration)
    ballast = chaos_dir(state) / "fill.bin"
    if path:
        # a path from the experiment only names a file under the chaos directory, never elsewhere
        candidate = (chaos_dir(state) / Path(path).name).resolve()
        if candidate.parent != chaos_dir(state).resolve() or not Path(path).name:
            raise ChaosActionError(f"path {path!r} is not a file name under {chaos_dir(state)}")
        ballast = candidate
    ballast.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ballast.parent).free
    size = int(min(cap, max(0.0, free - reserve)))
    fault = _registry(configuration).record(
        "disk_fill", str(ballast), {"kind": "remove_file", "path": str(ballast)}, detail={"bytes": size}
    )
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if size > 0:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                chunk = b"\0" * MB
                left = size
                while left > 0:
                    left -= os.write(fd, chunk[: min(left, MB)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return {
        "fault_id": fault.id,
        "file": str(ballast),
        "bytes": size,
        "free_after": shutil.disk_usage(ballast.parent).free,
    }


_BURN = "import sys,time\nend=time.monotonic()+float(sys.argv[1])\nwhile time.monotonic()<end:\n    pass\n"


def stress_cpu(
    workers: int = 1, duration_s: float = 10.0, configuration: Configuration = None
) -> dict[str, Any]:
    """Busy-loop ``workers`` child processes for ``duration_s`` seconds (they stop by themselves)."""
    import psutil

    n = int(_bounded("workers", workers, 1, os.cpu_count() or 1))
    d = _bounded("duration_s", duration_s, 0.0, MAX_DURATION_S)
    reg = _registry(configuration)
    fault = reg.record("cpu_stress", f"{n} workers", {"kind": "kill_pids", "pids": []})
    pids: list[dict[str, Any]] = []
    try:
        for _ in range(n):
            p = subprocess.Popen(
                [sys.executable, "-c", _BURN, str(d)],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            ctime = None
            with contextlib.suppress(Exception):
                ctime = psutil.Process(p.pid).create_time()
            pids.append({"pid": p.pid, "create_time": ctime})
            reg.update(fault.id, {"kind": "kill_pids", "pids": pids})
    except Exception:
        f = next((x for x in reg.list() if x.id == fault.id), None)
        if f is not None:
            undo_fault(f, reg.state_root)
            reg.remove(f.id)
        raise
    return {"fault_id": fault.id, "pids": [p["pid"] for p in pids], "duration_s": d}


# --- cleanup --------------------------------------------------------------------------------------


def clear_faults(configuration: Configuration = None) -> dict[str, Any]:
    """Undo every fault in the registry (the rollback every experiment should declare)."""
    reg = _registry(configuration)
    report = reg.clear()
    return report.to_dict()
