"""The fault registry (``<state>/run/faults.json``) and the on-disk fault contracts.

Every action of our Chaos Toolkit extension records *how to undo* what it injected here before it
injects it, so an independent cleanup (the runner's ``finally``, the dead man's switch, or the agent on
its next start) can always clear it, whatever happened to the experiment process. Undo recipes are plain
data (``{"kind": ..., ...}``) so a different process can execute them.

On-disk contracts other components read (all JSON, written atomically, under ``<state>/run/chaos/``):

- ``input_noise.json``: ``{"share": 0..1, "sigma": float, "seed": int, "expires_at": iso}``. The serving
  router perturbs that share of inference requests' inputs with Gaussian noise (:func:`input_noise_spec`,
  :func:`apply_input_noise`).
- ``clock_skew.json``: ``{"offset_s": float, "expires_at": iso}``. The agent reads time through
  :class:`SkewedClock`, which adds the offset while the file exists.
- ``fill.bin``: the disk-fill ballast (removed on undo).

The registry file is guarded by an ``fcntl`` lock so the runner, its child and the watchdog can share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sre_core.atomic import atomic_write_bytes, atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock

__all__ = [
    "CleanupReport",
    "FaultRecord",
    "FaultRegistry",
    "NoiseSpec",
    "SkewedClock",
    "apply_input_noise",
    "chaos_dir",
    "clock_skew_offset",
    "input_noise_spec",
    "undo_fault",
]

_log = logging.getLogger(__name__)
MAX_FAULTS = 512


def chaos_dir(state_root: Path) -> Path:
    """``<state>/run/chaos``: where fault side files live."""
    return Path(state_root) / "run" / "chaos"


@dataclass(frozen=True)
class FaultRecord:
    """One injected fault and the recipe that undoes it."""

    id: str
    kind: str
    target: str
    undo: dict[str, Any]
    injected_at: str
    run_id: str | None = None
    pid: int = 0
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "undo": self.undo,
            "injected_at": self.injected_at,
            "run_id": self.run_id,
            "pid": self.pid,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FaultRecord:
        return cls(
            id=str(d["id"]),
            kind=str(d["kind"]),
            target=str(d.get("target", "")),
            undo=dict(d.get("undo") or {}),
            injected_at=str(d.get("injected_at", "")),
            run_id=d.get("run_id"),
            pid=int(d.get("pid", 0)),
            detail=dict(d.get("detail") or {}),
        )


@dataclass
class CleanupReport:
    """What a cleanup pass undid and what it could not."""

    cleared: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    proxy_reset: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and self.proxy_reset is not False

    def to_dict(self) -> dict[str, Any]:
        return {
            "cleared": list(self.cleared),
            "failed": dict(self.failed),
            "proxy_reset": self.proxy_reset,
            "notes": list(self.notes),
            "ok": self.ok,
        }


class FaultRegistry:
    """``<state>/run/faults.json``: the faults currently injected, shared across processes.

    Args:
        state_root: the device state directory.
        clock: time source for ``injected_at``.
    """

    def __init__(self, state_root: Path, clock: Clock | None = None) -> None:
        self.state_root = Path(state_root)
        self.path = self.state_root / "run" / "faults.json"
        self.clock = clock or SystemClock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name("faults.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> list[FaultRecord]:
        if not self.path.exists():
            return []
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError) as exc:
            # A registry we cannot read must not hide faults: keep the bytes for a human, start afresh.
            _log.error("fault registry %s unreadable (%s); preserving it as .corrupt", self.path, exc)
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_suffix(".corrupt"))
            return []
        return [FaultRecord.from_dict(d) for d in raw.get("faults", [])]

    def _write(self, faults: Sequence[FaultRecord]) -> None:
        atomic_write_json(self.path, {"faults": [f.to_dict() for f in faults]}, mode=0o600)

    def list(self) -> list[FaultRecord]:
        """The faults recorded now."""
        with self._locked():
            return self._read()

    def record(
        self,
        kind: str,
        target: str,
        undo: dict[str, Any],
        run_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> FaultRecord:
        """Record a fault *before* injecting it. Returns the record (its ``id`` removes it later).

        Raises:
            RuntimeError: the registry already holds :data:`MAX_FAULTS` faults.
        """
        rec = FaultRecord(
            id=uuid.uuid4().hex[:16],
            kind=kind,
            target=target,
            undo=dict(undo),
            injected_at=self.clock.now().isoformat(),
            run_id=run_id if run_id is not None else os.environ.get("SRE_CHAOS_RUN_ID"),
            pid=os.getpid(),
            detail=dict(detail or {}),
        )
        with self._locked():
            faults = self._read()
            if len(faults) >= MAX_FAULTS:
                raise RuntimeError(f"fault registry full ({MAX_FAULTS}); run `sre-agent chaos cleanup`")
            faults.append(rec)
            self._write(faults)
        return rec

    def update(self, fault_id: str, undo: dict[str, Any]) -> None:
        """Replace the undo recipe of a fault (e.g. once a spawned pid is known)."""
        with self._locked():
            faults = [
                FaultRecord(**{**f.__dict__, "undo": dict(undo)}) if f.id == fault_id else f
                for f in self._read()
            ]
            self._write(faults)

    def remove(self, fault_id: str) -> bool:
        """Forget a fault (after it was undone). Returns whether it was there."""
        with self._locked():
            faults = self._read()
            kept = [f for f in faults if f.id != fault_id]
            if len(kept) != len(faults):
                self._write(kept)
            return len(kept) != len(faults)

    def clear(
        self,
        undo: Callable[[FaultRecord], None] | None = None,
        run_id: str | None = None,
        audit: AuditLog | None = None,
    ) -> CleanupReport:
        """Undo every recorded fault (of ``run_id`` when given), newest first; keep those that fail.

        Never raises for a failing undo: the failure is reported and the record stays for a retry.
        """
        runner = undo or (lambda f: undo_fault(f, self.state_root, audit=audit))
        report = CleanupReport()
        for f in reversed(self.list()):
            if run_id is not None and f.run_id not in (run_id, None):
                continue
            try:
                runner(f)
            except Exception as exc:
                report.failed[f.id] = f"{f.kind} on {f.target}: {type(exc).__name__}: {exc}"
                continue
            self.remove(f.id)
            report.cleared.append(f.id)
        return report


def _pid_matches(pid: int, create_time: float | None) -> bool:
    """Whether ``pid`` is still the process we started (guards against pid reuse)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def undo_fault(
    fault: FaultRecord, state_root: Path, timeout_s: float = 3.0, audit: AuditLog | None = None
) -> None:
    """Execute one undo recipe. Idempotent: undoing something already gone succeeds.

    Raises:
        ValueError: unknown undo kind (the record stays in the registry).
        Exception: the undo failed (e.g. the Toxiproxy API is down).
    """
    u = fault.undo
    kind = u.get("kind")
    if kind == "toxic":
        from chaos.toxiproxy_client import ToxiproxyClient

        with ToxiproxyClient(str(u["url"]), timeout_s=timeout_s) as c:
            c.remove_toxic(str(u["proxy"]), str(u["toxic"]), missing_ok=True)
    elif kind == "proxy":
        from chaos.toxiproxy_client import ToxiproxyClient

        with ToxiproxyClient(str(u["url"]), timeout_s=timeout_s) as c:
            c.delete_proxy(str(u["proxy"]), missing_ok=True)
    elif kind == "remove_file":
        with contextlib.suppress(FileNotFoundError):
            Path(u["path"]).unlink()
    elif kind == "kill_pids":
        for entry in u.get("pids", []):
            pid, ctime = int(entry["pid"]), entry.get("create_time")
            if _pid_matches(pid, ctime):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    elif kind == "restore_file":
        backup, target = Path(u["backup"]), Path(u["target"])
        if backup.exists():
            atomic_write_bytes(target, backup.read_bytes(), mode=int(u.get("mode", 0o644)))
            backup.unlink()
    elif kind == "noop":
        return
    elif kind == "restart_serving":
        _restart_serving(u, timeout_s)
    elif kind == "flip_back":
        from chaos.actions import _flip_to

        _flip_to(Path(state_root), str(u["module"]), str(u["slot"]), audit)
    else:
        raise ValueError(f"unknown undo kind {kind!r} in fault {fault.id}")


def _ready(url: str | None, timeout_s: float) -> bool:
    if not url:
        return False
    import httpx

    try:
        return httpx.get(url.rstrip("/") + "/v2/health/ready", timeout=timeout_s).is_success
    except httpx.HTTPError:
        return False


def _restart_serving(u: Mapping[str, Any], timeout_s: float) -> None:
    """Start the serving worker again unless a supervisor already did; wait until it is ready."""
    import subprocess
    import time

    url = u.get("ready_url")
    if _ready(url, min(timeout_s, 2.0)):
        return
    argv = u.get("argv")
    if argv:
        subprocess.Popen(
            [str(a) for a in argv],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    if not url:
        if not argv:
            raise RuntimeError("no serving_restart argv and no serving_url to wait for: restart it by hand")
        return
    deadline = time.monotonic() + max(timeout_s, 1.0)
    while time.monotonic() < deadline:
        if _ready(url, 1.0):
            return
        time.sleep(0.1)
    raise RuntimeError(f"serving at {url} not ready within {timeout_s}s after restart")


# --- contracts read by other components -------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSpec:
    """Input noise to apply to a share of inference requests."""

    share: float
    sigma: float
    seed: int
    expires_at: datetime | None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
    return data if isinstance(data, dict) else None


def input_noise_spec(state_root: Path, now: datetime) -> NoiseSpec | None:
    """The input-noise fault in force at ``now`` (None when none or expired)."""
    d = _read_json(chaos_dir(state_root) / "input_noise.json")
    if d is None:
        return None
    exp = datetime.fromisoformat(d["expires_at"]) if d.get("expires_at") else None
    if exp is not None and now >= exp:
        return None
    return NoiseSpec(float(d["share"]), float(d["sigma"]), int(d.get("seed", 0)), exp)


def apply_input_noise(values: list[float], spec: NoiseSpec, request_no: int) -> list[float]:
    """Perturb ``values`` when request number ``request_no`` falls in the spec's share (deterministic)."""
    import random

    rng = random.Random(spec.seed * 1_000_003 + request_no)
    if rng.random() >= spec.share:
        return values
    return [v + rng.gauss(0.0, spec.sigma) for v in values]


def clock_skew_offset(state_root: Path, now: datetime) -> float:
    """The clock skew in seconds that the agent must apply at ``now`` (0.0 when none)."""
    d = _read_json(chaos_dir(state_root) / "clock_skew.json")
    if d is None:
        return 0.0
    if d.get("expires_at") and now >= datetime.fromisoformat(d["expires_at"]):
        return 0.0
    return float(d.get("offset_s", 0.0))


class SkewedClock:
    """A :class:`~sre_core.clock.Clock` that applies the chaos clock-skew fault to wall time.

    Monotonic time is never skewed (durations stay true), and trusted time never reads the skew: the
    fault targets the agent's notion of wall time, never the signed-time high-water mark, which
    :class:`deployment.trusted_time.TrustedTime` keeps on :attr:`unskewed` (a forward skew would
    otherwise ratchet the mark forward for good and expire desired states early).
    """

    def __init__(self, base: Clock, state_root: Path) -> None:
        self.base = base
        self.state_root = Path(state_root)

    @property
    def unskewed(self) -> Clock:
        """The clock under the fault (what trusted time reads)."""
        return self.base

    def now(self) -> datetime:
        real = self.base.now()
        return real + timedelta(seconds=clock_skew_offset(self.state_root, real))

    def monotonic(self) -> float:
        return self.base.monotonic()

    def sleep(self, seconds: float) -> None:
        self.base.sleep(seconds)
