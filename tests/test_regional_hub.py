"""A regional hub between the root hub and the devices: real servers on 127.0.0.1, real signatures.

Down-sync: the regional hub mirrors the root's TUF repository (verified against the pinned root, never
re-signed), pre-fetches what the desired state names, and keeps serving it while the root is down.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from _trust_support import HubEnv, make_env

from deployment.artifacts import TrustStatus
from deployment.pull import PullError
from hub.regional import RegionalConfig, RegionalHub, build_regional_app
from sre_agent.provision import provision
from sre_core.http_server import ServerThread, free_port
from sre_core.paths import StatePaths


def _regional(env: HubEnv, tmp: Path, **kw: object) -> RegionalHub:
    conf = RegionalConfig(
        upstream=env.url,
        root=env.repo.metadata_dir / "1.root.json",
        state=tmp / "regional",
        **kw,  # type: ignore[arg-type]
    )
    return RegionalHub(conf, clock=env.clock)


def _device(env: HubEnv, tmp: Path, name: str, url: str) -> StatePaths:
    paths = StatePaths(tmp / name)
    provision(paths, root=env.repo.metadata_dir / "1.root.json", hub=url, channel="stable", clock=env.clock)
    return paths


def test_device_gets_a_release_through_the_regional_hub_and_keeps_getting_it_with_the_root_down(
    tmp_path: Path,
) -> None:
    env = make_env(tmp_path)
    target = env.artifact("1.0", size=32 * 1024)
    hub = _regional(env, tmp_path)
    down = hub.sync_down()
    assert down.published and down.online and down.error is None, down
    assert target in down.fetched, down
    root_bytes_after_sync = hub.mirror.bytes_from_upstream
    with ServerThread(build_regional_app(hub)) as regional:
        dev = _device(env, tmp_path, "dev1", regional.url)
        res = env.puller(source=regional.url, paths=dev).pull()
        assert res.online and res.trust == TrustStatus.FRESH
        assert res.artifacts["clf"].version == "1.0"
        # the root goes away: another device of the site still gets the release from the regional hub
        env.server.stop()
        again = hub.sync_down()
        assert not again.online and again.error, again
        dev2 = _device(env, tmp_path, "dev2", regional.url)
        res2 = env.puller(source=regional.url, paths=dev2).pull()
        assert res2.online and res2.artifacts["clf"].version == "1.0"
    assert hub.mirror.bytes_from_upstream == root_bytes_after_sync  # devices cost the root no bytes


def test_a_tampered_target_at_the_regional_hub_is_refused_by_the_device(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    target = env.artifact("1.0", size=16 * 1024)
    hub = _regional(env, tmp_path)
    assert hub.sync_down().published
    sha = env.repo.channel_targets("stable")[target].hashes["sha256"]
    served = hub.mirror.targets_dir / "stable" / f"{sha}.{target.split('/', 1)[1]}"
    served.chmod(0o644)
    data = bytearray(served.read_bytes())
    data[100] ^= 0x01
    served.write_bytes(bytes(data))
    with ServerThread(build_regional_app(hub)) as regional:
        dev = _device(env, tmp_path, "dev1", regional.url)
        with pytest.raises(PullError) as err:
            env.puller(source=regional.url, paths=dev).pull()
        assert err.value.refused
        assert not (dev.trust / "held.json").exists()
        assert "pull.refused" in [
            json.loads(line)["event"] for line in dev.audit_log.read_text().splitlines()
        ]
        # the next down-sync finds the served file changed since it was verified, re-hashes it,
        # drops it and fetches the signed bytes again: the site heals
        healed = hub.sync_down()
        assert target in healed.fetched, healed
        assert env.puller(source=regional.url, paths=dev).pull().artifacts["clf"].version == "1.0"


def test_targets_over_the_budget_are_fetched_on_demand_only_when_signed(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    target = env.artifact("1.0", size=48 * 1024)
    hub = _regional(env, tmp_path, prefetch_bytes=1024)
    down = hub.sync_down()
    assert down.published and target in down.over_budget and target not in down.fetched, down
    with ServerThread(build_regional_app(hub)) as regional:
        bogus = "stable/" + "0" * 64 + ".clf-1.0.onnx"
        assert httpx.get(f"{regional.url}/targets/{bogus}").status_code == 404
        assert httpx.get(f"{regional.url}/targets/../repo.json").status_code == 404
        dev = _device(env, tmp_path, "dev1", regional.url)
        res = env.puller(source=regional.url, paths=dev).pull()
        assert res.artifacts["clf"].version == "1.0"
    assert hub.mirror.bytes_from_upstream >= 48 * 1024


def test_sre_hub_regional_runs_as_a_child_process(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    env.clock.advance(datetime.now(UTC) - env.clock.now())  # the child runs on system time
    env.artifact("1.0", size=8 * 1024)
    exe = Path(sys.executable).parent / "sre-hub"
    root = str(env.repo.metadata_dir / "1.root.json")
    state = tmp_path / "regional"
    once = subprocess.run(
        [str(exe), "regional", "--upstream", env.url, "--root", root, "--state", str(state),
         "--once", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert once.returncode == 0, once.stdout + once.stderr
    assert json.loads(once.stdout)["down"]["published"] is True
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "regional", "--upstream", env.url, "--root", root, "--state", str(state),
         "--port", str(port), "--site", "plant-7", "--interval", "0.5", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        text = ""
        for _ in range(50):  # emit_json prints an indented object: read up to its closing brace
            text += proc.stdout.readline()
            if text.startswith("}", len(text) - 2):
                break
        url = json.loads(text)["url"]
        assert httpx.get(f"{url}/healthz", timeout=60).json() == {"ok": True, "site": "plant-7"}
        dev = _device(env, tmp_path, "dev1", url)
        assert env.puller(source=url, paths=dev).pull().artifacts["clf"].version == "1.0"
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
    assert rc == 0, proc.stderr.read() if proc.stderr else ""


def test_a_sneakernet_bundle_seeds_a_regional_hub_whose_uplink_never_worked(tmp_path: Path) -> None:
    from hub.bundle import export_bundle

    env = make_env(tmp_path)
    env.artifact("1.0", size=8 * 1024)
    export_bundle(env.repo, "stable", tmp_path / "usb")
    env.server.stop()
    conf = RegionalConfig(
        upstream="http://127.0.0.1:9", root=env.repo.metadata_dir / "1.root.json", state=tmp_path / "regional"
    )
    hub = RegionalHub(conf, clock=env.clock)
    assert not hub.sync_down().online  # the uplink is down
    seeded = hub.sync_down(str(tmp_path / "usb"))
    assert seeded.published and seeded.fetched and seeded.error is None, seeded
    with ServerThread(build_regional_app(hub)) as regional:
        dev = _device(env, tmp_path, "dev1", regional.url)
        assert env.puller(source=regional.url, paths=dev).pull().artifacts["clf"].version == "1.0"
