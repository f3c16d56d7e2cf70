"""`sre-agent serve`: the v2 inference server over the installed models, with on-device canaries.

:class:`~sre_agent.services.serving.ServingPlane` (the daemon's serving service) does the work; this
module only parses options and runs it until a signal.
"""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Any

import typer

from sre_agent.cli._common import ConfigOpt, JsonOpt, StateOpt, emit_json, err_console, settings_for
from sre_agent.services.serving import InputNoise, ServingPlane
from sre_core.errors import InputError
from sre_core.paths import StatePaths

__all__ = ["InputNoise", "ServingPlane", "register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        state: StateOpt = None,
        port: Annotated[
            int | None,
            typer.Option("--port", min=1, max=65535, help="TCP port (default: the serving.port setting)."),
        ] = None,
        host: Annotated[
            str | None, typer.Option("--host", help="Address (default: the serving.host setting).")
        ] = None,
        grpc_port: Annotated[
            int | None,
            typer.Option(
                "--grpc-port",
                min=0,
                max=65535,
                help="Also serve the protocol's gRPC half on this port (default: the serving.grpc_port "
                "setting; 0: off).",
            ),
        ] = None,
        reconcile_every: Annotated[
            float,
            typer.Option(
                "--reconcile-every",
                help="Seconds between pull + reconcile passes; new managed models go through the canary. "
                "0: only serve what is installed (a rollback made elsewhere is still picked up).",
            ),
        ] = 0.0,
        source: Annotated[
            str | None,
            typer.Option("--from", help="Hub URL or bundle directory (default: the provisioned hub)."),
        ] = None,
        canary_interval: Annotated[float, typer.Option(help="Seconds between canary evaluations.")] = 1.0,
        sync_every: Annotated[
            float, typer.Option(help="Seconds between checks that the served versions match the slots.")
        ] = 5.0,
        duration: Annotated[
            float | None, typer.Option(help="Stop by itself after this many seconds (tests, demos).")
        ] = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Serve the installed models over the Open Inference Protocol (KServe/Triton v2) until SIGTERM.

        Endpoints: /v2/health/live, /v2/health/ready, /v2/models/NAME, /v2/models/NAME/ready,
        POST /v2/models/NAME/infer (JSON tensors or the binary tensor extension), and Triton's
        /v2/models/NAME/config, /v2/models/NAME/stats (/v2/models/stats: all) and POST /v2/repository/index.
        With --grpc-port,
        the protocol's gRPC service (GRPCInferenceService) too, on the same models and canaries.
        With --reconcile-every, new managed versions are canaried on live traffic and flipped or cut off;
        `sre-agent status` shows the canary's progress.
        """
        from sre_core.malloc import limit_arenas

        limit_arenas()  # a long-running server too: see sre_core.malloc
        overrides: dict[str, Any] = {}
        if port is not None:
            overrides["port"] = port
        if host is not None:
            overrides["host"] = host
        if grpc_port is not None:
            overrides["grpc_port"] = grpc_port
        settings = settings_for(state, config)
        if overrides:
            settings = settings.model_copy(update={"serving": settings.serving.model_copy(update=overrides)})
        paths = StatePaths(settings.state_dir)
        if not paths.root.is_dir():
            raise InputError(
                f"open state directory {paths.root}", "it does not exist", "run sre-agent init first"
            )
        if reconcile_every < 0 or canary_interval <= 0 or sync_every <= 0:
            raise InputError(
                "serve",
                "--reconcile-every must be >= 0, --canary-interval and --sync-every > 0",
                "fix the flag",
            )
        pull = None
        if reconcile_every > 0:
            from sre_agent.cli.slots import _source

            pull = _source(paths, source, None, config)
        plane = ServingPlane(settings, paths, pull, canary_interval)
        stop = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        plane.start()
        info = {"url": plane.url, "grpc": plane.grpc_url, "models": plane.repository.names()}
        if json_out:
            emit_json(info)
        else:
            where = plane.url + (f" and gRPC {plane.grpc_url}" if plane.grpc_url else "")
            err_console().print(f"serving {', '.join(info['models']) or 'no models yet'} on {where}")
        interval = reconcile_every if reconcile_every > 0 else sync_every
        deadline = None if duration is None else plane.clock.monotonic() + duration
        try:
            while not stop.is_set():
                wait = (
                    interval
                    if deadline is None
                    else min(interval, max(0.0, deadline - plane.clock.monotonic()))
                )
                if stop.wait(wait):
                    break
                if deadline is not None and plane.clock.monotonic() >= deadline:
                    break
                plane.reconcile_pass()
        finally:
            plane.stop()
