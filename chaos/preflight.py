"""Pre-flight safety check of a chaos experiment: ``run``, ``escalate`` or ``reject``, with reasons.

Two pure stages, values in and verdict out (no imports of providers, no I/O, no clock):

- :meth:`Preflight.static` reads the *raw* document (before chaoslib imports anything or any probe
  runs): every activity slot (hypothesis probes, method, rollbacks, dynamic configuration probes,
  tolerance probes, controls, refs) is resolved and judged against the catalogue in the chaos policy.
- :meth:`Preflight.dynamic` judges the static report against a :class:`DeviceState` snapshot (verified
  standby, canary in progress, safe mode, headroom, allowed window).

Rules (``Finding.rule``) that escalate: ``unknown-activity``, ``process-provider``, ``shell-string``,
``http-non-loopback``, ``http-action``, ``non-loopback-argument``, ``unknown-control``, ``agent-target``,
``active-without-standby``, ``management-cut``, ``disk-below-reserve``, ``no-steady-state``,
``no-rollback``, ``irreversible``, ``unbounded-duration``, ``over-limit``, ``over-budget``,
``kind-mismatch``, ``injects-in-rollback``, ``escalate-argument``, ``declared-risk``,
``unresolved-value``, ``approval-mismatch``, ``external-secrets``; dynamic: ``safe-mode``,
``canary-in-progress``, ``headroom-disk``, ``headroom-cpu``, ``headroom-memory``, ``outside-window``,
``deployment-in-progress``. Rules that reject (the document is invalid): ``invalid`` (structure),
``invalid-value``, ``invalid-declaration``.

Author declarations (extension ``sre-agent``) can add targets, durations and risk; nothing in them is
ever used to remove a finding.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from chaos.catalogue import Catalogue, activity_key
from chaos.loader import Experiment, ExperimentError, iter_activities, load_experiment, parse_experiment
from chaos.resolve import Unresolved, contains_unresolved, resolve_document
from policies.chaos import ActivitySpec, ChaosPolicy, default_chaos_policy

__all__ = [
    "EXIT_CODES",
    "ActivityInfo",
    "DeviceState",
    "Finding",
    "Preflight",
    "PreflightResult",
    "SlotState",
    "StaticReport",
    "Verdict",
    "preflight_file",
    "preflight_timing",
]

Verdict = Literal["run", "escalate", "reject"]
EXIT_CODES: dict[str, int] = {"run": 0, "escalate": 10, "reject": 2}
"""CLI exit code per verdict."""

EXTENSION_NAMES = ("sre-agent", "sre_agent")
_DECLARATION_KEYS = {"name", "risk", "targets", "max_duration_s", "requires_approval", "modules", "notes"}
_RISKS = ("low", "medium", "high", "critical")
_VAR = re.compile(r"\$\{([^}]+)\}")
_SHELLS = ("sh", "bash", "dash", "zsh", "ksh", "fish", "busybox", "env", "python", "python3", "perl")
_AGENT_MARKERS = ("sre-agent", "sre_agent")
_STRICT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_ARGS = ("proxy", "proxy_name", "for_proxy", "toxic_name", "module")
_HOST_KEYS = ("toxiproxy_host", "host", "hub_host")


# --- values -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One reason not to run unattended: the rule, where in the document, and what was found."""

    rule: str
    path: str
    message: str
    activity: str = ""
    verdict: Verdict = "escalate"

    def __str__(self) -> str:
        name = f" ({self.activity})" if self.activity else ""
        return f"{self.rule} at {self.path or '<experiment>'}{name}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {
            "rule": self.rule,
            "path": self.path,
            "activity": self.activity,
            "message": self.message,
            "verdict": self.verdict,
        }


@dataclass(frozen=True)
class ActivityInfo:
    """An activity as pre-flight resolved it (refs followed, static arguments substituted)."""

    path: str
    phase: str
    name: str
    kind: str
    key: str
    known: bool
    targets: tuple[str, ...] = ()
    arguments: Mapping[str, Any] = field(default_factory=dict)
    state_changing: bool = False
    effect: str = ""
    restored_by: str = ""
    duration_s: float | None = 0.0
    fault_s: float | None = 0.0
    link: str | None = None
    module: str | None = None
    background: bool = False
    impact: str = ""
    target_link: str | None = None
    """The proxy it acts on (whether or not it cuts it)."""
    toxic: str | None = None
    restores_link: str | None = None
    """For a cleanup activity: the proxy it restores (``*``: every fault)."""
    amount: float | None = 0.0
    """How much of its impact it uses (cpu worker-s, disk MB, clock |offset| s, flips, share-s)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "phase": self.phase,
            "name": self.name,
            "kind": self.kind,
            "key": self.key,
            "known": self.known,
            "targets": list(self.targets),
            "arguments": dict(self.arguments),
            "state_changing": self.state_changing,
            "effect": self.effect,
            "restored_by": self.restored_by,
            "duration_s": self.duration_s,
            "fault_s": self.fault_s,
            "link": self.link,
            "module": self.module,
            "background": self.background,
            "impact": self.impact,
            "amount": self.amount,
        }


@dataclass(frozen=True)
class StaticReport:
    """What the static pre-flight learned from the document alone."""

    experiment_hash: str
    title: str
    findings: tuple[Finding, ...]
    activities: tuple[ActivityInfo, ...]
    targets: tuple[str, ...]
    standby_modules: tuple[str, ...]
    """Modules whose verified standby the experiment relies on (``*``: every module)."""
    estimated_duration_s: float | None
    declared: Mapping[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> Verdict:
        return _worst(self.findings)


class SlotState(BaseModel):
    """One module's A/B pair as the slots component reports it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    active_version: str | None = None
    standby_version: str | None = None
    standby_verified: bool = False
    canary_in_progress: bool = False
    phase: str = Field(
        default="idle", description="the slot lifecycle phase (idle when nothing is under way)"
    )


class DeviceState(BaseModel):
    """A snapshot of the device that the dynamic pre-flight judges against (plain values).

    ``None`` for a resource means "not measured" and counts as no headroom (fail closed).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    now: datetime
    safe_mode: bool = False
    modules: dict[str, SlotState] = Field(default_factory=dict)
    disk_free_mb: float | None = None
    cpu_load: float | None = Field(default=None, description="1-minute load average per core")
    mem_available_mb: float | None = None
    device_id: str | None = None

    @property
    def canary_in_progress(self) -> bool:
        return any(m.canary_in_progress for m in self.modules.values())


@dataclass(frozen=True)
class PreflightResult:
    """The verdict, its reasons, and everything an escalation needs."""

    verdict: Verdict
    reasons: tuple[str, ...]
    findings: tuple[Finding, ...]
    experiment_hash: str | None
    report: StaticReport | None
    device: DeviceState | None = None
    source: str = ""
    sanctioned: tuple[Finding, ...] = ()
    """Static findings an operator approval of this exact content hash accepted."""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        """``{"verdict", "reasons", "findings", "experiment_hash", ...}`` (JSON-ready)."""
        return {
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "findings": [f.to_dict() for f in self.findings],
            "experiment_hash": self.experiment_hash,
            "source": self.source,
            "targets": list(self.report.targets) if self.report else [],
            "estimated_duration_s": self.report.estimated_duration_s if self.report else None,
            "sanctioned": [f.to_dict() for f in self.sanctioned],
        }


def _amount(value: float | None, unit: str) -> str:
    return "unknown (not measured)" if value is None else f"{value:.2f} {unit}"


def _worst(findings: Iterable[Finding]) -> Verdict:
    verdicts = {f.verdict for f in findings}
    if "reject" in verdicts:
        return "reject"
    if "escalate" in verdicts:
        return "escalate"
    return "run"


def _num(value: Any) -> float | None:
    if isinstance(value, str) and 0 < len(value) <= 64:
        # ``$name`` substitutes as text, and the actions take float(value): judge the number it becomes
        try:
            n = float(value)
        except ValueError:
            return None
        return None if math.isnan(n) else n
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer with hundreds of digits: larger than any bound
        return math.inf if value > 0 else -math.inf


_Unresolved = Unresolved


# --- the static stage -------------------------------------------------------------------------------


class _Static:
    """One static analysis pass (mutable scratch state; :class:`Preflight` is the public face)."""

    def __init__(self, policy: ChaosPolicy, doc: Mapping[str, Any]) -> None:
        self.policy = policy
        self.cat = Catalogue(policy)
        self.doc = doc
        self.findings: list[Finding] = []
        self.activities: list[ActivityInfo] = []
        self.res = resolve_document(doc)
        self.by_name: dict[str, Mapping[str, Any]] = {}
        self.by_path: dict[str, Any] = {}
        for path, act in iter_activities(doc):
            self.by_path[path] = act
            if isinstance(act, dict) and "ref" not in act and isinstance(act.get("name"), str):
                self.by_name.setdefault(act["name"], act)

    def add(
        self, rule: str, path: str, message: str, activity: str = "", verdict: Verdict = "escalate"
    ) -> None:
        self.findings.append(Finding(rule, path, message, activity, verdict))

    def resolve(self, value: Any) -> Any:
        """``value`` as chaoslib will pass it (its substitution over configuration and secrets)."""
        return self.res.substitute(value)

    # -- per activity ---------------------------------------------------------------------------------

    def analyse(self) -> StaticReport:
        doc = self.doc
        ssh = doc.get("steady-state-hypothesis")
        if not isinstance(ssh, dict) or not ssh.get("probes"):
            self.add(
                "no-steady-state",
                "steady-state-hypothesis",
                "no steady-state hypothesis with probes: a deviation could not be told from success",
            )
        self._endpoints()
        self._secrets()
        self._device_settings()
        rollback_keys = self._rollback_keys()
        for path, act in iter_activities(doc):
            phase = _phase(path)
            self._activity(path, phase, act, rollback_keys)
        self._controls(doc.get("controls"), "controls")
        if isinstance(ssh, dict):
            self._controls(ssh.get("controls"), "steady-state-hypothesis.controls")
        declared = self._declarations()
        self._durations(declared)
        self._totals()
        targets = sorted({t for a in self.activities for t in a.targets} | set(declared.get("targets", ())))
        standby = self._standby_modules(declared)
        if "agent" in declared.get("targets", ()):
            self.add(
                "agent-target", "extensions", "the author declares that the experiment targets the agent"
            )
        total = self._total_duration(declared)
        return StaticReport(
            experiment_hash="",
            title=str(doc.get("title", "")),
            findings=tuple(self.findings),
            activities=tuple(self.activities),
            targets=tuple(targets),
            standby_modules=standby,
            estimated_duration_s=total,
            declared=declared,
        )

    def _endpoints(self) -> None:
        """Configuration that points our actions or chaostoolkit-toxiproxy at a host off the device."""
        for key, value in (self.doc.get("configuration") or {}).items():
            if isinstance(value, dict):
                continue
            host: str | None = None
            if isinstance(value, str) and value.lower().startswith(("http://", "https://")):
                host = urlsplit(value).hostname or ""
            elif key in _HOST_KEYS and isinstance(value, str):
                host = urlsplit("//" + value).hostname or value  # "host" or "host:port"
            if host is not None and not self._loopback(host):
                self.add(
                    "http-non-loopback",
                    f"configuration.{key}",
                    f"{key}={value!r} sends requests to a host that is not loopback",
                )

    def _secrets(self) -> None:
        """Secrets chaoslib fetches from outside the device, or cannot resolve predictably."""
        for where, kind in self.res.external:
            self.add("external-secrets", where, f"a {kind!r} secret is fetched from outside the device")
        for where, why in self.res.problems:
            self.add("unresolved-value", where, why)

    def _device_settings(self) -> None:
        """Configuration keys that only the device sets (what the runner executes, where faults go)."""
        for key in sorted(self.res.device_keys_set):
            self.add(
                "device-setting",
                f"configuration.{key}",
                f"{key!r} is a device setting (from the device's configuration, never the experiment's); "
                "remove it from the experiment",
                verdict="reject",
            )

    def _rollback_keys(self) -> set[str]:
        keys: set[str] = set()
        for act in self.doc.get("rollbacks") or []:
            real = self._deref(act)
            prov = real.get("provider") if isinstance(real, dict) else None
            if isinstance(prov, dict):
                keys.add(activity_key(prov))
        return keys

    def _deref(self, act: Any) -> Any:
        if isinstance(act, dict) and "ref" in act:
            return self.by_name.get(str(act["ref"]), act)
        return act

    def _activity(self, path: str, phase: str, raw: Any, rollback_keys: set[str]) -> None:
        act = self._deref(raw)
        if isinstance(raw, dict) and "ref" in raw:
            path = f"{path} -> ref {raw['ref']!r}"
        if not isinstance(act, dict) or "provider" not in act:
            self.add("invalid", path, "activity cannot be resolved", verdict="reject")
            return
        name = str(act.get("name", ""))
        kind = str(act.get("type", "probe"))
        prov: Mapping[str, Any] = act["provider"]
        ptype = prov.get("type")
        key = activity_key(prov)
        if act.get("controls"):
            self._controls(act.get("controls"), f"{path}.controls")
        pauses_ok = self._pauses(path, name, act)
        if ptype == "process":
            self._process(path, name, prov)
            self.activities.append(
                ActivityInfo(
                    path=path,
                    phase=phase,
                    name=name,
                    kind=kind,
                    key=key,
                    known=False,
                    targets=self._agent_targets(prov),
                    state_changing=kind == "action",
                    effect="an arbitrary program runs",
                    duration_s=self._timeout(act, prov) if pauses_ok else None,
                    fault_s=None,
                    background=bool(act.get("background")),
                )
            )
            return
        if ptype == "http":
            self._http(path, name, kind, prov)
            self.activities.append(
                ActivityInfo(
                    path=path,
                    phase=phase,
                    name=name,
                    kind=kind,
                    key=key,
                    known=False,
                    state_changing=kind == "action",
                    effect="an HTTP request is sent",
                    duration_s=self._timeout(act, prov) if pauses_ok else None,
                    fault_s=0.0,
                    background=bool(act.get("background")),
                )
            )
            return
        args = self.resolve(prov.get("arguments") or {})
        module = str(prov.get("module", ""))
        if any(module == m or module.startswith(m.replace("-", "_") + ".") for m in _AGENT_MARKERS):
            self.add("agent-target", path, f"calls into the agent itself ({key})", name)
        spec = self.cat.spec(prov)
        if spec is None:
            self.add(
                "unknown-activity",
                path,
                f"{key} is not in the chaos catalogue; its effects are unknown",
                name,
            )
            self.activities.append(
                ActivityInfo(
                    path=path,
                    phase=phase,
                    name=name,
                    kind=kind,
                    key=key,
                    known=False,
                    arguments=_shown(args),
                    state_changing=kind == "action",
                    effect="unknown: not in the catalogue",
                    duration_s=self._timeout(act, prov) if pauses_ok else None,
                    fault_s=None,
                    background=bool(act.get("background")),
                )
            )
            return
        sig = self.policy.signatures.get(key)
        if sig is not None:
            given = set(prov.get("arguments") or {})
            unknown = sorted(given - set(sig.params)) if not sig.any_keyword else []
            missing = sorted(set(sig.required) - given)
            if unknown or missing:
                # chaoslib's validation refuses the activity: `chaos run` would not run it
                what = "; ".join(
                    x
                    for x in (
                        f"unexpected arguments {unknown}" if unknown else "",
                        f"missing required arguments {missing}" if missing else "",
                    )
                    if x
                )
                self.add("invalid-value", f"{path}.provider.arguments", f"{key}: {what}", name, "reject")
        if spec.kind != kind or (
            spec.kind == "action" and phase in ("hypothesis", "configuration", "tolerance")
        ):
            self.add(
                "kind-mismatch", path, f"{key} is a catalogued {spec.kind}, used as a {kind} in {phase}", name
            )
        info = self._known(path, phase, name, act, prov, spec, args, key, rollback_keys)
        if not pauses_ok:
            info = _replace(info, duration_s=None)
        self.activities.append(info)

    def _known(
        self,
        path: str,
        phase: str,
        name: str,
        act: Mapping[str, Any],
        prov: Mapping[str, Any],
        spec: ActivitySpec,
        args: Mapping[str, Any],
        key: str,
        rollback_keys: set[str],
    ) -> ActivityInfo:
        def arg(arg_name: str) -> Any:
            if arg_name in args:
                return args[arg_name]
            return spec.defaults.get(arg_name)

        # every bounded quantity must be a known number within the catalogue's bound
        duration: float | None = None
        if spec.duration_arg:
            v = arg(spec.duration_arg)
            duration = self._bounded(
                path, name, spec.duration_arg, v, spec.max_duration_s, "s", duration=True
            )
        share: float | None = None
        if spec.toxicity_arg:
            v = arg(spec.toxicity_arg)
            if v is not None:
                t = share = self._bounded(path, name, spec.toxicity_arg, v, spec.max_toxicity, "")
                if t is not None and not 0 <= t <= 1:
                    self.add(
                        "invalid-value", path, f"{spec.toxicity_arg}={t} is not within 0..1", name, "reject"
                    )
        size: float | None = None
        if spec.size_arg:
            v = arg(spec.size_arg)
            if v is not None:
                size = self._bounded(path, name, spec.size_arg, v, spec.max_size, spec.size_unit)
        if spec.reserve_arg:
            v = arg(spec.reserve_arg)
            reserve = _num(v)
            if reserve is None:
                self.add(
                    "unbounded-duration" if v is None else "unresolved-value",
                    path,
                    f"{spec.reserve_arg} must be a number of MB known before the run, got {v!r}",
                    name,
                )
            elif reserve < self.policy.headroom.disk_reserve_mb:
                self.add(
                    "disk-below-reserve",
                    path,
                    f"fills the disk down to {reserve:g} MB, below the policy reserve of "
                    f"{self.policy.headroom.disk_reserve_mb:g} MB",
                    name,
                )
        for a in spec.escalate_args:
            if a in args:
                self.add(
                    "escalate-argument", path, f"argument {a!r} ({args[a]!r}) needs a human to review", name
                )
        for a, default in spec.loopback_args.items():
            host = args.get(a, default)
            if host is None:
                continue
            if isinstance(host, _Unresolved) or not self._loopback(str(host)):
                self.add("non-loopback-argument", path, f"{a}={host!r} is not a loopback address", name)
        unknown = sorted(k for k, v in args.items() if contains_unresolved(v))
        if unknown:
            # what the activity will receive is not determined by the document and policy
            self.add(
                "unresolved-value",
                path,
                "arguments known only at run time: " + ", ".join(f"{k}={args[k]!r}" for k in unknown)[:300],
                name,
            )
        for a in sorted({*_NAME_ARGS, spec.link_arg or "", spec.module_arg or ""} - {""}):
            v = args.get(a)
            if v is not None and not isinstance(v, Unresolved) and not _STRICT_NAME.fullmatch(str(v)):
                # the receiving API unquotes percent-escapes and resolves dot segments (and slot paths
                # join the name): a name is judged only when it cannot mean anything but itself
                self.add(
                    "invalid-name",
                    path,
                    f"{a}={v!r}: names must match {_STRICT_NAME.pattern} (the API would decode it)",
                    name,
                    "reject",
                )
        link: str | None = None
        if spec.link_arg or spec.link_default:
            raw_link = args.get(spec.link_arg) if spec.link_arg else None
            raw_link = spec.link_default if raw_link is None else raw_link
            link = (
                "<run-time>" if isinstance(raw_link, _Unresolved) else (str(raw_link) if raw_link else None)
            )
        module: str | None = None
        if spec.module_arg:
            m = args.get(spec.module_arg)
            module = m if isinstance(m, str) and m else "*"
        # reversibility and rollbacks
        restored_by = ""
        if spec.state_changing:
            if not spec.reversible:
                self.add("irreversible", path, f"{key} cannot be undone", name)
            if phase == "rollbacks" and not spec.restores:
                self.add("injects-in-rollback", path, f"{key} injects a fault during rollback", name)
            matches = [k for k in spec.restored_by if k in rollback_keys]
            if matches:
                restored_by = matches[0]
            elif spec.reversible and phase != "rollbacks":
                undo = ", ".join(spec.restored_by) or "nothing"
                self.add(
                    "no-rollback",
                    path,
                    f"changes device state but no rollback undoes it (expected one of: {undo})",
                    name,
                )
        if "agent" in spec.targets:
            self.add("agent-target", path, f"{key} acts on the agent itself", name)
        targets = tuple(spec.targets)
        if "active" in spec.targets and module is None:
            module = "*"
        cuts = self._cuts(spec, args, arg)
        target_link: str | None = None
        if spec.link_arg or spec.link_default:
            raw = args.get(spec.link_arg) if spec.link_arg else None
            raw = spec.link_default if raw is None else raw
            target_link = "<run-time>" if isinstance(raw, Unresolved) else (str(raw) if raw else None)
        toxic = args.get(spec.toxic_arg) if spec.toxic_arg else None
        toxic = None if toxic is None else ("<run-time>" if isinstance(toxic, Unresolved) else str(toxic))
        restores_link = (target_link or "*") if spec.restores else None
        managed = target_link is not None and (
            target_link in self.policy.management_links or target_link == "<run-time>"
        )
        if spec.link_effect != "none" and managed:
            what = "deletes" if spec.link_effect == "removes" else "re-creates (re-points)"
            self.add("management-cut", path, f"{what} the management link proxy {target_link!r}", name)
        own_time = self._timeout(act, prov)
        if spec.timeout_arg:
            t = self._bounded(
                path, name, spec.timeout_arg, arg(spec.timeout_arg), spec.max_timeout_s, "s", duration=True
            )
            waits = _num(arg(spec.size_arg)) if spec.size_arg else 1.0
            # chaoslib never enforces an activity `timeout`: the probe's own waits bound its time
            own_time = max(own_time, (t or 0.0) * max(1.0, waits or 1.0)) if t is not None else own_time
        if spec.blocking and duration is not None:
            own_time = max(own_time, duration)
        return ActivityInfo(
            path=path,
            phase=phase,
            name=name,
            kind=spec.kind,
            key=key,
            known=True,
            targets=targets,
            arguments=_shown(args),
            state_changing=spec.state_changing,
            effect=spec.effect or spec.description,
            restored_by=restored_by,
            duration_s=own_time if (duration is not None or not spec.duration_arg) else None,
            fault_s=duration if spec.self_restoring else (None if spec.state_changing else 0.0),
            link=(link if cuts else None),
            module=module,
            impact=spec.impact,
            amount=_amount_of(spec.impact, size, duration, share, spec.count),
            target_link=target_link,
            toxic=toxic,
            restores_link=restores_link,
            background=bool(act.get("background")),
        )

    def _cuts(self, spec: ActivitySpec, args: Mapping[str, Any], arg: Any) -> bool:
        """Whether the action stops traffic on its link: by its nature, or by its toxic's values."""
        if spec.cuts_link and not spec.type_arg:
            return True
        ttype: Any = spec.toxic_type
        if spec.type_arg:
            ttype = args.get(spec.type_arg)
        if ttype is None:
            return spec.cuts_link
        attrs: dict[str, Any] = {}
        if spec.attributes_arg:
            given = args.get(spec.attributes_arg)
            if isinstance(given, Unresolved):
                return True
            if isinstance(given, Mapping):
                attrs.update(given)
            elif given is not None:
                return True  # not a mapping: what the API makes of it is unknown
        for attr, name in spec.attr_args.items():
            v = arg(name)
            if v is not None:
                attrs[attr] = v
        return _toxic_stops_traffic(ttype, attrs, spec.cut_types, self.policy)

    def _totals(self) -> None:
        """Effects add up over the experiment (method and rollbacks): one bound per impact."""
        totals: dict[str, float] = {}
        first: dict[str, ActivityInfo] = {}
        for a in self.activities:
            if a.phase not in ("method", "rollbacks") or not a.impact or a.amount is None:
                continue
            totals[a.impact] = totals.get(a.impact, 0.0) + a.amount
            first.setdefault(a.impact, a)
        for impact, total in sorted(totals.items()):
            limit = self.policy.max_total.get(impact)  # type: ignore[call-overload]
            if limit is not None and total > limit:
                a = first[impact]
                self.add(
                    "over-limit",
                    a.path,
                    f"the experiment's {impact} effects add up to {total:g}, over the policy total of "
                    f"{limit:g}",
                    a.name,
                )

    def _bounded(
        self,
        path: str,
        name: str,
        arg: str,
        value: Any,
        limit: float | None,
        unit: str,
        duration: bool = False,
    ) -> float | None:
        if isinstance(value, _Unresolved):
            self.add(
                "unbounded-duration" if duration else "unresolved-value",
                path,
                f"{arg} is only known at run time ({value.expr}); pre-flight cannot bound it",
                name,
            )
            return None
        n = _num(value)
        if n is None or (duration and n < 0):
            rule = "unbounded-duration" if duration else "invalid-value"
            self.add(
                rule,
                path,
                f"{arg} must be a number >= 0, got {value!r}",
                name,
                "escalate" if duration else "reject",
            )
            return None
        if limit is not None and abs(n) > limit:
            self.add(
                "over-limit", path, f"{arg}={n:g}{unit} exceeds the catalogue limit of {limit:g}{unit}", name
            )
        return n

    def _pauses(self, path: str, name: str, act: Mapping[str, Any]) -> bool:
        ok = True
        for k, v in (act.get("pauses") or {}).items():
            r = self.resolve(v)
            n = _num(r)
            if n is None or n < 0:
                self.add(
                    "unbounded-duration",
                    f"{path}.pauses.{k}",
                    f"pause {v!r} is not a known number of seconds",
                    name,
                )
                ok = False
        return ok

    def _pause_total(self, act: Mapping[str, Any]) -> float:
        total = 0.0
        for v in (act.get("pauses") or {}).values():
            total += _num(self.resolve(v)) or 0.0
        return total

    def _timeout(self, act: Mapping[str, Any], prov: Mapping[str, Any]) -> float:
        t = act.get("timeout", prov.get("timeout"))
        if isinstance(t, list):
            return sum(n for n in (_num(x) for x in t) if n is not None)
        n = _num(t)
        return n if n is not None and n > 0 else self.policy.default_activity_s

    def _process(self, path: str, name: str, prov: Mapping[str, Any]) -> None:
        program = str(prov.get("path", ""))
        self.add(
            "process-provider", path, f"runs the program {program!r}; its effects cannot be checked", name
        )
        args = prov.get("arguments")
        base = Path(program).name
        if isinstance(args, str) or base in _SHELLS or (isinstance(args, list) and "-c" in args):
            self.add("shell-string", path, f"runs a shell command ({program} {args!r})", name)
        text = f"{program} {args!r}"
        if any(m in text for m in _AGENT_MARKERS):
            self.add("agent-target", path, "the command names the agent", name)

    def _agent_targets(self, prov: Mapping[str, Any]) -> tuple[str, ...]:
        text = f"{prov.get('path')} {prov.get('arguments')!r}"
        return ("agent",) if any(m in text for m in _AGENT_MARKERS) else ()

    def _http(self, path: str, name: str, kind: str, prov: Mapping[str, Any]) -> None:
        url = self.resolve(prov.get("url"))
        host = None if isinstance(url, _Unresolved) else urlsplit(str(url)).hostname
        if isinstance(url, str) and (not url.isascii() or any(c in url for c in "\\@ \t\r\n")):
            host = None  # parsers disagree on such URLs (urllib vs urllib3): the host is not known
        if host is None or not self._loopback(host):
            self.add(
                "http-non-loopback",
                path,
                f"sends a request to {prov.get('url')!r}, not a loopback host",
                name,
            )
        method = str(prov.get("method", "GET")).upper()
        if kind == "action" or method not in ("GET", "HEAD", "OPTIONS"):
            self.add(
                "http-action",
                path,
                f"an HTTP {method} may change state; its effects are not catalogued",
                name,
            )

    def _loopback(self, host: str) -> bool:
        host = host.strip().strip("[]")
        if host in self.policy.loopback_hosts:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _controls(self, controls: Any, path: str) -> None:
        if not isinstance(controls, list):
            return
        for i, ctl in enumerate(controls):
            prov = ctl.get("provider") if isinstance(ctl, dict) else None
            module = str(prov.get("module")) if isinstance(prov, dict) else "?"
            if not self.cat.control_allowed(module):
                self.add(
                    "unknown-control",
                    f"{path}[{i}]",
                    f"control module {module!r} is not allowed by policy",
                    str(ctl.get("name", "")) if isinstance(ctl, dict) else "",
                )
            elif isinstance(prov, dict) and prov.get("arguments"):
                # the allowed control takes its files and limits from the runner, not the document
                self.add(
                    "control-arguments",
                    f"{path}[{i}].provider.arguments",
                    f"arguments to control {module!r} come from the document; the runner sets them",
                    str(ctl.get("name", "")) if isinstance(ctl, dict) else "",
                )

    # -- author declarations (raise only) -----------------------------------------------------------

    def _declarations(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, ext in enumerate(self.doc.get("extensions") or []):
            if not (isinstance(ext, dict) and ext.get("name") in EXTENSION_NAMES):
                continue
            p = f"extensions[{i}]"
            for k in ext:
                if k not in _DECLARATION_KEYS:
                    self.add(
                        "invalid-declaration",
                        f"{p}.{k}",
                        f"unknown declaration {k!r}; expected one of {sorted(_DECLARATION_KEYS)}",
                        verdict="reject",
                    )
            risk = ext.get("risk")
            if risk is not None:
                if risk not in _RISKS:
                    self.add(
                        "invalid-declaration",
                        f"{p}.risk",
                        f"expected one of {_RISKS}, got {risk!r}",
                        verdict="reject",
                    )
                elif risk in ("high", "critical"):
                    self.add("declared-risk", f"{p}.risk", f"the author declares {risk} risk")
                out["risk"] = risk
            if ext.get("requires_approval") is True:
                self.add("declared-risk", f"{p}.requires_approval", "the author asks for a human approval")
            targets = ext.get("targets", [])
            from policies.chaos import TARGETS

            if not isinstance(targets, list) or any(t not in TARGETS for t in targets):
                self.add(
                    "invalid-declaration",
                    f"{p}.targets",
                    f"expected a list of {TARGETS}, got {targets!r}",
                    verdict="reject",
                )
            else:
                out["targets"] = tuple(sorted(set(out.get("targets", ())) | set(targets)))
            if "max_duration_s" in ext:
                d = _num(ext["max_duration_s"])
                if d is None or d <= 0:
                    self.add(
                        "invalid-declaration",
                        f"{p}.max_duration_s",
                        "expected positive seconds",
                        verdict="reject",
                    )
                else:
                    out["max_duration_s"] = max(d, out.get("max_duration_s", 0.0))
            mods = ext.get("modules", [])
            if isinstance(mods, list) and all(isinstance(m, str) for m in mods):
                out["modules"] = tuple(mods)
            else:
                self.add(
                    "invalid-declaration", f"{p}.modules", "expected a list of module names", verdict="reject"
                )
        return out

    # -- cross-activity rules -------------------------------------------------------------------------

    def _standby_modules(self, declared: Mapping[str, Any]) -> tuple[str, ...]:
        mods: set[str] = set()
        for a in self.activities:
            if "active" in a.targets and a.phase != "rollbacks":
                mods.add(a.module or "*")
        if "active" in declared.get("targets", ()):
            mods |= set(declared.get("modules", ())) or {"*"}
        breakers = [
            a
            for a in self.activities
            if "standby" in a.targets and a.state_changing and "active" not in a.targets
        ]
        for b in breakers:
            hit = [m for m in mods if m in ("*", b.module) or b.module == "*"]
            if hit:
                self.add(
                    "active-without-standby",
                    b.path,
                    "breaks the standby slot while the experiment also acts on the active slot: "
                    "nothing verified to fall back to",
                    b.name,
                )
        return tuple(sorted(mods))

    def _durations(self, declared: Mapping[str, Any]) -> None:
        """Fault lifetimes: until the end of the method plus the rollbacks up to the restoring one."""
        method = [a for a in self.activities if a.phase == "method"]
        rollbacks = [a for a in self.activities if a.phase == "rollbacks"]
        hyp = sum(self._span(a) or 0.0 for a in self.activities if a.phase == "hypothesis")
        spans = [self._span(b) for b in method]
        # after[i]: time of method[i+1:] (None once any of it is unbounded), computed in one pass
        after: list[float | None] = [0.0] * len(method)
        acc: float | None = 0.0
        for i in range(len(method) - 1, -1, -1):
            after[i] = acc
            s_i = spans[i]
            acc = None if (acc is None or s_i is None) else acc + s_i
        rb_spans = [self._span(r) for r in rollbacks]
        updated: dict[str, ActivityInfo] = {}
        cut_total: dict[str, float | None] = {}
        for i, a in enumerate(method):
            if not a.state_changing:
                continue
            rest = after[i]
            if rest is not None:
                rest += hyp
                for r, s_r in zip(rollbacks, rb_spans, strict=True):
                    rest = None if s_r is None else rest + s_r
                    if rest is None or self._undoes(r, a):
                        break
            own = self._span(a)
            until_restored = None if (rest is None or own is None) else rest + own
            fault = until_restored
            if a.fault_s is not None and until_restored is not None:
                fault = min(a.fault_s, until_restored)
            elif a.fault_s is not None:
                fault = a.fault_s
            updated[a.path] = _replace(a, fault_s=fault)
            if a.link is not None and (a.link in self.policy.management_links or a.link == "<run-time>"):
                # cuts add up per link: two 40 s cuts are an 80 s outage of the management link
                prev = cut_total.get(a.link, 0.0)
                cut_total[a.link] = None if (prev is None or fault is None) else prev + fault
                total = cut_total[a.link]
                if total is None:
                    self.add(
                        "management-cut", a.path, "cuts the management link for an unbounded time", a.name
                    )
                elif total > self.policy.max_management_cut_s:
                    self.add(
                        "management-cut",
                        a.path,
                        f"cuts the management link {a.link!r} for up to {total:g}s in all; policy "
                        f"allows {self.policy.max_management_cut_s:g}s",
                        a.name,
                    )
        for r in rollbacks:
            if (
                r.link is not None
                and r.state_changing
                and (r.link in self.policy.management_links or r.link == "<run-time>")
            ):
                self.add("management-cut", r.path, "cuts the management link during the rollbacks", r.name)
        self.activities = [updated.get(a.path, a) for a in self.activities]

    def _undoes(self, r: ActivityInfo, a: ActivityInfo) -> bool:
        """Whether rollback ``r`` undoes the fault ``a``: a catalogued restorer, of the same proxy, and
        of the same toxic when it names one (restoring a decoy restores nothing)."""
        spec = self.cat.get(a.key)
        if spec is None or r.key not in spec.restored_by:
            return False
        if r.restores_link not in (None, "*") and r.restores_link != a.target_link:
            return False
        return r.toxic is None or r.toxic == a.toxic

    def _span(self, a: ActivityInfo) -> float | None:
        if a.duration_s is None:
            return None
        act = self._raw_at(a.path)
        return a.duration_s + (self._pause_total(act) if act is not None else 0.0)

    def _raw_at(self, path: str) -> Mapping[str, Any] | None:
        real = self._deref(self.by_path.get(path.split(" -> ", maxsplit=1)[0]))
        return real if isinstance(real, dict) else None

    def _total_duration(self, declared: Mapping[str, Any]) -> float | None:
        total = 0.0
        for a in self.activities:
            s = self._span(a)
            if s is None:
                if not any(f.rule == "unbounded-duration" for f in self.findings):
                    self.add(
                        "unbounded-duration", a.path, "the activity's duration cannot be bounded", a.name
                    )
                return None
            total += s * (2 if a.phase == "hypothesis" else 1)
        total = max(total, float(declared.get("max_duration_s", 0.0)))
        if total > self.policy.max_experiment_s:
            self.add(
                "over-budget",
                "",
                f"estimated {total:g}s exceeds the {self.policy.max_experiment_s:g}s budget",
            )
        return total


def _amount_of(
    impact: str, size: float | None, duration: float | None, share: float | None, count: float = 1.0
) -> float | None:
    """The quantity of ``impact`` one activity uses (None: not known, other findings say why)."""
    if impact == "cpu":
        return None if size is None or duration is None else abs(size) * duration
    if impact in ("disk", "clock"):
        return None if size is None else abs(size)
    if impact in ("slots", "serving"):
        return count
    if impact == "input":
        return None if duration is None else (1.0 if share is None else share) * duration
    return 0.0


def _phase(path: str) -> str:
    if path.startswith("configuration"):
        return "configuration"
    if ".tolerance" in path:
        return "tolerance"
    if path.startswith("steady-state-hypothesis"):
        return "hypothesis"
    return path.split("[", 1)[0]


def _toxic_stops_traffic(
    ttype: Any, attrs: Mapping[str, Any], cut_types: Sequence[str], policy: ChaosPolicy
) -> bool:
    """A toxic judged by its effect: one that black-holes, resets, caps at nothing or stalls is a cut."""
    if isinstance(ttype, Unresolved) or not isinstance(ttype, str):
        return True
    if ttype in cut_types or ttype in ("timeout", "reset_peer", "limit_data"):
        return True

    def val(key: str, default: float) -> float:
        v = attrs.get(key, default)
        n = _num(v)
        return math.inf if n is None else n  # unknown or not a number: assume the worst

    if ttype == "latency":
        return val("latency", 0.0) + abs(val("jitter", 0.0)) >= policy.cut_latency_ms
    if ttype == "bandwidth":
        return val("rate", 0.0) <= policy.cut_rate_kbps
    if ttype == "slicer":
        return val("delay", 0.0) / 1000.0 >= policy.cut_latency_ms
    return ttype != "slow_close"  # slow_close only delays the close; an unknown type: assume a cut


def _shown(args: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in args.items():
        out[k] = repr(v) if isinstance(v, _Unresolved) else v
    return out


def _replace(info: ActivityInfo, **changes: Any) -> ActivityInfo:
    from dataclasses import replace

    return replace(info, **changes)


# --- the public face -------------------------------------------------------------------------------


class Preflight:
    """Pure pre-flight decisions for one policy.

    Args:
        policy: the chaos policy (catalogue, limits, windows); default: the shipped document.
    """

    def __init__(self, policy: ChaosPolicy | None = None) -> None:
        self.policy = policy or default_chaos_policy()

    def static(self, experiment: Experiment | Mapping[str, Any]) -> StaticReport:
        """Judge the raw document alone. ``experiment`` must be structurally valid (see the loader)."""
        doc = experiment.raw if isinstance(experiment, Experiment) else experiment
        report = _Static(self.policy, doc).analyse()
        h = experiment.hash if isinstance(experiment, Experiment) else _hash(doc)
        return _replace_report(report, experiment_hash=h)

    def dynamic(self, report: StaticReport, device: DeviceState) -> list[Finding]:
        """Findings from the device's current state (empty: the device allows the run now)."""
        out: list[Finding] = []
        pol = self.policy
        if device.safe_mode:
            out.append(Finding("safe-mode", "", "the device is in safe mode: no chaos until it leaves it"))
        for name, slot in sorted(device.modules.items()):
            if slot.canary_in_progress or slot.phase == "canary":
                out.append(Finding("canary-in-progress", "", f"module {name!r} has a canary in progress"))
            elif slot.phase not in ("idle", "safe"):
                out.append(Finding("deployment-in-progress", "", f"module {name!r} is {slot.phase}"))
        for m in report.standby_modules:
            names = sorted(device.modules) if m == "*" else [m]
            if not names:
                out.append(
                    Finding(
                        "active-without-standby", "", "acts on the active slot; the device reports no modules"
                    )
                )
            for n in names:
                held = device.modules.get(n)
                if held is None or not held.standby_verified:
                    where = [
                        a.path for a in report.activities if "active" in a.targets and a.module in (m, "*")
                    ]
                    out.append(
                        Finding(
                            "active-without-standby",
                            where[0] if where else "",
                            f"acts on the active slot of {n!r}, which has no verified standby",
                        )
                    )
        if device.disk_free_mb is None or device.disk_free_mb < pol.headroom.disk_reserve_mb:
            out.append(
                Finding(
                    "headroom-disk",
                    "",
                    f"free disk {_amount(device.disk_free_mb, 'MB')} is below the reserve of "
                    f"{pol.headroom.disk_reserve_mb:g} MB",
                )
            )
        if device.cpu_load is None or device.cpu_load > pol.headroom.max_cpu_load:
            out.append(
                Finding(
                    "headroom-cpu",
                    "",
                    f"CPU load {_amount(device.cpu_load, 'per core')} is above {pol.headroom.max_cpu_load:g}",
                )
            )
        if device.mem_available_mb is None or device.mem_available_mb < pol.headroom.min_mem_available_mb:
            out.append(
                Finding(
                    "headroom-memory",
                    "",
                    f"available memory {_amount(device.mem_available_mb, 'MB')} is below "
                    f"{pol.headroom.min_mem_available_mb:g} MB",
                )
            )
        if not pol.in_window(device.now):
            out.append(
                Finding("outside-window", "", f"{device.now.isoformat()} is outside every allowed window")
            )
        return out

    def check(
        self,
        experiment: Experiment,
        device: DeviceState | None = None,
        approved_hash: str | None = None,
        extra: Sequence[Finding] = (),
    ) -> PreflightResult:
        """Static then (when ``device`` is given) dynamic pre-flight; the verdict with its reasons.

        Args:
            experiment: a loaded (structurally valid) experiment.
            device: the device snapshot; None judges the document alone.
            approved_hash: the content hash of a *verified* operator approval (the caller checks the
                signature, see :func:`chaos.approval.verify_chaos_approval`). When it equals the
                experiment's hash, the *static* escalations are sanctioned except the policy's
                ``never_approvable`` rules (the agent, programs, device settings); the device's state
                still decides (safe mode, a canary, no verified standby, headroom, the window), and
                nothing sanctions a reject. A different hash is itself a finding (``approval-mismatch``).
        """
        report = self.static(experiment)
        findings = list(report.findings) + list(extra)
        sanctioned: list[Finding] = []
        if approved_hash is not None:
            if approved_hash == experiment.hash:
                never = set(self.policy.never_approvable)
                sanctioned = [f for f in findings if f.verdict == "escalate" and f.rule not in never]
                findings = [f for f in findings if f.verdict != "escalate" or f.rule in never]
            else:
                findings.append(
                    Finding(
                        "approval-mismatch",
                        "",
                        f"the approval names {approved_hash}, the experiment is {experiment.hash}: "
                        "it changed since it was approved",
                    )
                )
        if device is not None:
            findings += self.dynamic(report, device)
        verdict = _worst(findings)
        if findings:
            reasons = tuple(str(f) for f in findings)
        else:
            n = len(report.activities)
            where = "; device state allows it now" if device is not None else " (static check only)"
            if sanctioned:
                rules = ", ".join(sorted({f.rule for f in sanctioned}))
                reasons = (f"operator approval of {experiment.hash} sanctions: {rules}{where}",)
            else:
                reasons = (f"all {n} activities are catalogued, bounded and restored{where}",)
        return PreflightResult(
            verdict,
            reasons,
            tuple(findings),
            experiment.hash,
            report,
            device,
            experiment.source,
            tuple(sanctioned),
        )

    def reject(self, error: ExperimentError) -> PreflightResult:
        """The result for a document the loader refused."""
        if error.problems:
            findings = tuple(
                Finding(
                    "invalid",
                    p.path,
                    f"expected {p.expected}" + (f", got {p.got}" if p.got else ""),
                    verdict="reject",
                )
                for p in error.problems
            )
        else:
            findings = (Finding("invalid", "", error.why.strip(), verdict="reject"),)
        return PreflightResult(
            "reject", tuple(str(f) for f in findings), findings, None, None, None, error.source
        )


def _hash(doc: Mapping[str, Any]) -> str:
    from chaos.loader import experiment_hash

    return experiment_hash(doc)


def _replace_report(report: StaticReport, **changes: Any) -> StaticReport:
    from dataclasses import replace

    return replace(report, **changes)


def preflight_file(
    path: Path,
    policy: ChaosPolicy | None = None,
    device: DeviceState | None = None,
    approved_hash: str | None = None,
) -> tuple[Experiment | None, PreflightResult]:
    """Load ``path`` and pre-flight it; an invalid file gives a ``reject`` result (never raises for it)."""
    pf = Preflight(policy)
    try:
        exp = load_experiment(path)
    except ExperimentError as exc:
        return None, pf.reject(exc)
    return exp, pf.check(exp, device, approved_hash)


def preflight_timing(paths: Sequence[Path] | None = None, repeat: int = 200) -> dict[str, Any]:
    """Benchmark helper: pre-flight time per experiment, in microseconds (for ``benchmarks/chaos.py``).

    Per experiment: parse + validate (the loader) and the check (static + dynamic) separately. The
    comparison, measured in the same run on the same parsed documents: chaoslib's own
    ``ensure_experiment_is_valid`` (which imports the providers, so it only runs on documents that
    pre-flight lets run), as a ratio of our check time to chaoslib's validation time.
    """
    from datetime import UTC

    if paths is None:
        root = Path(__file__).resolve().parent.parent / "experiments"
        paths = sorted(p for p in root.iterdir() if p.suffix in (".json", ".yaml", ".yml"))
    pf = Preflight()
    device = DeviceState(
        now=datetime(2026, 1, 5, 12, tzinfo=UTC),
        modules={"classifier": SlotState(active_version="2", standby_version="1", standby_verified=True)},
        disk_free_mb=10_000,
        cpu_load=0.1,
        mem_available_mb=4096,
    )
    repeat = max(1, repeat)
    parse_us: dict[str, float] = {}
    check_us: dict[str, float] = {}
    resolve_us: dict[str, float] = {}
    verdicts: dict[str, str] = {}
    parsed: dict[str, Experiment] = {}
    for p in paths:
        data, name = Path(p).read_bytes(), Path(p).name
        t0 = time.perf_counter()
        for _ in range(repeat):
            try:
                exp: Experiment | None = parse_experiment(data, str(p))
            except ExperimentError as exc:
                exp, res = None, pf.reject(exc)
        parse_us[name] = (time.perf_counter() - t0) / repeat * 1e6
        if exp is not None:
            parsed[name] = exp
            t0 = time.perf_counter()
            for _ in range(repeat):
                res = pf.check(exp, device)
            check_us[name] = (time.perf_counter() - t0) / repeat * 1e6
            t0 = time.perf_counter()
            for _ in range(repeat):
                rs = resolve_document(exp.raw)
                for _, act in iter_activities(exp.raw):
                    if isinstance(act, dict) and isinstance(act.get("provider"), dict):
                        rs.substitute(act["provider"].get("arguments") or {})
            resolve_us[name] = (time.perf_counter() - t0) / repeat * 1e6
        verdicts[name] = res.verdict
    lib_us: dict[str, float] = {}
    try:
        from chaoslib.experiment import ensure_experiment_is_valid
    except ImportError:  # pragma: no cover - chaoslib is a dependency
        ensure_experiment_is_valid = None
    if ensure_experiment_is_valid is not None:
        import logging

        logging.getLogger("chaostoolkit").setLevel(logging.CRITICAL)
        for name, exp in parsed.items():
            if verdicts[name] != "run":
                continue  # never let chaoslib import what pre-flight refused
            try:
                ensure_experiment_is_valid(exp.raw)
            except Exception:  # noqa: S112 - documents chaoslib cannot resolve here are skipped
                continue
            t0 = time.perf_counter()
            for _ in range(repeat):
                ensure_experiment_is_valid(exp.raw)
            lib_us[name] = (time.perf_counter() - t0) / repeat * 1e6

    def median(values: Iterable[float]) -> float | None:
        v = sorted(values)
        return v[len(v) // 2] if v else None

    total = {n: parse_us[n] + check_us.get(n, 0.0) for n in parse_us}
    ours_on_lib = median(check_us[n] for n in lib_us)
    lib_median = median(lib_us.values())
    return {
        "preflight_us_per_experiment_median": median(total.values()),
        "preflight_us_per_experiment_max": max(total.values()) if total else None,
        "preflight_parse_us_median": median(parse_us.values()),
        "preflight_check_us_median": median(check_us.values()),
        "preflight_resolution_us_median": median(resolve_us.values()),
        "load_average_1m": os.getloadavg()[0],
        "preflight_us_by_experiment": {n: round(v, 1) for n, v in total.items()},
        "preflight_verdicts": verdicts,
        "preflight_experiments": len(total),
        "chaoslib_validate_us_median": lib_median,
        "preflight_check_vs_chaoslib_validate_ratio": (
            ours_on_lib / lib_median if ours_on_lib is not None and lib_median else None
        ),
    }
