"""`sre-agent run`: the daemon."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Annotated, Any

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
        from sre_core.malloc import limit_arenas

        limit_arenas()  # before any of the daemon's threads: see sre_core.malloc
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
        from sre_core.cli import require_writable

        require_writable(paths.root, f"start the daemon on {paths.root}")  # one message, not two tracebacks
        stop = threading.Event()
        reason = {"why": "duration elapsed"}

        def on_signal(signum: int, _frame: object) -> None:
            reason["why"] = signal.Signals(signum).name
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        from sre_core.sdnotify import SystemdNotifier

        notifier = SystemdNotifier.from_env()  # Type=notify: readiness and watchdog (no-op otherwise)
        clock = SystemClock()
        daemon = build_daemon(settings, paths, clock, heartbeat_s=heartbeat)
        daemon.start()
        notifier.ready(f"running on {paths.root}")
        try:
            _supervise(stop, duration, notifier, lambda: _alive(daemon, clock, heartbeat, notifier))
        finally:
            notifier.stopping(reason["why"])
            daemon.stop(reason["why"])
        # Stopped cleanly: every service flushed and closed. Skip interpreter teardown, where DuckDB's
        # native bindings print leak reports to stderr (not JSON, and no fault of ours to act on).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _supervise(stop: threading.Event, duration: float | None, notifier: Any, alive: Any) -> None:
    """Wait for a stop signal or ``duration``; ping systemd's watchdog while the daemon is alive."""
    import time

    interval = notifier.watchdog_interval_s
    deadline = None if duration is None else time.monotonic() + duration
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        wait = (
            interval if remaining is None else (remaining if interval is None else min(interval, remaining))
        )
        if stop.wait(wait):
            return
        if interval is not None and alive():
            notifier.watchdog()


def _alive(daemon: Any, clock: Any, heartbeat_s: float, notifier: Any) -> bool:
    """The scheduler still runs jobs: the heartbeat job succeeded recently (a stuck daemon gets no ping,
    so systemd restarts it after WatchdogSec)."""
    from datetime import datetime

    st = daemon.status()
    ref = (st["jobs"].get("heartbeat") or {}).get("last_ok") or st.get("started")
    if not ref:
        return False
    age = (clock.now() - datetime.fromisoformat(ref)).total_seconds()
    return bool(age <= 3 * heartbeat_s + (notifier.watchdog_interval_s or 0.0))
