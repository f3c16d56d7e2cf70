"""Shared CLI plumbing: options, consoles, JSON output, settings loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sre_agent.config import AgentSettings, EffectiveSettings, load_effective, load_settings
from sre_core.cli import JsonOpt, emit_json, err_console, out_console
from sre_core.paths import StatePaths

__all__ = [
    "ConfigOpt",
    "JsonOpt",
    "StateOpt",
    "effective_for",
    "emit_json",
    "err_console",
    "out_console",
    "settings_for",
    "state_paths",
]

StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state",
        help="Device state directory (default: $SRE_AGENT_STATE_DIR or /var/lib/sre-agent).",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Agent TOML config (default: $SRE_AGENT_CONFIG or <state>/agent.toml)."),
]


def settings_for(state: Path | None, config: Path | None = None) -> AgentSettings:
    """Effective settings for a command given its --state/--config flags."""
    return load_settings(config_file=config, state_dir=state)


def effective_for(state: Path | None, config: Path | None = None) -> EffectiveSettings:
    """Effective settings and the source of each value, for `config show`."""
    return load_effective(config_file=config, state_dir=state)


def state_paths(state: Path | None, config: Path | None = None) -> StatePaths:
    return StatePaths(settings_for(state, config).state_dir)
