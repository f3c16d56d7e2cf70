"""Re-pinning a device's trust anchor needs --force and is audited (real `sre-agent init` processes).

How to break it: run `sre-agent init --root OTHER` on a provisioned device; before, it silently
replaced the pinned root, so whoever handed over OTHER became the device's trust anchor.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from hub.repository import HubRepository

Run = Callable[..., subprocess.CompletedProcess[str]]


def test_init_with_another_root_needs_force_and_is_audited(tmp_path: Path, run_cli: Run) -> None:
    root_a = HubRepository.init(tmp_path / "a").metadata_dir / "1.root.json"
    root_b = HubRepository.init(tmp_path / "b").metadata_dir / "1.root.json"
    state = tmp_path / "dev"
    assert run_cli("sre-agent", "init", "--state", str(state), "--root", str(root_a)).returncode == 0
    pinned = (state / "trust" / "root.json").read_bytes()
    # The same root again: idempotent.
    assert run_cli("sre-agent", "init", "--state", str(state), "--root", str(root_a)).returncode == 0
    r = run_cli("sre-agent", "init", "--state", str(state), "--root", str(root_b))
    assert r.returncode == 2 and "--force" in r.stderr, r.stderr
    assert (state / "trust" / "root.json").read_bytes() == pinned
    r = run_cli("sre-agent", "init", "--state", str(state), "--root", str(root_b), "--force")
    assert r.returncode == 0, r.stderr
    assert (state / "trust" / "root.json").read_bytes() == root_b.read_bytes()
    events = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names.count("trust.pinned") == 1 and "trust.repin_refused" in names
    (repinned,) = [e for e in events if e["event"] == "trust.repinned"]
    assert repinned["data"]["previous_sha256"] != repinned["data"]["root_sha256"]
