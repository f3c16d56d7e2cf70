"""The telemetry interface lower layers write through, without importing ``sre_agent``.

``sre_agent.telemetry`` provides the DuckDB-backed implementation; :class:`MemorySink` serves unit
tests and :class:`NullSink` code paths that run without a store. Calls must never block the caller
on I/O: implementations buffer and flush in batches.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

__all__ = ["MemorySink", "NullSink", "TelemetrySink"]


@runtime_checkable
class TelemetrySink(Protocol):
    """Where components send metrics, events and typed records."""

    def metric(
        self, name: str, value: float, labels: dict[str, str] | None = None, ts: datetime | None = None
    ) -> None:
        """A gauge/counter sample."""
        ...

    def event(
        self,
        kind: str,
        message: str,
        severity: str = "info",
        attrs: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        """Something that happened (a flip, a refused artifact, a chaos verdict)."""
        ...

    def record(self, table: str, row: dict[str, Any]) -> None:
        """A typed row for a named table (verification results, chaos journals, escalations...)."""
        ...


class NullSink:
    """Drops everything."""

    def metric(
        self, name: str, value: float, labels: dict[str, str] | None = None, ts: datetime | None = None
    ) -> None:
        return None

    def event(
        self,
        kind: str,
        message: str,
        severity: str = "info",
        attrs: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        return None

    def record(self, table: str, row: dict[str, Any]) -> None:
        return None


@dataclass
class MemorySink:
    """Keeps everything in lists (tests, small tools)."""

    metrics: list[tuple[str, float, dict[str, str]]] = field(default_factory=list)
    events: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def metric(
        self, name: str, value: float, labels: dict[str, str] | None = None, ts: datetime | None = None
    ) -> None:
        with self._lock:
            self.metrics.append((name, value, dict(labels or {})))

    def event(
        self,
        kind: str,
        message: str,
        severity: str = "info",
        attrs: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        with self._lock:
            self.events.append((kind, message, severity, dict(attrs or {})))

    def record(self, table: str, row: dict[str, Any]) -> None:
        with self._lock:
            self.records.append((table, dict(row)))
