"""Serving a TUF repository directory over HTTP: strong ETags, conditional GETs and byte ranges.

Public API::

    repository_routes(repo_dir) -> list[Route]     GET/HEAD /metadata/{name}, /targets/{path}
    FileServer(root)                               the ASGI endpoint behind those routes

Hand-written rather than starlette's ``FileResponse`` because devices resume downloads with
``If-Range``, which needs a *strong* validator tied to the content: the ETag here is the file's
sha256 (cached per inode/size/mtime), not a hash of its modification time. Semantics (RFC 9110):
``If-None-Match`` -> 304; a single ``Range: bytes=a-b | a- | -n`` -> 206 with ``Content-Range``;
``If-Range`` that does not match the current ETag -> the full 200; unsatisfiable -> 416; several
ranges -> the full 200 (allowed, and enough for our client).

Cache headers (:func:`metadata_cache_control`, :func:`target_cache_control`) let a CDN or mirror carry
the polls without ever serving stale trust data: versioned metadata (``<N>.root.json``, consistent
snapshots) and hash-prefixed targets never change, so they are ``immutable``; ``timestamp.json`` and the
other unversioned names may be cached for at most :data:`MAX_METADATA_AGE_S` and never past the
``expires`` they are signed with (devices still enforce expiry themselves, this only keeps caches
honest). ``build_static_app`` serves just these files, as a CDN origin separate from the hub API.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "MAX_METADATA_AGE_S",
    "FileServer",
    "metadata_cache_control",
    "repository_routes",
    "target_cache_control",
]

_CHUNK = 256 * 1024
MAX_METADATA_AGE_S = 60
IMMUTABLE = "public, max-age=31536000, immutable"
_VERSIONED = re.compile(r"^[0-9]+\.")
_HASHED = re.compile(r"^[0-9a-f]{64}\.")


def metadata_cache_control(name: str, content: bytes, now: float) -> str:
    """``Cache-Control`` for a TUF metadata file: immutable when versioned, else at most
    :data:`MAX_METADATA_AGE_S` and never beyond its signed ``expires`` (``no-cache`` when unknown)."""
    if _VERSIONED.match(name):
        return IMMUTABLE
    try:
        expires = datetime.fromisoformat(str(json.loads(content)["signed"]["expires"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError):
        return "no-cache"
    left = int(expires.timestamp() - now)
    if left <= 0:
        return "no-cache"
    return f"public, max-age={min(MAX_METADATA_AGE_S, left)}, must-revalidate"


def target_cache_control(rel: str) -> str:
    """``Cache-Control`` for a target: immutable when its name carries its hash, else revalidate."""
    return IMMUTABLE if _HASHED.match(rel.rsplit("/", 1)[-1]) else "no-cache"


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """``(start, end_inclusive)``, None when the header should be ignored, "416" when unsatisfiable."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return "416"
            return (max(size - n, 0), size - 1)
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0:
        return None
    if start >= size:
        return "416"
    if end < start:
        return None
    return (start, min(end, size - 1))


class FileServer:
    """Serve files below ``root``; names that escape it or are hidden answer 404."""

    def __init__(self, root: Path, cache_control: Callable[[str, Path], str] | None = None) -> None:
        self.root = Path(root).resolve()
        self.cache_control = cache_control or (lambda rel, path: "no-cache")
        self._etags: dict[tuple[int, int, int], str] = {}
        self._lock = threading.Lock()

    def _resolve(self, rel: str) -> Path | None:
        if not rel or "\x00" in rel or any(p in {"", ".", ".."} or p.startswith(".") for p in rel.split("/")):
            return None
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def etag(self, path: Path) -> str:
        """Strong ETag: the content's sha256, cached while inode, size and mtime stay the same."""
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._etags.get(key)
        if cached is not None:
            return cached
        with path.open("rb") as fh:
            tag = '"' + hashlib.file_digest(fh, "sha256").hexdigest() + '"'
        with self._lock:
            if len(self._etags) > 100_000:
                self._etags.clear()
            self._etags[key] = tag
        return tag

    @staticmethod
    def _body(path: Path, start: int, length: int) -> Iterator[bytes]:
        with path.open("rb") as fh:
            fh.seek(start)
            left = length
            while left > 0:
                chunk = fh.read(min(_CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def respond(self, request: Request, rel: str) -> Response:
        path = self._resolve(rel)
        if path is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        size = path.stat().st_size
        etag = self.etag(path)
        ctype = "application/json" if path.suffix == ".json" else "application/octet-stream"
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": self.cache_control(rel, path)}
        inm = request.headers.get("if-none-match")
        if inm is not None and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            return Response(status_code=304, headers=headers)
        start, length, status = 0, size, 200
        rng = request.headers.get("range")
        if rng is not None:
            if_range = request.headers.get("if-range")
            if if_range is None or if_range.strip() == etag:
                parsed = _parse_range(rng, size)
                if parsed == "416":
                    return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
                if isinstance(parsed, tuple):
                    start, end = parsed
                    length, status = end - start + 1, 206
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type=ctype)
        return StreamingResponse(
            self._body(path, start, length), status_code=status, headers=headers, media_type=ctype
        )


def repository_routes(repo_dir: Path, now: Callable[[], float] = time.time) -> list[Route]:
    """Routes serving ``<repo>/metadata`` and ``<repo>/targets`` (never keys, staging or repo.json)."""

    def meta_cc(rel: str, path: Path) -> str:
        if _VERSIONED.match(rel):
            return IMMUTABLE
        return metadata_cache_control(rel, path.read_bytes()[: 1 << 20], now())

    metadata = FileServer(Path(repo_dir) / "metadata", meta_cc)
    targets = FileServer(Path(repo_dir) / "targets", lambda rel, path: target_cache_control(rel))

    async def get_metadata(request: Request) -> Response:
        name = request.path_params["name"]
        if "/" in name:
            return Response("not found\n", status_code=404)
        return await run_in_threadpool(metadata.respond, request, name)

    async def get_target(request: Request) -> Response:
        return await run_in_threadpool(targets.respond, request, request.path_params["path"])

    return [
        Route("/metadata/{name}", get_metadata, methods=["GET", "HEAD"]),
        Route("/targets/{path:path}", get_target, methods=["GET", "HEAD"]),
    ]
