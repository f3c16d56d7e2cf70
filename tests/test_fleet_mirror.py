"""Devices poll TUF metadata and targets from a separate origin (a CDN or mirror of the signed files)
while uploads and reports stay on the hub's API."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _trust_support import make_env

import sre_agent.cli
from deployment.manifest import ModuleManifest
from hub.fleet_api import fleet_routes
from hub.fleetdb import FleetDB
from hub.rollouts import ReportStore, RolloutService
from hub.server import build_hub_app, build_static_app
from sre_agent.provision import provision
from sre_core.clock import SystemClock
from sre_core.http_server import ServerThread
from sre_core.identity import load_identity


def _counting(app: Any, seen: list[tuple[str, int]]) -> Any:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def send_status(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                seen.append((scope["path"], msg["status"]))
            await send(msg)

        await app(scope, receive, send_status)

    return wrapped


def test_device_polls_a_static_mirror_and_reports_to_the_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = make_env(tmp_path)
    env.server.stop()
    repo, clock, paths = env.repo, env.clock, env.paths
    clock.advance(datetime.now(UTC) - clock.now())  # the CLI runs on system time: bring the hub there
    f = tmp_path / "clf-1.0.bin"
    f.write_bytes(b"1.0" * 64)
    repo.publish("stable", f, ModuleManifest(name="clf", version="1.0", mode="file", filename="m.bin"))
    repo.release("stable", "clf", "1.0")
    # The mirror is a copy of the signed files only (as a CDN or rsync mirror holds them).
    mirror = tmp_path / "mirror"
    for part in ("metadata", "targets"):
        shutil.copytree(repo.dir / part, mirror / part)
    svc = RolloutService(repo, clock=clock)
    hub_seen: list[tuple[str, int]] = []
    cdn_seen: list[tuple[str, int]] = []
    hub_app = build_hub_app(repo.dir, fleet_routes(repo.dir, svc, SystemClock()))
    with (
        ServerThread(_counting(hub_app, hub_seen)) as hub,
        ServerThread(_counting(build_static_app(mirror), cdn_seen)) as cdn,
    ):
        provision(paths, hub=hub.url, clock=clock)
        ident = load_identity(paths)
        FleetDB(svc.fleet_dir, clock).enroll(ident.device_id, ident.public_pem)
        (paths.root / "agent.toml").write_text(
            f'[hub]\nmetadata_url = "{cdn.url}/metadata"\ntargets_url = "{cdn.url}/targets/"\n'
        )
        assert sre_agent.cli.main(["config", "show", "--state", str(paths.root), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert json.dumps(shown).count(f"{cdn.url}/metadata") >= 1, shown

        rc = sre_agent.cli.main(["reconcile", "--once", "--state", str(paths.root), "--json"])
        out = json.loads(capsys.readouterr().out)
        assert rc in (0, 1) and out["online"] and out["report"] == "sent", out
        # every signed file came from the mirror, the report went to the hub's API
        assert ("/metadata/timestamp.json", 200) in cdn_seen, cdn_seen
        assert any(p.startswith("/targets/stable/") and s == 200 for p, s in cdn_seen), cdn_seen
        assert not [p for p, _ in hub_seen if p.startswith(("/metadata/", "/targets/"))], hub_seen
        assert any(p.startswith("/v1/") for p, _ in hub_seen), hub_seen
        assert ReportStore(svc.fleet_dir).all()[ident.device_id]["modules"]["clf"]["version"] == "1.0"


def test_mirror_urls_must_be_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "agent.toml").write_text('[hub]\nmetadata_url = "/srv/mirror/metadata"\n')
    assert sre_agent.cli.main(["config", "show", "--state", str(tmp_path)]) != 0
    assert "metadata_url" in capsys.readouterr().err


def test_serve_static_only_is_an_origin_without_the_api(tmp_path: Path) -> None:
    """`sre-hub serve --static-only`: the signed files with cache headers, and nothing else."""
    import subprocess
    import sys
    import time

    import httpx

    from hub.repository import HubRepository
    from sre_core.http_server import free_port

    repo = HubRepository.init(tmp_path / "repo", channels=("stable",))
    port = free_port()
    hub = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main(sys.argv[1:]))"]
    proc = subprocess.Popen([*hub, "serve", "--repo", str(repo.dir), "--port", str(port), "--static-only"])
    url = f"http://127.0.0.1:{port}"
    try:
        first = None
        for _ in range(600):
            try:
                first = httpx.get(f"{url}/metadata/timestamp.json", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert first is not None and first.status_code == 200
        assert "must-revalidate" in first.headers["cache-control"]
        again = httpx.get(f"{url}/metadata/timestamp.json", headers={"if-none-match": first.headers["etag"]})
        assert again.status_code == 304
        for api in ("/v1/fleet/status", "/healthz", "/repo.json", "/keys/root.json"):
            assert httpx.get(f"{url}{api}").status_code == 404, api
        assert not (repo.dir / "fleet" / "hub.db").exists()  # no database opened
    finally:
        proc.terminate()
        proc.wait(timeout=60)
