"""`sre-agent status` shows where a running canary stands (issue 5: progress visible in status)."""

from __future__ import annotations

import json
import os

from deployment.sample_models import linear_classifier
from deployment.serving import progress_path
from sre_agent.cli.slots import device_status
from sre_agent.provision import provision
from sre_core.clock import FakeClock
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from tests.test_canary import HIDDEN, make_run


def test_status_lists_canary_progress(tmp_path, run_cli) -> None:
    paths = StatePaths(tmp_path / "dev")
    provision(paths)
    clock = FakeClock()
    run = make_run(linear_classifier(seed=0, hidden_layers=HIDDEN), clock, MemorySink())
    run.progress_file = progress_path(paths, "m")
    run.start()
    (entry,) = device_status(paths)["canaries"]
    assert entry["module"] == "m" and entry["phase"] == "ramping" and entry["step"] == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRE_AGENT_")}
    r = run_cli("sre-agent", "status", "--state", str(paths.root), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["canaries"][0]["phase"] == "ramping"
    r = run_cli("sre-agent", "status", "--state", str(paths.root), env=env)
    assert r.returncode == 0, r.stderr
    assert "canaries" in r.stdout and "ramping" in r.stdout
