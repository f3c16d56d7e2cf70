"""The serving plane as a daemon service: the models, their canaries and the v2 inference server.

``sre-agent run`` holds one (through :mod:`sre_agent.wiring`); ``sre-agent serve`` runs one alone.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sre_agent.config import AgentSettings
from sre_core.atomic import atomic_write_text
from sre_core.paths import StatePaths

__all__ = ["InputNoise", "ServingPlane"]


class InputNoise:
    """The chaos input-noise fault as a router ``preprocess`` hook (re-reads the fault once a second)."""

    def __init__(self, root: Path, clock: Any) -> None:
        self.root = root
        self.clock = clock
        self._spec: Any = None
        self._checked = -1e18
        self._n = itertools.count()

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        from chaos.faults import apply_input_noise, input_noise_spec

        mono = self.clock.monotonic()
        if mono - self._checked >= 1.0:
            self._spec = input_noise_spec(self.root, self.clock.now())
            self._checked = mono
        spec = self._spec
        if spec is None:
            return feeds
        n = next(self._n)
        out = {}
        for k, v in feeds.items():
            if v.dtype.kind == "f":
                noisy = apply_input_noise(v.ravel().tolist(), spec, n)
                out[k] = np.asarray(noisy, dtype=v.dtype).reshape(v.shape)
            else:
                out[k] = v
        return out


@dataclass
class ServingPlane:
    """The models, their canaries and the HTTP server, built from settings.

    Args:
        settings: the agent settings (``[serving]``: host, port, threads, providers).
        paths: the device state.
        source: the pull source for reconcile passes (None: serve what is installed, never reconcile).
        canary_interval_s: seconds between canary evaluations.
        sink: the telemetry sink (the daemon's DuckDB writer; None drops telemetry, the audit keeps
            every canary step, verdict and flip).
        audit: the audit trail (pass the daemon's, which mirrors to DuckDB); clock: time source.
        telemetry_interval_s: per-model, per-version serving telemetry is flushed to ``sink`` this often,
            canary or not (default: the ``serving.telemetry_interval_s`` setting).
        routing_rng: each model's routing RNG from its name (canary slots, mirror sample), forwarded to
            the repository; None: seeded from the OS. Tests and trials inject one to reproduce a run.
    """

    settings: AgentSettings
    paths: StatePaths
    source: Any = None
    canary_interval_s: float = 1.0
    sink: Any = None
    audit: Any = None
    clock: Any = None
    name: str = "serving"
    telemetry_interval_s: float | None = None
    routing_rng: Callable[[str], random.Random] | None = None
    _server: Any = field(default=None, repr=False)
    _flusher: Any = field(default=None, repr=False)
    _grpc: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from deployment.oip import create_app
        from deployment.serving import ManagedServing, ModelRepository
        from deployment.sessions import SessionOptions
        from deployment.slots import SlotManager
        from policies.deployment import load_deployment_policy
        from sre_core.audit import AuditLog
        from sre_core.clock import SystemClock

        cfg = self.settings.serving
        self.clock = self.clock or SystemClock()
        self.audit = self.audit or AuditLog(self.paths.audit_log, self.clock)
        self.policy = load_deployment_policy(self.paths.policies / "deployment.yaml")
        self.slots = SlotManager(self.paths, self.audit, self.clock, self.policy)
        self.repository = ModelRepository(
            self.sink, preprocess=InputNoise(self.paths.root, self.clock), rng=self.routing_rng
        )
        options = SessionOptions(cfg.intra_op_threads, cfg.inter_op_threads, tuple(cfg.providers))
        self.serving = ManagedServing(
            self.paths,
            self.repository,
            slots=self.slots,
            clock=self.clock,
            audit=self.audit,
            options=options,
            policy_steps=self.policy.canary_steps,
            interval_s=self.canary_interval_s,
            policy=self.policy.canary,
        )
        self.app = create_app(self.repository, server_name="sre-agent")
        self._reconciler: Any = None

    @property
    def url(self) -> str:
        return self._server.url if self._server is not None else ""

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC front end ("" when off)."""
        return self._grpc.url if self._grpc is not None else ""

    def start(self) -> None:
        """Load the active versions, then listen."""
        from deployment.serving import clear_loading, resume_progress
        from sre_core.http_server import ServerThread

        self.slots.recover_all()
        resume_progress(self.paths, self.clock.now().isoformat())
        clear_loading(self.paths)
        self.serving.sync(self.slots)  # here, before the server listens: ready means loaded
        if self.sink is not None and self._flusher is None:
            from deployment.serving import TelemetryFlusher

            interval = self.telemetry_interval_s or self.settings.serving.telemetry_interval_s
            self._flusher = TelemetryFlusher(self.repository, interval).start()
        # Start-up objects (numpy, scipy, onnx, pydantic: ~10^5) leave the cyclic collector's scans, so
        # the collections that per-request garbage triggers stay short.
        gc.freeze()
        cfg = self.settings.serving
        # The chaos harness finds the serving worker here (kill_serving_worker). Written before the
        # socket listens, so whoever sees the server ready also finds the pid.
        self.paths.run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.pid_file, f"{os.getpid()}\n")
        try:
            if cfg.grpc_port:  # the protocol's gRPC half, on the same routers; up before REST says ready
                from deployment.oip_grpc import GrpcServer

                self._grpc = GrpcServer(self.repository, host=cfg.host, port=cfg.grpc_port).start()
            self._server = ServerThread(self.app, host=cfg.host, port=cfg.port).start()
        except BaseException:
            if self._grpc is not None:
                self._grpc.stop()
                self._grpc = None
            self.pid_file.unlink(missing_ok=True)
            raise

    def reconcile_pass(self) -> dict[str, Any]:
        """One reconcile pass with this plane as the canary driver, then serve what is active."""
        from deployment.reconcile import Reconciler

        out: dict[str, Any] = {}
        if self.source is not None:
            if self._reconciler is None:
                self._reconciler = Reconciler(
                    self.paths, self.source, self.clock, self.policy, self.audit, canary=self.serving
                )
            out["reconcile"] = self._reconciler.run_once().to_dict()
        out["sync"] = self.serving.sync(self.slots, background=True)  # a load never holds the pass
        return out

    def stop(self) -> None:
        """Cancel running canaries (the incumbent keeps serving), drain and close the server."""
        self.serving.stop()
        if self._grpc is not None:
            self._grpc.stop()
            self._grpc = None
        if self._server is not None:
            self._server.stop()
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        with contextlib.suppress(FileNotFoundError):
            if self.pid_file.read_text(encoding="utf-8").strip() == str(os.getpid()):
                self.pid_file.unlink()

    @property
    def pid_file(self) -> Path:
        return self.paths.run / "serving.pid"
