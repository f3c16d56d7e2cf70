"""The escalation packet for an experiment that pre-flight did not let run unattended.

Everything a human needs to decide, in one self-contained document: the raw experiment and its content
hash (an approval binds to the hash, so an edited experiment needs a new approval), the findings (rule
and activity path), the resolved targets, the device snapshot the decision was made on, and a plan
table (what breaks, what is changed and how it is restored, the stop conditions, the duration).

Built by a pure function from values; storing and uploading it is the agent's job (``to_dict``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chaos.loader import Experiment
from chaos.preflight import ActivityInfo, DeviceState, PreflightResult
from policies.chaos import ChaosPolicy

__all__ = ["EscalationPacket", "FindingRow", "PlanRow", "build_escalation"]

PACKET_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FindingRow(_Model):
    """One finding: the rule, the activity path in the document, the activity name, the explanation."""

    rule: str
    path: str
    activity: str
    message: str
    verdict: Literal["escalate", "reject"]


class PlanRow(_Model):
    """One step of the experiment as it would run."""

    step: int
    phase: str
    path: str
    activity: str
    provider: str
    kind: str
    targets: list[str]
    breaks: str = Field(description="what breaks while it is in force")
    changes_state: bool
    restored_by: str = Field(description="the rollback (or 'expires after Ns') that undoes it")
    duration_s: float | None = Field(description="time the step takes; None: unbounded")
    fault_s: float | None = Field(description="how long its fault lasts at most; None: unbounded")


class EscalationPacket(_Model):
    """A not-run experiment, escalated to a human. ``to_dict()`` is what gets stored and uploaded."""

    version: int = PACKET_VERSION
    kind: Literal["chaos.escalation"] = "chaos.escalation"
    created: datetime
    device_id: str | None
    verdict: Literal["escalate", "reject"]
    title: str
    source: str
    experiment_hash: str | None
    experiment: dict[str, Any] | None
    findings: list[FindingRow]
    targets: list[str]
    standby_modules: list[str]
    device: dict[str, Any] | None
    plan: list[PlanRow]
    stop_conditions: list[str]
    estimated_duration_s: float | None
    budget_s: float
    approve_with: str = Field(description="how an operator sanctions this exact experiment")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (datetimes as ISO strings)."""
        return self.model_dump(mode="json")

    def summary(self) -> str:
        """One line for logs and incident titles."""
        rules = sorted({f.rule for f in self.findings})
        short = (self.experiment_hash or "?")[:19]
        return f"chaos experiment {self.title!r} ({short}) {self.verdict}: {', '.join(rules)}"


def _breaks(a: ActivityInfo) -> str:
    if a.state_changing or not a.known:
        return a.effect
    if a.kind == "action":
        return f"nothing (cleanup: {a.effect})" if a.effect else "nothing (cleanup)"
    return "nothing (observes)"


def _stop_conditions(exp: Experiment | None, policy: ChaosPolicy) -> list[str]:
    g = policy.guardrails
    out = [
        f"guardrail: inference error rate above {g.max_error_rate:g}",
        f"guardrail: inference p95 above {g.max_p95_ms:g} ms",
        f"guardrail: uplink backlog above {g.max_uplink_backlog} rows",
        f"guardrail: a health probe errors (fail-closed), checked every {g.probe_interval_s:g} s",
        f"hard wall-clock budget of {policy.max_experiment_s:g} s (SIGUSR1, SIGUSR2, then SIGKILL)",
        "rollbacks run whatever happened (strategy 'always'), then an independent cleanup of every fault",
    ]
    if exp is not None:
        ssh = exp.raw.get("steady-state-hypothesis")
        if isinstance(ssh, dict):
            for p in ssh.get("probes") or []:
                if isinstance(p, dict):
                    out.append(
                        f"steady-state probe {p.get('name', p.get('ref'))!r} outside its tolerance "
                        f"{p.get('tolerance')!r} (deviation)"
                    )
    return out


def build_escalation(
    result: PreflightResult,
    experiment: Experiment | None,
    policy: ChaosPolicy,
    now: datetime,
    device: DeviceState | None = None,
) -> EscalationPacket:
    """The packet for a pre-flight result whose verdict is not ``run``.

    Raises:
        ValueError: the verdict is ``run`` (nothing to escalate).
    """
    if result.verdict == "run":
        raise ValueError("a runnable experiment is not escalated")
    device = device or result.device
    report = result.report
    plan: list[PlanRow] = []
    if report is not None:
        for i, a in enumerate(report.activities, 1):
            if a.state_changing:
                if a.restored_by:
                    restored = f"rollback {a.restored_by}"
                elif a.fault_s is not None and a.known:
                    restored = f"expires after {a.fault_s:g}s; no rollback declared"
                else:
                    restored = "NOT RESTORED by the experiment (independent cleanup only)"
            else:
                restored = "nothing to restore"
            plan.append(
                PlanRow(
                    step=i,
                    phase=a.phase,
                    path=a.path,
                    activity=a.name,
                    provider=a.key,
                    kind=a.kind,
                    targets=list(a.targets),
                    breaks=_breaks(a),
                    changes_state=a.state_changing,
                    restored_by=restored,
                    duration_s=a.duration_s,
                    fault_s=a.fault_s if a.state_changing else 0.0,
                )
            )
    h = result.experiment_hash
    return EscalationPacket(
        created=now,
        device_id=device.device_id if device else None,
        verdict="reject" if result.verdict == "reject" else "escalate",
        title=experiment.title if experiment else "",
        source=result.source,
        experiment_hash=h,
        experiment=dict(experiment.raw) if experiment else None,
        findings=[FindingRow(**f.to_dict()) for f in result.findings],  # type: ignore[arg-type]
        targets=list(report.targets) if report else [],
        standby_modules=list(report.standby_modules) if report else [],
        device=device.model_dump(mode="json") if device else None,
        plan=plan,
        stop_conditions=_stop_conditions(experiment, policy),
        estimated_duration_s=report.estimated_duration_s if report else None,
        budget_s=policy.max_experiment_s,
        approve_with=(
            f"an operator signs an approval of experiment hash {h} (`sre-agent chaos approve FILE "
            "--key KEY --operator ID --out APPROVAL.json`), then `sre-agent chaos run FILE --approve "
            "APPROVAL.json`; never-approvable findings stay blocking"
            if h
            else "fix the document; it is invalid"
        ),
    )
