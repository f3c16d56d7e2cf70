"""Runs checks in isolation and turns their results into telemetry and incidents.

Each run of a check happens in its own daemon thread with a deadline. A check that raises becomes an
``error`` result carrying its traceback; one that overruns becomes a ``timeout`` result carrying the
stack it was stuck in, and its thread is abandoned (Python threads cannot be killed). While that thread
is still alive, the check is not started again: later runs report ``timeout`` at once, so one hung check
holds at most one thread and never blocks the others.

Deadlines use the process's monotonic clock, not the injected clock: they bound real execution time.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sre_core.clock import Clock, SystemClock
from sre_core.telemetry import NullSink, TelemetrySink
from verification.base import Check, CheckResult, CheckSpec, Status
from verification.context import VerificationContext
from verification.registry import PlannedCheck

__all__ = ["RESULTS_TABLE", "Runner"]

RESULTS_TABLE = "verification_results"
_log = logging.getLogger(__name__)
_MAX_EVIDENCE_STACK = 4000
SPAWN_ALLOWANCE_S = 60.0
"""Start-up of an isolated check's child process (interpreter + imports; slow on a busy edge device)."""


@dataclass
class _Running:
    index: int
    check: Check
    spec: CheckSpec
    started: datetime
    t0: float
    thread: threading.Thread


@dataclass
class _IncidentState:
    failing: bool = False
    last_raised: float | None = None


class Runner:
    """Runs planned checks with isolation; records every result; raises incidents on failures.

    Args:
        sink: telemetry destination (``verification_results`` rows, metrics, incident events).
        clock: stamps results (wall time) and spaces repeated incidents (monotonic).
        max_parallel: checks running at once in :meth:`run`.
        incident_repeat_s: a check that keeps failing raises a new incident after this long.
    """

    def __init__(
        self,
        sink: TelemetrySink | None = None,
        clock: Clock | None = None,
        max_parallel: int = 2,
        incident_repeat_s: float = 3600.0,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self.sink: TelemetrySink = sink or NullSink()
        self.clock = clock or SystemClock()
        self.max_parallel = max_parallel
        self.incident_repeat_s = incident_repeat_s
        self._lock = threading.Lock()
        self._hung: dict[str, tuple[threading.Thread, float]] = {}
        self._incidents: dict[str, _IncidentState] = {}

    # -- public -------------------------------------------------------------------------------------

    def run(self, ctx: VerificationContext, planned: Sequence[PlannedCheck]) -> list[CheckResult]:
        """Run every planned check (at most ``max_parallel`` at once); results in the given order."""
        done: queue.SimpleQueue[tuple[int, CheckResult]] = queue.SimpleQueue()
        pending = deque(enumerate(planned))
        running: dict[int, _Running] = {}
        results: dict[int, CheckResult] = {}
        while pending or running:
            while pending and len(running) < self.max_parallel:
                idx, item = pending.popleft()
                started = self._start(idx, item, ctx, done)
                if isinstance(started, CheckResult):
                    results[idx] = self._finish(started)
                else:
                    running[idx] = started
            if not running:
                continue
            wait = min(r.t0 + _limit(r.spec) for r in running.values()) - time.monotonic()
            try:
                idx, res = done.get(timeout=max(0.0, wait))
                r = running.pop(idx, None)
                if r is not None:
                    results[idx] = self._finish(self._stamp(res, r))
            except queue.Empty:
                pass
            now = time.monotonic()
            for idx, r in list(running.items()):
                if now - r.t0 >= _limit(r.spec) and r.thread.is_alive():
                    del running[idx]
                    results[idx] = self._finish(self._timed_out(r, now))
        return [results[i] for i in range(len(planned))]

    def run_one(self, ctx: VerificationContext, item: PlannedCheck) -> CheckResult:
        """Run a single check (the scheduler's job body)."""
        return self.run(ctx, [item])[0]

    def record(self, result: CheckResult) -> CheckResult:
        """Record a result produced outside a run (e.g. a check that could not be loaded)."""
        return self._finish(result)

    # -- internals ----------------------------------------------------------------------------------

    def _start(
        self,
        idx: int,
        item: PlannedCheck,
        ctx: VerificationContext,
        done: queue.SimpleQueue[tuple[int, CheckResult]],
    ) -> _Running | CheckResult:
        check, spec = item.check, item.spec
        started = self.clock.now()
        with self._lock:
            hung = self._hung.get(spec.name)
            if hung is not None and not hung[0].is_alive():
                del self._hung[spec.name]
                hung = None
        if hung is not None:
            stuck = time.monotonic() - hung[1]
            res = CheckResult(
                Status.TIMEOUT,
                f"not started: the previous run is still hung after {stuck:.0f} s",
                {"hung_for_s": round(stuck, 1), "timeout_s": spec.timeout_s, "stack": _stack_of(hung[0])},
            )
            return res.stamped(spec.name, spec.severity, started, 0.0)

        def work() -> None:
            res: Any
            try:
                if spec.isolation == "process":
                    res = run_in_child(check, ctx, spec.timeout_s)
                else:
                    res = check.run(ctx)
            except BaseException as exc:  # a check must never take the agent down
                res = CheckResult(
                    Status.ERROR,
                    f"check raised {type(exc).__name__}: {exc}"[:500],
                    {"exception": type(exc).__name__},
                    traceback=traceback.format_exc(),
                )
            if not isinstance(res, CheckResult):
                res = CheckResult(Status.ERROR, f"{type(check).__name__}.run returned {type(res).__name__}")
            done.put((idx, res))

        thread = threading.Thread(target=work, name=f"check:{spec.name}", daemon=True)
        t0 = time.monotonic()
        thread.start()
        return _Running(idx, check, spec, started, t0, thread)

    def _stamp(self, res: CheckResult, r: _Running) -> CheckResult:
        return res.stamped(r.spec.name, r.spec.severity, r.started, time.monotonic() - r.t0)

    def _timed_out(self, r: _Running, now: float) -> CheckResult:
        with self._lock:
            self._hung[r.spec.name] = (r.thread, r.t0)
        res = CheckResult(
            Status.TIMEOUT,
            f"did not finish within {r.spec.timeout_s:g} s",
            {"timeout_s": r.spec.timeout_s, "stack": _stack_of(r.thread)},
        )
        return res.stamped(r.spec.name, r.spec.severity, r.started, now - r.t0)

    def _finish(self, res: CheckResult) -> CheckResult:
        """Write the result and any incident; telemetry failures are logged, never raised."""
        try:
            self.sink.record(RESULTS_TABLE, res.to_row())
            self.sink.metric(
                "verification.failing", 1.0 if res.status.failing else 0.0, {"check": res.check}, res.started
            )
            self._incident(res)
        except Exception:
            _log.exception("could not record the result of check %s", res.check)
        return res

    def _incident(self, res: CheckResult) -> None:
        now = time.monotonic()
        with self._lock:
            st = self._incidents.setdefault(res.check, _IncidentState())
            raise_it = res.status.failing and (
                not st.failing or st.last_raised is None or now - st.last_raised >= self.incident_repeat_s
            )
            recovered = st.failing and not res.status.failing and res.status is not Status.INCONCLUSIVE
            if res.status.failing:
                st.failing = True
                if raise_it:
                    st.last_raised = now
            elif recovered:
                st.failing = False
        if raise_it:
            facts: dict[str, Any] = {
                "check": res.check,
                "status": res.status.value,
                "category": res.check.split(".", 1)[0],
                **{k: v for k, v in res.measurements.items() if isinstance(v, (int, float))},
            }
            attrs: dict[str, Any] = {
                "source": "verification",
                "incident_kind": "verification_failure",
                "check": res.check,
                "status": res.status.value,
                "modules": list(res.modules),
                "facts": facts,
                "dedup_key": f"verification:{res.check}",
                "evidence": res.evidence,
                "measurements": res.measurements,
                "duration_s": res.duration_s,
            }
            if res.traceback:
                attrs["traceback"] = res.traceback
            self.sink.event(
                kind="incident",
                message=f"verification check {res.check} {res.status.value}: {res.summary}",
                severity=res.severity.value,
                attrs=attrs,
                ts=res.started,
            )
        elif recovered:
            self.sink.event(
                kind="incident_resolved",
                message=f"verification check {res.check} passes again: {res.summary}",
                severity="info",
                attrs={
                    "source": "verification",
                    "check": res.check,
                    "dedup_key": f"verification:{res.check}",
                },
                ts=res.started,
            )


def _limit(spec: CheckSpec) -> float:
    # A process-isolated check is killed by its manager thread; the runner's deadline is a backstop.
    return spec.timeout_s + (SPAWN_ALLOWANCE_S + 10.0 if spec.isolation == "process" else 0.0)


def _child_main(conn: Any, check: Check, ctx: VerificationContext) -> None:
    """Entry point of an isolated check's child process: say it started, run, send the result."""
    conn.send(("started", None))
    try:
        res: Any = check.run(ctx)
        if not isinstance(res, CheckResult):
            res = CheckResult(Status.ERROR, f"{type(check).__name__}.run returned {type(res).__name__}")
    except BaseException as exc:
        res = CheckResult(
            Status.ERROR,
            f"check raised {type(exc).__name__}: {exc}"[:500],
            {"exception": type(exc).__name__, "isolation": "process"},
            traceback=traceback.format_exc(),
        )
    conn.send(("result", res))
    conn.close()


def run_in_child(check: Check, ctx: VerificationContext, timeout_s: float) -> CheckResult:
    """Run ``check`` in a fresh (spawned) child process; kill it if the check overruns ``timeout_s``.

    The child's start-up (a Python interpreter importing the check) is bounded separately by
    :data:`SPAWN_ALLOWANCE_S` and does not count against the check's timeout.
    """
    import multiprocessing

    mp = multiprocessing.get_context("spawn")
    recv, send = mp.Pipe(duplex=False)
    proc = mp.Process(target=_child_main, args=(send, check, ctx), name=f"check:{check.name}", daemon=True)
    try:
        proc.start()
    except Exception as exc:
        recv.close()
        send.close()
        return CheckResult(
            Status.ERROR,
            f"cannot start the check in a child process: {type(exc).__name__}: {exc}"[:500],
            {"isolation": "process"},
            traceback=traceback.format_exc(),
        )
    send.close()
    evidence: dict[str, Any] = {"isolation": "process", "pid": proc.pid}
    try:
        for phase, limit in (("started", SPAWN_ALLOWANCE_S), ("result", timeout_s)):
            if not recv.poll(limit):
                proc.kill()
                proc.join(5)
                if phase == "started":
                    return CheckResult(
                        Status.ERROR, f"child process did not start within {limit:g} s (killed)", evidence
                    )
                return CheckResult(
                    Status.TIMEOUT,
                    f"did not finish within {limit:g} s (child process {proc.pid} killed)",
                    {**evidence, "timeout_s": limit, "killed": True},
                )
            kind, payload = recv.recv()
            if kind == "result":
                return payload  # type: ignore[no-any-return]
        return CheckResult(Status.ERROR, "child process sent no result", evidence)  # pragma: no cover
    except EOFError:
        proc.join(5)
        return CheckResult(
            Status.ERROR, f"child process died (exit code {proc.exitcode}) before it sent a result", evidence
        )
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)


def _stack_of(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame))[-_MAX_EVIDENCE_STACK:]
