"""A sneakernet bundle seeds a regional hub (as it seeds a device): verified against the site's pinned
root before anything is served; tampered or older bundles are refused and nothing of them is served."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from _trust_support import HubEnv, make_env

import hub.cli
from deployment.pull import Puller
from hub.bundle import export_bundle, seed_regional
from hub.regional import RegionalConfig, RegionalHub, build_regional_app
from sre_core.errors import SreError
from sre_core.http_server import ServerThread, free_port


def _regional(env: HubEnv, tmp: Path) -> RegionalHub:
    """A regional hub whose upstream is unreachable (the site is cut off: the bundle is all it gets)."""
    conf = RegionalConfig(
        upstream=f"http://127.0.0.1:{free_port()}",
        root=env.repo.metadata_dir / "1.root.json",
        state=tmp / "regional",
        site="ship-1",
    )
    return RegionalHub(conf, clock=env.clock)


def test_a_bundle_seeds_a_cut_off_site_and_its_devices_pull_from_it(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    target = env.artifact("1.0", size=4096)
    bundle = tmp_path / "usb"
    export_bundle(env.repo, "stable", bundle)
    env.server.stop()  # the root is out of reach from here on
    hub = _regional(env, tmp_path)
    try:
        result = seed_regional(hub, bundle)
        assert result.published and target in result.fetched, result.to_dict()
        with ServerThread(build_regional_app(hub)) as reg:
            got = Puller(env.paths, reg.url, "stable", clock=env.clock, fallbacks=[env.url]).pull()
        assert got.online and got.artifacts["clf"].version == "1.0"
        assert json.loads((env.paths.trust / "held.json").read_text())["source"] == reg.url
    finally:
        hub.close()


def test_a_tampered_bundle_serves_nothing_of_what_it_altered(tmp_path: Path) -> None:
    """How to break it: alter the artifact, or the metadata, on the USB stick. The regional hub verifies
    with python-tuf before publishing: altered metadata publishes nothing; an altered artifact is not
    served (a device asking for it gets no bytes from this hub)."""
    env = make_env(tmp_path)
    target = env.artifact("1.0", size=4096)
    bad_meta = tmp_path / "usb-meta"
    export_bundle(env.repo, "stable", bad_meta)
    ts = json.loads((bad_meta / "metadata" / "timestamp.json").read_text())
    ts["signed"]["expires"] = "2099-01-01T00:00:00Z"
    (bad_meta / "metadata" / "timestamp.json").write_text(json.dumps(ts))
    hub = _regional(env, tmp_path)
    try:
        with pytest.raises(SreError, match="seed the regional hub"):
            seed_regional(hub, bad_meta)
        assert hub.mirror.served_timestamp() is None
        assert not (hub.mirror.metadata_dir / "timestamp.json").exists()

        bad_art = tmp_path / "usb-art"
        export_bundle(env.repo, "stable", bad_art)
        blob = next((bad_art / "targets" / "stable").glob("*.onnx"))
        data = bytearray(blob.read_bytes())
        data[200] ^= 0xFF
        blob.write_bytes(bytes(data))
        result = seed_regional(hub, bad_art)  # the metadata is good: it is served
        assert target in result.failed and target not in result.fetched, result.to_dict()
        with ServerThread(build_regional_app(hub)) as reg:
            rel = env.target_file(target).relative_to(env.repo.targets_dir)
            resp = httpx.get(f"{reg.url}/targets/{rel}", timeout=10)
            assert resp.status_code != 200 or resp.content != bytes(data)
    finally:
        hub.close()


def test_an_older_bundle_cannot_roll_the_site_back(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    env.artifact("1.0", size=4096)
    old = tmp_path / "usb-old"
    export_bundle(env.repo, "stable", old)
    env.artifact("2.0", size=4096)
    new = tmp_path / "usb-new"
    export_bundle(env.repo, "stable", new)
    hub = _regional(env, tmp_path)
    try:
        seed_regional(hub, new)
        served = hub.mirror.served_timestamp()
        assert served is not None
        with pytest.raises(SreError):
            seed_regional(hub, old)
        assert hub.mirror.served_timestamp() == served
    finally:
        hub.close()


def test_sre_hub_bundle_seed_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    env = make_env(tmp_path)
    env.clock.advance(datetime.now(UTC) - env.clock.now())  # the CLI runs on the system clock
    env.artifact("1.0", size=4096)
    bundle = tmp_path / "usb"
    export_bundle(env.repo, "stable", bundle)
    args = [
        "bundle", "seed", str(bundle), "--state", str(tmp_path / "regional"), "--site", "ship-1",
        "--root", str(env.repo.metadata_dir / "1.root.json"), "--upstream", env.url, "--json",
    ]  # fmt: skip
    assert hub.cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["published"] and out["timestamp_version"] >= 1
    assert hub.cli.main([*args[:2], str(tmp_path / "nothing"), *args[3:]]) == 2
