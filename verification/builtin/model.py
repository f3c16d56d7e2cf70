"""Model behaviour (golden vectors on both slots) and rollback readiness (the standby can take over)."""

from __future__ import annotations

from typing import Any

from verification.base import Check, CheckResult, Severity
from verification.builtin._model import intact, run_golden
from verification.context import SlotView, VerificationContext

__all__ = ["GoldenVectorsCheck", "RollbackReadinessCheck"]


def _is_onnx_model(slot: SlotView) -> bool:
    m = slot.manifest
    return m is not None and m.kind == "model" and m.runtime.engine == "onnxruntime"


class GoldenVectorsCheck(Check):
    """Run each module's signed golden vectors on the active and the standby slot."""

    name = "model.golden"
    description = "signed golden vectors pass on the active and the standby slot (real ONNX Runtime)"
    severity = Severity.CRITICAL
    interval_s = 900.0
    timeout_s = 60.0

    def run(self, ctx: VerificationContext) -> CheckResult:
        evidence: dict[str, Any] = {}
        failed: list[str] = []
        judged = 0
        worst = 0.0
        for slot in sorted(ctx.slots, key=lambda s: (s.module, s.role)):
            if not _is_onnx_model(slot):
                continue
            key = f"{slot.module}/{slot.role}"
            golden = slot.manifest.golden if slot.manifest is not None else None
            if golden is None or not golden.vectors:
                evidence[key] = {"version": slot.version, "note": "no golden vectors shipped"}
                continue
            if not slot.artifact.is_file():
                evidence[key] = {"version": slot.version, "ok": False, "error": "artifact missing"}
                failed.append(key)
                continue
            outcome = run_golden(ctx.sessions, slot)
            judged += 1
            worst = max(worst, outcome.max_abs_error)
            evidence[key] = {"version": slot.version, "slot": slot.slot, **outcome.evidence()}
            if not outcome.ok:
                failed.append(key)
        if failed:
            return CheckResult.fail(
                f"golden vectors fail on {', '.join(failed)}", evidence, max_abs_error=worst
            ).about({k.split("/")[0] for k in failed})
        if judged == 0:
            return CheckResult.inconclusive("no installed model ships golden vectors", evidence)
        return CheckResult.ok(f"golden vectors pass on {judged} slot(s)", evidence, max_abs_error=worst)


class RollbackReadinessCheck(Check):
    """The standby of every module is intact, verified, loads into a real session, passes its vectors."""

    name = "rollback.readiness"
    description = "every module has a standby that is intact, verified, loads and passes golden vectors"
    severity = Severity.CRITICAL
    interval_s = 1800.0
    timeout_s = 60.0

    def run(self, ctx: VerificationContext) -> CheckResult:
        evidence: dict[str, Any] = {}
        not_ready: list[str] = []
        unproven: list[str] = []
        modules = sorted({s.module for s in ctx.slots if s.role == "active"})
        for module in modules:
            standby = ctx.slot(module, "standby")
            if standby is None:
                evidence[module] = {"ready": False, "reason": "no standby installed: nothing to roll back to"}
                not_ready.append(module)
                continue
            info: dict[str, Any] = {"version": standby.version, "slot": standby.slot}
            evidence[module] = info
            if not standby.verified:
                info.update(ready=False, reason="standby is not recorded as verified")
                not_ready.append(module)
                continue
            ok, why = intact(standby)
            info["integrity"] = why
            if not ok:
                info.update(ready=False, reason=f"standby is not intact: {why}")
                not_ready.append(module)
                continue
            if not _is_onnx_model(standby):
                info["ready"] = True
                continue
            outcome = run_golden(ctx.sessions, standby)
            info["golden"] = outcome.evidence()
            if not outcome.ok:
                reason = outcome.error or "golden vectors fail"
                info.update(ready=False, reason=f"standby {reason}")
                not_ready.append(module)
            elif outcome.vectors == 0:
                info.update(ready=True, note="loads, but ships no golden vectors to prove behaviour")
                unproven.append(module)
            else:
                info["ready"] = True
        ready = len(modules) - len(not_ready)
        if not_ready:
            return CheckResult.fail(
                f"cannot roll back: {', '.join(not_ready)}", evidence, ready=ready, not_ready=len(not_ready)
            ).about(not_ready)
        if not modules:
            return CheckResult.inconclusive("no module is installed", evidence)
        if unproven:
            return CheckResult.warn(
                f"standby loads but is unproven (no golden vectors): {', '.join(unproven)}",
                evidence,
                ready=ready,
                not_ready=0,
            )
        return CheckResult.ok(f"{ready} module(s) ready to roll back", evidence, ready=ready, not_ready=0)
