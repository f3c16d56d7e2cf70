"""The fleet command line: ``sre-hub``.

Each topic lives in its own module under ``hub/cli/`` with a ``register(app)`` function; this module
only assembles them. Add a topic by appending its module to :data:`TOPICS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import typer

from sre_core.cli import CONTEXT_SETTINGS, install_root_options, package_version, run_app

__all__ = ["TOPICS", "build_app", "main"]

TOPICS = [
    "hub.cli.basics",
    "hub.cli.repo",
    "hub.cli.fleet_data",
    "hub.cli.escalations",
    "hub.cli.rollouts",
    "hub.cli.report",
    "hub.cli.regional",
]

HELP = (
    "The fleet side of sre-agent: a TUF repository of signed modules in release channels, rollouts in "
    "waves, recalls, telemetry ingest, escalation review and DORA figures.\n\n"
    "Start with [bold]sre-hub init --repo DIR[/bold].\n\n"
    "Exit codes: 0 ok, 1 failure, 2 bad usage or input."
)


def build_app() -> typer.Typer:
    """A fresh app with every topic registered."""
    app = typer.Typer(
        name="sre-hub",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings=CONTEXT_SETTINGS,
    )
    install_root_options(app, "sre-hub", package_version)

    for name in TOPICS:
        importlib.import_module(name).register(app)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    return run_app(build_app(), "sre-hub", argv)
