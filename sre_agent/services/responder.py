"""The responder as a daemon service, and the telemetry plumbing that feeds it typed incident signals.

Every producer hands the responder one :class:`~sre_agent.incidents.IncidentSignal`: the daemon's own
jobs (probes, SLOs, chaos) call :meth:`ResponderService.report`, which also records the telemetry event;
components that only know the telemetry sink (the canary, the verification runner) emit an ``incident``
event that :class:`IncidentTee` turns into a signal once. ``incident_resolved`` events (the check passes
again) close what they resolve.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sre_agent.incidents import FactValue, IncidentSignal, SlotStatus, incident_from_signal
from sre_core.clock import Clock
from sre_core.paths import StatePaths
from sre_core.telemetry import TelemetrySink

if TYPE_CHECKING:
    from deployment.slots import ModuleStatus, SlotManager
    from sre_agent.respond import Responder

__all__ = [
    "IncidentTee",
    "LazySink",
    "Resolution",
    "ResponderService",
    "since_flip_s",
    "slot_facts",
]

_log = logging.getLogger(__name__)

MAX_QUEUED_INCIDENTS = 256


class LazySink:
    """Forwards to whatever ``get()`` returns now (the telemetry writer exists only once started)."""

    def __init__(self, get: Callable[[], TelemetrySink]) -> None:
        self._get = get

    def metric(
        self, name: str, value: float, labels: dict[str, str] | None = None, ts: datetime | None = None
    ) -> None:
        self._get().metric(name, value, labels, ts)

    def event(
        self,
        kind: str,
        message: str,
        severity: str = "info",
        attrs: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        self._get().event(kind, message, severity, attrs, ts)

    def record(self, table: str, row: dict[str, Any]) -> None:
        self._get().record(table, row)


@dataclass(frozen=True)
class Resolution:
    """A producer says the problem raised under ``key`` is gone (e.g. the check passes again)."""

    key: str
    why: str


class IncidentTee(LazySink):
    """A sink that also hands every ``incident`` event to ``on_signal`` as a typed signal, and every
    ``incident_resolved`` event to ``on_resolved``."""

    def __init__(
        self,
        get: Callable[[], TelemetrySink],
        on_signal: Callable[[IncidentSignal], None],
        on_resolved: Callable[[Resolution], None] | None = None,
    ) -> None:
        super().__init__(get)
        self._on_signal = on_signal
        self._on_resolved = on_resolved

    def event(
        self,
        kind: str,
        message: str,
        severity: str = "info",
        attrs: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        super().event(kind, message, severity, attrs, ts)
        try:  # a reporter must never fail because triage did
            if kind == "incident":
                sig = IncidentSignal.from_event(message, severity, dict(attrs or {}), ts)
                if sig is not None:
                    self._on_signal(sig)
            elif kind == "incident_resolved" and self._on_resolved is not None:
                key = str((attrs or {}).get("dedup_key") or "")
                if key:
                    self._on_resolved(Resolution(key, message[:300]))
        except Exception:
            _log.exception("could not queue an incident for triage")


def slot_facts(st: ModuleStatus, now: datetime) -> dict[str, FactValue]:
    """Facts about a module's slots for triage (pure apart from one ``lstat`` of the current link):
    ``since_flip_s``, ``standby_committed``, ``standby_bad``, ``standby_recalled``, ``bad_versions``,
    ``recalled_versions``."""
    facts: dict[str, FactValue] = {}
    age = since_flip_s(st.current_link, now)
    if age is not None:
        facts["since_flip_s"] = age
    bad = {sha: dict(v) for sha, v in st.bad.items()}
    recalled = {sha for sha, v in bad.items() if str(v.get("reason", "")).startswith("recalled")}
    facts["bad_versions"] = ",".join(sorted({str(v.get("version")) for v in bad.values()}))
    facts["recalled_versions"] = ",".join(sorted({str(bad[s].get("version")) for s in recalled}))
    sb = st.standby
    if sb is not None:
        lkg = st.last_known_good or {}
        facts["standby_committed"] = lkg.get("sha256") == sb.sha256
        facts["standby_bad"] = sb.sha256 in bad
        facts["standby_recalled"] = sb.sha256 in recalled
    return facts


def since_flip_s(current_link: Path, now: datetime) -> float | None:
    """Seconds since the module's ``current`` link was last re-pointed (a flip, promotion or rollback
    renames it into place); None when there is no link."""
    try:
        mtime = os.lstat(current_link).st_mtime
    except OSError:
        return None
    return round(max(0.0, now.timestamp() - mtime), 3)


class ResponderService:
    """Triages queued incident signals on its own thread, so a canary or check thread never waits on the
    model. The queue is bounded; a signal that does not fit is counted as dropped (the event itself is
    already in telemetry).

    Args:
        paths: the device state (safe-mode record, chaos lease).
        clock: time source.
        responder_factory: builds the :class:`~sre_agent.respond.Responder` on start.
        slots: the slot manager the module's slot status is read from (None: no slots).
        sink: where :meth:`report` records the incident event (the raw telemetry sink, not the tee).
        serving: whether a module's active version is loaded and serving (None: unknown).
    """

    name = "responder"

    def __init__(
        self,
        paths: StatePaths,
        clock: Clock,
        responder_factory: Callable[[], Responder],
        slots: Callable[[], SlotManager | None],
        sink: TelemetrySink | None = None,
        serving: Callable[[str], bool | None] | None = None,
    ) -> None:
        self.paths = paths
        self._serving = serving
        self.clock = clock
        self._factory = responder_factory
        self._slots = slots
        self._sink = sink
        self.responder: Responder | None = None
        self._queue: queue.Queue[IncidentSignal | Resolution] = queue.Queue(MAX_QUEUED_INCIDENTS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counts = {
            "queued": 0,
            "dropped": 0,
            "handled": 0,
            "failed": 0,
            "escalated": 0,
            "duplicates": 0,
            "followed_up": 0,
            "recurred": 0,
            "closed": 0,
        }
        self.recent: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0

    def slot_status(self, module: str) -> SlotStatus:
        """What rules read about the module's slots. The standby counts as verified only when it is not
        marked bad and re-hashes to its signed digest now (a rollback target must be intact)."""
        from deployment.safemode import read_safe_mode

        try:
            safe = read_safe_mode(self.paths).active
            slots = self._slots()
            if slots is None or module not in slots.modules():
                return SlotStatus(safe_mode=safe)
            st = slots.status(module)
            lkg = st.last_known_good or {}
            verified = False
            if st.standby is not None and st.standby.sha256 not in st.bad:
                verified = bool(slots.verify_slot(module, st.standby.slot).ok)
            return SlotStatus(
                active_version=st.active.version if st.active else None,
                standby_version=st.standby.version if st.standby else None,
                standby_verified=verified,
                last_known_good=lkg.get("version"),
                safe_mode=safe,
            )
        except Exception:
            _log.exception("slot status for %s", module)
            return SlotStatus()

    def _enrich(self, sig: IncidentSignal) -> IncidentSignal:
        """Facts every rule may read that only the daemon knows: chaos in flight, the module's slots
        (time since the flip, committed/bad/recalled standby), whether it serves. A producer's own
        value for a fact wins."""
        lease = self.paths.run / "chaos.lease"
        facts: dict[str, FactValue] = {"chaos_active": lease.exists()}
        if lease.exists():
            targets = _running_chaos_targets(lease)
            if targets:
                facts["chaos_targets"] = targets
        try:
            slots = self._slots()
            if slots is not None and sig.module in slots.modules():
                facts.update(slot_facts(slots.status(sig.module), self.clock.now()))
            elif slots is not None:  # a device-wide signal (an SLO): the most recent flip of any module
                ages = [since_flip_s(slots.status(m).current_link, self.clock.now()) for m in slots.modules()]
                known = [a for a in ages if a is not None]
                if known:
                    facts["since_flip_s"] = min(known)
            if self._serving is not None:
                up = self._serving(sig.module)
                if up is not None:
                    facts["active_serving"] = up
                    facts["active_down"] = not up
        except Exception:
            _log.exception("slot facts of %s", sig.module)
        return sig.with_facts(**facts)

    def submit(self, sig: IncidentSignal) -> None:
        """Queue a signal for triage (never blocks; the caller is a check or a canary)."""
        if sig.ts is None:
            from dataclasses import replace

            sig = replace(sig, ts=self.clock.now())
        self._put(self._enrich(sig))

    def resolved(self, res: Resolution) -> None:
        """Queue a resolution (closed in order with the signals before it)."""
        self._put(res)

    def _active_version(self, module: str) -> str | None:
        slots = self._slots()
        if slots is None or module not in slots.modules():
            return None
        active = slots.status(module).active
        return active.version if active is not None else None

    def _put(self, item: IncidentSignal | Resolution) -> None:
        try:
            self._queue.put_nowait(item)
            with self._lock:
                self.counts["queued"] += 1
        except queue.Full:
            with self._lock:
                self.counts["dropped"] += 1

    def report(self, sig: IncidentSignal) -> None:
        """A producer inside the daemon raises an incident: record the event, then queue the signal."""
        if self._sink is not None:
            try:
                self._sink.event("incident", sig.message[:300], sig.severity, sig.to_attrs(), sig.ts)
            except Exception:
                _log.exception("could not record an incident event")
        self.submit(sig)

    def resolve(self, key: str, why: str) -> None:
        """A producer inside the daemon says the problem under ``key`` is gone."""
        self.resolved(Resolution(key, why))

    def start(self) -> None:
        self.responder = self._factory()
        try:
            self.responder.resume()  # actions a crash cut short, finished once before anything new
            self.responder.close_not_serving(self._active_version)
        except Exception:
            _log.exception("could not resume the actions a crash interrupted")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="responder", daemon=True)
        self._thread.start()

    def handle(self, item: IncidentSignal | Resolution) -> None:
        """Handle one queued item on the calling thread (the service loop; a demo or test stepping it)."""
        responder = self.responder
        if responder is None:
            raise RuntimeError("the responder service is not started")
        try:
            if isinstance(item, Resolution):
                closed = responder.resolve(item.key, item.why)
                with self._lock:
                    self.counts["closed"] += len(closed)
                return
            incident = incident_from_signal(item, slot=self.slot_status(item.module))
            out = responder.handle(incident, key=item.key)
        except Exception:
            _log.exception("triage of an incident failed: %s", getattr(item, "message", "")[:200])
            with self._lock:
                self.counts["failed"] += 1
            return
        with self._lock:
            if out.tracked == "duplicate" and out.decision is None and not out.results:
                self.counts["duplicates"] += 1
                return
            self.counts[{"new": "handled", "recurred": "recurred"}.get(out.tracked, "followed_up")] += 1
            if out.escalation is not None:
                self.counts["escalated"] += 1
            self.recent = [
                *self.recent[-19:],
                {
                    "incident": incident.id,
                    "kind": incident.kind.value,
                    "module": incident.module,
                    "actions": [r.action.value for r in out.results],
                    "escalation": out.escalation.id if out.escalation is not None else None,
                },
            ]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                self._busy += 1
            try:
                self.handle(item)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle.notify_all()

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is handled (bounded); True when idle."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._busy or not self._queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.2))
        return True

    def stop(self) -> None:
        """Finish what is queued (bounded), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for _ in range(MAX_QUEUED_INCIDENTS):
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if self.responder is not None:
                self.handle(item)

    def status(self) -> dict[str, Any]:
        with self._lock:
            doc: dict[str, Any] = {"counts": dict(self.counts), "recent": list(self.recent)}
        r = self.responder
        doc["open_incidents"] = [e.to_dict() for e in r.tracker.open_incidents()] if r is not None else []
        return doc


def _running_chaos_targets(lease: Path) -> str | None:
    """What the running experiment perturbs, as the comma-separated target names
    :func:`sre_agent.triage.chaos_targets` reads. None when it cannot be read.

    Read from the actions of the method the runner is executing (``<chaos>/runs/<run_id>/experiment.json``):
    probes perturb nothing and rollbacks undo faults. A catalogued action (``module:func`` in the chaos
    policy) counts by its declared ``targets`` and ``impact``; another by the words of its function name."""
    import json
    import re

    from chaos.faults import chaos_dir
    from policies.chaos import default_chaos_policy
    from sre_agent.triage import CATALOGUE_TARGETS, TARGET_WORDS

    try:
        held = json.loads(lease.read_text())
        run_id = str(held["run_id"])
        root = Path(held["state_dir"])
        doc = json.loads((chaos_dir(root) / "runs" / run_id / "experiment.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    catalogue = default_chaos_policy().activities
    found: set[str] = set()
    for act in doc.get("method") or []:
        if not isinstance(act, dict) or act.get("type") != "action":
            continue
        provider = act.get("provider")
        func = provider.get("func") if isinstance(provider, dict) else None
        if not isinstance(provider, dict) or not isinstance(func, str):
            continue
        spec = catalogue.get(f"{provider.get('module')}:{func}")
        if spec is not None:
            declared = [*spec.targets, spec.impact]
            found |= {CATALOGUE_TARGETS[w] for w in declared if w in CATALOGUE_TARGETS}
            continue
        words = set(re.findall(r"[a-z]+", func.lower()))
        found |= {t for t, vocab in TARGET_WORDS.items() if words & vocab}
    return ",".join(sorted(found)) or None
