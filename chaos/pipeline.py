"""One experiment, start to finish: load, pre-flight, then either a guarded run or an escalation.

The thin orchestrator that ``sre-agent chaos run`` and the daemon's chaos schedule share. Decisions are
made by :mod:`chaos.preflight` (pure) and :mod:`chaos.runner`; this module only does the I/O around
them: read the file and the device state, write the escalation packet (atomically) and the audit and
telemetry entries. The object that passed pre-flight is the object that runs: the file is read once.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.approval import roster_for
from chaos.devicestate import read_device_state
from chaos.escalation import EscalationPacket, build_escalation
from chaos.loader import Experiment, ExperimentError, load_experiment
from chaos.preflight import DeviceState, Finding, Preflight, PreflightResult
from policies.approvals import Approval
from policies.chaos import ChaosPolicy, default_chaos_policy
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = ["ChaosOutcome", "approval_findings", "default_budget", "escalations_dir", "guarded_run"]


def escalations_dir(paths: StatePaths) -> Path:
    """``<state>/run/chaos/escalations``: packets of experiments that were not run."""
    return paths.run / "chaos" / "escalations"


def default_budget(policy: ChaosPolicy, estimate_s: float | None) -> float:
    """The hard wall-clock budget for a run: 1.5 x the estimate + 30 s, never above the policy's."""
    if estimate_s is None:
        return policy.max_experiment_s
    return min(policy.max_experiment_s, estimate_s * 1.5 + 30.0)


@dataclass(frozen=True)
class ChaosOutcome:
    """What happened to one experiment."""

    preflight: PreflightResult
    experiment: Experiment | None
    packet: EscalationPacket | None = None
    packet_path: Path | None = None
    run: Any = None
    """The runner's ``RunResult`` when the experiment ran."""
    budget_s: float | None = None

    @property
    def ran(self) -> bool:
        return self.run is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.preflight.to_dict(), "ran": self.ran}
        if self.packet_path is not None:
            out["packet"] = str(self.packet_path)
        if self.run is not None:
            out["result"] = self.run.to_dict(with_journal=False)
            out["budget_s"] = self.budget_s
        return out


def approval_findings(
    approval: Approval | None, exp: Experiment, paths: StatePaths, clock: Clock
) -> tuple[str | None, list[Finding], str | None]:
    """The approved hash when ``approval`` verifies now, else a finding saying why it does not count."""
    if approval is None:
        return None, [], None
    from chaos.approval import verify_chaos_approval
    from sre_core.errors import InputError

    try:
        roster = roster_for(paths)
        operator = verify_chaos_approval(approval, experiment_hash=exp.hash, roster=roster, now=clock.now())
    except InputError as exc:
        why = f"the approval does not count: {exc.why.strip()}"
        return None, [Finding("approval-invalid", "", why)], None
    return exp.hash, [], operator.id


def _packet_name(result: PreflightResult, source: str) -> str:
    if result.experiment_hash:
        return result.experiment_hash.split(":")[-1][:16]
    return "invalid-" + hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]


def guarded_run(
    source: Path | Experiment,
    paths: StatePaths,
    *,
    policy: ChaosPolicy | None = None,
    clock: Clock | None = None,
    device: DeviceState | None = None,
    approval: Approval | None = None,
    budget_s: float | None = None,
    toxiproxy_url: str | None = None,
    serving_url: str | None = None,
    model: str | None = None,
    telemetry: TelemetrySink | None = None,
    audit: AuditLog | None = None,
    actor: str = "agent",
    stop: threading.Event | None = None,
    device_settings: dict[str, Any] | None = None,
) -> ChaosOutcome:
    """Pre-flight ``source`` against the device; run it guarded on ``run``, escalate it otherwise.

    Args:
        source: an experiment file or an already loaded :class:`Experiment`.
        paths: the device state directory (must exist).
        policy: the chaos policy (default: the shipped one).
        clock: time source (the allowed window, packet timestamps).
        device: a device snapshot; default: read now from ``paths``.
        approval: an operator's signed approval; verified here against the device's operator roster
            (:func:`chaos.approval.verify_chaos_approval`) before pre-flight may count it.
        budget_s: hard wall-clock budget; default :func:`default_budget`.
        toxiproxy_url, serving_url, model: passed to the runner (None: embedded fault proxy; no
            serving guardrail).
        telemetry, audit: where verdicts, packets and run results are recorded.
        stop: set it to interrupt a run early (the daemon's shutdown); cleanup still runs.
        device_settings: the device's own settings for the run (``chaos.resolve.DEVICE_KEYS``).

    Never raises for a bad or refused experiment: that is a ``reject``/``escalate`` outcome with a
    packet. Raises ``OSError`` when the state directory cannot be written.
    """
    policy = policy or default_chaos_policy()
    clock = clock or SystemClock()
    sink = telemetry or NullSink()
    audit = audit or AuditLog(paths.audit_log, clock=clock)
    pf = Preflight(policy)
    label = str(source.source if isinstance(source, Experiment) else source)
    snapshot = device or read_device_state(paths, clock)
    exp: Experiment | None = None
    approved_by: str | None = None
    result: PreflightResult
    if isinstance(source, Experiment):
        exp = source
    else:
        try:
            exp = load_experiment(Path(source))
        except ExperimentError as exc:
            result = pf.reject(exc)
    if exp is not None:
        approved, extra, approved_by = approval_findings(approval, exp, paths, clock)
        result = pf.check(exp, snapshot, approved, extra)
    rules = sorted({f.rule for f in result.findings})
    audit.append(
        "chaos.preflight",
        actor=actor,
        file=label,
        experiment_hash=result.experiment_hash,
        verdict=result.verdict,
        rules=rules,
        sanctioned=sorted({f.rule for f in result.sanctioned}),
        approved_by=approved_by,
    )
    sink.metric("chaos.preflight", 1.0, {"verdict": result.verdict})
    if result.verdict != "run" or exp is None:
        packet = build_escalation(result, exp, policy, clock.now(), snapshot)
        where = escalations_dir(paths) / f"{_packet_name(result, label)}.json"
        atomic_write_json(where, packet.to_dict())
        audit.append(
            "chaos.escalated",
            actor=actor,
            file=label,
            experiment_hash=result.experiment_hash,
            verdict=result.verdict,
            rules=rules,
            packet=str(where),
        )
        sink.event(
            "chaos.escalated",
            packet.summary(),
            severity="warning" if result.verdict == "escalate" else "error",
            attrs={"experiment_hash": result.experiment_hash, "rules": rules, "packet": str(where)},
        )
        sink.record("escalations", {"kind": packet.kind, "packet": packet.to_dict()})
        return ChaosOutcome(result, exp, packet, where)

    from chaos.runner import run_experiment_guarded

    estimate = result.report.estimated_duration_s if result.report else None
    budget = budget_s or default_budget(policy, estimate)
    run = run_experiment_guarded(
        exp,
        state=paths,
        budget_s=budget,
        guardrails=policy.guardrails,
        disk_reserve_mb=policy.headroom.disk_reserve_mb,
        serving_url=serving_url,
        model=model,
        toxiproxy_url=toxiproxy_url,
        telemetry=sink,
        audit=audit,
        clock=clock,
        stop=stop,
        configuration=device_settings,
    )
    return ChaosOutcome(result, exp, run=run, budget_s=budget)
