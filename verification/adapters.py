"""Build a :class:`~verification.context.VerificationContext` from a real device state directory.

Slots come from ``deployment.slots.SlotManager.status`` (its ``state.json`` is the record of truth), the
desired state's expiry from ``deployment.pull.load_held``.
The trusted-time floor is read from ``<state>/clock.json`` leniently (the newest timestamp in it), so
this keeps working while the trust layer settles its format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from policies.verification import VerificationPolicy
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.paths import StatePaths
from verification.context import SessionCache, SlotView, VerificationContext
from verification.recorder import SampleRecorder

__all__ = ["build_context", "held_desired_expiry", "read_clock_floor", "slots_from_state"]

_log = logging.getLogger(__name__)


def slots_from_state(paths: StatePaths) -> tuple[list[SlotView], list[str]]:
    """Every module's active and standby slot as :class:`SlotView`, plus problems reading them."""
    from deployment.slots import SlotManager

    mgr = SlotManager(paths, AuditLog(paths.audit_log))
    views: list[SlotView] = []
    problems: list[str] = []
    for module in mgr.modules():
        try:
            st = mgr.status(module)
        except Exception as exc:
            problems.append(f"{module}: cannot read slot state: {exc}")
            continue
        for role, v in (("active", st.active), ("standby", st.standby)):
            if v is None:
                continue
            try:
                manifest = v.manifest
            except Exception as exc:
                problems.append(f"{module}/{role}: manifest does not parse: {exc}")
                manifest = None
            views.append(
                SlotView(
                    module=module,
                    slot=v.slot,
                    role=role,  # type: ignore[arg-type]
                    path=v.path,
                    version=v.version,
                    sha256=v.sha256,
                    manifest=manifest,
                    verified=True,  # the slot manager only records slots re-hashed at install
                    files=dict(v.record.files) or None,
                )
            )
    return views, problems


def held_desired_expiry(paths: StatePaths, clock: Clock) -> datetime | None:
    """Expiry of the signed desired state the device holds (``deployment.pull.load_held``), if any."""
    from deployment.pull import load_held

    try:
        held = load_held(paths, clock)
    except Exception as exc:
        _log.warning("verification: cannot read the held desired state: %s", exc)
        return None
    return held.desired.expires if held.desired is not None else None


def read_clock_floor(path: Path) -> datetime | None:
    """The newest aware timestamp found at the top level of ``clock.json`` (None if absent/unreadable)."""
    try:
        data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    best: datetime | None = None
    values = data.values() if isinstance(data, dict) else []
    for v in values:
        if not isinstance(v, str):
            continue
        try:
            ts = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            continue
        if ts.tzinfo is not None and (best is None or ts > best):
            best = ts
    return best


def build_context(
    paths: StatePaths,
    policy: VerificationPolicy,
    clock: Clock | None = None,
    desired_expires: datetime | None = None,
    sessions: SessionCache | None = None,
    input_samples: dict[str, dict[str, np.ndarray]] | None = None,
    output_samples: dict[str, np.ndarray] | None = None,
    telemetry_db: Path | None = None,
    recorder: SampleRecorder | None = None,
    telemetry_query: Callable[[str], list[tuple[Any, ...]]] | None = None,
) -> VerificationContext:
    """A context for the device at ``paths``: slots and the held desired state's expiry read now (unless
    ``desired_expires`` is given), samples from ``recorder`` merged under any passed explicitly."""
    clock = clock or SystemClock()
    if desired_expires is None:
        desired_expires = held_desired_expiry(paths, clock)
    slots, problems = slots_from_state(paths)
    for p in problems:
        _log.warning("verification: %s", p)
    ins: dict[str, dict[str, np.ndarray]] = {}
    outs: dict[str, np.ndarray] = {}
    if recorder is not None:
        ins, outs = recorder.snapshot()
    ins.update(input_samples or {})
    outs.update(output_samples or {})
    return VerificationContext(
        paths=paths,
        policy=policy,
        clock=clock,
        slots=slots,
        desired_expires=desired_expires,
        trusted_floor=read_clock_floor(paths.clock_file),
        telemetry_db=telemetry_db if telemetry_db is not None else paths.telemetry_db,
        telemetry_query=telemetry_query,
        input_samples=ins,
        output_samples=outs,
        sessions=sessions or SessionCache(),
    )
