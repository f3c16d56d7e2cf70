"""Managed serving: the models the inference server answers for, and the canary driver around them.

The thin orchestrator around the pure :class:`~deployment.canary.CanaryController`: it takes router
snapshots, asks the controller, and carries out each decision with the I/O it implies (routing weights,
the slot flip or abort, audit records, telemetry, an incident, the progress file that
``sre-agent status`` shows). Order matters for MTTR: on a failed gate the router's weight goes to 0
*first*, so the next request is answered by the incumbent before anything is written to disk.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deployment.canary import RESUME, CanaryConfig, CanaryController, Decision, Phase
from deployment.manifest import ModuleManifest
from deployment.router import Router
from deployment.sessions import ModelSession, SessionOptions, estimate_resident_bytes, load_session
from deployment.slots import SlotManager, SlotView
from policies.deployment import CanaryPolicy
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import SreError
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = [
    "AdmissionError",
    "Attempts",
    "CanaryRun",
    "CanarySlots",
    "ManagedServing",
    "ModelRepository",
    "TelemetryFlusher",
    "canary_progress",
    "clear_loading",
    "loading_models",
    "loading_path",
    "progress_path",
    "resume_progress",
]


class AdmissionError(SreError):
    """A candidate would not fit the memory budget next to the models already loaded."""


class CanarySlots(Protocol):
    """What the canary needs from the A/B slots (``deployment.slots.SlotManager`` provides it)."""

    def promote_canary(self, module: str, actor: str = ..., evidence: dict[str, Any] | None = ...) -> Any:
        """Flip the standby (the canary) active and commit it."""
        ...

    def abort_canary(self, module: str, reason: str, actor: str = ..., mark_bad: bool = ...) -> Any:
        """End the canary (the active version never changed); ``mark_bad``: never install it again."""
        ...


def progress_path(paths: StatePaths, module: str) -> Path:
    """Where the canary of ``module`` publishes its progress (``<state>/run/canary/<module>.json``)."""
    return paths.run / "canary" / f"{module}.json"


def canary_progress(paths: StatePaths, module: str | None = None) -> list[dict[str, Any]]:
    """Canary progress per module as last published by the serving process (for ``sre-agent status``).

    Each entry holds ``module``, ``candidate``, ``incumbent``, ``phase`` (pending, ramping, soaking,
    promoting, promoted, aborted, inconclusive, cancelled), ``step``/``steps``, ``weight`` (0..1),
    ``samples``/``min_samples``, ``reason``, ``gates`` (each with its verdict and numbers) and
    ``updated``. Unreadable files are skipped. No file means no canary ever ran for that module.
    """
    folder = paths.run / "canary"
    if not folder.is_dir():
        return []
    return _json_objects([folder / f"{module}.json"] if module else sorted(folder.glob("*.json")))


def _json_objects(files: list[Path]) -> list[dict[str, Any]]:
    """The JSON objects in ``files``, skipping unreadable ones (a writer may be replacing them)."""
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out.append(data)
    return out


def resume_progress(paths: StatePaths, now: str) -> list[str]:
    """After a restart: progress files a dead process left mid-canary go through :data:`RESUME`.

    The evidence died with that process, so a ramping or soaking canary shows as pending again (the slots
    resume it the same way and reconcile starts it over). Returns the modules whose record changed.
    """
    changed = []
    for entry in canary_progress(paths):
        try:
            phase = Phase(entry.get("phase", ""))
        except ValueError:
            continue
        resumed = RESUME[phase]
        module = str(entry.get("module", ""))
        if resumed is phase or not module:
            continue
        entry |= {
            "phase": resumed.value,
            "weight": 0.0,
            "reason": f"interrupted in phase {phase.value} by a restart; the canary starts over",
            "updated": now,
        }
        atomic_write_json(progress_path(paths, module), _finite(entry))
        changed.append(module)
    return changed


def loading_path(paths: StatePaths, module: str) -> Path:
    """Where a model load in flight is announced (``<state>/run/loading/<module>.json``)."""
    return paths.run / "loading" / f"{module}.json"


def loading_models(paths: StatePaths) -> list[dict[str, Any]]:
    """Model loads in flight, as the serving process announced them (for ``sre-agent status``).

    Each entry holds ``module``, ``version``, ``kind`` (``first version``: nothing served yet, it serves
    once loaded; ``candidate``: loaded for its canary; ``reload``: the active version after a rollback,
    its session was unloaded) and ``since``. A file exists only while the load runs.
    """
    folder = paths.run / "loading"
    if not folder.is_dir():
        return []
    return _json_objects(sorted(folder.glob("*.json")))


def clear_loading(paths: StatePaths) -> None:
    """After a restart no load is in flight: drop the announcements a dead process left."""
    folder = paths.run / "loading"
    if folder.is_dir():
        for f in folder.glob("*.json"):
            f.unlink(missing_ok=True)


class ModelRepository:
    """The models the inference server answers for: module name -> :class:`Router`. Thread-safe.

    Args:
        sink: serving telemetry.
        preprocess: applied to every request's inputs (the chaos input-noise hook).
        rng: the routing RNG of each model's router (the canary's shuffled slots and the mirror sample),
            made from the model name when its router is created; None: seeded from the OS. Tests and
            trials inject one so a run is reproducible through every path that creates a router.
    """

    def __init__(
        self,
        sink: TelemetrySink | None = None,
        preprocess: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None,
        rng: Callable[[str], random.Random] | None = None,
    ) -> None:
        self.sink: TelemetrySink = sink or NullSink()
        self.preprocess = preprocess
        self.rng = rng
        self._routers: dict[str, Router] = {}
        self._lock = threading.Lock()

    def add(self, session: ModelSession, seed: int | None = None) -> Router:
        """Serve ``session`` under its name (replacing the active version if the name is served).

        A new router's RNG is ``random.Random(seed)`` when ``seed`` is given, else the repository's
        ``rng`` for the name, else seeded from the OS."""
        with self._lock:
            router = self._routers.get(session.name)
            if router is None:
                rng = self.rng(session.name) if seed is None and self.rng is not None else None
                router = self._routers[session.name] = Router(
                    session.name, session, self.sink, seed=seed, preprocess=self.preprocess, rng=rng
                )
            else:
                router.replace_active(session)
            return router

    def get(self, name: str) -> Router | None:
        return self._routers.get(name)

    def names(self) -> list[str]:
        return sorted(self._routers)

    def resident_bytes(self, skip_standby: bool = False) -> int:
        """Estimated resident size of every loaded session (active, canary, standby)."""
        with self._lock:
            routers = list(self._routers.values())
        total = 0
        for router in routers:
            r = router.routing
            for sess in (r.active, r.canary, None if skip_standby else r.standby):
                if sess is not None:
                    total += sess.resident_bytes
        return total

    def flush_telemetry(self) -> None:
        """Write every model's per-version counts, errors and latency since the previous flush."""
        with self._lock:
            routers = list(self._routers.values())
        for router in routers:
            router.flush()


class TelemetryFlusher:
    """Flushes a repository's serving telemetry every ``interval_s``, canary or not, in one thread.

    Args:
        repository: the served models.
        interval_s: seconds between flushes (> 0).
    """

    def __init__(self, repository: ModelRepository, interval_s: float = 10.0) -> None:
        if not interval_s > 0:
            raise ValueError("the telemetry flush interval must be > 0 seconds")
        self.repository = repository
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flushes = 0
        self.failures = 0

    def start(self) -> TelemetryFlusher:
        if self._thread is not None:
            raise RuntimeError("the telemetry flusher is already started")
        self._thread = threading.Thread(target=self._loop, name="serving-telemetry", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush_once()

    def flush_once(self) -> None:
        try:
            self.repository.flush_telemetry()
            self.flushes += 1
        except Exception:  # a sink failure must not stop serving; the next interval retries
            self.failures += 1

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, then flush what is left (bounded wait)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.flush_once()


@dataclass
class CanaryRun:
    """Drives one canary to its end: snapshot -> decision -> action, one :meth:`tick` at a time.

    Args:
        module: the model's name.
        router: serving the incumbent; the candidate is loaded into it by :meth:`start`.
        candidate: the loaded candidate session.
        config: steps and gates.
        clock: monotonic time for step durations (inject a FakeClock in tests).
        sink: telemetry (step events, the incident on a failed gate, per-version metrics).
        audit: the audit trail (None: not recorded, e.g. benchmarks).
        slots: the A/B slots to commit the flip to or abort (None: serving only).
        progress_file: where progress is published for ``sre-agent status`` (None: not published).
    """

    module: str
    router: Router
    candidate: ModelSession
    config: CanaryConfig
    clock: Clock
    sink: TelemetrySink
    audit: AuditLog | None = None
    slots: CanarySlots | None = None
    progress_file: Path | None = None
    actor: str = "canary"
    stop_reason: str = "stopped"

    def __post_init__(self) -> None:
        incumbent = self.router.routing.active.version
        self.controller = CanaryController(self.config, self.candidate.version, incumbent)
        self.last: Decision | None = None

    @property
    def phase(self) -> Phase:
        return self.controller.phase

    def start(self) -> Decision:
        """Load the candidate next to the incumbent and open step 1."""
        c = self.config
        self.router.warmup_pairs = c.warmup_pairs
        self.router.start_canary(
            self.candidate,
            mirror_share=c.mirror_share,
            divergence=c.divergence,
            relative_tolerance=c.relative_tolerance,
            allow_pin=c.allow_pin,
        )
        decision = self.controller.start(self.router.snapshot(), self.clock.monotonic())
        self._act(decision)
        return decision

    def evaluate(self) -> Decision:
        """Judge the evidence so far (no action yet; :meth:`act` carries the decision out)."""
        return self.controller.evaluate(self.router.snapshot(), self.clock.monotonic())

    def act(self, decision: Decision) -> None:
        """Carry out a decision: weights, the flip, or the cut-off (router first, then disk)."""
        self._act(decision)

    def tick(self) -> Decision:
        """Judge the evidence so far and act on the verdict."""
        decision = self.evaluate()
        self._act(decision)
        return decision

    def cancel(self, reason: str) -> Decision:
        """Stop the canary without a verdict (operator, safe mode): weight 0, not marked bad."""
        self.router.cut_canary()
        decision = self.controller.cancel(reason)
        self._slots_abort(reason, mark_bad=False)
        self._record("canary.cancelled", decision, severity="warning")
        return decision

    def run(
        self, interval_s: float = 1.0, stop: threading.Event | None = None, max_ticks: int = 1_000_000
    ) -> Phase:
        """Tick every ``interval_s`` until the canary ends (or ``stop`` is set: cancelled)."""
        if self.controller.phase is Phase.PENDING:
            self.start()
        for _ in range(max_ticks):
            if self.controller.final:
                break
            if stop is not None and stop.is_set():
                self.cancel(self.stop_reason)
                break
            self.clock.sleep(interval_s)
            self.tick()
        else:
            self.cancel(f"gave up after {max_ticks} ticks")
        return self.controller.phase

    # -- carrying out decisions -----------------------------------------------------------------
    def _act(self, d: Decision) -> None:
        self.last = d
        if d.action == "abort":
            self.router.cut_canary()  # first: the next request is the incumbent's
            time.sleep(0)  # hand the GIL to serving threads before the bookkeeping below
            self._abort(d)
        elif d.action == "set_weight":
            self.router.set_weight(d.weight)
            self._record("canary.step", d)
        elif d.action == "flip":
            self._flip(d)
        self.router.flush()
        self._publish()

    def _abort(self, d: Decision) -> None:
        if d.mark_bad:
            self._slots_abort(d.reason, mark_bad=True)
            self._record("canary.gate_failed", d, severity="error")
            self.sink.event(
                "incident",
                f"canary of {self.module} {self.candidate.version} aborted: {d.reason}",
                severity="error",
                attrs={
                    "source": "canary",
                    "module": self.module,
                    "version": self.candidate.version,
                    "incumbent": self.controller.incumbent,
                    "step": d.step + 1,
                    "gates": [g.to_dict() for g in d.gates],
                },
            )
        else:
            self._slots_abort(d.reason, mark_bad=False)  # nothing was shown wrong: it may run again
            self._record("canary.inconclusive", d, severity="warning")

    def _slots_abort(self, reason: str, mark_bad: bool) -> None:
        if self.slots is None:
            return
        try:
            self.slots.abort_canary(self.module, reason, actor=self.actor, mark_bad=mark_bad)
        except (SreError, RuntimeError) as exc:  # the router already serves the incumbent; say so
            self.sink.event("canary_slot_error", str(exc), severity="error", attrs={"module": self.module})

    def _flip(self, d: Decision) -> None:
        evidence = {"gates": [g.to_dict() for g in d.gates], "steps": len(self.config.steps)}
        if self.slots is not None:
            try:
                self.slots.promote_canary(self.module, actor=self.actor, evidence=evidence)
            except SreError as exc:
                self.router.cut_canary()
                failed = self.controller.flip_failed(f"flip refused by the slots: {exc.message}")
                self._slots_abort(failed.reason, mark_bad=False)
                self._record("canary.flip_failed", failed, severity="error")
                return
        self.router.promote()  # one reference assignment: in-flight requests finish where they started
        self.controller.flipped()
        self._record("canary.promoted", d)

    def _record(self, event: str, d: Decision, severity: str = "info") -> None:
        data = {
            "module": self.module,
            "version": self.candidate.version,
            "incumbent": self.controller.incumbent,
            "phase": self.controller.phase.value,
            "step": d.step + 1,
            "weight": d.weight,
            "reason": d.reason,
            "gates": [g.to_dict() for g in d.gates],
        }
        if self.audit is not None:
            self.audit.append(event, actor=self.actor, **data)
        self.sink.event(event, d.reason or event, severity=severity, attrs=data)

    def _publish(self) -> None:
        if self.progress_file is None:
            return
        info = {"module": self.module, **self.controller.progress(), "updated": self.clock.now().isoformat()}
        self.progress_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.progress_file, _finite(info))


def _finite(o: Any) -> Any:
    """JSON-safe copy: NaN and infinities (a quantile of nothing) become None."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


@dataclass
class Attempts:
    """Inconclusive canaries of one module's version so far, and when the next may start."""

    version: str
    attempts: int = 0
    retry_after: str = ""  # ISO time; empty: now
    gave_up: str = ""  # why no further attempt is made (reported once)


def attempts_path(paths: StatePaths) -> Path:
    """Where inconclusive canary attempts are kept across restarts (``<state>/run/canary-attempts.json``)."""
    return paths.run / "canary-attempts.json"


class ManagedServing:
    """The canary driver reconcile hands a managed model to, and the repository the server reads.

    Args:
        paths: the device state layout (progress files).
        repository: the served models.
        slots: the A/B slots (commit or abort the canary there).
        clock: time source; ``sink``/``audit``: telemetry and trail.
        options: ONNX Runtime thread/provider settings (from the agent's ``[serving]`` config).
        policy_steps: canary step percentages from the deployment policy (manifest steps win).
        overrides: CanaryConfig fields to force (tests use small ``min_samples``).
        interval_s: seconds between canary evaluations.
        policy: the deployment policy's canary section (gate defaults, attempts, memory budget).
    """

    def __init__(
        self,
        paths: StatePaths,
        repository: ModelRepository,
        slots: CanarySlots | None = None,
        clock: Clock | None = None,
        sink: TelemetrySink | None = None,
        audit: AuditLog | None = None,
        options: SessionOptions | None = None,
        policy_steps: Sequence[float] | None = None,
        overrides: dict[str, Any] | None = None,
        interval_s: float = 1.0,
        policy: CanaryPolicy | None = None,
    ) -> None:
        self.paths = paths
        self.repository = repository
        self.slots = slots
        self.clock = clock or SystemClock()
        self.sink = sink or repository.sink
        self.audit = audit
        self.options = options or SessionOptions()
        self.policy_steps = policy_steps
        self.overrides = overrides or {}
        self.interval_s = interval_s
        self.policy = policy or CanaryPolicy()
        self.runs: dict[str, CanaryRun] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stops: dict[str, threading.Event] = {}
        self._candidates: dict[str, str] = {}
        self._stop_reasons: dict[str, str] = {}  # module -> version handed to start() (maybe still loading)
        self._loading: dict[str, dict[str, str]] = {}  # module -> the load in flight (status)
        self._reloads: dict[str, threading.Thread] = {}  # module -> sync's background load of the active
        self._phases: dict[str, Phase] = {}  # module -> how its last background canary (or load) ended
        self._stop = threading.Event()
        self._attempts_lock = threading.Lock()
        self._sync_lock = threading.Lock()

    def load(
        self, module: str, artifact: Path, manifest: ModuleManifest, sha256: str | None = None
    ) -> ModelSession:
        """Load an artifact into a session (providers from the manifest, CPU fallback); with ``sha256``
        the bytes loaded are the bytes hashed (:func:`deployment.sessions.load_session`)."""
        return load_session(
            artifact, name=module, version=manifest.version, runtime=manifest.runtime, options=self.options,
            expected_sha256=sha256,
        )  # fmt: skip

    def serve(
        self, module: str, artifact: Path, manifest: ModuleManifest, sha256: str | None = None
    ) -> Router:
        """Serve a version directly (start-up, file-less first install, rollback to a loaded version)."""
        return self.repository.add(self.load(module, artifact, manifest, sha256))

    def admit(self, module: str, artifact: Path) -> None:
        """Memory admission: refuse a candidate whose estimated resident size would exceed the budget.

        Raises:
            AdmissionError: over the policy's ``memory_budget_mb`` (0: no check).
        """
        budget = self.policy.memory_budget_mb << 20
        if budget <= 0:
            return
        need = estimate_resident_bytes(artifact)
        held = self.repository.resident_bytes(skip_standby=self.policy.unload_standby)
        if held + need > budget:
            raise AdmissionError(
                f"load canary candidate of {module}",
                f"estimated {need >> 20} MiB on top of {held >> 20} MiB of loaded models exceeds the "
                f"{budget >> 20} MiB budget",
                "raise canary.memory_budget_mb, enable canary.unload_standby, or publish a smaller model",
            )

    def prepare(
        self, module: str, artifact: Path, manifest: ModuleManifest, sha256: str | None = None
    ) -> CanaryRun:
        """Load the candidate and set up its canary against the version served now.

        Raises:
            SreError: nothing is served under ``module`` yet (there is no incumbent to judge against),
                or the candidate is over the memory budget (:class:`AdmissionError`).
        """
        router = self.repository.get(module)
        if router is None:
            raise SreError(
                f"canary {module} {manifest.version}",
                "no version of this model is being served, so there is no incumbent to compare with",
                "serve the active version first (sre-agent serve loads it from the slots)",
            )
        self.admit(module, artifact)
        if self.policy.unload_standby:
            router.drop_standby()
        candidate = self.load(module, artifact, manifest, sha256)
        config = CanaryConfig.from_spec(manifest.canary, self.policy_steps, self.policy, **self.overrides)
        run = CanaryRun(
            module=module,
            router=router,
            candidate=candidate,
            config=config,
            clock=self.clock,
            sink=self.sink,
            audit=self.audit,
            slots=self.slots,
            progress_file=progress_path(self.paths, module),
        )
        self.runs[module] = run
        return run

    def run_canary(self, module: str, artifact: Path, manifest: ModuleManifest) -> Phase:
        """Prepare and run the canary to its end (blocking); returns the final phase."""
        return self.prepare(module, artifact, manifest).run(self.interval_s, self._stop)

    # -- the reconcile seam (deployment.reconcile.CanaryDriver) ------------------------------------
    def start(self, module: str, standby: SlotView, slots: CanarySlots) -> None:
        """Take over a verified standby in phase ``canary``; loading and the canary run in a background
        thread, so a long load blocks neither reconcile nor serving.

        A candidate that does not load is aborted (marked bad); one over the memory budget is aborted
        (not marked bad) with an incident and not retried. The first version of a model (nothing served
        to compare with) is promoted directly once loaded (the probes and golden checks judge it); it
        loads in the same background thread, so it holds no reconcile pass either. A load still in
        flight for the module (a reload after a rollback) finishes first.
        """
        self.slots = slots
        prior = [t for t in (self._threads.get(module), self._reloads.get(module)) if t is not None]
        stop = self._stops[module] = threading.Event()
        self._candidates[module] = standby.manifest.version
        self._stop_reasons.pop(module, None)
        self._phases.pop(module, None)
        if self._stop.is_set():
            stop.set()
        # Announced before the thread runs: a pre-emption right after this call sees a load in flight.
        first = self.repository.get(module) is None
        self._announce(module, standby.manifest.version, "first version" if first else "candidate")
        thread = threading.Thread(
            target=self._background, args=(module, standby, slots, stop, prior), name=f"canary-{module}",
            daemon=True,
        )  # fmt: skip
        self._threads[module] = thread
        thread.start()

    def _background(
        self,
        module: str,
        standby: SlotView,
        slots: CanarySlots,
        stop: threading.Event,
        prior: Sequence[threading.Thread] = (),
    ) -> None:
        manifest = standby.manifest
        for t in prior:  # a previous canary's bookkeeping or a reload: never two loads of one module
            while t.is_alive() and not stop.is_set():
                t.join(0.1)
        if stop.is_set():  # pre-empted (or the daemon stops) before anything was loaded
            self._unannounce(module)
            self._phases[module] = self._cancel_unloaded(module, manifest.version, slots)
            return
        if self.repository.get(module) is None:
            self._phases[module] = self._first_version(module, standby, slots, stop)
            return
        self._announce(module, manifest.version, "candidate")
        try:
            run = self.prepare(module, standby.artifact_path, manifest, standby.artifact_sha256)
        except (SreError, ValueError) as exc:  # does not load, over budget, or unusable settings
            why = exc.message if isinstance(exc, SreError) else str(exc)
            over = isinstance(exc, AdmissionError)
            slots.abort_canary(module, f"candidate refused: {why}", actor="canary", mark_bad=not over)
            if over:
                self._give_up(module, manifest.version, f"refused by memory admission: {why}")
            self.sink.event(
                "incident",
                f"canary of {module} {manifest.version} refused: {why}",
                severity="error",
                attrs={"source": "canary", "module": module, "version": manifest.version},
            )
            self._phases[module] = Phase.ABORTED
            return
        finally:
            self._unannounce(module)
        if stop.is_set():  # pre-empted or stopped while the candidate was loading
            run.stop_reason = self._stop_reasons.get(module, run.stop_reason)
            run.cancel(run.stop_reason)
            self._phases[module] = Phase.CANCELLED
            return
        phase = run.run(self.interval_s, stop)
        self._after(module, manifest.version, phase)
        self._phases[module] = phase

    def _announce(self, module: str, version: str, kind: str) -> None:
        """Say that ``module`` ``version`` is loading (``sre-agent status``, the admin API's status)."""
        self._loading[module] = {
            "module": module, "version": version, "kind": kind, "since": self.clock.now().isoformat()
        }  # fmt: skip
        path = loading_path(self.paths, module)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, self._loading[module])
        except OSError:  # status only; the load goes on
            pass

    def _unannounce(self, module: str) -> None:
        self._loading.pop(module, None)
        loading_path(self.paths, module).unlink(missing_ok=True)

    def loading(self) -> list[dict[str, Any]]:
        """Loads in flight in this process (module, version, kind, since)."""
        return [dict(v) for _, v in sorted(self._loading.copy().items())]

    def _after(self, module: str, version: str, phase: Phase) -> None:
        """Bookkeeping of attempts: an inconclusive canary backs off (doubling), up to max_attempts."""
        if phase is not Phase.INCONCLUSIVE:
            if phase is not Phase.CANCELLED:
                self._forget(module)
            router = self.repository.get(module)
            if phase is Phase.PROMOTED and self.policy.unload_standby and router is not None:
                router.drop_standby()  # memory over MTTR: a rollback reloads it from its slot
            return
        p = self.policy
        with self._attempts_lock:
            book = self._load_attempts()
            rec = book.get(module)
            if rec is None or rec.version != version:
                rec = Attempts(version)
            rec.attempts += 1
            wait = p.retry_backoff_s * 2 ** (rec.attempts - 1)
            rec.retry_after = (self.clock.now() + timedelta(seconds=wait)).isoformat()
            book[module] = rec
            self._save_attempts(book)
        if rec.attempts >= p.max_attempts:
            self._give_up(module, version, f"{rec.attempts} canaries ended inconclusive")
        elif self.audit is not None:
            self.audit.append(
                "canary.retry_scheduled", actor="canary", module=module, version=version,
                attempts=rec.attempts, retry_after=rec.retry_after,
            )  # fmt: skip

    def _give_up(self, module: str, version: str, why: str) -> None:
        with self._attempts_lock:
            book = self._load_attempts()
            rec = book.get(module)
            if rec is None or rec.version != version:
                rec = Attempts(version, attempts=self.policy.max_attempts)
            rec.gave_up = why
            book[module] = rec
            self._save_attempts(book)
        if self.audit is not None:
            self.audit.append("canary.gave_up", actor="canary", module=module, version=version, why=why)
        self.sink.event(
            "incident",
            f"canary of {module} {version} not retried: {why}; a newer release or an operator decides",
            severity="warning",
            attrs={"source": "canary", "module": module, "version": version, "why": why},
        )

    def _forget(self, module: str) -> None:
        with self._attempts_lock:
            book = self._load_attempts()
            if book.pop(module, None) is not None:
                self._save_attempts(book)

    def _load_attempts(self) -> dict[str, Attempts]:
        try:
            raw = json.loads(attempts_path(self.paths).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        out = {}
        if isinstance(raw, dict):
            for module, rec in raw.items():
                if isinstance(rec, dict) and isinstance(rec.get("version"), str):
                    out[module] = Attempts(
                        rec["version"],
                        int(rec.get("attempts", 0)),
                        str(rec.get("retry_after", "")),
                        str(rec.get("gave_up", "")),
                    )
        return out

    def _save_attempts(self, book: dict[str, Attempts]) -> None:
        path = attempts_path(self.paths)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {m: asdict(a) for m, a in book.items()})

    def hold_reason(self, module: str, version: str) -> str | None:
        """Why a canary of ``module`` ``version`` must not start now (None: it may).

        Reconcile asks before installing: a version whose canaries ended inconclusive waits out its
        backoff, and after ``max_attempts`` is left alone (reported) until a newer version arrives.
        """
        with self._attempts_lock:
            rec = self._load_attempts().get(module)
        if rec is None or rec.version != version:
            return None
        if rec.gave_up:
            return f"not retried: {rec.gave_up}"
        if rec.retry_after and self.clock.now() < datetime.fromisoformat(rec.retry_after):
            return f"backing off after {rec.attempts} inconclusive canary(s) until {rec.retry_after}"
        return None

    def preempt(self, module: str, version: str) -> bool:
        """A newer desired ``version`` arrived while a canary of ``module`` runs: cancel that canary
        (weight 0 at once, not marked bad) and wait for it to end. True when none runs any more."""
        if not self.busy(module):
            return True
        if self._candidates.get(module) == version:
            return False  # the desired version is the one being canaried (or loaded for it)
        self.halt(module, f"pre-empted by desired version {version}")
        if module in self._loading:
            # The candidate (or a first version) is still loading (a big model can take minutes): never
            # hold the reconcile pass for it. The thread cancels it as soon as the load returns; a later
            # pass installs the newer version.
            return False
        thread = self._threads.get(module)
        if thread is not None:
            thread.join(self.interval_s * 3 + 10)
        return not self.busy(module)

    def halt(self, module: str, reason: str) -> None:
        """Ask the canary (or the load) of ``module`` to stop with ``reason``; returns at once. A running
        canary is cancelled at its next tick, a load in flight as soon as it returns (not marked bad)."""
        self._stop_reasons[module] = reason
        run = self.runs.get(module)
        if run is not None and run.candidate.version == self._candidates.get(module):
            run.stop_reason = reason
        stop = self._stops.get(module)
        if stop is not None:
            stop.set()

    def _first_version(
        self, module: str, standby: SlotView, slots: CanarySlots, stop: threading.Event
    ) -> Phase:
        """Load the first version of ``module`` (its slot's bytes, hashed as loaded), then flip to it and
        serve it; a newer release or a stop while it loads cancels it (not marked bad, never served)."""
        manifest = standby.manifest
        self._announce(module, manifest.version, "first version")
        try:
            session = self.load(module, standby.artifact_path, manifest, standby.artifact_sha256)
        except SreError as exc:
            slots.abort_canary(
                module, f"does not load: {exc.why or exc.message}", actor="canary", mark_bad=True
            )
            return Phase.ABORTED
        except Exception as exc:  # not the model's fault as far as we know: end the phase, not bad
            why = f"{type(exc).__name__}: {exc}"[:300]
            slots.abort_canary(module, f"load failed: {why}", actor="canary", mark_bad=False)
            self.sink.event("serving_load_failed", why, severity="error", attrs={"module": module})
            return Phase.ABORTED
        finally:
            self._unannounce(module)
        if stop.is_set():  # pre-empted (or the daemon stops) while it loaded: never served
            return self._cancel_unloaded(module, manifest.version, slots)
        try:
            slots.promote_canary(module, actor="canary", evidence={"first_version": True})
        except SreError as exc:  # e.g. its bytes changed since the canary started: never served
            slots.abort_canary(module, f"flip refused: {exc.message}", actor="canary", mark_bad=True)
            return Phase.ABORTED
        self.repository.add(session)
        return Phase.PROMOTED

    def _cancel_unloaded(self, module: str, version: str, slots: CanarySlots) -> Phase:
        """End a canary phase whose version never served (stopped before or while it loaded): the slots
        go back to idle, the version is not marked bad, and the audit says why."""
        reason = self._stop_reasons.get(module, "stopped")
        slots.abort_canary(module, reason, actor="canary", mark_bad=False)
        if self.audit is not None:
            self.audit.append(
                "canary.cancelled", actor="canary", module=module, version=version,
                phase=Phase.CANCELLED.value, reason=reason, served=False,
            )  # fmt: skip
        return Phase.CANCELLED

    def sync(self, slots: SlotManager, background: bool = False) -> dict[str, str]:
        """Serve what the slots say is active (start-up, and after a rollback made elsewhere).

        Skips modules with a canary running (or a load in flight), modules in file mode and non-ONNX
        modules. A version the router still holds as standby comes back by pointer swap; anything else is
        loaded: here (start-up, before the server listens), or with ``background`` in a thread of its own
        (the daemon's reconcile job and the rollback action), so a long load (a rollback with
        ``unload_standby``) holds neither the pass nor the responder. Returns module -> what was done.
        """
        with self._sync_lock:  # the reconcile job and the rollback action may sync at once: one load
            return self._sync(slots, background)

    def _sync(self, slots: SlotManager, background: bool) -> dict[str, str]:
        done: dict[str, str] = {}
        for module in slots.modules():
            st = slots.status(module)
            if st.active is None or st.phase.value != "idle" or self.busy(module) or self.reloading(module):
                continue
            manifest = st.active.manifest
            if (
                manifest.mode != "managed"
                or manifest.kind != "model"
                or manifest.runtime.engine != "onnxruntime"
            ):
                continue
            router = self.repository.get(module)
            if router is not None and router.routing.active.version == st.active.version:
                continue
            standby = router.routing.standby if router is not None else None
            if router is not None and standby is not None and standby.version == st.active.version:
                router.rollback()
                done[module] = f"switched back to loaded {st.active.version}"
                continue
            if background:
                thread = threading.Thread(
                    target=self._reload, args=(module, st.active, slots), name=f"load-{module}", daemon=True
                )
                self._reloads[module] = thread
                self._announce(module, st.active.version, "reload")
                thread.start()
                done[module] = f"loading {st.active.version}"
                continue
            try:
                self.serve(module, st.active.artifact_path, manifest, st.active.artifact_sha256)
            except SreError as exc:
                done[module] = f"failed: {exc.message}"
                self.sink.event(
                    "serving_load_failed", exc.message, severity="error", attrs={"module": module}
                )
                continue
            done[module] = f"serving {st.active.version}"
        return done

    def _reload(self, module: str, view: SlotView, slots: SlotManager) -> None:
        """Load the active version of ``module`` off the caller's thread; serve it if it still is."""
        try:
            session = self.load(module, view.artifact_path, view.manifest, view.artifact_sha256)
        except Exception as exc:  # the next sync tries again; say so meanwhile
            why = exc.message if isinstance(exc, SreError) else f"{type(exc).__name__}: {exc}"
            self.sink.event("serving_load_failed", why, severity="error", attrs={"module": module})
            return
        finally:
            self._unannounce(module)
        st = slots.status(module)
        if st.active is None or st.active.sha256 != view.sha256:
            return  # the slots moved on while it loaded: the next sync serves what they say now
        self.repository.add(session)

    def reloading(self, module: str) -> bool:
        """True while :meth:`sync` loads the active version of ``module`` in the background."""
        thread = self._reloads.get(module)
        return thread is not None and thread.is_alive()

    def wait(self, module: str, timeout_s: float) -> Phase | None:
        """Wait for the background canary (or first-version load) of ``module`` to end; its final phase
        (None: still running). A first version that serves ends ``promoted``."""
        thread = self._threads.get(module)
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                return None
        phase = self._phases.get(module)
        if phase is not None:
            return phase
        run = self.runs.get(module)
        return run.phase if run is not None else None

    def wait_loads(self, timeout_s: float) -> bool:
        """Wait for background reloads (:meth:`sync` with ``background``); True when none runs."""
        for thread in list(self._reloads.values()):
            thread.join(timeout_s)
        return not any(t.is_alive() for t in self._reloads.values())

    def busy(self, module: str) -> bool:
        """True while a canary of ``module`` is running (its candidate or first version loading included)."""
        thread = self._threads.get(module)
        return thread is not None and thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel every running canary at its next tick and wait for them (bounded)."""
        self._stop.set()
        for event in list(self._stops.values()):
            event.set()
        for thread in [*self._threads.values(), *self._reloads.values()]:
            thread.join(timeout_s)
