"""The hub's repository HTTP serving: strong ETags, conditional requests, byte ranges, no leaks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hub.repository import HubRepository
from hub.server import build_hub_app
from sre_core.clock import FakeClock
from sre_core.http_server import ServerThread


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[httpx.Client, bytes, str]]:
    repo = HubRepository.init(tmp_path / "repo", clock=FakeClock())
    data = bytes(range(256)) * 4000
    path = repo.targets_dir / "stable" / "blob.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with ServerThread(build_hub_app(repo.dir)) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        yield client, data, "/targets/stable/blob.bin"


def test_strong_etag_and_not_modified(hub: tuple[httpx.Client, bytes, str]) -> None:
    client, data, url = hub
    r = client.get(url)
    assert r.status_code == 200 and r.content == data
    etag = r.headers["etag"]
    assert etag == '"' + hashlib.sha256(data).hexdigest() + '"'  # strong, content-derived
    assert r.headers["accept-ranges"] == "bytes"
    r = client.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    r = client.get(url, headers={"If-None-Match": '"other"'})
    assert r.status_code == 200
    h = client.head(url)
    assert h.status_code == 200 and int(h.headers["content-length"]) == len(data) and h.content == b""


def test_ranges(hub: tuple[httpx.Client, bytes, str]) -> None:
    client, data, url = hub
    size = len(data)
    r = client.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{size}"
    r = client.get(url, headers={"Range": f"bytes={size - 10}-"})
    assert r.status_code == 206 and r.content == data[-10:]
    r = client.get(url, headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]
    r = client.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    r = client.get(url, headers={"Range": "bytes=0-1,5-6"})  # multiple ranges: the whole file
    assert r.status_code == 200 and r.content == data


def test_if_range(hub: tuple[httpx.Client, bytes, str]) -> None:
    client, data, url = hub
    etag = client.head(url).headers["etag"]
    r = client.get(url, headers={"Range": "bytes=1000-", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[1000:]
    r = client.get(url, headers={"Range": "bytes=1000-", "If-Range": '"changed"'})
    assert r.status_code == 200 and r.content == data


def test_nothing_outside_metadata_and_targets(hub: tuple[httpx.Client, bytes, str]) -> None:
    client, _, _ = hub
    assert client.get("/metadata/timestamp.json").status_code == 200
    assert client.get("/metadata/1.root.json").status_code == 200
    for bad in [
        "/metadata/current/root.json",
        "/metadata/..%2Frepo.json",
        "/targets/../repo.json",
        "/targets/%2e%2e/keys/root",
        "/keys/root",
        "/repo.json",
        "/targets/stable/.hidden",
    ]:
        assert client.get(bad).status_code == 404, bad
    assert client.get("/healthz").json() == {"ok": True}
