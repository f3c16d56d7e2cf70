"""The demo path runs headless to the end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_headless(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sre_agent.demo", "--keep", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chain intact" in r.stdout
    assert (tmp_path / "demo" / "device" / "audit.jsonl").exists()
