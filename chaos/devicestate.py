"""Reading a :class:`~chaos.preflight.DeviceState` snapshot from a device state directory (I/O only).

The decisions live in :mod:`chaos.preflight`; this module only gathers the values: slot state from
:class:`deployment.slots.SlotManager` (the standby is *verified* when it holds a version that is not
marked bad and re-hashes to its signed digests), safe mode from :mod:`deployment.safemode`, and the
resources of the machine (free disk on the state volume, load per core, available memory).
Anything that cannot be read is reported as unknown, which the pre-flight treats as "not safe".
"""

from __future__ import annotations

import logging
import os
import shutil

from chaos.preflight import DeviceState, SlotState
from sre_core.clock import Clock, SystemClock
from sre_core.paths import StatePaths

__all__ = ["read_device_state"]

_log = logging.getLogger(__name__)
MB = 1024 * 1024


def _slots(paths: StatePaths, rehash: bool) -> tuple[dict[str, SlotState], bool]:
    from deployment.safemode import is_safe_mode
    from deployment.slots import SlotManager
    from sre_core.audit import AuditLog

    safe = is_safe_mode(paths)
    mgr = SlotManager(paths, AuditLog(paths.audit_log))
    out: dict[str, SlotState] = {}
    for name in mgr.modules():
        try:
            st = mgr.status(name)
        except Exception as exc:  # an unreadable module counts as one without a verified standby
            _log.warning("chaos pre-flight: cannot read slot state of %s: %s", name, exc)
            out[name] = SlotState(phase="unknown")
            continue
        verified = False
        if st.standby is not None and st.standby.sha256 not in st.bad:
            verified = mgr.verify_slot(name, st.standby.slot).ok if rehash else True
        phase = str(st.phase.value)
        out[name] = SlotState(
            active_version=st.active.version if st.active else None,
            standby_version=st.standby.version if st.standby else None,
            standby_verified=verified,
            canary_in_progress=phase == "canary",
            phase=phase,
        )
    return out, safe


def read_device_state(
    paths: StatePaths, clock: Clock | None = None, device_id: str | None = None, rehash: bool = True
) -> DeviceState:
    """A snapshot of the device for the dynamic pre-flight (never raises for a missing piece).

    Args:
        paths: the device state layout.
        clock: the time source for ``now`` (the allowed-window check).
        device_id: default: read from the identity directory.
        rehash: re-hash each standby slot against its signed digests (True: what "verified" means;
            False: trust the slot record, for callers that verify on their own schedule).
    """
    clock = clock or SystemClock()
    try:
        modules, safe = _slots(paths, rehash)
    except Exception as exc:
        _log.warning("chaos pre-flight: slot state unavailable: %s", exc)
        modules, safe = {}, True
    disk: float | None = None
    try:
        disk = shutil.disk_usage(paths.root).free / MB
    except OSError:
        disk = None
    cpu: float | None = None
    try:
        cpu = os.getloadavg()[0] / max(1, os.cpu_count() or 1)
    except OSError:
        cpu = None
    mem: float | None = None
    try:
        import psutil

        mem = psutil.virtual_memory().available / MB
    except Exception:
        mem = None
    if device_id is None:
        try:
            device_id = paths.device_id_file.read_text(encoding="utf-8").strip() or None
        except OSError:
            device_id = None
    return DeviceState(
        now=clock.now(),
        safe_mode=safe,
        modules=modules,
        disk_free_mb=disk,
        cpu_load=cpu,
        mem_available_mb=mem,
        device_id=device_id,
    )
