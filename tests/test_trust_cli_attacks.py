"""Attacks through the real CLIs (`sre-agent` child processes) against a real hub on loopback.

- A far-future timestamp signed with the hub's real online key, then a key rotation and a new release:
  the device refuses the time (exit 1, shown in `status`), never enters safe mode, and recovers by
  itself. Before the bound, trusted time jumped 30 years: safe mode at once, and "Final root.json is
  expired" after the rotation until someone deleted clock.json by hand.
- A mirror that trickles metadata one byte a second: the pull ends at its deadline as offline, so the
  expired desired state puts the device in safe mode. Before, the deadline was only checked between
  256 KiB chunks and the pass never ended.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _trust_support import Trickler

from deployment.manifest import ModuleManifest
from hub.repository import HubRepository
from hub.server import build_hub_app
from sre_core.clock import FakeClock, SystemClock
from sre_core.http_server import ServerThread

Run = Callable[..., subprocess.CompletedProcess[str]]


def _device(tmp: Path, run_cli: Run, url: str, root: Path) -> str:
    state = tmp / "dev"
    r = run_cli(
        "sre-agent", "init", "--state", str(state), "--root", str(root), "--hub", url, "--channel", "stable"
    )
    assert r.returncode == 0, r.stderr
    return str(state)


def _publish(repo: HubRepository, tmp: Path, version: str, expires: timedelta = timedelta(days=14)) -> None:
    f = tmp / f"clf-{version}.bin"
    f.write_bytes(version.encode() * 1000)
    repo.publish("stable", f, ModuleManifest(name="clf", version=version, mode="file", filename="m.bin"))
    repo.release("stable", "clf", version, expires_in=expires)


def _reconcile(run_cli: Run, state: str, *extra: str, timeout: float = 120) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = run_cli("sre-agent", "reconcile", "--state", state, "--once", "--json", *extra, timeout=timeout)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


@pytest.mark.slow
def test_far_future_timestamp_then_rotation_no_safe_mode_and_recovery(tmp_path: Path, run_cli: Run) -> None:
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=SystemClock())
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    try:
        state = _device(tmp_path, run_cli, server.url, repo.metadata_dir / "1.root.json")
        _publish(repo, tmp_path, "1.0.0")
        rc, rep = _reconcile(run_cli, state)
        assert rc == 0 and [o["result"] for o in rep["outcomes"]] == ["committed"]

        # The hub's real online timestamp key signs a time 30 years ahead.
        future = FakeClock(datetime.now(UTC) + timedelta(days=30 * 365))
        HubRepository(repo.dir, clock=future).timestamp()
        rc, rep = _reconcile(run_cli, state)
        assert rc == 1 and not rep["safe_mode"], rep
        assert "beyond the device clock" in (rep["pull_refused"] or "")
        st = json.loads(run_cli("sre-agent", "status", "--state", state, "--json").stdout)
        assert not st["safe_mode"]["active"] and "beyond the device clock" in st["last_pull_refused"]
        assert st["modules"][0]["active"]["version"] == "1.0.0"
        r = run_cli("sre-agent", "status", "--state", state)
        assert "last pull refused" in r.stdout
        mark = json.loads((Path(state) / "clock.json").read_text())["high_water"]
        assert datetime.fromisoformat(mark) < datetime.now(UTC) + timedelta(days=1)

        # The operators rotate the online key and release again; the device follows, no hand on it.
        r = run_cli("sre-hub", "keys", "rotate", "timestamp", "--repo", str(repo.dir))
        assert r.returncode == 0, r.stderr
        _publish(repo, tmp_path, "2.0.0")
        rc, rep = _reconcile(run_cli, state)
        assert rc == 0 and rep["trust"] == "fresh" and not rep["safe_mode"], rep
        assert [(o["result"], o["version"]) for o in rep["outcomes"]] == [("committed", "2.0.0")]
        assert rep["pull_refused"] is None
        audit = [json.loads(x)["event"] for x in (Path(state) / "audit.jsonl").read_text().splitlines()]
        assert "pull.future_time_refused" in audit and "safe_mode.entered" not in audit
    finally:
        server.stop()


@pytest.mark.slow
def test_trickling_mirror_cannot_hold_the_device_past_expiry(tmp_path: Path, run_cli: Run) -> None:
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=SystemClock())
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    trickler = Trickler()
    try:
        state = _device(tmp_path, run_cli, server.url, repo.metadata_dir / "1.root.json")
        policies = Path(state) / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "trust.yaml").write_text("metadata_deadline_s: 2\npull_deadline_s: 4\n")
        _publish(repo, tmp_path, "1.0.0", expires=timedelta(seconds=20))
        rc, rep = _reconcile(run_cli, state)
        assert rc == 0 and rep["trust"] == "fresh" and not rep["safe_mode"], rep
        expires = datetime.fromisoformat(rep_expiry(state))
        while datetime.now(UTC) <= expires:  # bounded by the 20 s lifetime
            time.sleep(0.5)
        # Only the trickling mirror is reachable now. The pass must end at the pull deadline (4 s)
        # and count as offline; the 90 s child timeout only catches a pass that never ends.
        rc, rep = _reconcile(run_cli, state, "--from", trickler.url, timeout=90)
        assert not rep["online"] and rep["trust"] == "expired" and rep["safe_mode"], rep
        st = json.loads(run_cli("sre-agent", "status", "--state", state, "--json").stdout)
        assert st["safe_mode"]["active"] and st["safe_mode"]["reason"] == "expired"
    finally:
        trickler.close()
        server.stop()


def rep_expiry(state: str) -> str:
    held = json.loads((Path(state) / "trust" / "held.json").read_text())
    return str(held["desired"]["expires"])


def _publish_manifest(repo: HubRepository, tmp: Path, version: str, **manifest: object) -> None:
    f = tmp / f"clf-{version}.bin"
    f.write_bytes(version.encode() * 1000)
    man = ModuleManifest.model_validate(
        {"name": "clf", "version": version, "mode": "file", "filename": "m.bin", **manifest}
    )
    repo.publish("stable", f, man)
    repo.release("stable", "clf", version)


def _status(run_cli: Run, state: str) -> dict:  # type: ignore[type-arg]
    r = run_cli("sre-agent", "status", "--state", state, "--json")
    assert r.returncode == 0, r.stderr
    mod: dict = json.loads(r.stdout)["modules"][0]  # type: ignore[type-arg]
    return mod


@pytest.mark.slow
def test_refused_release_keeps_lkg_and_recall_never_revives_the_recalled(
    tmp_path: Path, run_cli: Run
) -> None:
    """How to break it: publish a release whose probe the allowlist refuses, or whose probe delays
    exceed the budget; before, it was installed into the standby first (overwriting the last-known-good)
    and an operator rollback then failed. Then recall a version and roll back: before, the recalled
    version was the last-known-good and `rollback` served it."""
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=SystemClock())
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    try:
        state = _device(tmp_path, run_cli, server.url, repo.metadata_dir / "1.root.json")
        served = Path(state) / "modules" / "clf" / "current" / "m.bin"
        for v in ("1.0.0", "2.0.0"):
            _publish(repo, tmp_path, v)
            assert _reconcile(run_cli, state)[0] == 0
        assert served.read_bytes() == b"2.0.0" * 1000
        assert _status(run_cli, state)["last_known_good"]["version"] == "1.0.0"

        refused: dict[str, dict[str, Any]] = {
            "3.0.0": {"probes": [{"kind": "exec", "argv": ["/bin/sh", "-c", "true"]}]},  # not allowlisted
            "3.0.1": {"probes": [{"kind": "file", "path": "ready", "initial_delay_s": 3600}]},  # budget
            "3.0.2": {"probes": [{"kind": "file", "path": "ready", "timeout_s": 1}] * 17},  # too many
        }
        for version, manifest in refused.items():
            _publish_manifest(repo, tmp_path, version, **manifest)
            rc, rep = _reconcile(run_cli, state)
            (o,) = rep["outcomes"]
            assert rc == 1 and o["result"] == "refused" and o["version"] == version, rep
            assert served.read_bytes() == b"2.0.0" * 1000
        m = _status(run_cli, state)
        assert m["standby"]["version"] == "1.0.0" and m["last_known_good"]["version"] == "1.0.0"

        # Back to a good release, then recall it to 1.0.0.
        _publish(repo, tmp_path, "4.0.0")
        assert _reconcile(run_cli, state)[0] == 0 and served.read_bytes() == b"4.0.0" * 1000
        r = run_cli(
            "sre-hub", "recall", "--repo", str(repo.dir), "--channel", "stable", "--module", "clf",
            "--withdraw", "4.0.0", "--to", "2.0.0", "--reason", "bad outputs",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        rc, rep = _reconcile(run_cli, state)
        assert rc == 0 and [(o["result"], o["version"]) for o in rep["outcomes"]] == [("committed", "2.0.0")]
        m = _status(run_cli, state)
        assert m["active"]["version"] == "2.0.0" and m["last_known_good"]["version"] == "2.0.0"
        # An operator rollback must not serve the recalled 4.0.0 (it is no rollback target).
        r = run_cli("sre-agent", "rollback", "clf", "--state", state)
        assert r.returncode == 2 and "marked bad" in r.stderr, r.stdout + r.stderr
        assert served.read_bytes() == b"2.0.0" * 1000
        rc, rep = _reconcile(run_cli, state)
        assert rc == 0 and served.read_bytes() == b"2.0.0" * 1000
        assert [o["result"] for o in rep["outcomes"]] == ["noop"]
    finally:
        server.stop()
