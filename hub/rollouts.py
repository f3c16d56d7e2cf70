"""Fleet rollouts and recalls at the hub: one lifecycle table, gates, the halt rule, signed documents.

Public API::

    RolloutSpec(channel, module, version, waves=[10, 50, 100], gates=None, soak_s=600, min_devices=3,
                halt_after=1, group=None)   group: device ids (a device-group rollout)
    TRANSITIONS: dict[(state, event), state]      the whole lifecycle; next_state(state, event) -> state
    ReportStore(fleet_dir)                         latest device reports (``<fleet>/reports/<id>.json``)
    RolloutService(repo, fleet_dir=None, clock=None, reports=None, tick_interval_s=5.0)
        .start(spec, actor) -> Rollout ; .approve/.pause/.resume/.ack(channel, actor) -> Rollout
        .abort(channel, revert, actor) -> Rollout
        .observe(report) -> list[str] (events fired: halt, advance, complete)
        .tick(channel=None) -> list[str]           automatic gates (cron / every report)
        .status(channel) -> RolloutStatus          per wave: members known, healthy, failed
        .recall(channel, module, withdrawn, to_version, reason, actor) -> dict
        .current(channel) -> Rollout | None ; .history(channel) -> list[Rollout]
    wave_of(bucket, waves) -> int                  which wave a device bucket falls in

A rollout is not a new signature scheme: its signed form is :class:`deployment.rollout.RolloutDoc`
inside the channel's desired state (``<channel>/desired-state.json``), a TUF target signed by the
channel's delegated role, re-signed (serial + 1) on every state change. Only integers go into it.
The hub's bookkeeping (history, failures seen, when each wave opened) lives in
``<repo>/rollouts/<channel>.json`` and is never trusted by devices.

Lifecycle (one table, :data:`TRANSITIONS`)::

    start            -> running
    running  --approve/advance--> running (next wave)   --complete--> completed
    running  --pause--> paused --resume--> running
    running  --fail-limit--> halted --ack--> paused       (failures acknowledged; resume to go on)
    running|paused|halted --abort-keep--> aborted  --abort-revert--> reverted

Gates: wave 0 opens on start; wave i+1 opens by ``approve`` (gate "manual") or automatically (gate
"auto") once the open waves have soaked ``soak_s`` with at least ``min_devices`` members reporting the
candidate healthy (fewer when fewer members are known) and no unacknowledged failure. Completion after
the last wave follows the same rule. Nothing waits for every member: an unreachable device blocks
nobody. Halt rule: ``halt_after`` distinct failed devices (the candidate rolled back and marked bad on
the device) since the last ``ack`` halt the rollout at once; halted, nobody starts the candidate.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployment.manifest import NAME_RE, VERSION_RE, manifest_from_custom, version_key
from deployment.rollout import BASIS_POINTS, RecallDoc, RolloutDoc, bucket
from hub.repository import HubRepository
from sre_core.atomic import atomic_write_json
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError

__all__ = [
    "TRANSITIONS",
    "ReportStore",
    "Rollout",
    "RolloutService",
    "RolloutSpec",
    "RolloutStatus",
    "WaveStatus",
    "next_state",
    "wave_of",
]

State = Literal["none", "running", "paused", "halted", "completed", "aborted", "reverted"]
TERMINAL: frozenset[str] = frozenset({"completed", "aborted", "reverted"})

TRANSITIONS: dict[tuple[str, str], str] = {
    ("none", "start"): "running",
    ("running", "approve"): "running",
    ("running", "advance"): "running",
    ("running", "complete"): "completed",
    ("running", "pause"): "paused",
    ("paused", "resume"): "running",
    ("running", "fail_limit"): "halted",
    ("paused", "fail_limit"): "paused",
    ("halted", "fail_limit"): "halted",
    ("halted", "ack"): "paused",
    ("running", "abort_keep"): "aborted",
    ("paused", "abort_keep"): "aborted",
    ("halted", "abort_keep"): "aborted",
    ("running", "abort_revert"): "reverted",
    ("paused", "abort_revert"): "reverted",
    ("halted", "abort_revert"): "reverted",
    ("aborted", "abort_revert"): "reverted",
}

_HINTS = {
    "resume": "a halted rollout needs `sre-hub rollout ack` (acknowledge the failures) before resume",
    "approve": "approve opens the next wave of a running rollout; resume it first if it is paused",
}


def next_state(state: str, event: str) -> str:
    """The lifecycle table. Raises InputError for an event the state does not accept."""
    nxt = TRANSITIONS.get((state, event))
    if nxt is None:
        raise InputError(
            f"rollout {event.replace('_', ' ')}",
            f"a rollout that is {state} does not accept {event!r}",
            _HINTS.get(event, "see `sre-hub rollout status` for what it accepts"),
        )
    return nxt


def wave_of(device_bucket: int, waves: list[int]) -> int:
    """Index of the wave whose cumulative percentage first covers ``device_bucket`` (0..9999)."""
    for i, pct in enumerate(waves):
        if device_bucket < pct * (BASIS_POINTS // 100):
            return i
    return len(waves)


class RolloutSpec(BaseModel):
    """What an operator asks for (validated before anything is signed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = Field(pattern=NAME_RE)
    module: str = Field(pattern=NAME_RE)
    version: str = Field(pattern=VERSION_RE)
    waves: list[int] = Field(default_factory=lambda: [10, 50, 100], min_length=1, max_length=20)
    gates: list[Literal["manual", "auto"]] | None = Field(
        default=None, description="gate of each wave after the first (default: all auto)"
    )
    soak_s: int = Field(default=600, ge=0, le=30 * 86400)
    min_devices: int = Field(default=3, ge=1, le=1_000_000)
    halt_after: int = Field(default=1, ge=1, le=1_000_000)
    group: list[str] | None = Field(
        default=None, max_length=100_000, description="limit the rollout to these device ids (a device group)"
    )

    @field_validator("waves")
    @classmethod
    def _cumulative(cls, v: list[int]) -> list[int]:
        if any(not 0 < p <= 100 for p in v) or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("waves are increasing cumulative percentages in 1..100, e.g. 10,50,100")
        if v[-1] != 100:
            raise ValueError("the last wave must be 100 (the whole fleet)")
        return v

    @model_validator(mode="after")
    def _gates(self) -> RolloutSpec:
        if self.gates is not None and len(self.gates) != len(self.waves) - 1:
            raise ValueError(f"give one gate per wave after the first ({len(self.waves) - 1})")
        return self

    def gate(self, wave: int) -> str:
        """Gate that opens ``wave`` (>= 1), or that completes the rollout (``wave == len(waves)``)."""
        if wave >= len(self.waves) or self.gates is None:
            return "auto"
        return self.gates[wave - 1]


class Rollout(BaseModel):
    """The hub's record of one rollout (bookkeeping; the signed part is :meth:`doc`)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    spec: RolloutSpec
    target: str
    baseline: str | None = None
    baseline_target: str | None = None
    state: State = "running"
    wave: int = 0
    wave_opened_at: datetime
    started_at: datetime
    finished_at: datetime | None = None
    failed: dict[str, str] = Field(default_factory=dict, description="device -> when its failure was seen")
    acked: list[str] = Field(default_factory=list, description="failed devices already acknowledged")
    history: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def percent(self) -> int:
        return self.spec.waves[min(self.wave, len(self.spec.waves) - 1)]

    @property
    def open_failures(self) -> list[str]:
        return sorted(set(self.failed) - set(self.acked))

    def doc(self) -> RolloutDoc:
        """The signed document devices read (integers and strings only)."""
        return RolloutDoc(
            id=self.id,
            module=self.spec.module,
            version=self.spec.version,
            target=self.target,
            baseline=self.baseline,
            waves=list(self.spec.waves),
            wave=self.wave,
            state="running" if self.state == "none" else self.state,
            group=sorted(self.spec.group) if self.spec.group is not None else None,
        )


@dataclass
class WaveStatus:
    """One wave's figures from device reports (members known = reported devices in the wave; reachable =
    those heard from since the rollout began)."""

    index: int
    percent: int
    gate: str
    open: bool
    members_known: int = 0
    reachable: int = 0
    on_candidate: int = 0
    healthy: int = 0
    failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RolloutStatus:
    """A rollout with per-wave figures and whether the next gate would pass now."""

    rollout: Rollout
    waves: list[WaveStatus] = field(default_factory=list)
    gate_ready: bool = False
    gate_reason: str = ""
    devices_reporting: int = 0

    def to_dict(self) -> dict[str, Any]:
        r = self.rollout
        return {
            "id": r.id,
            "channel": r.spec.channel,
            "module": r.spec.module,
            "version": r.spec.version,
            "baseline": r.baseline,
            "state": r.state,
            "wave": r.wave,
            "percent": r.percent,
            "started_at": r.started_at.isoformat(),
            "wave_opened_at": r.wave_opened_at.isoformat(),
            "finished_at": r.finished_at.isoformat() if r.finished_at else None,
            "failed_devices": sorted(r.failed),
            "open_failures": r.open_failures,
            "halt_after": r.spec.halt_after,
            "soak_s": r.spec.soak_s,
            "min_devices": r.spec.min_devices,
            "gate_ready": self.gate_ready,
            "gate_reason": self.gate_reason,
            "devices_reporting": self.devices_reporting,
            "waves": [w.to_dict() for w in self.waves],
        }


_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ReportStore:
    """The latest report of each device (``<fleet>/reports/<device>.json``), cached in memory.

    Reports are written only by the hub server (one writer); other processes read the files.
    """

    def __init__(self, fleet_dir: Path) -> None:
        self.dir = Path(fleet_dir) / "reports"
        self._cache: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def put(self, report: dict[str, Any]) -> None:
        dev = str(report.get("device_id", ""))
        if not _DEVICE_RE.match(dev):
            raise InputError("store device report", f"bad device id {dev!r}")
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.dir / f"{dev}.json", report)
            if self._cache is not None:
                self._cache[dev] = report

    def all(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            if self._cache is None:
                cache: dict[str, dict[str, Any]] = {}
                if self.dir.is_dir():
                    for p in sorted(self.dir.glob("*.json")):
                        try:
                            cache[p.stem] = json.loads(p.read_text())
                        except (OSError, ValueError):
                            continue
                self._cache = cache
            return dict(self._cache)

    def in_channel(self, channel: str) -> dict[str, dict[str, Any]]:
        return {d: r for d, r in self.all().items() if r.get("channel") == channel}


def _module_facts(report: dict[str, Any], module: str) -> dict[str, Any]:
    mods = report.get("modules") or {}
    facts = mods.get(module) if isinstance(mods, dict) else None
    return facts if isinstance(facts, dict) else {}


def _healthy_on(report: dict[str, Any], module: str, version: str) -> bool:
    f = _module_facts(report, module)
    return (
        f.get("version") == version
        and f.get("phase") in (None, "idle")
        and not report.get("safe_mode")
        and version not in (f.get("bad") or [])
    )


def _failed_on(report: dict[str, Any], module: str, version: str) -> bool:
    return version in (_module_facts(report, module).get("bad") or [])


def _received_since(report: dict[str, Any], since: datetime) -> bool:
    at = report.get("received_at")
    try:
        return isinstance(at, str) and datetime.fromisoformat(at) >= since
    except ValueError:
        return False


class RolloutService:
    """Runs rollouts and recalls for every channel of one hub repository. Thread-safe in-process;
    across processes every operation re-reads the record under the repository lock.

    Args:
        repo: the hub repository (signs desired states with each channel's delegated key).
        fleet_dir: reports live under ``<fleet_dir>/reports`` (default ``<repo>/fleet``).
        clock: hub time (soak, audit stamps).
        reports: a shared :class:`ReportStore` (the server's ingest route passes its own).
        tick_interval_s: ordinary reports re-evaluate the gates at most this often per channel (a report
            of a bad version at once; ``tick()`` any time).
    """

    def __init__(
        self,
        repo: HubRepository,
        fleet_dir: Path | None = None,
        clock: Clock | None = None,
        reports: ReportStore | None = None,
        tick_interval_s: float = 5.0,
    ) -> None:
        self.repo = repo
        self.clock = clock or repo.clock or SystemClock()
        self.fleet_dir = Path(fleet_dir) if fleet_dir else repo.dir / "fleet"
        self.reports = reports or ReportStore(self.fleet_dir)
        self.dir = repo.dir / "rollouts"
        self._lock = threading.RLock()
        self._buckets: dict[tuple[str, str], int] = {}
        self._last_tick: dict[str, float] = {}
        self.tick_interval_s = tick_interval_s

    # ------------------------------------------------------------------ records
    def _path(self, channel: str) -> Path:
        return self.dir / f"{channel}.json"

    def _load_all(self, channel: str) -> list[Rollout]:
        p = self._path(channel)
        if not p.is_file():
            return []
        data = json.loads(p.read_text())
        return [Rollout.model_validate(r) for r in data.get("rollouts", [])]

    def _save_all(self, channel: str, rollouts: list[Rollout]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self._path(channel), {"rollouts": [r.model_dump(mode="json") for r in rollouts[-50:]]}
        )

    def current(self, channel: str) -> Rollout | None:
        """The newest rollout of ``channel`` (terminal or not)."""
        rs = self._load_all(channel)
        return rs[-1] if rs else None

    def history(self, channel: str) -> list[Rollout]:
        return self._load_all(channel)

    def _active(self, channel: str) -> Rollout:
        r = self.current(channel)
        if r is None or r.state in TERMINAL:
            raise InputError(
                f"rollout in {channel}", "no rollout is in progress", "start one with `sre-hub rollout start`"
            )
        return r

    def _bucket(self, device: str, rollout_id: str) -> int:
        key = (device, rollout_id)
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) > 1_000_000:
                self._buckets.clear()
            b = self._buckets[key] = bucket(device, rollout_id)
        return b

    # ------------------------------------------------------------------ signing
    def _apply(self, r: Rollout, event: str, actor: str, **detail: Any) -> Rollout:
        """Move ``r`` through the table, persist the record, sign the channel's desired state."""
        new = next_state(r.state, event)
        now = self.clock.now()
        r.history.append({"at": now.isoformat(), "event": event, "from": r.state, "to": new, "actor": actor,
                          **detail})  # fmt: skip
        r.state = new  # type: ignore[assignment]
        if new in TERMINAL:
            r.finished_at = now
        channel = r.spec.channel
        changes: dict[str, Any] = {"rollout": r.doc().model_dump(mode="json")}
        ds = self.repo.desired_state(channel)
        if new == "completed" and r.spec.group is None:  # a group rollout never moves the channel
            modules = {k: v.model_dump() for k, v in (ds.modules.items() if ds else [])}
            modules[r.spec.module] = {"version": r.spec.version, "target": r.target}
            changes["modules"] = modules
        elif new == "reverted":
            modules = {k: v.model_dump() for k, v in (ds.modules.items() if ds else [])}
            if r.baseline is not None and r.baseline_target is not None:
                modules[r.spec.module] = {"version": r.baseline, "target": r.baseline_target}
            else:
                modules.pop(r.spec.module, None)
            changes["modules"] = modules
        rollouts = self._load_all(channel)
        if rollouts and rollouts[-1].id == r.id:
            rollouts[-1] = r
        else:
            rollouts.append(r)
        self._save_all(channel, rollouts)
        self.repo.update_desired(channel, changes)
        return r

    # ------------------------------------------------------------------ operator verbs
    def start(self, spec: RolloutSpec, actor: str = "operator") -> Rollout:
        """Start a rollout of ``spec.module@spec.version`` in ``spec.channel`` (wave 0 opens now).

        Raises:
            InputError: the version is not published in the channel, or a rollout is in progress.
        """
        with self._lock, self.repo.lock():
            prev = self.current(spec.channel)
            if prev is not None and prev.state not in TERMINAL:
                raise InputError(
                    f"start rollout of {spec.module} {spec.version}",
                    f"rollout {prev.id} ({prev.spec.module} {prev.spec.version}) is {prev.state}",
                    "finish it or `sre-hub rollout abort --keep|--revert` first",
                )
            target = self._published(spec.channel, spec.module, spec.version)
            ds = self.repo.desired_state(spec.channel)
            base = ds.modules.get(spec.module) if ds else None
            if base is not None and base.version == spec.version:
                raise InputError(
                    f"start rollout of {spec.module} {spec.version}",
                    "the channel already runs that version",
                    "publish a new version first",
                )
            for rc in ds.recalls if ds else []:
                if rc.get("module") == spec.module and spec.version in rc.get("withdrawn", []):
                    raise InputError(
                        f"start rollout of {spec.module} {spec.version}", "that version was recalled"
                    )
            now = self.clock.now()
            n = len(self._load_all(spec.channel)) + 1
            rid = f"{spec.channel}-{spec.module}-{spec.version}-{n}"[:64]
            rid = re.sub(r"[^A-Za-z0-9._-]", "-", rid)
            r = Rollout(
                id=rid,
                spec=spec,
                target=target,
                baseline=base.version if base else None,
                baseline_target=base.target if base else None,
                state="none",
                wave_opened_at=now,
                started_at=now,
            )
            return self._apply(r, "start", actor, waves=spec.waves)

    def approve(self, channel: str, actor: str = "operator") -> Rollout:
        """Open the next wave now (any gate), or complete after the last wave."""
        with self._lock, self.repo.lock():
            r = self._active(channel)
            return self._advance(r, actor, "approve")

    def pause(self, channel: str, actor: str = "operator") -> Rollout:
        with self._lock, self.repo.lock():
            return self._apply(self._active(channel), "pause", actor)

    def resume(self, channel: str, actor: str = "operator") -> Rollout:
        with self._lock, self.repo.lock():
            return self._apply(self._active(channel), "resume", actor)

    def ack(self, channel: str, actor: str = "operator") -> Rollout:
        """Acknowledge the failures that halted the rollout (it becomes paused)."""
        with self._lock, self.repo.lock():
            r = self._active(channel)
            acked = r.open_failures
            r.acked = sorted(set(r.acked) | set(acked))
            return self._apply(r, "ack", actor, devices=acked)

    def abort(self, channel: str, revert: bool, actor: str = "operator") -> Rollout:
        """Stop the rollout: ``--keep`` freezes it (members on the candidate keep it), ``--revert`` returns
        every device to the baseline."""
        with self._lock, self.repo.lock():
            r = self.current(channel)
            if r is None or (r.state in TERMINAL and not (revert and r.state == "aborted")):
                raise InputError(f"abort rollout in {channel}", "no rollout is in progress")
            return self._apply(r, "abort_revert" if revert else "abort_keep", actor)

    def _advance(self, r: Rollout, actor: str, how: str) -> Rollout:
        if r.wave + 1 >= len(r.spec.waves):
            return self._apply(r, "complete", actor, via=how)
        r.wave += 1
        r.wave_opened_at = self.clock.now()
        return self._apply(r, "approve" if how == "approve" else "advance", actor, wave=r.wave,
                           percent=r.percent)  # fmt: skip

    # ------------------------------------------------------------------ devices
    def observe(self, report: dict[str, Any]) -> list[str]:
        """Take one device report: store it, apply the halt rule, evaluate the automatic gate."""
        self.reports.put({**report, "received_at": self.clock.now().isoformat()})
        channel = str(report.get("channel", ""))
        if not re.match(NAME_RE, channel) or channel not in self.repo.channels:
            return []
        # Gate evaluation reads every report of the channel: at most once per tick_interval_s on ordinary
        # reports (O(fleet) per interval, not per report), at once when a device reports a bad version.
        mods = report.get("modules")
        failing = isinstance(mods, dict) and any(isinstance(m, dict) and m.get("bad") for m in mods.values())
        now = self.clock.monotonic()
        last = self._last_tick.get(channel)
        if not failing and last is not None and now - last < self.tick_interval_s:
            return []
        self._last_tick[channel] = now
        return self.tick(channel)

    def tick(self, channel: str | None = None) -> list[str]:
        """Evaluate the halt rule and automatic gates (every report, and from cron). Returns events."""
        fired: list[str] = []
        for ch in [channel] if channel else self.repo.channels:
            with self._lock:
                r = self.current(ch)
                if r is None or r.state in TERMINAL:
                    continue
                st = self._status(r)
                failed_now = {d for w in st.waves for d in self._failed_devices(r, w.index)}
                new_failures = failed_now - set(r.failed)
                if new_failures:
                    with self.repo.lock():
                        r = self._active(ch)
                        for d in sorted(new_failures):
                            r.failed[d] = self.clock.now().isoformat()
                        if len(r.open_failures) >= r.spec.halt_after and r.state == "running":
                            self._apply(r, "fail_limit", "hub", devices=sorted(new_failures))
                            fired.append("halt")
                        else:
                            self._save_all(ch, [*self._load_all(ch)[:-1], r])
                    continue
                if r.state == "running" and st.gate_ready and r.spec.gate(r.wave + 1) == "auto":
                    with self.repo.lock():
                        r = self._active(ch)
                        self._advance(r, "hub", "auto")
                        fired.append("complete" if r.state == "completed" else "advance")
        return fired

    def _failed_devices(self, r: Rollout, wave: int) -> list[str]:
        out = []
        for dev, rep in self._in_scope(r).items():
            b = self._bucket(dev, r.id)
            if wave_of(b, r.spec.waves) == wave and _failed_on(rep, r.spec.module, r.spec.version):
                out.append(dev)
        return out

    def _in_scope(self, r: Rollout) -> dict[str, dict[str, Any]]:
        reps = self.reports.in_channel(r.spec.channel)
        if r.spec.group is None:
            return reps
        group = set(r.spec.group)
        return {d: rep for d, rep in reps.items() if d in group}

    def status(self, channel: str) -> RolloutStatus:
        """The newest rollout of ``channel`` with per-wave figures.

        Raises:
            InputError: the channel never had a rollout.
        """
        r = self.current(channel)
        if r is None:
            raise InputError(f"rollout status of {channel}", "no rollout was ever started in this channel")
        return self._status(r)

    def _status(self, r: Rollout) -> RolloutStatus:
        waves = [
            WaveStatus(i, pct, "start" if i == 0 else r.spec.gate(i), i <= r.wave)
            for i, pct in enumerate(r.spec.waves)
        ]
        reps = self._in_scope(r)
        for dev, rep in reps.items():
            i = wave_of(self._bucket(dev, r.id), r.spec.waves)
            if i >= len(waves):
                continue
            w = waves[i]
            w.members_known += 1
            w.reachable += int(_received_since(rep, r.started_at))
            if _module_facts(rep, r.spec.module).get("version") == r.spec.version:
                w.on_candidate += 1
            if _healthy_on(rep, r.spec.module, r.spec.version):
                w.healthy += 1
            if _failed_on(rep, r.spec.module, r.spec.version):
                w.failed += 1
        st = RolloutStatus(r, waves, devices_reporting=len(reps))
        open_waves = waves[: r.wave + 1]
        # Only members heard from since the rollout began can be asked to be healthy: a member that last
        # reported before it (and has been unreachable since) never holds the gate.
        reachable = sum(w.reachable for w in open_waves)
        healthy = sum(w.healthy for w in open_waves)
        need = min(r.spec.min_devices, reachable) if reachable else r.spec.min_devices
        soaked = (self.clock.now() - r.wave_opened_at).total_seconds()
        if r.state != "running":
            st.gate_reason = f"rollout is {r.state}"
        elif r.open_failures:
            st.gate_reason = f"{len(r.open_failures)} unacknowledged failed devices"
        elif soaked < r.spec.soak_s:
            st.gate_reason = f"soaking: {int(soaked)}/{r.spec.soak_s} s"
        elif healthy < max(need, 1):
            st.gate_reason = f"{healthy}/{max(need, 1)} devices healthy on {r.spec.version}"
        else:
            st.gate_ready = True
            nxt = "complete" if r.wave + 1 >= len(waves) else f"open wave {r.wave + 1}"
            st.gate_reason = f"ready to {nxt} ({healthy} healthy, soaked {int(soaked)} s)"
        return st

    # ------------------------------------------------------------------ recall
    def recall(
        self,
        channel: str,
        module: str,
        withdrawn: list[str],
        to_version: str,
        reason: str = "",
        actor: str = "operator",
    ) -> dict[str, Any]:
        """Withdraw ``withdrawn`` versions of ``module`` fleet-wide; devices move to ``to_version``
        (a newer one: roll forward; an older one: roll down) at their next sync, online or by bundle.
        A rollout of a withdrawn version is reverted.

        Raises:
            InputError: unknown versions, or ``to_version`` is itself withdrawn.
        """
        if not withdrawn:
            raise InputError("recall", "name at least one version to withdraw")
        if to_version in withdrawn:
            raise InputError("recall", f"{to_version} is among the withdrawn versions", "name another")
        with self._lock, self.repo.lock():
            for v in withdrawn:
                self._published(channel, module, v)
            to_target = self._published(channel, module, to_version)
            r = self.current(channel)
            if (
                r is not None
                and r.state not in TERMINAL
                and r.spec.module == module
                and r.spec.version in withdrawn
            ):
                self._apply(r, "abort_revert", actor, via="recall")
            ds = self.repo.desired_state(channel)
            kind: Literal["forward", "down"] = (
                "forward" if all(version_key(to_version) > version_key(v) for v in withdrawn) else "down"
            )
            n = len(ds.recalls) + 1 if ds else 1
            doc = RecallDoc(
                id=f"recall-{n}", module=module, withdrawn=sorted(withdrawn), to_version=to_version,
                to_target=to_target, kind=kind, reason=reason[:500],
            )  # fmt: skip
            recalls = [*(ds.recalls if ds else []), doc.model_dump(mode="json")]
            modules = {k: v.model_dump() for k, v in (ds.modules.items() if ds else [])}
            cur = modules.get(module)
            if cur is None or cur["version"] in withdrawn or kind == "forward":
                modules[module] = {"version": to_version, "target": to_target}
            out = self.repo.update_desired(channel, {"recalls": recalls, "modules": modules})
            log = self.dir / "recalls.jsonl"
            self.dir.mkdir(parents=True, exist_ok=True)
            with log.open("a") as fh:
                entry = {
                    "at": self.clock.now().isoformat(),
                    "channel": channel,
                    "actor": actor,
                    "serial": out.serial,
                }
                fh.write(json.dumps({**entry, **doc.model_dump(mode="json")}) + "\n")
            return {**doc.model_dump(mode="json"), "channel": channel, "serial": out.serial}

    def _published(self, channel: str, module: str, version: str) -> str:
        for path, tf in self.repo.channel_targets(channel).items():
            man = manifest_from_custom(tf.custom)
            if man is not None and man.name == module and man.version == version:
                return path
        raise InputError(
            f"{module} {version} in {channel}",
            "that version was not published in this channel",
            f"run `sre-hub publish --channel {channel} ...` first",
        )
