"""The values a check judges: installed slots, trust horizon, samples, paths, clock and policy.

Checks read only this value, never the device's bookkeeping files directly, so they are testable with
artifacts built in the test and independent of how ``deployment.slots`` stores its state.
:mod:`verification.adapters` builds a context from a real state directory.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deployment.manifest import ModuleManifest
from policies.verification import VerificationPolicy
from sre_core.clock import Clock, SystemClock
from sre_core.paths import StatePaths

__all__ = ["FrozenClock", "SessionCache", "SlotView", "VerificationContext", "sha256_file"]

Role = Literal["active", "standby"]
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class SlotView:
    """One installed slot of a module, as the slot bookkeeping describes it.

    Args:
        module: module name.
        slot: slot directory name (``a`` or ``b``).
        role: ``active`` or ``standby``.
        path: the slot directory.
        version: installed version.
        sha256: the signed digest of the artifact installed there.
        manifest: the signed module manifest of that version (golden vectors, runtime).
        verified: whether the installer recorded the slot as verified (standby readiness needs it).
        files: for extracted bundles, relative path -> sha256 of every installed file (then the
            bundle's own digest is not re-hashable and these are checked instead).
    """

    module: str
    slot: str
    role: Role
    path: Path
    version: str
    sha256: str
    manifest: ModuleManifest | None = None
    verified: bool = True
    files: dict[str, str] | None = None

    @property
    def artifact(self) -> Path:
        """The installed artifact file (``manifest.filename`` inside the slot)."""
        name = self.manifest.filename if self.manifest is not None else "model.onnx"
        return self.path / name


class SessionCache:
    """ONNX Runtime sessions keyed by (path, size, mtime), so a scheduled check does not rebuild one.

    A changed file gets a fresh session; bounded to ``max_sessions`` (oldest evicted).
    """

    def __init__(self, max_sessions: int = 8, providers: list[str] | None = None) -> None:
        self.max_sessions = max_sessions
        self.providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[tuple[str, int, int], Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Sessions and locks do not cross a process boundary: a child starts with an empty cache.
        return {"max_sessions": self.max_sessions, "providers": self.providers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_sessions"], state["providers"])  # type: ignore[misc]

    def get(self, path: Path) -> Any:
        """A session for ``path``; raises whatever onnxruntime raises for an unloadable model."""
        import onnxruntime as ort

        st = Path(path).stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            sess = self._sessions.get(key)
        if sess is not None:
            return sess
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        with self._lock:
            for old in [k for k in self._sessions if k[0] == key[0]]:
                del self._sessions[old]
            while len(self._sessions) >= self.max_sessions:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[key] = sess
        return sess


@dataclass(frozen=True)
class FrozenClock:
    """A clock stopped at one instant: what a child process sees of a clock that cannot be pickled."""

    wall: datetime
    mono: float

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        return None


@dataclass
class VerificationContext:
    """Everything a check may look at.

    Args:
        paths: the device state directory layout.
        policy: the verification policy (thresholds, reserves).
        clock: wall + monotonic time.
        slots: installed slots of every module.
        desired_expires: expiry of the signed desired state being enforced (None: never pulled).
        trusted_floor: highest signed timestamp seen (the clock high-water mark), if known.
        telemetry_db: the DuckDB telemetry file to check (None: skip).
        telemetry_query: when this process already holds the DuckDB file (the daemon's store), a
            function running SQL on that connection and returning rows; the integrity check uses it
            instead of opening the path (DuckDB lets nobody else open a held file).
        input_samples: module -> input name -> recent inputs ``[N, features]`` recorded by serving.
        output_samples: module -> recent outputs (``[N, classes]`` probabilities or ``[N]`` class ids).
        sessions: ONNX Runtime session cache shared by the model checks.
    """

    paths: StatePaths
    policy: VerificationPolicy
    clock: Clock = field(default_factory=SystemClock)
    slots: list[SlotView] = field(default_factory=list)
    desired_expires: datetime | None = None
    trusted_floor: datetime | None = None
    telemetry_db: Path | None = None
    telemetry_query: Callable[[str], list[tuple[Any, ...]]] | None = None
    input_samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    output_samples: dict[str, np.ndarray] = field(default_factory=dict)
    sessions: SessionCache = field(default_factory=SessionCache)

    def __getstate__(self) -> dict[str, Any]:
        """What a child process gets (process isolation): no live connection, no sessions; the clock
        as is when it pickles (the system clock), else frozen at this instant."""
        import pickle

        state = dict(self.__dict__)
        state["telemetry_query"] = None
        try:
            pickle.dumps(self.clock)
        except Exception:
            state["clock"] = FrozenClock(self.clock.now(), self.clock.monotonic())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def modules(self) -> list[str]:
        """Module names with at least one installed slot, sorted."""
        return sorted({s.module for s in self.slots})

    def slot(self, module: str, role: Role) -> SlotView | None:
        """The module's slot in ``role``, if installed."""
        for s in self.slots:
            if s.module == module and s.role == role:
                return s
        return None

    def manifest(self, module: str) -> ModuleManifest | None:
        """The active slot's manifest (else the standby's)."""
        for role in ("active", "standby"):
            s = self.slot(module, role)  # type: ignore[arg-type]
            if s is not None and s.manifest is not None:
                return s.manifest
        return None
