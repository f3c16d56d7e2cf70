"""The guarded runner: one experiment in a child process, under a hard budget, always cleaned up.

Public API (what ``sre-agent chaos run`` and the daemon's schedule call; pre-flight first, that is the
caller's job)::

    result = run_experiment_guarded(
        experiment,                 # Path to a .json/.yaml file, a parsed dict, or a loader.Experiment
        state=StatePaths(...),      # the device state directory
        budget_s=300,               # hard wall-clock budget for the whole run
        guardrails=policy.guardrails, disk_reserve_mb=policy.headroom.disk_reserve_mb,
        serving_url="http://127.0.0.1:8000", model="clf",   # what the guardrail watches (optional)
        toxiproxy_url=None,         # None: an embedded fault proxy runs for the duration of the run
        telemetry=sink, audit=audit_log,
    )
    result.verdict   # Verdict.PASSED | DEVIATED | ABORTED | INTERRUPTED | ERROR
    result.journal, result.reasons, result.cleanup, result.gates

What happens, in order:

1. A stale lease from a dead agent is recovered first (its faults are undone).
2. A run directory ``<state>/run/chaos/runs/<run_id>/`` gets ``experiment.json`` (our ``state_dir`` and
   ``toxiproxy_url`` injected into its configuration) and ``settings.json`` with rollbacks strategy
   ``always`` and the guardrail control (:mod:`chaos.controls`) as a global control.
3. The lease ``<state>/run/chaos.lease`` is written and the watchdog (:mod:`chaos.watchdog`) started in
   its own session: if this process dies, it clears the faults.
4. ``python -m chaos._child RUN_DIR`` runs chaoslib's ``run_experiment()`` in its own process group.
   On budget: SIGUSR1 (interrupt, rollbacks still run), after ``grace_s[0]`` SIGUSR2 (leave now), after
   ``grace_s[1]`` SIGKILL of the whole group.
5. ``finally``: an independent cleanup undoes every fault in ``<state>/run/faults.json`` and resets the
   Toxiproxy API, whatever happened; the lease is removed (the watchdog exits).
6. The verdict is judged (:func:`judge`), the journal and verdict go to telemetry (table
   ``chaos_journals``, event ``chaos.run``) and audit (``chaos.run.started`` / ``chaos.run.finished``).
   A deviated sanctioned run yields learned gates (:func:`learned_gates`) written to ``<state>/gates/``
   in the format of ``verification.gates.GateDefinition``.

The run's lifecycle is one ``(state, event) -> state`` table (:data:`TRANSITIONS`); the current state is
persisted in the lease before each step so a restart knows where a run stopped (any state -> cleanup).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chaos.faults import CleanupReport, chaos_dir
from chaos.resolve import DEVICE_KEYS
from chaos.watchdog import cleanup as _cleanup_faults
from chaos.watchdog import read_lease, recover_stale_lease
from policies.chaos import Guardrails
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import SreError
from sre_core.lifecycle import StateTable
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = [
    "RESUME",
    "TABLE",
    "TRANSITIONS",
    "ChaosBusyError",
    "LearnedGate",
    "RunPhase",
    "RunResult",
    "Verdict",
    "judge",
    "learned_gates",
    "recover",
    "run_document",
    "run_experiment_guarded",
]

DEFAULT_GRACE_S = (10.0, 5.0)
MAX_BUDGET_S = 24 * 3600.0
JOURNAL_TABLE = "chaos_journals"
POLL_S = 0.05


class Verdict(StrEnum):
    """How a run ended."""

    PASSED = "passed"
    DEVIATED = "deviated"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"
    ERROR = "error"


class RunPhase(StrEnum):
    PREPARED = "prepared"
    RUNNING = "running"
    INTERRUPTING = "interrupting"  # SIGUSR1 sent
    LEAVING = "leaving"  # SIGUSR2 sent
    KILLING = "killing"  # SIGKILL sent
    EXITED = "exited"
    CLEANED = "cleaned"


class RunEvent(StrEnum):
    START = "start"
    EXITED = "exited"
    BUDGET = "budget"  # budget spent, or a stop was requested
    GRACE_OVER = "grace_over"
    CLEANED = "cleaned"


TRANSITIONS: dict[tuple[RunPhase, RunEvent], RunPhase] = {
    (RunPhase.PREPARED, RunEvent.START): RunPhase.RUNNING,
    (RunPhase.PREPARED, RunEvent.EXITED): RunPhase.EXITED,  # failed to start
    (RunPhase.RUNNING, RunEvent.EXITED): RunPhase.EXITED,
    (RunPhase.RUNNING, RunEvent.BUDGET): RunPhase.INTERRUPTING,
    (RunPhase.INTERRUPTING, RunEvent.EXITED): RunPhase.EXITED,
    (RunPhase.INTERRUPTING, RunEvent.GRACE_OVER): RunPhase.LEAVING,
    (RunPhase.LEAVING, RunEvent.EXITED): RunPhase.EXITED,
    (RunPhase.LEAVING, RunEvent.GRACE_OVER): RunPhase.KILLING,
    (RunPhase.KILLING, RunEvent.EXITED): RunPhase.EXITED,
    (RunPhase.EXITED, RunEvent.CLEANED): RunPhase.CLEANED,
}


RESUME: dict[RunPhase, RunPhase] = dict.fromkeys(RunPhase, RunPhase.CLEANED)
"""After a restart every stored run phase ends cleaned: :func:`recover` fires the stale lease (undoes the
faults), whatever step the run had reached."""
TABLE: StateTable[RunPhase, RunEvent] = StateTable(
    "chaos run", TRANSITIONS, RunPhase.PREPARED, RESUME, frozenset({RunPhase.CLEANED})
)


def _next(phase: RunPhase, event: RunEvent) -> RunPhase:
    return TABLE.next(phase, event)


class LearnedGate(dict[str, Any]):
    """A gate definition (a dict in ``verification.gates.GateDefinition``'s JSON format)."""


@dataclass
class RunResult:
    """The outcome of one guarded run."""

    run_id: str
    experiment_hash: str
    title: str
    verdict: Verdict
    reasons: list[str]
    status: str | None
    deviated: bool
    started_at: str
    ended_at: str
    duration_s: float
    budget_s: float
    signals: list[str]
    exit_code: int | None
    journal: dict[str, Any] | None
    cleanup: CleanupReport
    gates: list[LearnedGate] = field(default_factory=list)
    run_dir: str = ""

    def to_dict(self, with_journal: bool = True) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_hash": self.experiment_hash,
            "title": self.title,
            "verdict": self.verdict.value,
            "reasons": list(self.reasons),
            "status": self.status,
            "deviated": self.deviated,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "budget_s": self.budget_s,
            "signals": list(self.signals),
            "exit_code": self.exit_code,
            "cleanup": self.cleanup.to_dict(),
            "gates": [dict(g) for g in self.gates],
            "run_dir": self.run_dir,
            **({"journal": self.journal} if with_journal else {}),
        }


# --- pure decisions --------------------------------------------------------------------------------


def judge(
    journal: Mapping[str, Any] | None,
    *,
    budget_hit: bool,
    stopped: bool = False,
    trip: Mapping[str, Any] | None = None,
    armed: bool = True,
    error: str | None = None,
    exit_code: int | None = None,
) -> tuple[Verdict, list[str]]:
    """The verdict of a run from what it left behind (pure)."""
    reasons: list[str] = []
    if budget_hit:
        reasons.append("the wall-clock budget was spent; the run was interrupted")
    if stopped:
        reasons.append("a stop was requested")
    if trip:
        reasons.extend(f"guardrail: {r}" for r in trip.get("reasons", []))
    if budget_hit or stopped or trip:
        return Verdict.INTERRUPTED, reasons
    if journal is None:
        reasons.append(error or f"the experiment process exited with {exit_code} and left no journal")
        return Verdict.ERROR, reasons
    if not armed:
        return Verdict.ERROR, ["the guardrail control did not arm; the run was unguarded"]
    status = str(journal.get("status", ""))
    if status == "interrupted":
        return Verdict.INTERRUPTED, ["the run was interrupted"]
    if status == "aborted":
        return Verdict.ABORTED, ["the run aborted (an activity failed hard)"]
    if status == "failed":
        return Verdict.ABORTED, ["the steady-state hypothesis was not met before the method"]
    failed = _failed_actions(journal)
    if failed:
        # a fault that did not inject proves nothing: the run is an error, never "passed"
        return Verdict.ERROR, [f"{what} failed: {why}" for what, why in failed]
    if journal.get("deviated"):
        failing = [p for p, _ in _deviating_probes(journal)]
        return Verdict.DEVIATED, [f"steady state deviated after the method: {', '.join(failing) or '?'}"]
    if status == "completed":
        return Verdict.PASSED, []
    return Verdict.ERROR, [f"unexpected journal status {status!r}"]


def _failed_actions(journal: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(section name, error)`` for every action (method or rollback) whose run did not succeed."""
    out: list[tuple[str, str]] = []
    for section in ("run", "rollbacks"):
        for run in journal.get(section) or []:
            if not isinstance(run, Mapping):
                continue
            act = run.get("activity") or {}
            if act.get("type") != "action" or run.get("status") == "succeeded":
                continue
            exc = run.get("exception") or []
            why = str(exc[-1]).strip() if isinstance(exc, list) and exc else str(run.get("status"))
            kind = "rollback" if section == "rollbacks" else "fault"
            out.append((f"{kind} {act.get('name', '?')!r}", why[:300]))
    return out


def _deviating_probes(journal: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    after = (journal.get("steady_states") or {}).get("after") or {}
    out = []
    for p in after.get("probes") or []:
        if p.get("tolerance_met") is False:
            act = p.get("activity") or {}
            out.append((str(act.get("name", "?")), dict(act)))
    return out


# Which verification check guards the weakness a fault exposed (check names of verification/builtin).
CHECK_FOR_ACTION = {
    "corrupt_standby_slot": "integrity.slots",
    "rollback_drill": "rollback.readiness",
    "kill_serving_worker": "rollback.readiness",
    "fill_disk": "resources.headroom",
    "stress_cpu": "resources.headroom",
    "skew_agent_clock": "trust.clock",
    "inject_input_noise": "drift.inputs",
}
FALLBACK_CHECK = "rollback.readiness"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:36] or "experiment"


def learned_gates(
    journal: Mapping[str, Any], run_id: str, experiment_hash: str, title: str, created: str
) -> list[LearnedGate]:
    """Gate definitions for the weaknesses a deviated run found (pure; none when it did not deviate).

    One gate per verification check implicated by the method's actions (an action without a mapped
    check falls back to ``rollback.readiness``: while a known weakness is open, the way back must work).
    """
    probes = _deviating_probes(journal)
    if not journal.get("deviated") or not probes:
        return []
    actions = []
    for run in journal.get("run") or []:
        act = run.get("activity") or {}
        if act.get("type") == "action":
            func = str((act.get("provider") or {}).get("func", ""))
            actions.append(func)
    checks = sorted({CHECK_FOR_ACTION.get(a, FALLBACK_CHECK) for a in actions} or {FALLBACK_CHECK})
    digest = experiment_hash.rsplit(":", maxsplit=1)[-1][:8]
    gates = []
    for check in checks:
        name = f"chaos-{_slug(title)}-{digest}-{check.replace('.', '-')}"[:63].rstrip("-.")
        gates.append(
            LearnedGate(
                name=name,
                check=check,
                severity="warning",
                source="chaos",
                reason=(
                    f"chaos run {run_id} of '{title}' deviated: "
                    f"{', '.join(p for p, _ in probes)} out of tolerance "
                    f"after {', '.join(actions) or 'the method'}"
                )[:2000],
                finding={
                    "run_id": run_id,
                    "experiment_hash": experiment_hash,
                    "title": title,
                    "probes": [d for _, d in probes],
                    "actions": actions,
                },
                created=created,
            )
        )
    return gates


# --- orchestration ---------------------------------------------------------------------------------


def _load(experiment: Any) -> tuple[dict[str, Any], str]:
    from chaos.loader import experiment_hash, load_experiment

    if isinstance(experiment, (str, Path)):
        exp = load_experiment(Path(experiment))
        return dict(exp.raw), exp.hash
    raw = getattr(experiment, "raw", None)
    if isinstance(raw, dict):
        return dict(raw), str(getattr(experiment, "hash", "") or experiment_hash(raw))
    if isinstance(experiment, Mapping):
        return dict(experiment), experiment_hash(experiment)
    raise TypeError(f"experiment must be a path, a mapping or a loaded Experiment, not {type(experiment)}")


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def recover(state: StatePaths, audit: AuditLog | None = None) -> list[dict[str, Any]]:
    """On agent start: fire a stale lease and audit every dead man's switch report. Returns the reports."""
    reports = []
    fired = recover_stale_lease(state.root)
    if fired is not None:
        lease, rep = fired
        reports.append(
            {"run_id": lease.get("run_id"), "why": "stale lease on start", "cleanup": rep.to_dict()}
        )
    cdir = chaos_dir(state.root)
    for path in sorted(cdir.glob("deadman-*.json")) if cdir.is_dir() else []:
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            reports.append({"file": str(path), "why": "unreadable dead man's switch report"})
        path.unlink()
    if audit is not None:
        for r in reports:
            audit.append("chaos.deadman", actor="chaos", run_id=r.get("run_id"), why=r.get("why"))
    return reports


def run_experiment_guarded(
    experiment: Any,
    *,
    state: StatePaths | Path,
    budget_s: float,
    guardrails: Guardrails | None = None,
    disk_reserve_mb: float | None = None,
    serving_url: str | None = None,
    model: str | None = None,
    toxiproxy_url: str | None = None,
    configuration: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    telemetry: TelemetrySink | None = None,
    audit: AuditLog | None = None,
    clock: Clock | None = None,
    sanctioned: bool = True,
    grace_s: tuple[float, float] = DEFAULT_GRACE_S,
    stop: threading.Event | None = None,
    python: str | None = None,
    guard_interval_s: float | None = None,
    skip_pauses: bool = False,
) -> RunResult:
    """Run one (pre-flighted) experiment guarded. Never raises for what the experiment does.

    Args:
        experiment: a file path, a parsed document, or a :class:`chaos.loader.Experiment`.
        state: the device state directory.
        budget_s: hard wall-clock budget (then SIGUSR1, SIGUSR2, SIGKILL ``grace_s`` apart).
        guardrails: a ``policies.chaos.Guardrails`` (limits and probe cadence); None: its defaults.
        disk_reserve_mb: trip when free disk under the state dir falls below this.
        serving_url, model: the inference server the guardrail watches (None: no serving checks).
        toxiproxy_url: a Toxiproxy API; None starts an embedded fault proxy for the run.
        configuration: the device's settings (``chaos.resolve.DEVICE_KEYS``: serving_restart...).
        settings: extra Chaos Toolkit settings (the rollback strategy and guardrail always win).
        telemetry, audit: where the journal and verdict go.
        sanctioned: whether findings of a deviated run may become learned gates.
        stop: set it to interrupt the run early (same path as the budget).
        skip_pauses: a rehearsal: chaoslib's ``Dry.PAUSE`` (activities run, their pauses do not).

    Raises:
        chaos.loader.ExperimentError: the experiment file cannot be loaded (nothing ran).
        ChaosBusyError: another chaos run is in progress on this device (nothing ran).
        ValueError: a budget outside (0, 24 h].
    """
    if not 0 < budget_s <= MAX_BUDGET_S:
        raise ValueError(f"budget_s must be in (0, {MAX_BUDGET_S}]")
    paths = state if isinstance(state, StatePaths) else StatePaths(Path(state))
    clock = clock or SystemClock()
    doc, exp_hash = _load(experiment)
    title = str(doc.get("title", ""))
    with _exclusive(paths):
        recover(paths, audit)
        return _run_locked(
            doc, exp_hash, title, paths, budget_s, guardrails, disk_reserve_mb, serving_url, model,
            toxiproxy_url, configuration, settings, telemetry, audit, clock, sanctioned, grace_s, stop,
            python, guard_interval_s, skip_pauses,
        )  # fmt: skip


class ChaosBusyError(SreError):
    """Another chaos run holds this device."""


@contextlib.contextmanager
def _exclusive(paths: StatePaths) -> Iterator[None]:
    """One chaos run per device at a time (flock on ``<state>/run/chaos.lock``, released on death)."""
    paths.run.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.run / "chaos.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ChaosBusyError(
                "start a chaos run", "another chaos run is in progress on this device", "wait for it to end"
            ) from None
        yield
    finally:
        os.close(fd)


def run_document(
    doc: Mapping[str, Any],
    state_root: Path,
    toxiproxy_url: str,
    serving_url: str | None = None,
    device: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The document chaoslib runs: the experiment with the device's settings as its configuration.

    Device settings (what runs, where faults go, which link is which) come from the device, never from
    the document: pre-flight rejects a document that sets one, and they are dropped here too.
    """
    cfg = {k: v for k, v in dict(doc.get("configuration") or {}).items() if k not in DEVICE_KEYS}
    cfg.update({k: v for k, v in dict(device or {}).items() if k in DEVICE_KEYS})
    cfg.update({"state_dir": str(state_root), "toxiproxy_url": toxiproxy_url})
    api = urlsplit(toxiproxy_url)
    if api.hostname and api.port:  # chaostoolkit-toxiproxy reads host and port, not a URL
        cfg.update({"toxiproxy_host": api.hostname, "toxiproxy_port": api.port})
    if serving_url:
        cfg["serving_url"] = serving_url  # the device's own server, not one the author names
    return {**doc, "configuration": cfg}


def _run_locked(
    doc: dict[str, Any],
    exp_hash: str,
    title: str,
    paths: StatePaths,
    budget_s: float,
    guardrails: Guardrails | None,
    disk_reserve_mb: float | None,
    serving_url: str | None,
    model: str | None,
    toxiproxy_url: str | None,
    configuration: Mapping[str, Any] | None,
    settings: Mapping[str, Any] | None,
    telemetry: TelemetrySink | None,
    audit: AuditLog | None,
    clock: Clock,
    sanctioned: bool,
    grace_s: tuple[float, float],
    stop: threading.Event | None,
    python: str | None,
    guard_interval_s: float | None,
    skip_pauses: bool,
) -> RunResult:
    sink: TelemetrySink = telemetry or NullSink()

    run_id = clock.now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    run_dir = chaos_dir(paths.root) / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    started_at = clock.now()
    t0 = clock.monotonic()

    g = guardrails if guardrails is not None else Guardrails()
    fp = None
    if toxiproxy_url is None:
        from chaos.faultproxy import FaultProxyServer

        fp = FaultProxyServer()
        toxiproxy_url = fp.start()

    doc_run = run_document(doc, paths.root, toxiproxy_url, serving_url, configuration)
    guard_args: dict[str, Any] = {
        "state_dir": str(paths.root),
        "serving_url": serving_url,
        "model": model,
        "max_error_rate": g.max_error_rate,
        "max_p95_ms": g.max_p95_ms,
        "max_uplink_backlog": g.max_uplink_backlog,
        "disk_reserve_mb": disk_reserve_mb,
        "timeout_s": g.probe_timeout_s,
        "interval_s": guard_interval_s or g.probe_interval_s,
        "trip_file": str(run_dir / "guardrail.json"),
        "armed_file": str(run_dir / "armed.json"),
        "stop_file": str(run_dir / "stop"),
    }
    run_settings = json.loads(json.dumps(dict(settings or {}), default=str))
    run_settings.setdefault("runtime", {}).setdefault("rollbacks", {})["strategy"] = "always"
    run_settings.setdefault("controls", {})["sre-guardrail"] = {
        "provider": {"type": "python", "module": "chaos.controls", "arguments": guard_args}
    }
    atomic_write_json(run_dir / "experiment.json", doc_run)
    atomic_write_json(run_dir / "settings.json", run_settings)
    atomic_write_json(run_dir / "options.json", {"dry": "pause" if skip_pauses else None})

    if audit is not None:
        audit.append(
            "chaos.run.started",
            actor="chaos",
            run_id=run_id,
            experiment_hash=exp_hash,
            title=title,
            budget_s=budget_s,
        )
    sink.event("chaos.run.started", f"chaos run {run_id}: {title}", attrs={"run_id": run_id})

    lease_path = paths.run / "chaos.lease"
    lease: dict[str, Any] = {
        "run_id": run_id,
        "state_dir": str(paths.root),
        "agent_pid": os.getpid(),
        "agent_create_time": _create_time(os.getpid()),
        "child_pid": None,
        "toxiproxy_url": toxiproxy_url,
        "hard_deadline_mono": t0 + budget_s + sum(grace_s),
        "phase": RunPhase.PREPARED.value,
    }
    atomic_write_json(lease_path, lease)
    exe = python or sys.executable
    env = {
        **os.environ,
        "SRE_CHAOS_RUN_ID": run_id,
        "SRE_CHAOS_STATE_DIR": str(paths.root),
        "SRE_CHAOS_TOXIPROXY_URL": toxiproxy_url,
        "SRE_CHAOS_AUDIT_LOG": str(run_dir / "audit.jsonl"),
        "SRE_CHAOS_AGENT_PID": str(os.getpid()),
        "PYTHONUNBUFFERED": "1",
    }
    if serving_url:
        env["SRE_CHAOS_SERVING_URL"] = serving_url
    watchdog = subprocess.Popen(
        [exe, "-m", "chaos.watchdog", str(lease_path)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )

    phase = RunPhase.PREPARED
    signals: list[str] = []
    budget_hit = stopped = False
    exit_code: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    cleanup = CleanupReport()

    def advance(event: RunEvent) -> None:
        nonlocal phase
        phase = _next(phase, event)
        lease["phase"] = phase.value
        with contextlib.suppress(OSError):
            if lease_path.exists():
                atomic_write_json(lease_path, lease)

    try:
        with (run_dir / "child.log").open("wb") as log:
            proc = subprocess.Popen(
                [exe, "-m", "chaos._child", str(run_dir)],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(run_dir),
            )
        lease["child_pid"] = proc.pid
        lease["child_create_time"] = _create_time(proc.pid)
        advance(RunEvent.START)
        deadline = t0 + budget_s
        while True:
            try:
                exit_code = proc.wait(timeout=POLL_S)
                advance(RunEvent.EXITED)
                break
            except subprocess.TimeoutExpired:
                pass
            now = clock.monotonic()
            if phase is RunPhase.RUNNING and (now >= deadline or (stop is not None and stop.is_set())):
                stopped = now < deadline
                budget_hit = not stopped
                advance(RunEvent.BUDGET)
                _signal(proc, signal.SIGUSR1, signals)
                deadline = now + grace_s[0]
            elif phase is RunPhase.INTERRUPTING and now >= deadline:
                advance(RunEvent.GRACE_OVER)
                _signal(proc, signal.SIGUSR2, signals)
                deadline = now + grace_s[1]
            elif phase is RunPhase.LEAVING and now >= deadline:
                advance(RunEvent.GRACE_OVER)
                _killpg(proc.pid, signals)
    except BaseException as exc:
        # Even our own failure (or KeyboardInterrupt) goes through the same cleanup below.
        if proc is not None and proc.poll() is None:
            _killpg(proc.pid, signals)
            exit_code = proc.wait(5)
        (run_dir / "runner-error.txt").write_text(f"{type(exc).__name__}: {exc}", encoding="utf-8")
        if not isinstance(exc, Exception):
            raise
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the experiment's group
        cleanup = _cleanup_faults(paths.root, toxiproxy_url, audit=AuditLog(run_dir / "audit.jsonl"))
        if fp is not None:
            fp.stop()
            cleanup.notes.append("embedded fault proxy stopped")
        if phase is not RunPhase.CLEANED and phase is RunPhase.EXITED:
            advance(RunEvent.CLEANED)
        if read_lease(lease_path) is not None:
            lease_path.unlink()
        try:
            watchdog.wait(2.0)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait(2.0)

    journal = _read_json(run_dir / "journal.json")
    err = _read_json(run_dir / "error.json")
    trip = _read_json(run_dir / "guardrail.json")
    armed = (run_dir / "armed.json").exists()
    verdict, reasons = judge(
        journal,
        budget_hit=budget_hit,
        stopped=stopped,
        trip=trip,
        armed=armed,
        error=str(err["error"]) if err else None,
        exit_code=exit_code,
    )
    if not cleanup.ok:
        reasons.append(f"cleanup incomplete: {cleanup.failed or cleanup.notes}")
    ended_at = clock.now()
    result = RunResult(
        run_id=run_id,
        experiment_hash=exp_hash,
        title=title,
        verdict=verdict,
        reasons=reasons,
        status=str(journal.get("status")) if journal else None,
        deviated=bool(journal.get("deviated")) if journal else False,
        started_at=started_at.isoformat(),
        ended_at=ended_at.isoformat(),
        duration_s=round(clock.monotonic() - t0, 3),
        budget_s=budget_s,
        signals=signals,
        exit_code=exit_code,
        journal=journal,
        cleanup=cleanup,
        run_dir=str(run_dir),
    )
    if verdict is Verdict.DEVIATED and sanctioned and journal is not None:
        result.gates = _persist_gates(
            paths, learned_gates(journal, run_id, exp_hash, title, ended_at.isoformat())
        )
    _report(result, sink, audit, run_dir / "audit.jsonl")
    return result


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals, signals: list[str]) -> None:
    signals.append(sig.name)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


def _killpg(pid: int, signals: list[str]) -> None:
    signals.append("SIGKILL")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _persist_gates(paths: StatePaths, gates: list[LearnedGate]) -> list[LearnedGate]:
    """Write each new gate to ``<state>/gates/<name>.json`` (an existing gate of that name is kept)."""
    out = []
    gdir = paths.root / "gates"
    for gate in gates:
        target = gdir / f"{gate['name']}.json"
        if not target.exists():
            atomic_write_json(target, dict(gate))
        out.append(gate)
    return out


def _report(result: RunResult, sink: TelemetrySink, audit: AuditLog | None, side_audit: Path) -> None:
    severity = "info" if result.verdict is Verdict.PASSED else "warning"
    sink.record(
        JOURNAL_TABLE,
        {
            "run_id": result.run_id,
            "ts": datetime.fromisoformat(result.ended_at),
            "experiment_hash": result.experiment_hash,
            "title": result.title,
            "verdict": result.verdict.value,
            "status": result.status,
            "deviated": result.deviated,
            "duration_s": result.duration_s,
            "reasons": list(result.reasons),
            "signals": list(result.signals),
            "cleanup": result.cleanup.to_dict(),
            "gates": [g["name"] for g in result.gates],
            "journal": result.journal,
        },
    )
    sink.event(
        "chaos.run",
        f"chaos run {result.run_id} ({result.title}): {result.verdict.value}",
        severity=severity,
        attrs={"run_id": result.run_id, "verdict": result.verdict.value, "reasons": result.reasons},
    )
    sink.metric("chaos.run.duration_s", result.duration_s, {"verdict": result.verdict.value})
    if audit is not None:
        # what the experiment's activities and the cleanup recorded (slot flips...) joins the main trail
        for rec in AuditLog(side_audit).records():
            audit.append(
                f"chaos.{rec.event}", actor=rec.actor, run_id=result.run_id, at=rec.ts, data=rec.data
            )
        audit.append(
            "chaos.run.finished",
            actor="chaos",
            run_id=result.run_id,
            experiment_hash=result.experiment_hash,
            verdict=result.verdict.value,
            reasons=result.reasons,
            signals=result.signals,
            cleanup=result.cleanup.to_dict(),
            gates=[g["name"] for g in result.gates],
        )
