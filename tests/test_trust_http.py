"""The hub's repository HTTP serving: strong ETags, conditional requests, byte ranges, no leaks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.http import _parse_range
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


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 5000), a=st.integers(0, 6000), b=st.integers(0, 6000), suffix=st.booleans())
def test_range_parser_matches_a_slice(size: int, a: int, b: int, suffix: bool) -> None:
    header = f"bytes=-{a}" if suffix else f"bytes={a}-{b}"
    got = _parse_range(header, size)
    data = bytes(size)
    if suffix:
        assert got == ("416" if a == 0 else (max(size - a, 0), size - 1))
    elif a >= size:
        assert got == "416"
    elif b < a:
        assert got is None
    else:
        assert isinstance(got, tuple)
        start, end = got
        assert data[start : end + 1] == data[a : b + 1] and end < size


def test_directory_fetcher_stays_inside_the_bundle(tmp_path: Path) -> None:
    from tuf.api import exceptions

    from deployment.fetcher import DirectoryFetcher

    (tmp_path / "bundle" / "metadata").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    (tmp_path / "bundle" / "metadata" / "timestamp.json").write_text("{}")
    f = DirectoryFetcher(tmp_path / "bundle")
    assert f.download_bytes((tmp_path / "bundle/metadata/timestamp.json").as_uri(), 100) == b"{}"
    with pytest.raises(exceptions.DownloadError, match="outside"):
        f.download_bytes((tmp_path / "bundle").as_uri() + "/../secret", 100)
    with pytest.raises(exceptions.DownloadHTTPError):
        f.download_bytes((tmp_path / "bundle/metadata/none.json").as_uri(), 100)


def test_every_read_has_a_deadline_however_slowly_bytes_trickle(tmp_path: Path) -> None:
    """How to break it: trickle a byte a second. Before, the deadline was checked only between full
    256 KiB chunks (metadata) and each byte reset the read timeout, so a read never ended."""
    from _trust_support import Trickler
    from tuf.api.exceptions import SlowRetrievalError

    from deployment.fetcher import FetchConfig, HttpFetcher

    trickler = Trickler()
    try:
        cfg = FetchConfig(read_timeout_s=30, metadata_deadline_s=1.5, base_deadline_s=1.5, pull_deadline_s=60)
        f = HttpFetcher(cfg)
        try:
            with pytest.raises(SlowRetrievalError):
                f.download_bytes(f"{trickler.url}/metadata/timestamp.json", 16 * 1024)
            with pytest.raises(SlowRetrievalError):
                f.download_to(f"{trickler.url}/targets/x", tmp_path / "x.part", 4000)
        finally:
            f.close()
        # The whole pull has a deadline too: once it passed, no request even starts.
        f = HttpFetcher(FetchConfig(pull_deadline_s=0.5, metadata_deadline_s=30))
        try:
            with pytest.raises(SlowRetrievalError):
                f.download_bytes(f"{trickler.url}/metadata/timestamp.json", 16 * 1024)
            with pytest.raises(SlowRetrievalError, match="deadline passed"):
                f.download_bytes(f"{trickler.url}/metadata/root.json", 16 * 1024)
        finally:
            f.close()
    finally:
        trickler.close()
