"""Learned gates: conditions from chaos findings or an operator, persisted and evaluated like checks.

A gate names a check and a condition on that check's result: a measurement compared with a threshold
(``resources.headroom`` / ``memory_available_mb >= 300``), or just "the check must pass". Gates live as
one JSON file each under ``<state>/gates/``; adding and removing one is audited. A gate runs its
check itself (with the gate's own deadline), so it needs no ordering against the scheduled checks.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sre_core.atomic import atomic_write_json, fsync_dir
from sre_core.audit import AuditLog
from sre_core.errors import InputError
from verification.base import Check, CheckResult, Severity, Status
from verification.context import VerificationContext

__all__ = ["GATE_PREFIX", "GateCheck", "GateDefinition", "GateStore", "evaluate_gate"]

GATE_PREFIX = "gate."
Op = Literal["<", "<=", ">", ">=", "=="]
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}


class GateDefinition(BaseModel):
    """One persisted gate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    check: str = Field(description="registered check whose result the gate judges")
    measurement: str | None = Field(default=None, description="a measurement of that check's result")
    op: Op | None = None
    threshold: float | None = None
    severity: Literal["info", "warning", "critical"] = "warning"
    source: Literal["chaos", "operator"] = "operator"
    reason: str = Field(default="", max_length=2000, description="why the gate exists (the finding)")
    finding: dict[str, Any] | None = Field(default=None, description="chaos finding reference/details")
    created: datetime | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=3600)

    @model_validator(mode="after")
    def _condition(self) -> GateDefinition:
        given = [self.measurement is not None, self.op is not None, self.threshold is not None]
        if any(given) and not all(given):
            raise ValueError("measurement, op and threshold go together")
        if self.check.startswith(GATE_PREFIX):
            raise ValueError("a gate cannot judge another gate")
        return self

    @property
    def check_name(self) -> str:
        """The name the gate runs under (``gate.<name>``)."""
        return GATE_PREFIX + self.name

    def describe(self) -> str:
        if self.measurement is None:
            return f"{self.check} must pass"
        return f"{self.check}: {self.measurement} {self.op} {self.threshold:g}"


def evaluate_gate(gate: GateDefinition, inner: CheckResult) -> CheckResult:
    """Judge a check's result against the gate's condition (pure)."""
    evidence: dict[str, Any] = {
        "gate": gate.name,
        "condition": gate.describe(),
        "source": gate.source,
        "reason": gate.reason,
        "check_status": inner.status.value,
        "check_summary": inner.summary,
    }
    if inner.status in {Status.ERROR, Status.TIMEOUT}:
        return CheckResult(Status.ERROR, f"gate cannot be judged: {inner.summary}", evidence)
    if gate.measurement is None:
        if inner.status.failing:
            return CheckResult.fail(f"{gate.describe()}, but: {inner.summary}", evidence)
        if inner.status is Status.INCONCLUSIVE:
            return CheckResult.inconclusive(f"{gate.check} is inconclusive: {inner.summary}", evidence)
        return CheckResult.ok(f"{gate.describe()}: {inner.status.value}", evidence)
    value = inner.measurements.get(gate.measurement)
    if value is None:
        evidence["measurements"] = sorted(inner.measurements)
        if inner.status is Status.INCONCLUSIVE:
            return CheckResult.inconclusive(f"{gate.check} is inconclusive: {inner.summary}", evidence)
        return CheckResult(
            Status.ERROR, f"{gate.check} reports no measurement {gate.measurement!r}", evidence
        )
    assert gate.op is not None and gate.threshold is not None  # noqa: S101 (validated together)
    evidence["value"] = value
    if _OPS[gate.op](value, gate.threshold):
        return CheckResult.ok(f"{gate.describe()} holds ({value:g})", evidence, value=value)
    return CheckResult.fail(f"{gate.describe()} violated ({value:g})", evidence, value=value)


class GateCheck(Check):
    """A gate evaluated like a check: run the named check, judge its result."""

    def __init__(self, gate: GateDefinition, resolve: Callable[[str], Check]) -> None:
        self.gate = gate
        self.name = gate.check_name
        self.description = gate.reason or gate.describe()
        self.severity = Severity(gate.severity)
        self.timeout_s = gate.timeout_s
        self._resolve = resolve

    def run(self, ctx: VerificationContext) -> CheckResult:
        inner = self._resolve(self.gate.check).run(ctx)
        return evaluate_gate(self.gate, inner)


class GateStore:
    """The gate files under ``<state>/gates/``.

    Args:
        directory: the gates directory.
        audit: where add/remove are recorded (optional for read-only use).
        clock_now: stamps ``created`` on add when the definition has none.
    """

    def __init__(
        self,
        directory: Path,
        audit: AuditLog | None = None,
        clock_now: Callable[[], datetime] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.audit = audit
        self.clock_now = clock_now

    def _file(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def add(self, gate: GateDefinition, actor: str = "operator", replace: bool = False) -> GateDefinition:
        """Persist a gate. Raises InputError if one with that name exists (unless ``replace``)."""
        if self._file(gate.name).exists() and not replace:
            raise InputError(
                f"add gate {gate.name}", "a gate with that name exists", "remove it first or pick a new name"
            )
        if gate.created is None and self.clock_now is not None:
            gate = gate.model_copy(update={"created": self.clock_now()})
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._file(gate.name), json.loads(gate.model_dump_json()))
        if self.audit is not None:
            self.audit.append(
                "gate.added",
                actor=actor,
                gate=gate.name,
                condition=gate.describe(),
                source=gate.source,
                reason=gate.reason,
            )
        return gate

    def remove(self, name: str, actor: str = "operator") -> GateDefinition:
        """Delete a gate. Raises InputError if there is none by that name."""
        gate = self.get(name)
        self._file(name).unlink()
        fsync_dir(self.directory)
        if self.audit is not None:
            self.audit.append("gate.removed", actor=actor, gate=name, condition=gate.describe())
        return gate

    def get(self, name: str) -> GateDefinition:
        """One gate. Raises InputError if missing or invalid."""
        path = self._file(name)
        if not path.is_file():
            raise InputError(f"gate {name}", "no such gate", "see `sre-agent gates list`")
        return self._load(path)

    def _load(self, path: Path) -> GateDefinition:
        try:
            return GateDefinition.model_validate_json(path.read_bytes())
        except (ValidationError, OSError) as exc:
            raise InputError(f"load gate {path}", str(exc), "fix or remove the file") from exc

    def list(self) -> tuple[list[GateDefinition], list[tuple[str, str]]]:
        """All gates sorted by name, plus ``(file stem, message)`` for each file that does not parse."""
        gates: list[GateDefinition] = []
        problems: list[tuple[str, str]] = []
        if not self.directory.is_dir():
            return gates, problems
        for path in sorted(self.directory.glob("*.json")):
            try:
                gates.append(self._load(path))
            except InputError as exc:
                problems.append((path.stem, exc.message))
        return gates, problems
