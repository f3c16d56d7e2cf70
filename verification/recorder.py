"""A bounded, thread-safe record of recent model inputs and outputs for the drift checks.

Serving calls :meth:`SampleRecorder.observe` on a sample of requests (cheap: a copy into a ring
buffer); the verification context factory takes :meth:`SampleRecorder.snapshot`. Memory is bounded
by ``max_rows`` per module and tensor; the oldest rows are overwritten.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SampleRecorder"]


@dataclass
class _Ring:
    data: np.ndarray
    filled: int = 0
    pos: int = 0

    def push(self, rows: np.ndarray) -> None:
        cap = len(self.data)
        rows = rows[-cap:]
        n = len(rows)
        end = self.pos + n
        if end <= cap:
            self.data[self.pos : end] = rows
        else:
            first = cap - self.pos
            self.data[self.pos :] = rows[:first]
            self.data[: n - first] = rows[first:]
        self.pos = end % cap
        self.filled = min(cap, self.filled + n)

    def ordered(self) -> np.ndarray:
        if self.filled < len(self.data):
            return self.data[: self.filled].copy()
        return np.concatenate([self.data[self.pos :], self.data[: self.pos]])


@dataclass
class SampleRecorder:
    """Recent inputs (per module and input name) and outputs (per module), bounded.

    Args:
        max_rows: rows kept per module and tensor.
    """

    max_rows: int = 20_000
    _inputs: dict[tuple[str, str], _Ring] = field(default_factory=dict)
    _outputs: dict[str, _Ring] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError("max_rows must be at least 1")

    def _fresh(self, ring: _Ring | None, rows: np.ndarray) -> _Ring:
        if ring is None or ring.data.shape[1:] != rows.shape[1:]:
            # A new shape (a new model version with other features) starts a fresh record.
            ring = _Ring(np.empty((self.max_rows, *rows.shape[1:]), dtype=rows.dtype))
        return ring

    def observe(
        self, module: str, inputs: dict[str, np.ndarray] | None = None, outputs: np.ndarray | None = None
    ) -> None:
        """Record a batch: ``inputs`` name -> ``[N, ...]``, ``outputs`` ``[N, classes]`` or ``[N]``."""
        with self._lock:
            for name, arr in (inputs or {}).items():
                rows = np.asarray(arr)
                if rows.ndim == 0 or len(rows) == 0:
                    continue
                ring = self._inputs[(module, name)] = self._fresh(self._inputs.get((module, name)), rows)
                ring.push(rows)
            if outputs is not None:
                rows = np.asarray(outputs)
                if rows.ndim > 0 and len(rows) > 0:
                    ring = self._outputs[module] = self._fresh(self._outputs.get(module), rows)
                    ring.push(rows)

    def snapshot(self) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """Copies of what is held, oldest first: (module -> name -> inputs, module -> outputs)."""
        with self._lock:
            inputs: dict[str, dict[str, np.ndarray]] = {}
            for (module, name), ring in self._inputs.items():
                inputs.setdefault(module, {})[name] = ring.ordered()
            outputs = {m: ring.ordered() for m, ring in self._outputs.items()}
        return inputs, outputs

    def clear(self, module: str | None = None) -> None:
        """Forget a module's samples (after a flip the baseline is the new version's) or all."""
        with self._lock:
            if module is None:
                self._inputs.clear()
                self._outputs.clear()
                return
            for key in [k for k in self._inputs if k[0] == module]:
                del self._inputs[key]
            self._outputs.pop(module, None)
