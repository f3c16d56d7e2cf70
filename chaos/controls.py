"""The guardrail: a Chaos Toolkit control that interrupts a run when the device's health crosses policy.

Declared by the runner as a global control in the Chaos Toolkit *settings* (so an experiment file cannot
remove it)::

    controls:
      sre-guardrail:
        provider: {type: python, module: chaos.controls, arguments: {...GuardTargets + limits...}}

It checks before and after every activity of the hypothesis and the method, and a watcher thread checks
every ``interval_s`` in between (a long activity is interrupted too: the thread sends SIGTERM to its own
process, which chaoslib >= 1.45 turns into ``InterruptExecution`` in the main thread). Rollbacks are never
interrupted. It is *fail-closed*: a probe that errors or times out is a breach. Every trip is written
to ``trip_file`` (JSON) so the parent can report why, and ``armed_file`` proves the guardrail was loaded
(chaoslib silently drops a control that fails to load; the runner treats an unarmed run as an error).

:class:`Guardrail` is the pure decision (readings in, breaches out); :func:`read_health` does the I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "GuardLimits",
    "GuardTargets",
    "Guardrail",
    "Readings",
    "after_activity_control",
    "before_activity_control",
    "before_experiment_control",
    "before_rollback_control",
    "cleanup_control",
    "configure_control",
    "read_health",
]

MB = 1024 * 1024


@dataclass(frozen=True)
class GuardLimits:
    """Policy limits (from ``policies.chaos.Guardrails`` and ``Headroom``); None disables a limit."""

    max_error_rate: float | None = 0.05
    max_p95_ms: float | None = 500.0
    max_uplink_backlog: int | None = None
    disk_reserve_mb: float | None = None


@dataclass(frozen=True)
class GuardTargets:
    """What to look at."""

    state_dir: str | None = None
    serving_url: str | None = None
    model: str | None = None
    samples: int = 5
    timeout_s: float = 2.0
    stop_file: str | None = None


@dataclass
class Readings:
    """One round of health readings; ``errors`` lists probes that failed to read."""

    ready: bool | None = None
    p95_ms: float | None = None
    error_rate: float | None = None
    uplink_backlog: int | None = None
    free_disk_mb: float | None = None
    stop_requested: bool = False
    errors: list[str] = field(default_factory=list)


class Guardrail:
    """The decision: which limits do these readings cross? (pure; fail-closed)."""

    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits

    def breaches(self, r: Readings) -> list[str]:
        out = [f"probe failed: {e}" for e in r.errors]
        lim = self.limits
        if r.stop_requested:
            out.append("stop requested")
        if r.ready is False:
            out.append("serving not ready")
        if lim.max_p95_ms is not None and r.p95_ms is not None and r.p95_ms > lim.max_p95_ms:
            out.append(f"inference p95 {r.p95_ms:.1f} ms > {lim.max_p95_ms} ms")
        if lim.max_error_rate is not None and r.error_rate is not None and r.error_rate > lim.max_error_rate:
            out.append(f"inference error rate {r.error_rate:.3f} > {lim.max_error_rate}")
        if (
            lim.max_uplink_backlog is not None
            and r.uplink_backlog is not None
            and r.uplink_backlog > lim.max_uplink_backlog
        ):
            out.append(f"uplink backlog {r.uplink_backlog} > {lim.max_uplink_backlog}")
        if (
            lim.disk_reserve_mb is not None
            and r.free_disk_mb is not None
            and r.free_disk_mb < lim.disk_reserve_mb
        ):
            out.append(f"free disk {r.free_disk_mb:.0f} MB < reserve {lim.disk_reserve_mb} MB")
        return out


def read_health(t: GuardTargets, limits: GuardLimits) -> Readings:
    """Take one round of readings (each probe bounded by ``t.timeout_s``); never raises."""
    r = Readings()
    if t.stop_file and Path(t.stop_file).exists():
        r.stop_requested = True
    cfg: dict[str, Any] = {"state_dir": t.state_dir, "serving_url": t.serving_url}
    if t.serving_url:
        from chaos import probes

        try:
            r.ready = probes.serving_ready(t.timeout_s, cfg)
            if t.model and r.ready and (limits.max_p95_ms is not None or limits.max_error_rate is not None):
                lat, errors = probes._sample(cfg, t.model, t.samples, None, t.timeout_s)
                r.p95_ms = probes._p95(lat)
                r.error_rate = errors / max(1, len(lat) + errors)
        except Exception as exc:
            r.errors.append(f"serving: {type(exc).__name__}: {exc}")
    if t.state_dir and limits.max_uplink_backlog is not None:
        from chaos import probes

        try:
            r.uplink_backlog = probes.uplink_backlog(cfg)
        except Exception as exc:
            r.errors.append(f"uplink backlog: {type(exc).__name__}: {exc}")
    if t.state_dir and limits.disk_reserve_mb is not None:
        try:
            r.free_disk_mb = shutil.disk_usage(t.state_dir).free / MB
        except OSError as exc:
            r.errors.append(f"disk: {exc}")
    return r


# --- the Chaos Toolkit control -----------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.targets = GuardTargets()
        self.guard = Guardrail(GuardLimits())
        self.trip_file: str | None = None
        self.tripped: list[str] = []
        self.in_rollbacks = False
        self.interval_s = 1.0
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.checks = 0


_S = _State()


def _trip(reasons: list[str], where: str) -> None:
    with _S.lock:
        first = not _S.tripped
        if first:
            _S.tripped = list(reasons)
    if first and _S.trip_file:
        data = {"reasons": reasons, "where": where, "checks": _S.checks}
        with contextlib.suppress(OSError):
            tmp = Path(_S.trip_file + ".tmp")
            tmp.write_text(json.dumps(data), encoding="utf-8")
            tmp.replace(_S.trip_file)


def _check(where: str) -> list[str]:
    try:
        readings = read_health(_S.targets, _S.guard.limits)
        breaches = _S.guard.breaches(readings)
    except Exception as exc:  # fail-closed: a guardrail that cannot judge trips
        breaches = [f"guardrail error: {type(exc).__name__}: {exc}"]
    _S.checks += 1
    if breaches:
        _trip(breaches, where)
    return breaches


def _interrupt(where: str) -> None:
    from chaoslib.exceptions import InterruptExecution

    if _S.in_rollbacks:
        return
    breaches = list(_S.tripped) or _check(where)
    if breaches:
        raise InterruptExecution("guardrail tripped: " + "; ".join(breaches))


def _watch() -> None:
    while not _S.stop.wait(_S.interval_s):
        if _S.in_rollbacks or _S.tripped:
            return
        if _check("watcher"):
            if not _S.in_rollbacks:
                os.kill(os.getpid(), signal.SIGTERM)
            return


def configure_control(
    state_dir: str | None = None,
    serving_url: str | None = None,
    model: str | None = None,
    samples: int = 5,
    timeout_s: float = 2.0,
    stop_file: str | None = None,
    max_error_rate: float | None = 0.05,
    max_p95_ms: float | None = 500.0,
    max_uplink_backlog: int | None = None,
    disk_reserve_mb: float | None = None,
    interval_s: float = 1.0,
    trip_file: str | None = None,
    armed_file: str | None = None,
    watch: bool = True,
) -> None:
    """Arm the guardrail (called once by chaoslib; arguments come from the control's provider)."""
    _S.targets = GuardTargets(state_dir, serving_url, model, int(samples), float(timeout_s), stop_file)
    _S.guard = Guardrail(GuardLimits(max_error_rate, max_p95_ms, max_uplink_backlog, disk_reserve_mb))
    _S.trip_file = trip_file
    _S.tripped = []
    _S.in_rollbacks = False
    _S.interval_s = max(0.05, float(interval_s))
    _S.stop.clear()
    if armed_file:
        with contextlib.suppress(OSError):
            Path(armed_file).write_text(
                json.dumps(
                    {"pid": os.getpid(), "targets": asdict(_S.targets), "limits": asdict(_S.guard.limits)}
                ),
                encoding="utf-8",
            )
    if watch:
        _S.thread = threading.Thread(target=_watch, name="sre-guardrail", daemon=True)
        _S.thread.start()


def before_experiment_control(context: Any, **kwargs: Any) -> None:
    """Refuse to start on a device that is already outside its limits."""
    _interrupt("before experiment")


def before_activity_control(context: Any, **kwargs: Any) -> None:
    _interrupt(f"before {_name(context)}")


def after_activity_control(context: Any, state: Any = None, **kwargs: Any) -> None:
    _interrupt(f"after {_name(context)}")


def before_rollback_control(context: Any, **kwargs: Any) -> None:
    """From here on nothing is interrupted: rollbacks must run."""
    _S.in_rollbacks = True


def cleanup_control() -> None:
    _S.stop.set()
    t = _S.thread
    if t is not None and t is not threading.current_thread():
        t.join(2.0)
    _S.thread = None


def _name(context: Any) -> str:
    if isinstance(context, dict):
        return str(context.get("name", "activity"))
    return "activity"
