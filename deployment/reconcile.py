"""Reconcile: bring each module from what is installed to what the signed desired state asks for.

One pass (:meth:`Reconciler.run_once`): resolve interrupted work (first pass only) -> pull through the
injected ``source`` (the TUF puller in production) -> decide safe mode by trusted time -> mark recalled
versions (never a rollback target again) -> plan per module, gated by constraints (:class:`Planner`,
pure) -> for each planned module: every check that can refuse the release (probe allowlist, probe count
and time budget, a canary driver for a managed model) runs *before* the standby is written, so a
refused release never destroys the last-known-good -> install into the standby, then either hand the
standby to a :class:`CanaryDriver` (managed serving) or, in file mode, flip ``current`` and let the
probes judge: commit, or roll back at once and mark the version bad -> record the outcome (audit,
telemetry, ``<state>/reconcile.json``). A refused pull (``PullResult.refused``) is reported and makes
the pass not ``ok``.

Managed mode seam: a :class:`CanaryDriver` gets the verified standby after
:meth:`deployment.slots.SlotManager.begin_canary`; it later calls ``promote_canary`` or
``abort_canary`` on the slot manager. Without a driver a managed model is never committed: the pass
reports ``needs_canary`` (run the daemon or ``sre-agent serve``, which canary it). A recall's target is
the exception: it is a rollback (as in RAUC or Mender), so it is verified, flipped, probed and committed
as the last-known-good at once, never canaried against the withdrawn version it replaces.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, time, tzinfo
from pathlib import Path
from typing import Any, Literal, Protocol

from deployment.artifacts import PullResult, TrustStatus, VerifiedArtifact
from deployment.config_modules import ConfigActivator, ConfigCheck, ConfigModuleError, config_document
from deployment.lifecycle import Phase
from deployment.manifest import Constraints, DesiredState, version_key
from deployment.policy_modules import PolicyActivator, PolicyModuleError, slot_documents
from deployment.probes import ProbeContext, ProbeRefusedError, ProbeRunner
from deployment.rollout import RolloutLedger, recalls_of
from deployment.safemode import SafeMode, decide
from deployment.slots import ModuleStatus, SlotError, SlotManager, SlotView
from policies.deployment import DeploymentPolicy
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError, SreError
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = [
    "CanaryDriver",
    "ModuleOutcome",
    "PlanContext",
    "PlanItem",
    "Planner",
    "ReconcileReport",
    "Reconciler",
    "Source",
    "in_maintenance_window",
    "parse_window",
    "read_last_reconcile",
    "reconcile_file",
]

Source = Callable[[], PullResult]
"""Returns the latest pull (verified desired state + verified artifacts); may raise when offline."""

Action = Literal["install", "noop", "blocked", "refused", "missing"]
_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_WINDOW_RE = re.compile(r"^\s*(\S+)\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class CanaryDriver(Protocol):
    """The managed-serving seam (implemented by the serving issue).

    ``start`` receives a module whose verified standby is in phase ``canary``; the driver loads it next
    to the incumbent, runs the canary, and later calls ``slots.promote_canary(module, evidence=...)``
    (flip + commit) or ``slots.abort_canary(module, reason)`` (marks the version bad). It must return
    promptly (run the canary in the background).
    """

    def start(self, module: str, standby: SlotView, slots: SlotManager) -> None: ...


def reconcile_file(paths: StatePaths) -> Path:
    """``<state>/reconcile.json``: the last pass (time, trust, desired serial, outcomes)."""
    return paths.root / "reconcile.json"


def read_last_reconcile(paths: StatePaths) -> dict[str, Any]:
    """The last reconcile record (empty when none)."""
    try:
        data: dict[str, Any] = json.loads(reconcile_file(paths).read_text(encoding="utf-8"))
        return data
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------- constraints (pure)
def parse_window(spec: str) -> tuple[set[int], time, time, bool]:
    """Parse ``"Mon-Fri 02:00-04:00"``, ``"Sat,Sun 22:00-02:00"`` or ``"* 00:00-24:00"``.

    Returns (weekdays the window *starts* on, start, end, wraps past midnight).

    Raises:
        InputError: the text is not a window.
    """
    m = _WINDOW_RE.match(spec)
    if not m:
        raise InputError(
            f"parse maintenance window {spec!r}", "expected 'DAYS HH:MM-HH:MM'", "e.g. 'Mon-Fri 02:00-04:00'"
        )
    days_s, h1, m1, h2, m2 = m.groups()
    days: set[int] = set()
    for part in days_s.lower().split(","):
        if part == "*":
            days |= set(range(7))
        elif "-" in part:
            a, _, b = part.partition("-")
            if a[:3] not in _DAYS or b[:3] not in _DAYS:
                raise InputError(f"parse maintenance window {spec!r}", f"unknown day range {part!r}")
            i, j = _DAYS.index(a[:3]), _DAYS.index(b[:3])
            days |= {(i + k) % 7 for k in range((j - i) % 7 + 1)}
        elif part[:3] in _DAYS:
            days.add(_DAYS.index(part[:3]))
        else:
            raise InputError(f"parse maintenance window {spec!r}", f"unknown day {part!r}")
    if int(h1) > 23 or int(m1) > 59 or int(h2) > 24 or int(m2) > 59 or (int(h2) == 24 and int(m2)):
        raise InputError(f"parse maintenance window {spec!r}", "hours 00-24, minutes 00-59")
    start = time(int(h1), int(m1))
    end = time(23, 59, 59, 999999) if int(h2) == 24 else time(int(h2), int(m2))
    return days, start, end, end <= start


def in_maintenance_window(windows: list[str], local_now: datetime) -> bool:
    """True when ``local_now`` (device-local time) is inside any window; no windows means always."""
    if not windows:
        return True
    t = local_now.time().replace(tzinfo=None)
    wd = local_now.weekday()
    for spec in windows:
        days, start, end, wraps = parse_window(spec)
        if not wraps:
            if wd in days and start <= t < end:
                return True
        elif (wd in days and t >= start) or ((wd - 1) % 7 in days and t < end):
            return True
    return False


@dataclass(frozen=True)
class PlanContext:
    """Facts the planner judges constraints against."""

    local_now: datetime
    agent_version: str
    free_bytes: int
    min_free_mb: int


@dataclass(frozen=True)
class PlanItem:
    """What to do with one module, and why."""

    module: str
    action: Action
    version: str | None = None
    sha256: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "action": self.action,
            "version": self.version,
            "sha256": self.sha256,
            "reason": self.reason,
        }


class Planner:
    """Desired vs installed, per module, gated by constraints. Pure: values in, plan out."""

    def plan(
        self,
        desired: DesiredState,
        artifacts: dict[str, VerifiedArtifact],
        installed: dict[str, ModuleStatus],
        ctx: PlanContext,
    ) -> list[PlanItem]:
        """One item per desired module, ordered so that dependencies come first."""
        items: list[PlanItem] = []
        for module in _dependency_order(desired, artifacts):
            want = desired.modules[module]
            art = artifacts.get(module)
            st = installed.get(module)
            active = st.active if st else None
            if (
                active is not None
                and active.version == want.version
                and (art is None or active.sha256 == art.sha256)
            ):
                items.append(PlanItem(module, "noop", want.version, active.sha256, "already active"))
                continue
            if art is None or art.version != want.version:
                items.append(PlanItem(module, "missing", want.version, None, "no verified artifact pulled"))
                continue
            if st is not None and art.sha256 in st.bad:
                why = st.bad[art.sha256].get("reason", "")
                items.append(PlanItem(module, "refused", art.version, art.sha256, f"marked bad: {why}"))
                continue
            blocked = self._constraints(art.manifest.constraints, art, desired, installed, ctx)
            if blocked:
                items.append(PlanItem(module, "blocked", art.version, art.sha256, blocked))
                continue
            items.append(
                PlanItem(module, "install", art.version, art.sha256, f"desired serial {desired.serial}")
            )
        return items

    def _constraints(
        self,
        c: Constraints,
        art: VerifiedArtifact,
        desired: DesiredState,
        installed: dict[str, ModuleStatus],
        ctx: PlanContext,
    ) -> str:
        if not in_maintenance_window(c.maintenance_windows, ctx.local_now):
            return (
                f"outside maintenance windows {c.maintenance_windows} (device time {ctx.local_now:%a %H:%M})"
            )
        if c.min_agent_version and version_key(ctx.agent_version) < version_key(c.min_agent_version):
            return f"needs agent >= {c.min_agent_version}, this is {ctx.agent_version}"
        for dep, minimum in sorted(c.depends_on.items()):
            st = installed.get(dep)
            have = st.active.version if st and st.active else None
            planned = desired.modules.get(dep)
            ok_now = have is not None and version_key(have) >= version_key(minimum)
            ok_planned = planned is not None and version_key(planned.version) >= version_key(minimum)
            if not (ok_now or ok_planned):
                return f"needs {dep} >= {minimum} (installed: {have or 'none'})"
        need = art.length * (2 if art.manifest.format == "tar" else 1)
        headroom = max(c.min_free_disk_mb, ctx.min_free_mb) * 1024 * 1024
        if ctx.free_bytes - need < headroom:
            return (
                f"not enough disk: {ctx.free_bytes // 2**20} MiB free, needs {need // 2**20} MiB "
                f"+ {headroom // 2**20} MiB headroom"
            )
        return ""


def _dependency_order(desired: DesiredState, artifacts: dict[str, VerifiedArtifact]) -> list[str]:
    """Desired modules, dependencies first (cycles keep name order; their constraints then block)."""
    names = sorted(desired.modules)
    deps = {
        n: set(artifacts[n].manifest.constraints.depends_on) & set(names) if n in artifacts else set()
        for n in names
    }
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(len(names)):
        for n in names:
            if n not in seen and deps[n] <= seen:
                out.append(n)
                seen.add(n)
    return out + [n for n in names if n not in seen]


# ---------------------------------------------------------------------------- outcome records
@dataclass(frozen=True)
class ModuleOutcome:
    """What happened to one module in one pass."""

    module: str
    result: Literal[
        "committed",
        "rolled_back",
        "canary",
        "noop",
        "blocked",
        "refused",
        "missing",
        "failed",
        "safe_mode",
        "needs_canary",
    ]
    version: str | None = None
    previous: str | None = None
    reason: str = ""
    probes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "result": self.result,
            "version": self.version,
            "previous": self.previous,
            "reason": self.reason,
            "probes": self.probes,
        }


@dataclass
class ReconcileReport:
    """One pass: trust, safe mode and per-module outcomes."""

    started: str
    trusted_now: str
    trust: str
    online: bool
    serial: int | None
    safe_mode: bool
    safe_mode_changed: str | None = None
    recovered: dict[str, str] = field(default_factory=dict)
    outcomes: list[ModuleOutcome] = field(default_factory=list)
    pull_refused: str | None = None

    @property
    def ok(self) -> bool:
        bad = {"failed", "rolled_back", "refused", "needs_canary"}
        return self.pull_refused is None and not any(o.result in bad for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "trusted_now": self.trusted_now,
            "trust": self.trust,
            "online": self.online,
            "serial": self.serial,
            "safe_mode": self.safe_mode,
            "safe_mode_changed": self.safe_mode_changed,
            "recovered": self.recovered,
            "outcomes": [o.to_dict() for o in self.outcomes],
            "pull_refused": self.pull_refused,
            "ok": self.ok,
        }


# ---------------------------------------------------------------------------- orchestrator
class Reconciler:
    """The thin orchestrator around :class:`Planner`, :class:`SlotManager`, probes and safe mode.

    Args:
        paths: device state layout.
        source: returns the latest :class:`PullResult`; an exception means "offline" (the last
            held desired state's expiry is still enforced from ``reconcile.json``).
        clock: injected time (a fake clock simulates a month in a second).
        policy: the deployment policy.
        audit: the audit trail (default ``<state>/audit.jsonl``).
        canary: the managed-serving driver, or None.
        telemetry: metrics/events sink.
        agent_version: compared with ``min_agent_version`` constraints.
        local_tz: the device's time zone for maintenance windows (default: the system's).
        disk_free: free bytes at a path (default: ``shutil.disk_usage``).
        config_check: the agent's check of a signed config layer
            (``sre_agent.config.signed_layer_check``); None refuses ``kind: config`` modules (not bad:
            a process that has the check applies them).
    """

    def __init__(
        self,
        paths: StatePaths,
        source: Source,
        clock: Clock | None = None,
        policy: DeploymentPolicy | None = None,
        audit: AuditLog | None = None,
        canary: CanaryDriver | None = None,
        telemetry: TelemetrySink | None = None,
        agent_version: str = "0.1.0",
        local_tz: tzinfo | None = None,
        disk_free: Callable[[Path], int] | None = None,
        config_check: ConfigCheck | None = None,
    ) -> None:
        self.paths = paths
        self.source = source
        self.clock = clock or SystemClock()
        self.policy = policy or DeploymentPolicy()
        self.audit = audit or AuditLog(paths.audit_log, self.clock)
        self.canary = canary
        self.telemetry = telemetry or NullSink()
        self.agent_version = agent_version
        self.local_tz = local_tz
        self.disk_free = disk_free or (lambda p: shutil.disk_usage(p).free)
        self.slots = SlotManager(paths, self.audit, self.clock, self.policy)
        self.safe = SafeMode(paths, self.slots, self.audit, self.clock, self.policy.flapping, self.telemetry)
        self.probes = ProbeRunner(self.policy.probes, self.clock)
        self.planner = Planner()
        self.policies = PolicyActivator(paths, self.audit, self.clock)
        self.configs = ConfigActivator(paths, self.audit, config_check, self.clock)
        self._recovered = False

    def recover(self) -> dict[str, str]:
        """Resolve interrupted installs and flips, re-apply safe mode (done by the first pass)."""
        self.audit.head()  # drops a torn final line left by kill -9 (it was never acknowledged)
        self._discard_poisoned_time()
        done = self.slots.recover_all()
        self.safe.sync_slots()
        for module, what in self.policies.sync(self.slots).items():
            done[module] = f"{done.get(module, 'nothing pending')}; policy {what}"
        for module, what in self.configs.sync(self.slots).items():
            done[module] = f"{done.get(module, 'nothing pending')}; {what}"
        self._recovered = True
        changed = {m: d for m, d in done.items() if d != "nothing pending"}
        if changed:
            self.audit.append("reconcile.recovered", modules=changed)
        return done

    def _discard_poisoned_time(self) -> None:
        """A trusted time poisoned before signed times were bounded is dropped at start (audited), by the
        same path every pull runs (:func:`deployment.pull.recover_trusted_time`)."""
        from datetime import timedelta

        from deployment.pull import recover_trusted_time
        from policies.trust import load_trust_policy

        try:
            tolerance = timedelta(seconds=load_trust_policy(self.paths.policies).max_signed_time_ahead_s)
        except (SreError, ValueError) as exc:  # an unreadable trust policy stays an error for the pull
            self.audit.append("trusted_time.check_failed", why=str(exc)[:300])
            return
        recover_trusted_time(self.paths, self.clock, self.audit, tolerance, self.telemetry)

    def run_once(self) -> ReconcileReport:
        """One reconcile pass. Never raises for a module's failure: it is reported in the outcome."""
        recovered = {} if self._recovered else self.recover()
        if recovered == {}:  # an operator rollback between passes may have moved a policy/config module
            self.policies.sync(self.slots)
            self.configs.sync(self.slots)
        started = self.clock.now()
        last = read_last_reconcile(self.paths)
        pull = self._pull(last)
        desired = pull.desired
        report = ReconcileReport(
            started=started.isoformat(),
            trusted_now=pull.trusted_now.isoformat(),
            trust=pull.trust.value,
            online=pull.online,
            serial=desired.serial if desired else None,
            safe_mode=False,
            recovered={m: d for m, d in recovered.items() if d != "nothing pending"},
            pull_refused=pull.refused,
        )
        # Safe mode is judged by trusted time before anything is installed.
        verdict = decide(self.safe.state(), pull.trust, desired, pull.trusted_now, self.policy.flapping)
        if verdict.action == "enter" and verdict.reason is not None:
            self.safe.enter(verdict.reason, verdict.detail, desired=desired)
            report.safe_mode_changed = f"entered: {verdict.detail}"
        elif verdict.action == "leave":
            self.safe.exit(verdict.detail)
            report.safe_mode_changed = f"left: {verdict.detail}"
        state = self.safe.state()
        report.safe_mode = state.active
        if state.active:
            self.safe.alert(f"in safe mode ({state.reason}: {state.detail}); no installs")
            for m in self.slots.modules():
                report.outcomes.append(ModuleOutcome(m, "safe_mode", reason=str(state.reason)))
        elif desired is not None:
            self._mark_recalled(desired)
            self._apply(desired, pull, report)
        self._record(report, pull, last)
        return report

    # ------------------------------------------------------------------ steps
    def _pull(self, last: dict[str, Any]) -> PullResult:
        try:
            pull = self.source()
        except Exception as exc:
            # Offline (or the puller failed): keep enforcing what we hold, expiry included.
            now = self.clock.now()
            held = last.get("trusted_now")
            trusted = max(now, datetime.fromisoformat(held)) if held else now
            desired = None
            if last.get("desired"):
                desired = DesiredState.model_validate(last["desired"])
            trust = TrustStatus.NONE if desired is None else (
                TrustStatus.EXPIRED if desired.is_expired(trusted) else TrustStatus.STALE
            )  # fmt: skip
            self.audit.append("reconcile.pull_failed", why=f"{type(exc).__name__}: {exc}", trust=trust.value)
            return PullResult(trust=trust, online=False, trusted_now=trusted, desired=desired)
        self.audit.append(
            "reconcile.pulled", trust=pull.trust.value, online=pull.online,
            serial=pull.desired.serial if pull.desired else None,
            artifacts={m: {"version": a.version, "sha256": a.sha256} for m, a in pull.artifacts.items()},
            refused=pull.refused,
        )  # fmt: skip
        return pull

    def _mark_recalled(self, desired: DesiredState) -> None:
        """Installed slots holding a withdrawn version are marked bad: never served or rolled back to."""
        known = set(self.slots.modules())
        for rc in recalls_of(desired):
            if rc.module in known:
                self.slots.mark_recalled(rc.module, rc.withdrawn, f"recalled ({rc.id}): {rc.reason}"[:200])

    def _recall_target(self, desired: DesiredState, art: VerifiedArtifact) -> bool:
        """True when ``art`` is what a recall moves this module to."""
        return any(rc.module == art.module and rc.to_version == art.version for rc in recalls_of(desired))

    def _apply(self, desired: DesiredState, pull: PullResult, report: ReconcileReport) -> None:
        installed = {m: self.slots.status(m) for m in set(desired.modules) | set(self.slots.modules())}
        ctx = PlanContext(
            local_now=pull.trusted_now.astimezone(self.local_tz),
            agent_version=self.agent_version,
            free_bytes=self.disk_free(self.paths.root),
            min_free_mb=self.policy.min_free_disk_mb,
        )
        for planned in self.planner.plan(desired, pull.artifacts, installed, ctx):
            item = planned
            if item.action == "install":
                # Re-check dependencies against what this pass actually activated.
                art = pull.artifacts[item.module]
                unmet = self._unmet_dependency(art)
                if unmet:
                    item = PlanItem(item.module, "blocked", item.version, item.sha256, unmet)
                else:
                    recall = self._recall_target(desired, art)
                    report.outcomes.append(self._install(art, recall, desired.issued))
                    continue
            if item.action == "refused":
                self.audit.append("reconcile.refused", module=item.module, version=item.version,
                                  sha256=item.sha256, reason=item.reason)  # fmt: skip
            elif item.action in {"blocked", "missing"}:
                self.audit.append(f"reconcile.{item.action}", module=item.module, version=item.version,
                                  reason=item.reason)  # fmt: skip
            result: Any = item.action
            report.outcomes.append(ModuleOutcome(item.module, result, item.version, reason=item.reason))

    def _unmet_dependency(self, art: VerifiedArtifact) -> str:
        for dep, minimum in sorted(art.manifest.constraints.depends_on.items()):
            st = self.slots.status(dep)
            have = st.active.version if st.active and st.phase is Phase.IDLE else None
            if have is None or version_key(have) < version_key(minimum):
                return f"needs {dep} >= {minimum} (active: {have or 'none'})"
        return ""

    def _refusal(
        self, art: VerifiedArtifact, previous: str | None, recall_target: bool = False
    ) -> ModuleOutcome | None:
        """Every check that can refuse this release without touching a slot (None: all passed)."""
        manifest = art.manifest
        try:
            self.probes.check_allowed(manifest.probes)
        except ProbeRefusedError as exc:
            self.audit.append("probe.refused", module=art.module, version=art.version, why=exc.message)
            return ModuleOutcome(art.module, "refused", art.version, previous, exc.message)
        if manifest.kind == "policy":
            try:
                self.policies.check(art)
            except PolicyModuleError as exc:
                # Invalid for the agent's own policy models: never installed, never retried.
                self.slots.mark_bad(art.module, art.sha256, art.version, f"invalid policy: {exc.why}"[:300])
                self.audit.append("policy.refused", module=art.module, version=art.version, why=exc.message)
                return ModuleOutcome(art.module, "refused", art.version, previous, exc.message)
        if manifest.kind == "config":
            try:
                self.configs.check(art)
            except ConfigModuleError as exc:
                if self.configs.checker is not None:  # invalid for the agent's own model: never retried
                    why = f"invalid config: {exc.why}"[:300]
                    self.slots.mark_bad(art.module, art.sha256, art.version, why)
                self.audit.append("config.refused", module=art.module, version=art.version, why=exc.message)
                return ModuleOutcome(art.module, "refused", art.version, previous, exc.message)
        if (
            manifest.kind == "model"
            and manifest.mode == "managed"
            and self.canary is None
            and not recall_target
        ):
            why = (
                "a managed model is committed only with canary evidence, and no canary driver runs here: "
                "start the daemon (sre-agent run) or sre-agent serve, which canary it against the "
                "incumbent; nothing was installed"
            )
            self.audit.append("reconcile.needs_canary", module=art.module, version=art.version, why=why)
            return ModuleOutcome(art.module, "needs_canary", art.version, previous, why)
        return None

    def _install(
        self, art: VerifiedArtifact, recall_target: bool = False, issued: datetime | None = None
    ) -> ModuleOutcome:
        module = art.module
        before = self.slots.status(module)
        previous = before.active.version if before.active else None
        if before.phase is Phase.CANARY:
            # A newer desired version pre-empts a running canary (the driver cancels it cleanly).
            preempt = getattr(self.canary, "preempt", None)
            if preempt is None or not preempt(module, art.version):
                return ModuleOutcome(module, "canary", art.version, previous, "canary in progress")
            if self.slots.status(module).phase is Phase.CANARY:
                return ModuleOutcome(module, "canary", art.version, previous, "canary in progress")
        hold = getattr(self.canary, "hold_reason", None)  # inconclusive canaries: backoff, then a cap
        held = hold(module, art.version) if hold is not None and art.manifest.mode == "managed" else None
        if held:
            return ModuleOutcome(module, "blocked", art.version, previous, held)
        refused = self._refusal(art, previous, recall_target)
        if refused is not None:
            return refused
        try:
            standby = self.slots.install(art)
        except SlotError as exc:
            return ModuleOutcome(module, "failed", art.version, previous, exc.message)
        manifest = art.manifest
        # A recall's target is a rollback (as RAUC/Mender roll back): verified, flipped and probed at
        # once, never canaried against the withdrawn incumbent it replaces.
        driver = self.canary if manifest.kind == "model" and manifest.mode == "managed" else None
        if driver is not None and not recall_target:
            try:
                view = self.slots.begin_canary(module, recall_target=recall_target)
                driver.start(module, view, self.slots)
            except SlotError as exc:
                return ModuleOutcome(module, "failed", art.version, previous, exc.message)
            return ModuleOutcome(module, "canary", art.version, previous, "handed to the canary driver")
        prior = self.policies.active().get(module, {})
        prior_config = self.configs.active().get(module, {})
        status = self.slots.flip(module)
        restart: list[str] = []
        if manifest.kind == "policy":
            # In effect before the probes run, so the probes judge the new policy.
            self.policies.activate(module, art.version, art.sha256, slot_documents(standby.path), issued)
        elif manifest.kind == "config":
            try:  # likewise: the signed layer is in effect while the probes judge it
                values = config_document(standby.artifact_path, manifest)
                restart = self.configs.activate(module, art.version, art.sha256, values, issued)
            except ConfigModuleError as exc:
                self.slots.rollback(module, reason=exc.message[:300])
                self._restore_config(module, before, prior_config)
                self.audit.append("config.refused", module=module, version=art.version, why=exc.message)
                return ModuleOutcome(module, "rolled_back", art.version, previous, exc.message)
        swapped_ns = status.current_link.lstat().st_mtime_ns
        ctx = ProbeContext(module, art.version, standby.artifact_path, standby.path, swapped_ns)
        probe_report = self.probes.run_all(manifest.probes, ctx)
        results = [r.to_dict() for r in probe_report.results]
        if probe_report.ok:
            self.audit.append("probe.completed", module=module, version=art.version, ok=True, results=results)
            self.slots.commit(
                module,
                evidence={"probes": len(results), "recall_target": recall_target},
                as_last_known_good=recall_target,
            )
            if recall_target:
                self.audit.append("recall.rolled_back", module=module, version=art.version, previous=previous)
            self.telemetry.event(
                "deployment", f"{module} {art.version} committed", attrs={"previous": previous}
            )
            why = "probes passed" + (
                f"; applied at the next restart: {', '.join(restart)}" if restart else ""
            )
            return ModuleOutcome(module, "committed", art.version, previous, why, results)
        failed = probe_report.failed()
        why = f"{failed.kind} probe {failed.outcome}: {failed.detail}" if failed else "probes failed"
        # Roll back first (its state is persisted before it acts), then record the verdict: MTTR counts.
        self.slots.rollback(module, reason=why)
        if manifest.kind == "policy":
            self._restore_policy(module, before, prior)
        elif manifest.kind == "config":
            self._restore_config(module, before, prior_config)
        self.audit.append("probe.completed", module=module, version=art.version, ok=False, results=results)
        self.telemetry.event(
            "deployment", f"{module} {art.version} rolled back: {why}", severity="error",
            attrs={"previous": previous},
        )  # fmt: skip
        self.safe.record_rollback(module)
        return ModuleOutcome(module, "rolled_back", art.version, previous, why, results)

    def _restore_policy(self, module: str, before: ModuleStatus, prior: dict[str, Any]) -> None:
        """After a policy module rolled back: the version active before it, or the factory policy."""
        prev = before.active
        if prev is not None and prev.record.manifest.get("kind") == "policy":
            issued = prior.get("issued") if prior.get("sha256") == prev.sha256 else None
            self.policies.restore(module, slot_documents(prev.path), prev.version, prev.sha256, issued)
        else:
            self.policies.restore(module, None)

    def _restore_config(self, module: str, before: ModuleStatus, prior: dict[str, Any]) -> None:
        """After a config module rolled back: the layer of the version active before it, or none."""
        prev = before.active
        if (
            prev is not None
            and prev.record.manifest.get("kind") == "config"
            and prior.get("sha256") == prev.sha256
        ):
            self.configs.restore(module, prior.get("values"), prev.version, prev.sha256, prior.get("issued"))
        else:
            self.configs.restore(module, None)

    def _record(self, report: ReconcileReport, pull: PullResult, last: dict[str, Any]) -> None:
        rec = {
            "last_run": report.started,
            "last_sync": report.started if pull.online else last.get("last_sync"),
            "trust": report.trust,
            "trusted_now": report.trusted_now,
            "desired": pull.desired.model_dump(mode="json") if pull.desired else last.get("desired"),
            "report": report.to_dict(),
        }
        atomic_write_json(reconcile_file(self.paths), rec)
        RolloutLedger(self.paths).observe(report)  # seen/committed/rolled-back times for fleet DORA
        self.audit.append(
            "reconcile.completed", ok=report.ok, safe_mode=report.safe_mode,
            outcomes={o.module: o.result for o in report.outcomes},
        )  # fmt: skip
        self.telemetry.metric("reconcile_ok", 1.0 if report.ok else 0.0)
