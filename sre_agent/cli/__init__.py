"""The device command line: ``sre-agent``.

Each topic lives in its own module under ``sre_agent/cli/`` with a ``register(app)`` function; this
module only assembles them. Add a topic by appending its module to :data:`TOPICS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import typer

from sre_core.cli import CONTEXT_SETTINGS, install_root_options, package_version, run_app

__all__ = ["TOPICS", "build_app", "main"]

TOPICS = [
    "sre_agent.cli.basics",
    "sre_agent.cli.pull",
    "sre_agent.cli.run",
    "sre_agent.cli.chaos",
    "sre_agent.cli.verify",
    "sre_agent.cli.slots",
    "sre_agent.cli.serve",
    "sre_agent.cli.telemetry",
    "sre_agent.cli.escalations",
    "sre_agent.cli.report",
    "sre_agent.cli.policy",
]

HELP = (
    "The on-device SRE: pulls signed modules, installs them into A/B slots, canaries and flips or rolls "
    "back, verifies itself, runs guarded chaos, triages incidents and escalates to operators.\n\n"
    "Start with [bold]sre-agent init --state DIR[/bold], then [bold]sre-agent status --state DIR[/bold].\n\n"
    "Exit codes: 0 ok, 1 failure, 2 bad usage or input (some commands document more)."
)


def build_app() -> typer.Typer:
    """A fresh app with every topic registered."""
    app = typer.Typer(
        name="sre-agent",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings=CONTEXT_SETTINGS,
    )
    install_root_options(app, "sre-agent", package_version)

    for name in TOPICS:
        importlib.import_module(name).register(app)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (0 ok, 1 failure, 2 bad usage/input)."""
    return run_app(build_app(), "sre-agent", argv)
