"""What a check is and what it returns.

A check is a small typed unit with a name, a default schedule, a severity and a timeout; its
:meth:`Check.run` takes a :class:`~verification.context.VerificationContext` and returns a
:class:`CheckResult` carrying evidence. Checks are pure with respect to the harness: they never write
telemetry or raise incidents themselves; the runner does that for every result.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from verification.context import VerificationContext

__all__ = ["Check", "CheckResult", "CheckSpec", "Severity", "Status"]


class Severity(enum.StrEnum):
    """How much a failure of the check matters (incidents carry it)."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Status(enum.StrEnum):
    """The verdict of one run.

    pass: verified; warn: degraded but within policy; fail: the check found a problem; error: the check
    itself raised (the traceback is in the result); timeout: it did not finish within its timeout;
    inconclusive: not enough data to judge (too few samples, nothing installed), never a pass.
    """

    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    WARN = "warn"
    FAIL = "fail"
    ERROR = "error"
    TIMEOUT = "timeout"
    INCONCLUSIVE = "inconclusive"

    @property
    def failing(self) -> bool:
        """True for the verdicts that raise an incident."""
        return self in {Status.FAIL, Status.ERROR, Status.TIMEOUT}


@dataclass(frozen=True)
class CheckResult:
    """One run's verdict with its evidence.

    ``check``, ``started``, ``duration_s`` and ``severity`` are stamped by the runner; a check builds
    its result with :meth:`ok`, :meth:`warn`, :meth:`fail` or :meth:`inconclusive`.
    """

    status: Status
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, float] = field(default_factory=dict)
    check: str = ""
    severity: Severity = Severity.WARNING
    started: datetime | None = None
    duration_s: float = 0.0
    traceback: str | None = None
    modules: tuple[str, ...] = ()

    @classmethod
    def ok(cls, summary: str, evidence: dict[str, Any] | None = None, **measurements: float) -> CheckResult:
        return cls(Status.PASS, summary, dict(evidence or {}), dict(measurements))

    @classmethod
    def warn(cls, summary: str, evidence: dict[str, Any] | None = None, **measurements: float) -> CheckResult:
        return cls(Status.WARN, summary, dict(evidence or {}), dict(measurements))

    @classmethod
    def fail(cls, summary: str, evidence: dict[str, Any] | None = None, **measurements: float) -> CheckResult:
        return cls(Status.FAIL, summary, dict(evidence or {}), dict(measurements))

    @classmethod
    def inconclusive(
        cls, summary: str, evidence: dict[str, Any] | None = None, **measurements: float
    ) -> CheckResult:
        return cls(Status.INCONCLUSIVE, summary, dict(evidence or {}), dict(measurements))

    def about(self, modules: list[str] | tuple[str, ...] | set[str]) -> CheckResult:
        """A copy naming the modules the verdict concerns (incidents are raised per device, with these)."""
        return replace(self, modules=tuple(sorted(set(modules))))

    def stamped(self, check: str, severity: Severity, started: datetime, duration_s: float) -> CheckResult:
        """A copy with the runner's bookkeeping filled in."""
        return replace(self, check=check, severity=severity, started=started, duration_s=duration_s)

    def to_row(self) -> dict[str, Any]:
        """The ``verification_results`` telemetry row (flat, JSON-safe values)."""
        import json

        return {
            "ts": self.started,
            "check": self.check,
            "status": self.status.value,
            "severity": self.severity.value,
            "summary": self.summary,
            "duration_s": round(self.duration_s, 6),
            "evidence": json.dumps(self.evidence, sort_keys=True, default=str),
            "measurements": json.dumps(self.measurements, sort_keys=True),
            "traceback": self.traceback,
            "modules": ",".join(self.modules),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (CLI ``--json``)."""
        return {
            "check": self.check,
            "status": self.status.value,
            "severity": self.severity.value,
            "summary": self.summary,
            "started": self.started.isoformat() if self.started else None,
            "duration_s": round(self.duration_s, 6),
            "evidence": self.evidence,
            "measurements": self.measurements,
            "traceback": self.traceback,
            "modules": list(self.modules),
        }


@dataclass(frozen=True)
class CheckSpec:
    """A check's effective schedule and limits (defaults from the check, overridden by policy)."""

    name: str
    interval_s: float
    timeout_s: float
    severity: Severity
    jitter_s: float = 0.0
    misfire_grace_s: float = 60.0
    isolation: Literal["thread", "process"] = "thread"

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"check {self.name}: interval and timeout must be positive")
        if self.jitter_s < 0 or self.misfire_grace_s < 0:
            raise ValueError(f"check {self.name}: jitter and misfire grace cannot be negative")


class Check(ABC):
    """Base class of every check (built-in, third-party through ``sre_agent.checks``, or a gate).

    Subclasses set the class attributes and implement :meth:`run`. ``run`` may raise: the runner turns
    an exception into an ``error`` result with the traceback.
    """

    name: str = ""
    description: str = ""
    severity: Severity = Severity.WARNING
    interval_s: float | None = None  # None: the policy's defaults
    timeout_s: float | None = None
    isolation: Literal["thread", "process"] = "thread"

    @abstractmethod
    def run(self, ctx: VerificationContext) -> CheckResult:
        """Judge the device described by ``ctx``; return the verdict with evidence."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
