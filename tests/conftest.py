"""Shared fixtures: a fresh state directory, a fake clock, CLI runners."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sre_core.clock import FakeClock
from sre_core.paths import StatePaths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(tmp_path: Path) -> StatePaths:
    paths = StatePaths(tmp_path / "state")
    paths.create()
    return paths


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a console script (``sre-agent`` or ``sre-hub``) as a real child process."""

    def _run(prog: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        exe = Path(sys.executable).parent / prog
        return subprocess.run(
            [str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )

    return _run
