"""The harness: policy + registry + learned gates + runner, for one-shot runs and the scheduler."""

from __future__ import annotations

from pathlib import Path

from policies.verification import VerificationPolicy
from sre_core.clock import Clock
from sre_core.telemetry import TelemetrySink
from verification.base import CheckResult, CheckSpec, Severity, Status
from verification.context import VerificationContext
from verification.gates import GATE_PREFIX, GateCheck, GateStore
from verification.registry import CheckRegistry, PlannedCheck
from verification.runner import Runner

__all__ = ["Harness"]


class Harness:
    """Plans the checks the policy names plus every learned gate, and runs them.

    Args:
        policy: the verification policy.
        registry: installed checks (default: built-ins + ``sre_agent.checks`` entry points).
        runner: the isolating runner (default: one writing to ``sink``).
        gates_dir: ``<state>/gates`` (None: no learned gates).
    """

    def __init__(
        self,
        policy: VerificationPolicy,
        registry: CheckRegistry | None = None,
        runner: Runner | None = None,
        gates_dir: Path | None = None,
        sink: TelemetrySink | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.policy = policy
        self.registry = registry or CheckRegistry.default()
        self.runner = runner or Runner(
            sink=sink,
            clock=clock,
            max_parallel=policy.defaults.max_parallel,
            incident_repeat_s=policy.incident_repeat_s,
        )
        self.gates = GateStore(gates_dir) if gates_dir is not None else None
        self._gate_checks: dict[str, GateCheck] = {}

    def plan(self, only: str | None = None) -> tuple[list[PlannedCheck], list[CheckResult]]:
        """What runs: policy-named checks and gates (or only the one named), and load problems."""
        if only is not None and only.startswith(GATE_PREFIX):
            planned: list[PlannedCheck] = []
            problems: list[CheckResult] = []
        else:
            planned, problems = self.registry.plan(self.policy, only)
        if only is None or only.startswith(GATE_PREFIX):
            g_planned, g_problems = self.plan_gates(only)
            planned += g_planned
            problems += g_problems
        return planned, problems

    def plan_gates(self, only: str | None = None) -> tuple[list[PlannedCheck], list[CheckResult]]:
        """Every persisted gate as a planned check (or just ``only``), and gate files that are invalid."""
        gp = self.policy.gates
        if self.gates is None or not gp.enabled:
            return [], []
        gates, bad = self.gates.list()
        problems = [
            CheckResult(Status.ERROR, msg, check=GATE_PREFIX + stem, severity=Severity.WARNING)
            for stem, msg in bad
            if only is None or only == GATE_PREFIX + stem
        ]
        planned: list[PlannedCheck] = []
        for gate in gates:
            if only is not None and gate.check_name != only:
                continue
            gc = self._gate_checks.get(gate.check_name)
            if gc is None or gc.gate != gate:
                gc = GateCheck(gate, self.registry.get)
                self._gate_checks[gate.check_name] = gc
            d = self.policy.defaults
            spec = CheckSpec(
                name=gc.name,
                interval_s=gp.interval_s or d.interval_s,
                timeout_s=gate.timeout_s or gp.timeout_s or d.timeout_s,
                severity=gc.severity,
                jitter_s=d.jitter_s if gp.jitter_s is None else gp.jitter_s,
                misfire_grace_s=d.misfire_grace_s,
            )
            planned.append(PlannedCheck(gc, spec))
        if only is not None and not planned and not problems:
            problems.append(
                CheckResult(Status.ERROR, f"no gate named {only[len(GATE_PREFIX) :]}", check=only)
            )
        return planned, problems

    def run_once(self, ctx: VerificationContext, only: str | None = None) -> list[CheckResult]:
        """Run everything planned once; load problems are recorded as error results too."""
        planned, problems = self.plan(only)
        recorded = [self.runner.record(self._stamp(p, ctx)) for p in problems]
        return self.runner.run(ctx, planned) + recorded

    @staticmethod
    def _stamp(res: CheckResult, ctx: VerificationContext) -> CheckResult:
        return res.stamped(res.check, res.severity, ctx.clock.now(), 0.0)
