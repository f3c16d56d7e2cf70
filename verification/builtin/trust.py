"""Trust horizon (time left on the signed desired state) and clock sanity."""

from __future__ import annotations

import threading
from datetime import datetime

from verification.base import Check, CheckResult, Severity
from verification.context import VerificationContext

__all__ = ["ClockSanityCheck", "TrustHorizonCheck"]


class TrustHorizonCheck(Check):
    """How long until the desired state expires (then the device drops into safe mode)."""

    name = "trust.horizon"
    description = "time until the signed desired state expires"
    severity = Severity.CRITICAL
    interval_s = 300.0
    timeout_s = 10.0

    def run(self, ctx: VerificationContext) -> CheckResult:
        pol = ctx.policy.trust
        if ctx.desired_expires is None:
            return CheckResult.inconclusive("no signed desired state held yet")
        now = ctx.clock.now()
        if ctx.trusted_floor is not None and ctx.trusted_floor > now:
            now = ctx.trusted_floor  # trusted time: winding the clock back does not buy time
        left = (ctx.desired_expires - now).total_seconds()
        evidence = {"expires": ctx.desired_expires.isoformat(), "trusted_now": now.isoformat()}
        if left <= 0:
            return CheckResult.fail(
                f"desired state expired {-left:.0f} s ago: safe mode is due", evidence, horizon_s=left
            )
        if left < pol.horizon_fail_s:
            return CheckResult.fail(
                f"desired state expires in {left / 3600:.1f} h (under {pol.horizon_fail_s / 3600:.1f} h)",
                evidence,
                horizon_s=left,
            )
        if left < pol.horizon_warn_s:
            return CheckResult.warn(f"desired state expires in {left / 3600:.1f} h", evidence, horizon_s=left)
        return CheckResult.ok(f"desired state valid for {left / 86400:.1f} days", evidence, horizon_s=left)


class ClockSanityCheck(Check):
    """The wall clock is plausible, not behind trusted time, and has not stepped since the last run."""

    name = "trust.clock"
    description = "wall clock plausible, not behind trusted time, no step between runs"
    severity = Severity.CRITICAL
    interval_s = 300.0
    timeout_s = 10.0

    def __init__(self) -> None:
        self._last: tuple[datetime, float] | None = None
        self._lock = threading.Lock()

    def run(self, ctx: VerificationContext) -> CheckResult:
        pol = ctx.policy.trust
        now = ctx.clock.now()
        mono = ctx.clock.monotonic()
        with self._lock:
            last, self._last = self._last, (now, mono)
        evidence: dict[str, object] = {"now": now.isoformat()}
        if ctx.trusted_floor is not None:
            evidence["trusted_floor"] = ctx.trusted_floor.isoformat()
        if now < pol.earliest_plausible:
            return CheckResult.fail(
                f"wall clock {now.isoformat()} predates {pol.earliest_plausible.date()}: RTC reset?", evidence
            )
        if ctx.trusted_floor is not None:
            lag = (ctx.trusted_floor - now).total_seconds()
            if lag > pol.floor_tolerance_s:
                return CheckResult.fail(
                    f"wall clock is {lag:.0f} s behind the highest signed time seen", evidence, lag_s=lag
                )
        step = 0.0
        if last is not None:
            step = (now - last[0]).total_seconds() - (mono - last[1])
            evidence["step_s"] = round(step, 3)
            if abs(step) > pol.max_step_s:
                return CheckResult.warn(
                    f"wall clock stepped by {step:+.0f} s since the last check", evidence, step_s=step
                )
        return CheckResult.ok("wall clock is sane", evidence, step_s=step)
