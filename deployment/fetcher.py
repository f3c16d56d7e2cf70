"""Fetchers: HTTP (httpx) and directory (offline bundles), for TUF metadata and resumable artifacts.

Public API::

    FetchConfig(connect_timeout_s=5, read_timeout_s=20, max_stalled_attempts=5, max_attempts=10_000,
                min_rate_bytes_s=8192, base_deadline_s=120, metadata_deadline_s=60, pull_deadline_s=3600)
        an artifact transfer may take base + length / min rate; a metadata read metadata_deadline_s;
        everything a fetcher does together pull_deadline_s from its creation (one fetcher per pull)
    HttpFetcher(config=None, client=None, clock=None, held=None, transport=None)   a tuf FetcherInterface
        over httpx (``transport``: an httpx transport for the client it builds, e.g. a link simulator);
        ``held(url)`` returns the device's trusted copy of that metadata file (or None): the request
        then carries ``If-None-Match`` (the hub's strong ETag is the content sha256) and a 304 answers
        with those bytes, which the TUF client verifies as if downloaded
    DirectoryFetcher(base_dir, config=None, clock=None)      a tuf FetcherInterface over a bundle directory
    make_fetcher(source, config=None, clock=None, held=None, transport=None) -> HttpFetcher | DirectoryFetcher
    base_urls(source, metadata_url=None, targets_url=None) -> (metadata_base_url, targets_base_url)
    <fetcher>.download_to(url, part, length, validator=None, progress=None, on_validator=None)
        -> DownloadStats(bytes_received, requests, resumes, restarts, etag)

``download_to`` appends to a partial file and never writes more than the signed ``length``: a server
that sends more (an endless or oversized artifact) fails with ``DownloadLengthMismatchError``. When
the connection drops, it resumes with ``Range: bytes=<have>-`` and ``If-Range: <etag>``; a 200 answer
(the file changed) restarts from zero. Attempts that make no progress are bounded.

Deadlines are wall-clock and independent of chunk size: every read is checked as bytes arrive, and a
watchdog shuts the socket down when the deadline passes while a read is blocked (a server that trickles
a byte a second, or sends headers and then nothing, cannot hold a pull). A passed deadline raises
``SlowRetrievalError`` (a ``DownloadError``: the caller treats the pull as offline). The watchdog runs in
real time (it bounds real sockets); the checks between reads use the injected clock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from sre_core.clock import Clock, SystemClock

__all__ = [
    "DirectoryFetcher",
    "DownloadStats",
    "FetchConfig",
    "HttpFetcher",
    "Progress",
    "base_urls",
    "make_fetcher",
]

Progress = Callable[[int], None]
CHUNK = 256 * 1024


@dataclass(frozen=True)
class FetchConfig:
    """Timeouts and retry bounds."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    max_stalled_attempts: int = 5
    max_attempts: int = 10_000
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    min_rate_bytes_s: float = 8 * 1024
    base_deadline_s: float = 120.0
    metadata_deadline_s: float = 60.0
    pull_deadline_s: float = 3600.0

    def deadline_s(self, length: int) -> float:
        """Wall-clock budget for one transfer of ``length`` bytes (a trickling server cannot hold us)."""
        return self.base_deadline_s + length / self.min_rate_bytes_s

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_stalled_attempts < 1 or self.max_attempts < 1:
            raise ValueError("attempt bounds must be >= 1")
        if self.min_rate_bytes_s <= 0 or self.base_deadline_s <= 0:
            raise ValueError("rate and deadline must be positive")
        if self.metadata_deadline_s <= 0 or self.pull_deadline_s <= 0:
            raise ValueError("deadlines must be positive")


@dataclass
class DownloadStats:
    """What one artifact download cost."""

    bytes_received: int = 0
    requests: int = 0
    resumes: int = 0
    restarts: int = 0
    etag: str | None = None


class _RangeAnswer:
    """One response to a (possibly ranged) GET: where its body starts and the body itself."""

    def __init__(self, start: int, etag: str | None, chunks: Iterator[bytes], close: Callable[[], None]):
        self.start = start
        self.etag = etag
        self.chunks = chunks
        self.close = close


class _Resumable:
    """The resume loop shared by both fetchers; subclasses provide :meth:`_open`."""

    config: FetchConfig
    clock: Clock
    pull_deadline: float  # monotonic time by which everything this fetcher does must be done

    def _open(self, url: str, offset: int, validator: str | None, deadline: float) -> _RangeAnswer:
        raise NotImplementedError

    def _deadline_fired(self) -> bool:
        """True when a watchdog cut the last request at its deadline."""
        return False

    def _slow(self, url: str, have: int, length: int) -> exceptions.SlowRetrievalError:
        return exceptions.SlowRetrievalError(
            f"{url}: {have} of {length} bytes when the deadline passed (below the minimum rate, or the "
            f"pull ran past {self.config.pull_deadline_s:g} s)"
        )

    def _transient(self, exc: Exception) -> bool:
        return isinstance(exc, OSError)

    def download_to(
        self,
        url: str,
        part: Path,
        length: int,
        validator: str | None = None,
        progress: Progress | None = None,
        on_validator: Callable[[str | None], None] | None = None,
    ) -> DownloadStats:
        """Download ``url`` into ``part`` (appending to what is there) until it holds ``length`` bytes.

        Args:
            validator: the ETag seen when the partial was started (sent as ``If-Range``).
            on_validator: called with a new ETag when a download (re)starts, to persist it.

        Raises:
            DownloadLengthMismatchError: the server sent more than ``length`` bytes.
            DownloadHTTPError: the server answered with an error status.
            DownloadError: the transfer kept failing without progress.
        """
        stats = DownloadStats(etag=validator)
        part = Path(part)
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        if have and progress:
            progress(have)
        stalled = 0
        last_error: Exception | None = None
        deadline = min(self.clock.monotonic() + self.config.deadline_s(length), self.pull_deadline)
        for _attempt in range(self.config.max_attempts):
            if have == length:
                return stats
            if self.clock.monotonic() > deadline:
                raise self._slow(url, have, length)
            before = have
            try:
                answer = self._open(url, have, stats.etag if have else None, deadline)
            except (exceptions.DownloadHTTPError, exceptions.SlowRetrievalError):
                raise
            except (exceptions.DownloadError, httpx.TransportError, OSError) as exc:
                last_error = exc
                answer = None
            if answer is not None:
                stats.requests += 1
                try:
                    if answer.start == 0 and have:
                        stats.restarts += 1
                        have = 0
                    elif answer.start:
                        stats.resumes += 1
                    if answer.start == 0:
                        stats.etag = answer.etag
                        if on_validator:
                            on_validator(answer.etag)
                    with part.open("r+b" if part.exists() else "wb") as fh:
                        fh.seek(have)
                        fh.truncate()
                        try:
                            for chunk in answer.chunks:
                                if have + len(chunk) > length:
                                    raise exceptions.DownloadLengthMismatchError(
                                        f"{url} sent more than the signed length of {length} bytes"
                                    )
                                fh.write(chunk)
                                have += len(chunk)
                                stats.bytes_received += len(chunk)
                                if progress:
                                    progress(len(chunk))
                                if self.clock.monotonic() > deadline:
                                    raise self._slow(url, have, length)
                        finally:
                            fh.flush()
                            os.fsync(fh.fileno())
                except exceptions.DownloadError:
                    raise
                except (httpx.TransportError, OSError) as exc:
                    last_error = exc
                finally:
                    answer.close()
            if have == length:
                return stats
            if self.clock.monotonic() > deadline or self._deadline_fired():
                raise self._slow(url, have, length)
            if have > before:
                stalled = 0
                continue
            stalled += 1
            if stalled >= self.config.max_stalled_attempts:
                break
            self.clock.sleep(min(self.config.backoff_s * 2 ** (stalled - 1), self.config.max_backoff_s))
        raise exceptions.DownloadError(
            f"download of {url} stopped at {have} of {length} bytes after {stats.requests} requests"
            f" ({last_error or 'no progress'})"
        )


class _Watchdog:
    """Shuts the fetcher's socket down when a deadline passes while a read is blocked on it.

    httpx bounds each socket read (``read_timeout_s``), not a whole exchange: a server that sends one
    byte per read timeout never trips it. ``shutdown`` wakes a blocked ``recv`` in another thread (a
    ``close`` would not), so the read returns at the deadline and the fetcher raises.
    """

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.fired = False
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore trace hook: remember the socket of each new connection."""
        if event == "connection.connect_tcp.complete":
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with self._lock:
                    self.sock = sock

    def arm(self, seconds: float) -> None:
        self.disarm()
        with self._lock:
            self.fired = False
            self._timer = threading.Timer(max(seconds, 0.0), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def disarm(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One CA bundle load per process (it costs ~50 ms, more than a warm refresh)."""
    return ssl.create_default_context()


class HttpFetcher(_Resumable, FetcherInterface):
    """httpx fetcher: a timeout on every call; HTTP errors become ``DownloadHTTPError``."""

    def __init__(
        self,
        config: FetchConfig | None = None,
        client: httpx.Client | None = None,
        clock: Clock | None = None,
        held: Callable[[str], bytes | None] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config or FetchConfig()
        self.held = held
        self.not_modified = 0
        self.clock = clock or SystemClock()
        timeout = httpx.Timeout(
            self.config.read_timeout_s,
            connect=self.config.connect_timeout_s,
            pool=self.config.connect_timeout_s,
        )
        self._own = client is None
        # One connection at a time: the socket the watchdog remembers is the one every request uses.
        self.client = client or httpx.Client(
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            verify=_ssl_context(),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            transport=transport,
        )
        self.requests = 0
        self.pull_deadline = self.clock.monotonic() + self.config.pull_deadline_s
        self._watchdog = _Watchdog()

    def close(self) -> None:
        self._watchdog.disarm()
        if self._own:
            self.client.close()

    def _deadline_fired(self) -> bool:
        return self._watchdog.fired

    def _send(self, url: str, headers: dict[str, str], deadline: float) -> httpx.Response:
        """Start a GET that must be over by ``deadline`` (monotonic); the watchdog is armed until the
        response is closed."""
        self.requests += 1
        remaining = deadline - self.clock.monotonic()
        if remaining <= 0:
            raise exceptions.SlowRetrievalError(f"GET {url}: the pull deadline passed before the request")
        timeout = httpx.Timeout(
            min(self.config.read_timeout_s, remaining),
            connect=min(self.config.connect_timeout_s, remaining),
            pool=min(self.config.connect_timeout_s, remaining),
        )
        request = self.client.build_request(
            "GET", url, headers=headers, timeout=timeout, extensions={"trace": self._watchdog.trace}
        )
        self._watchdog.arm(remaining)
        try:
            return self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            self._watchdog.disarm()
            if self._watchdog.fired or (
                isinstance(exc, httpx.TimeoutException) and remaining < (self.config.read_timeout_s)
            ):
                raise exceptions.SlowRetrievalError(f"GET {url}: no answer by the deadline ({exc})") from exc
            raise exceptions.DownloadError(f"GET {url}: {type(exc).__name__}: {exc}") from exc

    def _closer(self, resp: httpx.Response) -> Callable[[], None]:
        def close() -> None:
            self._watchdog.disarm()
            resp.close()

        return close

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """Metadata download with bounded retries when the link drops mid-transfer."""
        for attempt in range(self.config.max_stalled_attempts):
            try:
                return super().download_bytes(url, max_length)
            except (
                exceptions.DownloadHTTPError,
                exceptions.DownloadLengthMismatchError,
                exceptions.SlowRetrievalError,
            ):
                raise
            except exceptions.DownloadError:
                if attempt + 1 >= self.config.max_stalled_attempts:
                    raise
                self.clock.sleep(min(self.config.backoff_s * 2**attempt, self.config.max_backoff_s))
        raise exceptions.DownloadError(f"GET {url}: no attempts left")  # pragma: no cover

    def _fetch(self, url: str) -> Iterator[bytes]:
        deadline = min(self.clock.monotonic() + self.config.metadata_deadline_s, self.pull_deadline)
        mine = self.held(url) if self.held is not None else None
        cond = {"If-None-Match": f'"{hashlib.sha256(mine).hexdigest()}"'} if mine is not None else {}
        resp = self._send(url, cond, deadline)
        if resp.status_code == 304 and mine is not None:
            self._closer(resp)()
            self.not_modified += 1
            return iter([mine])  # unchanged: the TUF client verifies these bytes again
        if resp.status_code != 200:
            self._closer(resp)()
            raise exceptions.DownloadHTTPError(f"GET {url}: HTTP {resp.status_code}", resp.status_code)
        return self._chunks(resp, url, deadline)

    def _chunks(self, resp: httpx.Response, url: str, deadline: float) -> Iterator[bytes]:
        # iter_raw() without a chunk size yields every network read: the deadline is checked as bytes
        # arrive, not once per 256 KiB (which a byte-a-second server never completes).
        close = self._closer(resp)
        try:
            for chunk in resp.iter_raw():
                if self.clock.monotonic() > deadline or self._watchdog.fired:
                    raise exceptions.SlowRetrievalError(f"GET {url}: not complete by its deadline")
                yield chunk
        except httpx.HTTPError as exc:
            if self._watchdog.fired:
                raise exceptions.SlowRetrievalError(f"GET {url}: not complete by its deadline") from exc
            raise exceptions.DownloadError(f"GET {url} interrupted: {exc}") from exc
        finally:
            close()

    def _open(self, url: str, offset: int, validator: str | None, deadline: float) -> _RangeAnswer:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        resp = self._send(url, headers, deadline)
        close = self._closer(resp)
        etag = resp.headers.get("etag")
        if resp.status_code == 206:
            start = _content_range_start(resp.headers.get("content-range", ""))
            if start != offset:
                close()
                raise exceptions.DownloadError(f"GET {url}: Content-Range starts at {start}, asked {offset}")
        elif resp.status_code == 200:
            start = 0
        else:
            close()
            raise exceptions.DownloadHTTPError(f"GET {url}: HTTP {resp.status_code}", resp.status_code)
        if etag is not None and etag.startswith("W/"):
            etag = None  # a weak validator must not be used with If-Range
        return _RangeAnswer(start, etag, resp.iter_raw(), close)  # unbuffered: a drop loses nothing


def _content_range_start(value: str) -> int:
    # "bytes 100-199/200"
    try:
        unit, _, rest = value.partition(" ")
        if unit != "bytes":
            return -1
        return int(rest.split("-", 1)[0])
    except ValueError:
        return -1


class DirectoryFetcher(_Resumable, FetcherInterface):
    """Reads ``file://`` URLs under one bundle directory (sneakernet). Paths may not escape it."""

    def __init__(self, base_dir: Path, config: FetchConfig | None = None, clock: Clock | None = None) -> None:
        self.base = Path(base_dir).resolve()
        self.config = config or FetchConfig()
        self.clock = clock or SystemClock()
        self.requests = 0
        self.pull_deadline = self.clock.monotonic() + self.config.pull_deadline_s

    def close(self) -> None:
        """Nothing to release."""

    def _path(self, url: str) -> Path:
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise exceptions.DownloadError(f"{url} is not a file:// URL")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.base):
            raise exceptions.DownloadError(f"{url} is outside the bundle {self.base}")
        if not path.is_file():
            raise exceptions.DownloadHTTPError(f"{path} is not in the bundle", 404)
        return path

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requests += 1
        return self._read(self._path(url), 0)

    @staticmethod
    def _read(path: Path, offset: int) -> Iterator[bytes]:
        with path.open("rb") as fh:
            fh.seek(offset)
            while chunk := fh.read(CHUNK):
                yield chunk

    def _open(self, url: str, offset: int, validator: str | None, deadline: float) -> _RangeAnswer:
        self.requests += 1
        path = self._path(url)
        st = path.stat()
        etag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
        start = offset if (offset and validator == etag) else 0
        gen = self._read(path, start)
        return _RangeAnswer(start, etag, gen, lambda: _close(gen))


def _close(gen: Iterator[bytes]) -> None:
    with contextlib.suppress(Exception):
        gen.close()  # type: ignore[attr-defined]


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def base_urls(
    source: str, metadata_url: str | None = None, targets_url: str | None = None
) -> tuple[str, str]:
    """Metadata and targets base URLs for a hub URL or a bundle directory; ``metadata_url`` /
    ``targets_url`` (a CDN or mirror carrying the same signed files) replace the source's."""
    if _is_url(source):
        base = source.rstrip("/")
        meta, targets = f"{base}/metadata/", f"{base}/targets/"
    else:
        base_dir = Path(source).resolve()
        meta, targets = (base_dir / "metadata").as_uri() + "/", (base_dir / "targets").as_uri() + "/"
    if metadata_url:
        meta = metadata_url.rstrip("/") + "/"
    if targets_url:
        targets = targets_url.rstrip("/") + "/"
    return meta, targets


def make_fetcher(
    source: str,
    config: FetchConfig | None = None,
    clock: Clock | None = None,
    held: Callable[[str], bytes | None] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> HttpFetcher | DirectoryFetcher:
    """An HTTP fetcher for ``http(s)://`` sources, else a directory fetcher for a bundle."""
    if _is_url(source):
        return HttpFetcher(config, clock=clock, held=held, transport=transport)
    return DirectoryFetcher(Path(source), config, clock)
