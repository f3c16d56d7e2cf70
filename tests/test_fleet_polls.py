"""Cacheable polls: TUF metadata and targets carry cache headers a CDN may follow without serving a
device anything past its signed freshness; conditional requests answer 304."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from hub.http import MAX_METADATA_AGE_S, metadata_cache_control, target_cache_control
from hub.repository import HubRepository
from hub.server import build_static_app
from sre_core.http_server import ServerThread


def _doc(expires: datetime) -> bytes:
    return json.dumps({"signed": {"expires": expires.isoformat().replace("+00:00", "Z")}}).encode()


def test_cache_lifetime_never_outlives_the_signed_expiry() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    t = now.timestamp()
    far = metadata_cache_control("timestamp.json", _doc(now + timedelta(days=1)), t)
    assert far == f"public, max-age={MAX_METADATA_AGE_S}, must-revalidate"
    assert metadata_cache_control("timestamp.json", _doc(now + timedelta(seconds=7)), t).endswith(
        "max-age=7, must-revalidate"
    )
    assert metadata_cache_control("timestamp.json", _doc(now - timedelta(seconds=1)), t) == "no-cache"
    assert metadata_cache_control("timestamp.json", b"not json", t) == "no-cache"
    assert "immutable" in metadata_cache_control("3.root.json", b"", t)
    assert "immutable" in target_cache_control("stable/" + "ab" * 32 + ".clf-1.0.bin")
    assert target_cache_control("stable/desired-state.json") == "no-cache"


def test_static_origin_serves_conditional_polls_with_cache_headers(tmp_path: Path) -> None:
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",))
    with ServerThread(build_static_app(repo.dir)) as server, httpx.Client(base_url=server.url) as c:
        first = c.get("/metadata/timestamp.json")
        assert first.status_code == 200 and "must-revalidate" in first.headers["cache-control"]
        again = c.get("/metadata/timestamp.json", headers={"if-none-match": first.headers["etag"]})
        assert again.status_code == 304 and again.headers["cache-control"] == first.headers["cache-control"]
        assert "immutable" in c.get("/metadata/1.root.json").headers["cache-control"]
        assert c.get("/v1/fleet/status").status_code == 404  # the API stays on the hub


def test_device_polls_are_conditional_and_a_304_keeps_the_trusted_copy(tmp_path: Path) -> None:
    from typing import Any

    from _trust_support import make_env

    from deployment.manifest import ModuleManifest
    from deployment.pull import Puller
    from hub.server import build_hub_app

    env = make_env(tmp_path)
    env.server.stop()
    f = tmp_path / "clf.bin"
    f.write_bytes(b"1.0" * 64)
    env.repo.publish("stable", f, ModuleManifest(name="clf", version="1.0", mode="file", filename="m.bin"))
    env.repo.release("stable", "clf", "1.0")
    seen: list[tuple[str, int]] = []
    app = build_hub_app(env.repo.dir)

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        async def send_status(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                seen.append((scope["path"], msg["status"]))
            await send(msg)

        await app(scope, receive, send_status)

    with ServerThread(counting) as server:
        first = Puller(env.paths, server.url, "stable", clock=env.clock).pull()
        assert first.online
        seen.clear()
        again = Puller(env.paths, server.url, "stable", clock=env.clock).pull()
        assert again.online and again.trust == first.trust
        assert ("/metadata/timestamp.json", 304) in seen, seen
