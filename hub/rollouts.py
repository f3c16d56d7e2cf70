"""Fleet rollouts and recalls at the hub: one lifecycle table, gates, the halt rule, signed documents.

Public API::

    RolloutSpec(channel, module, version, waves=[10, 50, 100], gates=None, soak_s=600, min_devices=3,
                halt_after=1, group=None)   group: device ids (a device-group rollout)
    TRANSITIONS: dict[(state, event), state]      the whole lifecycle; next_state(state, event) -> state
    ReportStore(fleet_dir)                         latest device reports (the hub store)
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
The hub's bookkeeping (history, failures seen, when each wave opened, per-wave counters) lives in the
hub store (:mod:`hub.store`) and is never trusted by devices.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import Connection, select, update

from deployment.manifest import NAME_RE, VERSION_RE, manifest_from_custom, version_key
from deployment.rollout import BASIS_POINTS, RecallDoc, RolloutDoc, bucket
from hub.repository import HubRepository
from hub.store import HubStore, open_store, store_config
from hub.store._schema import recalls as recalls_t
from hub.store._schema import reports as reports_t
from hub.store._schema import rollout_channels, rollout_counters, rollout_members
from hub.store._schema import rollouts as rollouts_t
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError
from sre_core.lifecycle import NoTransitionError, StateTable

__all__ = [
    "TABLE",
    "TRANSITIONS",
    "ReportStore",
    "Rollout",
    "RolloutEvent",
    "RolloutService",
    "RolloutSpec",
    "RolloutState",
    "RolloutStatus",
    "WaveStatus",
    "device_flags",
    "gate_decision",
    "next_state",
    "wave_of",
]

State = Literal["none", "running", "paused", "halted", "completed", "aborted", "reverted"]
TERMINAL: frozenset[str] = frozenset({"completed", "aborted", "reverted"})


class RolloutState(StrEnum):
    """A rollout's stored state (the values are what the hub store holds)."""

    NONE = "none"
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    COMPLETED = "completed"
    ABORTED = "aborted"
    REVERTED = "reverted"


class RolloutEvent(StrEnum):
    """What an operator or a report posts to a rollout."""

    START = "start"
    APPROVE = "approve"
    ADVANCE = "advance"
    COMPLETE = "complete"
    PAUSE = "pause"
    RESUME = "resume"
    FAIL_LIMIT = "fail_limit"
    ACK = "ack"
    ABORT_KEEP = "abort_keep"
    ABORT_REVERT = "abort_revert"


_R, _V = RolloutState, RolloutEvent

TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (_R.NONE, _V.START): _R.RUNNING,
    (_R.RUNNING, _V.APPROVE): _R.RUNNING,
    (_R.RUNNING, _V.ADVANCE): _R.RUNNING,
    (_R.RUNNING, _V.COMPLETE): _R.COMPLETED,
    (_R.RUNNING, _V.PAUSE): _R.PAUSED,
    (_R.PAUSED, _V.RESUME): _R.RUNNING,
    (_R.RUNNING, _V.FAIL_LIMIT): _R.HALTED,
    (_R.PAUSED, _V.FAIL_LIMIT): _R.PAUSED,
    (_R.HALTED, _V.FAIL_LIMIT): _R.HALTED,
    (_R.HALTED, _V.ACK): _R.PAUSED,
    (_R.RUNNING, _V.ABORT_KEEP): _R.ABORTED,
    (_R.PAUSED, _V.ABORT_KEEP): _R.ABORTED,
    (_R.HALTED, _V.ABORT_KEEP): _R.ABORTED,
    (_R.RUNNING, _V.ABORT_REVERT): _R.REVERTED,
    (_R.PAUSED, _V.ABORT_REVERT): _R.REVERTED,
    (_R.HALTED, _V.ABORT_REVERT): _R.REVERTED,
    (_R.ABORTED, _V.ABORT_REVERT): _R.REVERTED,
}

TABLE: StateTable[RolloutState, RolloutEvent] = StateTable(
    "rollout",
    TRANSITIONS,
    _R.NONE,
    {st: st for st in RolloutState},  # stored in the hub store; every state is where it resumes
    frozenset({_R.COMPLETED, _R.REVERTED}),
)
"""The rollout lifecycle on the shared engine (:mod:`sre_core.lifecycle`)."""

_HINTS = {
    "resume": "a halted rollout needs `sre-hub rollout ack` (acknowledge the failures) before resume",
    "approve": "approve opens the next wave of a running rollout; resume it first if it is paused",
}


def next_state(state: str, event: str) -> str:
    """The lifecycle table. Raises InputError for an event the state does not accept."""
    try:
        nxt: str | None = TABLE.next(RolloutState(state), RolloutEvent(event)).value
    except (NoTransitionError, ValueError):
        nxt = None
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
    """The latest report of each device, in the hub store (shared by every replica).

    Args:
        fleet_dir: ``<repo>/fleet`` (the store location comes from ``<repo>/hub.toml``).
        store: an open store to share.
    """

    def __init__(self, fleet_dir: Path, store: HubStore | None = None) -> None:
        self.store = store or open_store(store_config(Path(fleet_dir).parent).database_url)

    def put(self, report: dict[str, Any]) -> dict[str, Any] | None:
        """Store ``report`` as its device's latest; returns the one it replaces (None if first)."""
        dev = str(report.get("device_id", ""))
        if not _DEVICE_RE.match(dev):
            raise InputError("store device report", f"bad device id {dev!r}")
        channel = report.get("channel")
        values = {
            "channel": str(channel)[:64] if isinstance(channel, str) else None,
            "received_at": str(report.get("received_at") or ""),
            "body": json.dumps(report),
        }
        with self.store.tx() as conn:
            old = conn.execute(
                select(reports_t.c.body).where(reports_t.c.device_id == dev).with_for_update()
            ).scalar_one_or_none()
            if old is None:
                conn.execute(self.store.insert(reports_t).values(device_id=dev, **values)
                             .on_conflict_do_update(index_elements=["device_id"], set_=values))  # fmt: skip
            else:
                conn.execute(update(reports_t).where(reports_t.c.device_id == dev).values(**values))
        return dict(json.loads(old)) if old is not None else None

    def get(self, device_id: str) -> dict[str, Any] | None:
        with self.store.tx() as conn:
            body = conn.execute(
                select(reports_t.c.body).where(reports_t.c.device_id == device_id)
            ).scalar_one_or_none()
        return dict(json.loads(body)) if body is not None else None

    def all(self) -> dict[str, dict[str, Any]]:
        with self.store.tx() as conn:
            rows = conn.execute(select(reports_t.c.device_id, reports_t.c.body)).all()
        return {r.device_id: json.loads(r.body) for r in rows}

    def in_channel(self, channel: str) -> dict[str, dict[str, Any]]:
        with self.store.tx() as conn:
            rows = conn.execute(
                select(reports_t.c.device_id, reports_t.c.body).where(reports_t.c.channel == channel)
            ).all()
        return {r.device_id: json.loads(r.body) for r in rows}


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


def gate_decision(r: Rollout, waves: list[WaveStatus], soaked_s: float) -> tuple[bool, str]:
    """Whether the next gate of ``r`` passes now, and why (pure: counters and the soak time in, verdict out).

    The rule (module docstring): the open waves have soaked and at least ``min_devices`` of their members
    heard from since the start (fewer when fewer are reachable, never 0) report the candidate healthy, with
    no unacknowledged failure. Completion further needs the candidate healthy on members of the final
    wave itself. An empty or all-silent current wave is named in the reason, never waited on silently.
    """
    open_waves = waves[: r.wave + 1]
    reachable = sum(w.reachable for w in open_waves)
    healthy = sum(w.healthy for w in open_waves)
    need = max(1, min(r.spec.min_devices, reachable) if reachable else r.spec.min_devices)
    if r.state != "running":
        return False, f"rollout is {r.state}"
    if r.open_failures:
        return False, f"{len(r.open_failures)} unacknowledged failed devices"
    if soaked_s < r.spec.soak_s:
        return False, f"soaking: {int(soaked_s)}/{r.spec.soak_s} s"
    cur = waves[min(r.wave, len(waves) - 1)]
    note = ""
    if cur.members_known == 0:
        note = f"wave {cur.index} ({cur.percent} %) has no known members; "
    elif cur.reachable == 0:
        note = f"all {cur.members_known} known members of wave {cur.index} are silent since the start; "
    if healthy < need:
        hint = " (approve to open the next wave by hand)" if note else ""
        return False, f"{note}{healthy}/{need} devices healthy on {r.spec.version}{hint}"
    last = r.wave + 1 >= len(waves)
    if last:
        final = waves[-1]
        need_f = max(1, min(r.spec.min_devices, final.reachable))
        if final.healthy < need_f:
            why = (
                "has no known members"
                if final.members_known == 0
                else f"has {final.healthy}/{need_f} healthy"
            )
            return (
                False,
                f"completion needs the candidate healthy on the final wave: wave {final.index} {why}",
            )
    nxt = "complete" if last else f"open wave {r.wave + 1}"
    return True, f"{note}ready to {nxt} ({healthy} healthy, soaked {int(soaked_s)} s)"


MEMBER, REACHABLE, ON_CANDIDATE, HEALTHY, FAILED = 1, 2, 4, 8, 16
_FLAG_COLUMNS = (
    (MEMBER, "members_known"),
    (REACHABLE, "reachable"),
    (ON_CANDIDATE, "on_candidate"),
    (HEALTHY, "healthy"),
    (FAILED, "failed"),
)


def device_flags(r: Rollout, device: str, rep: dict[str, Any] | None) -> int:
    """What one device's latest report contributes to rollout ``r`` (bits MEMBER..FAILED; 0: out of scope)."""
    if rep is None or rep.get("channel") != r.spec.channel:
        return 0
    if r.spec.group is not None and device not in r.spec.group:
        return 0
    f = MEMBER
    f |= REACHABLE if _received_since(rep, r.started_at) else 0
    f |= ON_CANDIDATE if _module_facts(rep, r.spec.module).get("version") == r.spec.version else 0
    f |= HEALTHY if _healthy_on(rep, r.spec.module, r.spec.version) else 0
    f |= FAILED if _failed_on(rep, r.spec.module, r.spec.version) else 0
    return f


class RolloutService:
    """Runs rollouts and recalls for every channel of one hub repository.

    State lives in the hub store, so any number of hub processes may run this at once: every operator
    verb and every gate decision runs in one transaction holding the channel's row lock (and the
    repository lock while it signs), and re-reads the rollout under it, so a gate opens exactly once
    however many ticks, reports and approvals race. A report costs O(1): it updates its device's row and
    the per-wave counters of the rollout in progress; gates read only those counters.

    Args:
        repo: the hub repository (signs desired states with each channel's delegated key).
        fleet_dir: ``<fleet_dir>`` (default ``<repo>/fleet``); the store comes from ``<repo>/hub.toml``.
        clock: hub time (soak, audit stamps).
        reports: a shared :class:`ReportStore`.
        tick_interval_s: kept for compatibility (gates are evaluated on every report: it is O(1)).
        store: an open store to share.
    """

    def __init__(
        self,
        repo: HubRepository,
        fleet_dir: Path | None = None,
        clock: Clock | None = None,
        reports: ReportStore | None = None,
        tick_interval_s: float = 5.0,
        store: HubStore | None = None,
    ) -> None:
        self.repo = repo
        self.clock = clock or repo.clock or SystemClock()
        self.fleet_dir = Path(fleet_dir) if fleet_dir else repo.dir / "fleet"
        self.store = (
            store or (reports.store if reports else None) or open_store(store_config(repo.dir).database_url)
        )
        self.reports = reports or ReportStore(self.fleet_dir, self.store)
        self.dir = repo.dir / "rollouts"
        self._tx = threading.local()
        self.tick_interval_s = tick_interval_s

    # ------------------------------------------------------------------ records
    @contextmanager
    def _conn(self) -> Iterator[Connection]:
        """The transaction of the enclosing :meth:`_locked` block, or a new one."""
        held = getattr(self._tx, "conn", None)
        if held is not None:
            yield held
            return
        with self.store.tx() as conn:
            yield conn

    @contextmanager
    def _locked(self, channel: str) -> Iterator[Connection]:
        """One transaction holding ``channel``'s row lock, then the repository lock (always this order)."""
        if getattr(self._tx, "conn", None) is not None:
            raise RuntimeError("rollout transactions do not nest")
        with self.store.tx() as conn:
            conn.execute(
                self.store.insert(rollout_channels).values(channel=channel, count=0).on_conflict_do_nothing()
            )
            conn.execute(
                select(rollout_channels.c.channel)
                .where(rollout_channels.c.channel == channel)
                .with_for_update()
            ).one()
            self._tx.conn = conn
            try:
                with self.repo.lock():
                    yield conn
            finally:
                self._tx.conn = None

    def _load_all(self, channel: str) -> list[Rollout]:
        with self._conn() as conn:
            rows = conn.execute(
                select(rollouts_t.c.body).where(rollouts_t.c.channel == channel).order_by(rollouts_t.c.seq)
            ).all()
        return [Rollout.model_validate_json(b.body) for b in rows]

    def _save(self, r: Rollout) -> None:
        body = r.model_dump_json()
        with self._conn() as conn:
            res = conn.execute(
                update(rollouts_t).where(rollouts_t.c.id == r.id).values(state=r.state, body=body)
            )
            if res.rowcount == 0:
                n = conn.execute(
                    select(rollout_channels.c.count).where(rollout_channels.c.channel == r.spec.channel)
                ).scalar_one()
                conn.execute(
                    rollouts_t.insert().values(
                        id=r.id, channel=r.spec.channel, seq=n + 1, state=r.state, body=body
                    )
                )
                conn.execute(
                    update(rollout_channels)
                    .where(rollout_channels.c.channel == r.spec.channel)
                    .values(count=n + 1, current_id=r.id)
                )

    def current(self, channel: str) -> Rollout | None:
        """The newest rollout of ``channel`` (terminal or not)."""
        with self._conn() as conn:
            body = conn.execute(
                select(rollouts_t.c.body)
                .where(rollouts_t.c.channel == channel)
                .order_by(rollouts_t.c.seq.desc())
                .limit(1)
            ).scalar_one_or_none()
        return Rollout.model_validate_json(body) if body is not None else None

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
        return bucket(device, rollout_id)

    def _wave(self, r: Rollout, device: str) -> int:
        return wave_of(self._bucket(device, r.id), r.spec.waves)

    # ------------------------------------------------------------------ counters
    def _seed(self, r: Rollout) -> None:
        """Counters of a new rollout from the reports already held (once per rollout: O(fleet))."""
        n = len(r.spec.waves)
        sums = [[0] * len(_FLAG_COLUMNS) for _ in range(n)]
        members = []
        with self._conn() as conn:  # the held transaction: a second one would wait on our own lock
            held = conn.execute(
                select(reports_t.c.device_id, reports_t.c.body).where(reports_t.c.channel == r.spec.channel)
            ).all()
        for dev, body in held:
            f = device_flags(r, dev, json.loads(body))
            w = self._wave(r, dev)
            if f == 0 or w >= n:
                continue
            members.append({"rollout_id": r.id, "device_id": dev, "wave": w, "flags": f})
            for k, (bit, _) in enumerate(_FLAG_COLUMNS):
                sums[w][k] += 1 if f & bit else 0
        with self._conn() as conn:
            conn.execute(
                rollout_counters.insert(),
                [{"rollout_id": r.id, "wave": w, **{c: sums[w][k] for k, (_, c) in enumerate(_FLAG_COLUMNS)}}
                 for w in range(n)],
            )  # fmt: skip
            for i in range(0, len(members), 5000):
                conn.execute(rollout_members.insert(), members[i : i + 5000])

    def _count(self, r: Rollout, device: str, rep: dict[str, Any] | None = None, stored: bool = False) -> int:
        """Apply one device's report to ``r``'s counters (one transaction); returns its flags.

        With ``stored``, the report counted is the device's stored one, read under the device's member
        row lock: reports of one device racing through several replicas (each stored, then counted)
        are then counted in whatever order, and the last count always reflects the last report stored.
        """
        w = self._wave(r, device)
        if w >= len(r.spec.waves):
            return 0
        with self.store.tx() as conn:
            conn.execute(
                self.store.insert(rollout_members)
                .values(rollout_id=r.id, device_id=device, wave=w, flags=0)
                .on_conflict_do_nothing()
            )
            old = conn.execute(
                select(rollout_members.c.flags)
                .where(rollout_members.c.rollout_id == r.id, rollout_members.c.device_id == device)
                .with_for_update()
            ).scalar_one()
            if stored:  # under the member row lock: the newest committed report, not the one in hand
                body = conn.execute(
                    select(reports_t.c.body).where(reports_t.c.device_id == device)
                ).scalar_one_or_none()
                rep = json.loads(body) if body is not None else None
            new = device_flags(r, device, rep)
            if old == new:
                return new
            delta = {c: getattr(rollout_counters.c, c) + (bool(new & b) - bool(old & b))
                     for b, c in _FLAG_COLUMNS if bool(new & b) != bool(old & b)}  # fmt: skip
            conn.execute(
                update(rollout_counters)
                .where(rollout_counters.c.rollout_id == r.id, rollout_counters.c.wave == w)
                .values(**delta)
            )
            conn.execute(
                update(rollout_members)
                .where(rollout_members.c.rollout_id == r.id, rollout_members.c.device_id == device)
                .values(flags=new)
            )
        return new

    def _counters(self, r: Rollout) -> list[WaveStatus]:
        waves = [
            WaveStatus(i, pct, "start" if i == 0 else r.spec.gate(i), i <= r.wave)
            for i, pct in enumerate(r.spec.waves)
        ]
        with self._conn() as conn:
            for row in conn.execute(select(rollout_counters).where(rollout_counters.c.rollout_id == r.id)):
                if 0 <= row.wave < len(waves):
                    w = waves[row.wave]
                    for _, c in _FLAG_COLUMNS:
                        setattr(w, c, int(getattr(row, c)))
        return waves

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
        self._save(r)
        self.repo.update_desired(channel, changes)
        return r

    # ------------------------------------------------------------------ operator verbs
    def start(self, spec: RolloutSpec, actor: str = "operator") -> Rollout:
        """Start a rollout of ``spec.module@spec.version`` in ``spec.channel`` (wave 0 opens now).

        Raises:
            InputError: the version is not published in the channel, or a rollout is in progress.
        """
        with self._locked(spec.channel):
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
            self._apply(r, "start", actor, waves=spec.waves)
            self._seed(r)
            return r

    def approve(self, channel: str, actor: str = "operator", wave: int | None = None) -> Rollout:
        """Open the next wave now (any gate), or complete after the last wave.

        Args:
            wave: the wave this approval opens (``len(waves)``: completion). When given and that gate was
                already passed (by a tick or another operator), nothing more opens.

        Raises:
            InputError: no rollout in progress, or ``wave`` is not the next gate.
        """
        with self._locked(channel):
            r = self._active(channel)
            if wave is not None and wave <= r.wave:
                raise InputError(
                    f"approve wave {wave} in {channel}",
                    f"wave {wave} is already open (its gate was passed; the rollout is at wave {r.wave}, "
                    f"{r.state}): nothing more opens",
                    f"check `sre-hub rollout status`; --wave {r.wave + 1} opens the next one",
                )
            if wave is not None and wave != r.wave + 1:
                raise InputError(
                    f"approve wave {wave} in {channel}",
                    f"the rollout is at wave {r.wave} ({r.state}): that gate is not the next one",
                    "see `sre-hub rollout status`",
                )
            return self._advance(r, actor, "approve")

    def pause(self, channel: str, actor: str = "operator") -> Rollout:
        with self._locked(channel):
            return self._apply(self._active(channel), "pause", actor)

    def resume(self, channel: str, actor: str = "operator") -> Rollout:
        with self._locked(channel):
            return self._apply(self._active(channel), "resume", actor)

    def ack(self, channel: str, actor: str = "operator") -> Rollout:
        """Acknowledge the failures that halted the rollout (it becomes paused)."""
        with self._locked(channel):
            r = self._active(channel)
            acked = r.open_failures
            r.acked = sorted(set(r.acked) | set(acked))
            return self._apply(r, "ack", actor, devices=acked)

    def abort(self, channel: str, revert: bool, actor: str = "operator") -> Rollout:
        """Stop the rollout: ``--keep`` freezes it (members on the candidate keep it), ``--revert`` returns
        every device to the baseline."""
        with self._locked(channel):
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
        """Take one device report: store it, update the counters of the rollouts it touches, apply the
        halt rule and the automatic gate. O(1) in the fleet size."""
        prev = self.reports.put({**report, "received_at": self.clock.now().isoformat()})
        dev = str(report.get("device_id", ""))
        fired: list[str] = []
        old_channel = prev.get("channel") if prev else None
        for ch in dict.fromkeys([str(report.get("channel", "")), str(old_channel or "")]):
            if not ch or not re.match(NAME_RE, ch) or ch not in self.repo.channels:
                continue
            r = self.current(ch)
            if r is None or r.state in TERMINAL:
                continue
            flags = self._count(r, dev, stored=True)
            if (flags & FAILED and dev not in r.failed) or (
                r.state == "running" and r.spec.gate(r.wave + 1) == "auto" and self._status(r).gate_ready
            ):
                fired += self._tick_one(ch)
        return fired

    def tick(self, channel: str | None = None) -> list[str]:
        """Evaluate the halt rule and automatic gates (cron, and reports that may pass a gate)."""
        fired: list[str] = []
        for ch in [channel] if channel else self.repo.channels:
            fired += self._tick_one(ch)
        return fired

    def _failed_members(self, r: Rollout) -> list[str]:
        with self._conn() as conn:
            rows = conn.execute(
                select(rollout_members.c.device_id).where(
                    rollout_members.c.rollout_id == r.id, rollout_members.c.flags.op("&")(FAILED) != 0
                )
            ).all()
        return [row.device_id for row in rows]

    def _tick_one(self, ch: str) -> list[str]:
        """One channel's decision, under its lock, on freshly read state (so it happens exactly once)."""
        r = self.current(ch)
        if r is None or r.state in TERMINAL:
            return []
        with self._locked(ch):
            r = self.current(ch)
            if r is None or r.state in TERMINAL:
                return []
            new_failures = sorted(set(self._failed_members(r)) - set(r.failed))
            if new_failures:
                for d in new_failures:
                    r.failed[d] = self.clock.now().isoformat()
                if len(r.open_failures) >= r.spec.halt_after and r.state == "running":
                    self._apply(r, "fail_limit", "hub", devices=new_failures)
                    return ["halt"]
                self._save(r)
                return []
            st = self._status(r)
            if r.state == "running" and st.gate_ready and r.spec.gate(r.wave + 1) == "auto":
                r = self._advance(r, "hub", "auto")
                return ["complete" if r.state == "completed" else "advance"]
        return []

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
        waves = self._counters(r)
        st = RolloutStatus(r, waves, devices_reporting=sum(w.members_known for w in waves))
        st.gate_ready, st.gate_reason = gate_decision(
            r, waves, (self.clock.now() - r.wave_opened_at).total_seconds()
        )
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
        with self._locked(channel):
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
            entry = {
                "at": self.clock.now().isoformat(),
                "channel": channel,
                "actor": actor,
                "serial": out.serial,
            }
            with self._conn() as conn:
                conn.execute(
                    recalls_t.insert().values(
                        channel=channel,
                        at=str(entry["at"]),
                        body=json.dumps({**entry, **doc.model_dump(mode="json")}),
                    )
                )
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
