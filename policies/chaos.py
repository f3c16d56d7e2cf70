"""The chaos policy: the catalogue of known activities and their effects, guardrails, headroom, windows.

Pre-flight derives an experiment's risk from this document alone; nothing an experiment author writes
can widen it. An activity that is not catalogued here is unknown, and unknown means *escalate*.

Catalogue keys name the provider: ``module:func`` for Python providers (``chaos.actions:cut_uplink``).
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, time
from typing import Literal

from pydantic import Field, field_validator, model_validator

from policies.base import PolicyModel, load_default

__all__ = [
    "TARGETS",
    "ActivitySpec",
    "ChaosPolicy",
    "Guardrails",
    "Headroom",
    "Target",
    "Window",
    "default_chaos_policy",
]

Target = Literal["uplink", "input", "standby", "canary", "active", "agent", "disk", "cpu", "clock"]
TARGETS: tuple[str, ...] = ("uplink", "input", "standby", "canary", "active", "agent", "disk", "cpu", "clock")
Impact = Literal["link", "cpu", "disk", "slots", "serving", "clock", "input", "none"]
IMPACTS: tuple[str, ...] = ("link", "cpu", "disk", "slots", "serving", "clock", "input", "none")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_KEY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


_MAX_TOTAL: dict[Impact, float] = {"cpu": 1200, "disk": 4096, "clock": 86400, "slots": 4, "input": 300}


class ActivitySpec(PolicyModel):
    """What one known activity does to the device, and the bounds within which it may run unattended.

    Argument names (``*_arg``) say which provider argument carries a bounded quantity; a bound that is
    exceeded, or a quantity that is missing or not a number, makes the experiment escalate.
    """

    kind: Literal["action", "probe"]
    description: str = ""
    targets: tuple[Target, ...] = ()
    effect: str = Field(default="", description="what breaks while it runs (shown in the plan table)")
    state_changing: bool = False
    reversible: bool = True
    self_restoring: bool = Field(default=False, description="ends by itself when its duration elapses")
    restored_by: tuple[str, ...] = Field(default=(), description="catalogue keys that undo it")
    restores: bool = Field(default=False, description="a cleanup activity (safe as a rollback)")
    duration_arg: str | None = None
    max_duration_s: float | None = Field(default=None, gt=0)
    toxicity_arg: str | None = None
    max_toxicity: float = Field(default=1.0, ge=0, le=1)
    size_arg: str | None = None
    max_size: float | None = Field(default=None, gt=0)
    size_unit: str = ""
    reserve_arg: str | None = Field(default=None, description="disk: free MB the activity leaves")
    cuts_link: bool = Field(default=False, description="severs the link it acts on (not just degrades)")
    link_arg: str | None = Field(default=None, description="argument naming the proxy/link acted on")
    link_default: str | None = Field(default=None, description="link acted on when link_arg is absent")
    module_arg: str | None = Field(default=None, description="argument naming the module (slot pair)")
    type_arg: str | None = Field(default=None, description="argument naming the fault type")
    cut_types: tuple[str, ...] = Field(default=(), description="with type_arg: the types that cut the link")
    impact: Impact = Field(default="none", description="what on the device the action changes")
    count: float = Field(default=1.0, ge=0, description="units of a counted impact per call (slot flips)")
    link_effect: Literal["none", "removes", "creates"] = Field(
        default="none", description="removes or (re)creates the proxy it names (judged on management links)"
    )
    toxic_arg: str | None = Field(default=None, description="argument naming the toxic it adds or deletes")
    timeout_arg: str | None = Field(default=None, description="argument bounding each wait (probes)")
    max_timeout_s: float | None = Field(default=None, gt=0)
    toxic_type: str | None = Field(default=None, description="the Toxiproxy toxic type it adds (fixed)")
    attributes_arg: str | None = Field(default=None, description="argument holding the toxic's attributes")
    attr_args: dict[str, str] = Field(
        default_factory=dict, description="toxic attribute -> the argument that carries it"
    )
    blocking: bool = Field(default=False, description="the call lasts its duration (holds, then restores)")
    defaults: dict[str, float] = Field(
        default_factory=dict, description="the function's defaults for bounded arguments left out"
    )
    escalate_args: tuple[str, ...] = Field(default=(), description="arguments whose use needs a human")
    loopback_args: dict[str, str | None] = Field(
        default_factory=dict, description="host arguments that must be loopback -> default when absent"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ActivitySpec:
        if self.kind == "probe" and self.state_changing:
            raise ValueError("a probe cannot be state_changing")
        if self.duration_arg and self.max_duration_s is None:
            raise ValueError("duration_arg needs max_duration_s")
        if self.size_arg and self.max_size is None:
            raise ValueError("size_arg needs max_size")
        if self.self_restoring and not self.duration_arg:
            raise ValueError("a self_restoring activity needs a duration_arg")
        if self.state_changing and not self.restores and self.impact == "none":
            raise ValueError("a state-changing action must declare its impact")
        return self


class Signature(PolicyModel):
    """A catalogued function's arguments (chaoslib refuses an activity whose arguments do not bind)."""

    params: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    any_keyword: bool = False


class Guardrails(PolicyModel):
    """Limits the runner's guardrail control enforces while an experiment runs (fail-closed)."""

    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_p95_ms: float = Field(default=500.0, gt=0)
    max_uplink_backlog: int = Field(default=100_000, ge=0)
    probe_interval_s: float = Field(default=1.0, gt=0, le=60)
    probe_timeout_s: float = Field(default=2.0, gt=0, le=60)


class Headroom(PolicyModel):
    """Resources the device must keep; below them chaos is not run unattended."""

    disk_reserve_mb: float = Field(default=512.0, ge=0)
    max_cpu_load: float = Field(default=0.8, gt=0, description="1-minute load average per core")
    min_mem_available_mb: float = Field(default=128.0, ge=0)


class Window(PolicyModel):
    """An allowed window in UTC: on ``days``, from ``start`` to ``end`` (``end`` < ``start`` wraps)."""

    days: tuple[Day, ...] = _DAYS
    start: time = time(0, 0)
    end: time = time(23, 59, 59)

    @field_validator("start", "end", mode="before")
    @classmethod
    def _clock_time(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted 17:30 as the base-60 integer 1050: take it as HH:MM.
        if isinstance(value, int) and not isinstance(value, bool):
            hours, minutes = divmod(value, 60)
            if not (0 <= hours < 24):
                raise ValueError(f'{value} is not a time of day; write it as "HH:MM"')
            return time(hours, minutes)
        return value

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: time) -> time:
        return value.replace(tzinfo=None)  # windows are in UTC

    def contains(self, when: datetime) -> bool:
        """Whether the aware instant ``when`` (converted to UTC) falls in this window."""
        from datetime import UTC

        utc = when.astimezone(UTC)
        day = _DAYS[utc.weekday()]
        t = utc.time().replace(tzinfo=None)
        if self.start <= self.end:
            return day in self.days and self.start <= t <= self.end
        if t >= self.start:
            return day in self.days
        # after midnight: the window opened on the previous day
        return _DAYS[(utc.weekday() - 1) % 7] in self.days and t <= self.end


class ChaosPolicy(PolicyModel):
    """The whole chaos policy document (``policies/defaults/chaos.yaml``)."""

    activities: dict[str, ActivitySpec]
    controls: tuple[str, ...] = Field(default=(), description="control modules allowed to load")
    guardrails: Guardrails = Field(default_factory=Guardrails)
    headroom: Headroom = Field(default_factory=Headroom)
    windows: tuple[Window, ...] = Field(default=(), description="empty: any time")
    management_links: tuple[str, ...] = ("uplink",)
    max_management_cut_s: float = Field(default=60.0, ge=0)
    max_experiment_s: float = Field(default=900.0, gt=0, description="hard wall-clock budget")
    default_activity_s: float = Field(default=10.0, gt=0, description="allowance without a timeout")
    loopback_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1", "[::1]")
    cut_latency_ms: float = Field(
        default=5000.0, gt=0, description="a latency (plus jitter) this long stops traffic: judged as a cut"
    )
    cut_rate_kbps: float = Field(
        default=1.0, ge=0, description="a bandwidth at or below this stops traffic: judged as a cut"
    )
    max_total: dict[Impact, float] = Field(
        default_factory=lambda: dict(_MAX_TOTAL),
        description="bound on the sum over an experiment (method and rollbacks) per impact: cpu in "
        "worker-seconds, disk in MB, clock in |offset| seconds, slots in flips, input in share-seconds",
    )
    signatures: dict[str, Signature] = Field(
        default_factory=dict, description="module:func -> its arguments (checked without an import)"
    )
    never_approvable: tuple[str, ...] = Field(
        default=("agent-target", "process-provider", "shell-string", "device-setting"),
        description="findings that stay blocking whatever an operator approves",
    )

    @field_validator("activities")
    @classmethod
    def _keys(cls, value: dict[str, ActivitySpec]) -> dict[str, ActivitySpec]:
        for key, spec in value.items():
            if not _KEY.match(key):
                raise ValueError(f"activity key {key!r}: expected 'module:function'")
            for other in spec.restored_by:
                if other not in value:
                    raise ValueError(f"{key}: restored_by names {other!r}, which is not catalogued")
        return value

    def in_window(self, when: datetime) -> bool:
        """Whether chaos may run unattended at ``when`` (no windows configured: always)."""
        return not self.windows or any(w.contains(when) for w in self.windows)


@functools.cache
def default_chaos_policy() -> ChaosPolicy:
    """The shipped default document (parsed once; the model is frozen)."""
    return load_default(ChaosPolicy, "chaos")
