"""`sre-agent run`: the daemon."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Annotated

import typer

from sre_agent.cli._common import ConfigOpt, StateOpt, settings_for
from sre_core.clock import SystemClock
from sre_core.errors import SreError
from sre_core.logs import configure_logging
from sre_core.paths import StatePaths

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        state: StateOpt = None,
        config: ConfigOpt = None,
        heartbeat: Annotated[float, typer.Option(help="Heartbeat interval in seconds.")] = 30.0,
        duration: Annotated[
            float | None, typer.Option(help="Stop by itself after this many seconds (tests, soaks).")
        ] = None,
    ) -> None:
        """Run the on-device daemon until SIGTERM/SIGINT.

        Schedules pull + reconcile, verification, chaos, uplink, retention, SLOs and a heartbeat, and runs
        the serving plane. SIGTERM drains in-flight requests, flushes telemetry and clears faults.
        """
        from sre_agent.wiring import build_daemon

        settings = settings_for(state, config)
        configure_logging(settings.log_format, settings.log_level)
        paths = StatePaths(settings.state_dir)
        if not paths.private_key.exists():
            raise SreError(
                f"start the daemon on {paths.root}",
                "the device is not provisioned",
                f"run `sre-agent init --state {paths.root}` first",
            )
        stop = threading.Event()
        reason = {"why": "duration elapsed"}

        def on_signal(signum: int, _frame: object) -> None:
            reason["why"] = signal.Signals(signum).name
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        daemon = build_daemon(settings, paths, SystemClock(), heartbeat_s=heartbeat)
        daemon.start()
        try:
            stop.wait(duration)
        finally:
            daemon.stop(reason["why"])
        # Stopped cleanly: every service flushed and closed. Skip interpreter teardown, where DuckDB's
        # native bindings print leak reports to stderr (not JSON, and no fault of ours to act on).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
