"""The device side of fleet rollouts and recalls: membership, the effective desired state, the report.

Public API::

    RolloutDoc, RecallDoc                          the signed documents (inside the channel's desired state)
    bucket(device_id, rollout_id) -> int           stable 0..9999 (basis points)
    is_member(device_id, rollout_id, percent) -> bool
    rollout_of(desired) -> RolloutDoc | None ; recalls_of(desired) -> list[RecallDoc]
    resolve(desired, device_id, current) -> DesiredState      pure: what THIS device should run
    device_id_of(paths) -> str ; installed_versions(paths, modules) -> dict[str, str | None]
    effective_desired(paths, desired) -> DesiredState          resolve() with the device's own facts
    RolloutLedger(paths).observe(report) ; .entries()          seen/committed/rolled-back times per version
    device_report(paths, channel, clock) -> dict               what the device reports to the hub
    send_report(hub_url, paths, report, clock, client=None) -> dict   RFC 9421-signed POST; ``hub_url``
        may list several hubs (a regional first): the first that takes the report answers

A rollout and the channel's recalls travel *inside* the channel's desired state
(``<channel>/desired-state.json``), a TUF target signed by the channel's delegated role: no second
signature scheme. ``modules`` holds the baseline (what the fleet runs); the rollout names the
candidate. Each device decides its own membership from a stable hash of its id and the rollout id
against the open wave's cumulative percentage, so the hub never needs to reach a device to move a wave
and an unreachable device blocks nobody.

Resolution (pure, :func:`resolve`), per the rollout's state:

- ``running``: members take the candidate; non-members keep what they run (baseline when they run
  nothing).
- ``paused`` / ``halted`` / ``aborted`` (abort --keep): membership is frozen and nobody *starts* the
  candidate: members already on it keep it, everyone else keeps what they run.
- ``completed``: everyone takes the candidate (every device of the group, for a device-group rollout:
  the rest of the channel is not part of it and keeps what it runs). ``reverted`` (abort --revert): the
  rollout is ignored and ``modules`` (the baseline) applies to every device.

Recalls come last and win: a withdrawn version is never an effective target, and a device running one
moves to the recall's replacement (roll forward to a named version, or down to a minimum version).
A module left out of the effective state is not touched by reconcile (it keeps its current version).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployment.manifest import NAME_RE, VERSION_RE, DesiredModule, DesiredState
from sre_core.atomic import atomic_write_json
from sre_core.clock import Clock, SystemClock
from sre_core.paths import StatePaths

if TYPE_CHECKING:
    from deployment.reconcile import ReconcileReport

__all__ = [
    "REPORT_PATH",
    "DeviceReport",
    "LedgerEntry",
    "ModuleFacts",
    "RecallDoc",
    "RolloutDoc",
    "RolloutLedger",
    "bucket",
    "device_id_of",
    "device_report",
    "effective_desired",
    "installed_versions",
    "is_member",
    "recalls_of",
    "resolve",
    "rollout_of",
    "send_report",
]

REPORT_PATH = "/v1/fleet/reports"
BASIS_POINTS = 10_000
_LEDGER_MAX = 256  # versions remembered per device (oldest dropped first)

RolloutState = Literal["running", "paused", "halted", "completed", "aborted", "reverted"]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RolloutDoc(_Doc):
    """The signed part of a rollout (integers only: it may also travel in TUF metadata)."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    module: str = Field(pattern=NAME_RE)
    version: str = Field(pattern=VERSION_RE)
    target: str
    baseline: str | None = None
    waves: list[int] = Field(min_length=1, description="cumulative percentages, ending at 100")
    wave: int = Field(ge=0, description="index of the open wave")
    state: RolloutState = "running"
    group: list[str] | None = Field(
        default=None,
        max_length=100_000,
        description="device ids the rollout is limited to (None: the channel)",
    )

    @property
    def percent(self) -> int:
        return self.waves[min(self.wave, len(self.waves) - 1)]


class RecallDoc(_Doc):
    """A release withdrawn fleet-wide and what replaces it."""

    id: str
    module: str = Field(pattern=NAME_RE)
    withdrawn: list[str] = Field(min_length=1)
    to_version: str = Field(pattern=VERSION_RE)
    to_target: str
    kind: Literal["forward", "down"] = "down"
    reason: str = ""


class ModuleFacts(_Doc):
    """One module as a device reports it."""

    version: str | None = None
    phase: str | None = None
    bad: list[str] = Field(default_factory=list, max_length=1024)


class LedgerEntry(_Doc):
    """One module version in the device's ledger (see :class:`RolloutLedger`)."""

    module: str
    version: str
    seen_at: datetime
    seen_serial: int | None = None
    link_gap_s: int | None = Field(default=None, ge=0)
    committed_at: datetime | None = None
    rolled_back_at: datetime | None = None
    left_at: datetime | None = None
    serving: bool | None = None
    flip_ms: int | None = Field(default=None, ge=0)
    reason: str = Field(default="", max_length=500)


class DeviceReport(_Doc):
    """What a device reports to the hub (the hub validates every report against this)."""

    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    channel: str = Field(pattern=NAME_RE)
    time: datetime | None = None
    serial: int | None = None
    last_sync: datetime | None = None
    trust: str | None = None
    safe_mode: bool = False
    modules: dict[str, ModuleFacts] = Field(default_factory=dict, max_length=256)
    ledger: dict[str, LedgerEntry] = Field(default_factory=dict, max_length=4 * _LEDGER_MAX)
    open_escalations: int = Field(default=0, ge=0)


def bucket(device_id: str, rollout_id: str) -> int:
    """The device's stable position 0..9999 for this rollout (different rollouts shuffle the fleet)."""
    digest = hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BASIS_POINTS


def is_member(device_id: str, rollout_id: str, percent: int) -> bool:
    """True when the device falls inside the cumulative ``percent`` of the fleet."""
    return bucket(device_id, rollout_id) < max(0, min(100, percent)) * (BASIS_POINTS // 100)


def rollout_of(desired: DesiredState) -> RolloutDoc | None:
    """The rollout carried by a desired state (None when none, or when it is malformed)."""
    if not desired.rollout:
        return None
    try:
        return RolloutDoc.model_validate(desired.rollout)
    except ValidationError:
        return None


def recalls_of(desired: DesiredState) -> list[RecallDoc]:
    out = []
    for raw in desired.recalls:
        try:
            out.append(RecallDoc.model_validate(raw))
        except ValidationError:
            continue
    return out


def resolve(desired: DesiredState, device_id: str, current: Mapping[str, str | None]) -> DesiredState:
    """What this device should run: the rollout and the recalls applied to the signed desired state.

    Args:
        desired: the verified, signed desired state of the channel.
        device_id: this device's id (membership is decided from it).
        current: module -> the version the device runs now (None: nothing installed).
    """
    modules: dict[str, DesiredModule] = dict(desired.modules)
    ro = rollout_of(desired)
    if ro is not None and ro.state != "reverted":
        cand = DesiredModule(version=ro.version, target=ro.target)
        cur = current.get(ro.module)
        in_group = ro.group is None or device_id in ro.group
        member = in_group and is_member(device_id, ro.id, ro.percent)
        done = ro.state == "completed" and in_group
        if done or (ro.state == "running" and member) or (member and cur == ro.version):
            modules[ro.module] = cand
        elif cur is not None:
            modules.pop(ro.module, None)  # keep what it runs
    for rc in recalls_of(desired):
        repl = DesiredModule(version=rc.to_version, target=rc.to_target)
        want = modules.get(rc.module)
        running = want.version if want is not None else current.get(rc.module)
        if running in rc.withdrawn:
            modules[rc.module] = repl
    if modules == desired.modules:
        return desired
    return desired.model_copy(update={"modules": modules})


# ---------------------------------------------------------------------------- device facts (I/O)
def device_id_of(paths: StatePaths) -> str:
    """The provisioned device id ('' before provisioning: membership still decides, stably)."""
    try:
        return paths.device_id_file.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def installed_versions(paths: StatePaths, modules: list[str]) -> dict[str, str | None]:
    """module -> the active version from the slot state (read-only, no lock: state.json is atomic)."""
    out: dict[str, str | None] = {}
    for m in modules:
        out[m] = None
        try:
            st = json.loads((paths.module(m) / "state.json").read_text(encoding="utf-8"))
            active = st.get("active")
            rec = (st.get("slots") or {}).get(active) if active else None
            if isinstance(rec, dict) and isinstance(rec.get("version"), str):
                out[m] = rec["version"]
        except (OSError, ValueError, AttributeError):
            continue
    return out


def effective_desired(paths: StatePaths, desired: DesiredState) -> DesiredState:
    """:func:`resolve` with this device's id and installed versions (the pull hook)."""
    if not desired.rollout and not desired.recalls:
        return desired
    names = set(desired.modules)
    ro = rollout_of(desired)
    if ro is not None:
        names.add(ro.module)
    names |= {r.module for r in recalls_of(desired)}
    return resolve(desired, device_id_of(paths), installed_versions(paths, sorted(names)))


# ---------------------------------------------------------------------------- ledger + report
class RolloutLedger:
    """``<state>/rollout.json``: when each module version was first seen, committed or rolled back.

    The hub's DORA figures come from it: lead time = committed - issued, of which ``seen - issued`` is
    time the device was disconnected; MTTR = the local flip time of a rollback; time to restore = from
    the hub's failure (halt, abort, recall) to ``left_at``, when the device last stopped serving the
    failed version (``serving`` marks the version a committed/noop pass serves).
    """

    def __init__(self, paths: StatePaths) -> None:
        self.paths = paths
        self.path = paths.root / "rollout.json"

    def entries(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return dict(data.get("versions", {})) if isinstance(data, dict) else {}

    def observe(self, report: ReconcileReport) -> None:
        """Fold one reconcile pass in (called at the end of every pass)."""
        entries = self.entries()
        changed = False
        now = report.started
        meta = self._meta()
        last_online = meta.get("last_online")
        gap_s = None
        if report.online and isinstance(last_online, str):
            gap = datetime.fromisoformat(now) - datetime.fromisoformat(last_online)
            gap_s = max(0, int(gap.total_seconds()))
        for o in report.outcomes:
            if not o.version or o.result in {"safe_mode"}:
                continue
            key = f"{o.module}@{o.version}"
            e = entries.get(key)
            if e is None:
                e = {"module": o.module, "version": o.version, "seen_at": now, "seen_serial": report.serial,
                     "link_gap_s": gap_s}  # fmt: skip
                entries[key] = e
                changed = True
            if o.result in {"committed", "noop"} and "committed_at" not in e:
                e["committed_at"] = now
                changed = True
            if o.result == "rolled_back" and "rolled_back_at" not in e:
                e["rolled_back_at"] = now
                e["reason"] = o.reason[:200]
                e["flip_ms"] = self._flip_ms(o.module)
                changed = True
            if o.result == "rolled_back" and e.get("left_at") is None:
                e["serving"], e["left_at"] = False, now  # its canary share, or the flip, ends here
                changed = True
            elif o.result in {"committed", "noop"}:
                changed |= self._serving(entries, o.module, o.version, now)
        if report.online:
            meta["last_online"] = now
            changed = True
        if changed:
            if len(entries) > _LEDGER_MAX:
                keep = sorted(entries, key=lambda k: str(entries[k].get("seen_at")))[-_LEDGER_MAX:]
                entries = {k: entries[k] for k in keep}
            atomic_write_json(self.path, {"versions": entries, "meta": meta})

    @staticmethod
    def _serving(entries: dict[str, dict[str, Any]], module: str, version: str, now: str) -> bool:
        """Mark ``version`` of ``module`` as the one served; every other version that was served
        stops at ``now`` (``left_at``). Returns whether anything changed."""
        changed = False
        for e in entries.values():
            if e.get("module") != module:
                continue
            if e.get("version") == version:
                if not e.get("serving"):
                    e["serving"] = True
                    changed = True
            elif e.get("serving"):
                e["serving"] = False
                e["left_at"] = now
                changed = True
        return changed

    def _meta(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        meta = data.get("meta", {}) if isinstance(data, dict) else {}
        return dict(meta) if isinstance(meta, dict) else {}

    def _flip_ms(self, module: str) -> int | None:
        """Time from the failed version's flip to the rollback flip, from the audit trail."""
        from sre_core.audit import AuditLog

        flipped: str | None = None
        back: str | None = None
        for rec in AuditLog(self.paths.audit_log).records():
            if rec.data.get("module") != module:
                continue
            if rec.event == "slot.flipped":
                flipped, back = rec.ts, None
            elif rec.event == "slot.rolled_back":
                back = rec.ts
        if flipped is None or back is None:
            return None
        delta = datetime.fromisoformat(back) - datetime.fromisoformat(flipped)
        return max(0, int(delta.total_seconds() * 1000))


def device_report(
    paths: StatePaths, channel: str, clock: Clock | None = None, open_escalations: int = 0
) -> dict[str, Any]:
    """What the device tells the hub: versions, bad versions, last sync, safe mode, the ledger.

    Integers and strings only, so the same document could be carried in signed metadata.
    """
    clock = clock or SystemClock()
    from deployment.reconcile import read_last_reconcile

    last = read_last_reconcile(paths)
    modules: dict[str, Any] = {}
    mods_dir = paths.modules
    names = (
        []
        if not mods_dir.is_dir()
        else sorted(p.name for p in mods_dir.iterdir() if (p / "state.json").exists())
    )
    for m in names:
        try:
            st = json.loads((paths.module(m) / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        active = st.get("active")
        rec = (st.get("slots") or {}).get(active) if active else None
        modules[m] = {
            "version": rec.get("version") if isinstance(rec, dict) else None,
            "phase": st.get("phase"),
            "bad": sorted(
                {str(b.get("version")) for b in (st.get("bad") or {}).values() if isinstance(b, dict)}
            ),
        }
    report = last.get("report") or {}
    return {
        "device_id": device_id_of(paths),
        "channel": channel,
        "time": clock.now().isoformat(),
        "serial": report.get("serial"),
        "last_sync": last.get("last_sync"),
        "trust": last.get("trust"),
        "safe_mode": bool(report.get("safe_mode")),
        "modules": modules,
        "ledger": RolloutLedger(paths).entries(),
        "open_escalations": int(open_escalations),
    }


def send_report(
    hub_url: str | Sequence[str],
    paths: StatePaths,
    report: dict[str, Any],
    clock: Clock | None = None,
    client: httpx.Client | None = None,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """POST the report, signed with the device key (RFC 9421). Returns the hub's JSON answer.

    With several hubs, each is tried in order until one answers 2xx (each request is signed for its
    own URL); a hub that cannot be reached or answers an error passes the report to the next.

    Raises:
        httpx.HTTPError: no hub took it: the last hub's transport failure or refusal (the caller retries
            at the next sync).
    """
    from sre_core.identity import load_identity
    from sre_core.signing import sign_request

    hubs = [hub_url] if isinstance(hub_url, str) else list(hub_url)
    if not hubs:
        raise ValueError("send_report needs at least one hub URL")
    clock = clock or SystemClock()
    ident = load_identity(paths)
    body = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
    own = client is None
    c = client or httpx.Client(timeout=timeout_s)
    try:
        for i, hub in enumerate(hubs):
            url = hub.rstrip("/") + REPORT_PATH
            headers = sign_request(
                "POST",
                url,
                body,
                ident.private_key,
                ident.device_id,
                int(clock.now().timestamp()),
                secrets.token_hex(12),
                {"content-type": "application/json"},
            )
            try:
                resp = c.post(url, content=body, headers=headers, timeout=timeout_s)
                resp.raise_for_status()
            except httpx.HTTPError:
                if i + 1 == len(hubs):
                    raise
                continue
            answer: dict[str, Any] = resp.json()
            return answer
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        if own:
            c.close()
