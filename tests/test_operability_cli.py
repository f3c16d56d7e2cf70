"""Terminal habits on both command lines: help on every option, -h, --version, --json on every command
that prints, flags shown as flags, full table values when piped, no Python None in text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import hub.cli
import sre_agent.cli
from sre_core.cli import click_command, walk_commands

APPS = {"sre-agent": sre_agent.cli, "sre-hub": hub.cli}

# Commands without --json, and why.
NO_JSON = {
    ("sre-agent", "run"): "a daemon: its output is the log (SRE_AGENT_LOG_FORMAT=json)",
}


def _leaves(prog: str) -> list[tuple[tuple[str, ...], Any]]:
    cmd = click_command(APPS[prog].build_app())
    return [(p, c) for p, c in walk_commands(cmd) if not hasattr(c, "commands")]


@pytest.mark.parametrize("prog", sorted(APPS))
def test_every_option_and_argument_has_help(prog: str) -> None:
    missing = [
        f"{prog} {' '.join(path)} {p.name}"
        for path, c in _leaves(prog)
        for p in c.params
        if not (getattr(p, "help", None) or "").strip()
    ]
    assert not missing, missing
    assert len(_leaves(prog)) > 5


@pytest.mark.parametrize("prog", sorted(APPS))
def test_every_command_that_prints_takes_json(prog: str) -> None:
    missing = [
        f"{prog} {' '.join(path)}"
        for path, c in _leaves(prog)
        if (prog, " ".join(path)) not in NO_JSON and "--json" not in [o for p in c.params for o in p.opts]
    ]
    assert not missing, missing


@pytest.mark.parametrize("prog", sorted(APPS))
def test_dash_h_and_version_and_flags_shown_as_flags(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = APPS[prog].main
    assert main(["-h"]) == 0
    top = capsys.readouterr().out
    assert "--version" in top and "-h" in top
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"{prog} ")
    for path, _ in _leaves(prog):
        assert main([*path, "-h"]) == 0, path
        text = capsys.readouterr().out
        assert "<bool>" not in text, path


def test_piped_tables_show_full_values(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # capsys is not a terminal, like a pipe: nothing may be cut with an ellipsis.
    long = tmp_path / ("x" * 120)
    assert sre_agent.cli.main(["config", "show", "--state", str(long)]) == 0
    out = capsys.readouterr().out
    assert str(long) in out and "…" not in out
    assert "None" not in out


def test_rollout_tick_has_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    repo = tmp_path / "hub"
    assert hub.cli.main(["init", "--repo", str(repo)]) == 0
    capsys.readouterr()
    assert hub.cli.main(["rollout", "tick", "--repo", str(repo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"actions": []}
