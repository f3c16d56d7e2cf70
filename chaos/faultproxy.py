"""An embedded asyncio fault proxy that speaks the Toxiproxy HTTP API, for where no Toxiproxy runs.

Devices and CI have no Toxiproxy server (no package, no Go toolchain, no ``netem``), but our actions,
``toxiproxy-python`` and ``chaostoolkit-toxiproxy`` all talk the Toxiproxy HTTP API. This module
implements that API and its toxics over plain asyncio TCP, in one event loop:

- API: ``GET/POST /proxies``, ``GET/POST/DELETE /proxies/{name}``, ``GET/POST /proxies/{name}/toxics``,
  ``GET/POST/DELETE /proxies/{name}/toxics/{toxic}``, ``POST /reset``, ``POST /populate``, ``GET /version``.
  The HTTP/1.1 parsing is hand-written (about 60 lines) so the API and every proxied connection share one
  loop and the module needs nothing beyond the standard library.
- Toxics: ``latency`` (latency, jitter ms), ``bandwidth`` (rate KB/s), ``slow_close`` (delay ms),
  ``timeout`` (timeout ms, 0 = hold), ``reset_peer`` (timeout ms), ``slicer`` (average_size,
  size_variation bytes, delay µs), ``limit_data`` (bytes); each with ``stream`` (upstream = client to
  upstream, downstream = back) and ``toxicity`` (the chance, drawn once per connection, that the toxic
  applies to that connection). Toxics added or removed act on live connections too.
- Safety: proxies listen on loopback; a non-loopback listen address (``chaostoolkit-toxiproxy`` asks for
  ``0.0.0.0``) is rewritten to ``127.0.0.1`` unless ``allow_remote`` is set. Request bodies, proxies,
  toxics and connections are bounded; idle API connections time out.

Differences from Toxiproxy: latency delays each chunk after the previous one was written (no
pipelining of delayed chunks), which only matters for streaming under a latency toxic.

Use in process with :class:`FaultProxyServer` (``start()``/``stop()``, a context manager; the loop
runs in a daemon thread) or as a process: ``python -m chaos.faultproxy --port 8474``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["TOXIC_DEFAULTS", "VERSION", "FaultProxy", "FaultProxyServer", "main"]

VERSION = "2.9.0-sre-faultproxy"
_log = logging.getLogger(__name__)

TOXIC_DEFAULTS: dict[str, dict[str, int]] = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "slow_close": {"delay": 0},
    "timeout": {"timeout": 0},
    "reset_peer": {"timeout": 0},
    "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
    "limit_data": {"bytes": 0},
}
STREAMS = ("upstream", "downstream")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 1 << 20
MAX_PROXIES = 256
MAX_TOXICS = 64
MAX_LINKS = 1024
API_IDLE_S = 30.0
API_READ_S = 10.0
CONNECT_S = 5.0


class ApiError(Exception):
    """An API request that must be answered with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Toxic:
    """One toxic on one proxy."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, int]
    uid: int
    created: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": dict(self.attributes),
        }


def _split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ApiError(400, f"{what} {value!r}: expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_toxic(body: Any, uid: int, now: float) -> Toxic:
    if not isinstance(body, dict):
        raise ApiError(400, "toxic: expected a JSON object")
    ttype = body.get("type")
    if ttype not in TOXIC_DEFAULTS:
        raise ApiError(400, f"toxic type {ttype!r} is not one of {sorted(TOXIC_DEFAULTS)}")
    stream = body.get("stream") or "downstream"
    if stream not in STREAMS:
        raise ApiError(400, f"stream {stream!r}: expected upstream or downstream")
    toxicity = body.get("toxicity", 1.0)
    if not isinstance(toxicity, (int, float)) or not 0.0 <= float(toxicity) <= 1.0:
        raise ApiError(400, f"toxicity {toxicity!r}: expected a number in [0, 1]")
    attrs = dict(TOXIC_DEFAULTS[ttype])
    attrs.update(_attributes(ttype, body.get("attributes") or {}))
    name = body.get("name") or f"{ttype}_{stream}"
    if not isinstance(name, str) or not name or "/" in name or len(name) > 128:
        raise ApiError(400, f"toxic name {name!r} is not valid")
    return Toxic(name, str(ttype), str(stream), float(toxicity), attrs, uid, now)


def _attributes(ttype: str, raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise ApiError(400, "attributes: expected a JSON object")
    out: dict[str, int] = {}
    for key, value in raw.items():
        if key not in TOXIC_DEFAULTS[ttype]:
            continue  # Toxiproxy ignores unknown attributes too
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ApiError(400, f"{ttype}.{key} = {value!r}: expected a non-negative number")
        out[key] = int(value)
    return out


class _Side(asyncio.Protocol):
    """One TCP connection of a link: the client's (accepted) or the upstream's (dialled)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.link: _Link | None = None
        self.lost = False
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # TCP: always an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.link is not None:
            self.link.on_data(self, data)

    def eof_received(self) -> bool:
        if self.link is not None:
            self.link.on_eof(self)
        return True  # keep the other direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.writable.set()
        if self.link is not None:
            self.link.close()

    def pause_writing(self) -> None:
        self.writable.clear()
        if self.link is not None:
            self.link.hold(self, "buffer", True)

    def resume_writing(self) -> None:
        self.writable.set()
        if self.link is not None:
            self.link.hold(self, "buffer", False)


class _ClientSide(_Side):
    """The accepted side: reading waits until the upstream is connected."""

    def __init__(self, fp: FaultProxy, proxy: _Proxy) -> None:
        super().__init__()
        self.fp = fp
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()  # type: ignore[union-attr]
        asyncio.get_running_loop().create_task(self.fp._open_upstream(self.proxy, self))


STREAMS_FROM = {"client": "upstream", "upstream": "downstream"}
QUEUE_HIGH = 4 << 20


class _Link:
    """One proxied connection pair and its two directions.

    Fast path: with no toxic in force on a direction, ``data_received`` writes straight to the other
    transport (flow control by pausing the reader when the writer's buffer is full). With toxics, data
    is queued with its arrival time and a pump coroutine applies them in order.
    """

    def __init__(self, proxy: _Proxy, client: _Side, upstream: _Side) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.rng = random.Random()
        self.decisions: dict[int, bool] = {}
        self.counted: dict[int, int] = {}
        self.closed = False
        self.queues: dict[str, deque[tuple[float, bytes]]] = {"upstream": deque(), "downstream": deque()}
        self.queued = {"upstream": 0, "downstream": 0}
        self.pumps: dict[str, asyncio.Task[None] | None] = {"upstream": None, "downstream": None}
        self.eof = {"upstream": False, "downstream": False}
        self.finished = {"upstream": False, "downstream": False}
        self.holds: dict[str, set[str]] = {"upstream": set(), "downstream": set()}
        self.tasks: set[asyncio.Task[None]] = set()

    def active(self, toxic: Toxic) -> bool:
        """Whether ``toxic`` applies to this connection (drawn once per connection and toxic)."""
        hit = self.decisions.get(toxic.uid)
        if hit is None:
            hit = toxic.toxicity >= 1.0 or self.rng.random() < toxic.toxicity
            self.decisions[toxic.uid] = hit
        return hit

    def _ends(self, stream: str) -> tuple[_Side, _Side]:
        return (self.client, self.upstream) if stream == "upstream" else (self.upstream, self.client)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def hold(self, writer: _Side, why: str, on: bool) -> None:
        """Pause/resume reading the side that feeds ``writer`` (or, for "queue", the stream's source)."""
        stream = "downstream" if writer is self.client else "upstream"
        self._hold_stream(stream, why, on)

    def _hold_stream(self, stream: str, why: str, on: bool) -> None:
        src, _ = self._ends(stream)
        holds = self.holds[stream]
        before = bool(holds)
        if on:
            holds.add(why)
        else:
            holds.discard(why)
        if src.transport is None or src.lost or self.closed or before == bool(holds):
            return
        if holds:
            src.transport.pause_reading()
        else:
            src.transport.resume_reading()

    def on_data(self, side: _Side, data: bytes) -> None:
        if self.closed:
            return
        stream = "upstream" if side is self.client else "downstream"
        idle = self.pumps[stream] is None and not self.queues[stream]
        if idle and (not self.proxy.toxics or not self.proxy.stream_toxics(stream, self)):
            dest = self._ends(stream)[1]
            if dest.transport is not None and not dest.lost:
                dest.transport.write(data)
            return
        self.queues[stream].append((self.loop.time(), data))
        self.queued[stream] += len(data)
        if self.queued[stream] > QUEUE_HIGH:
            self._hold_stream(stream, "queue", True)
        if self.pumps[stream] is None:
            self.pumps[stream] = self._spawn(self._pump(stream))

    def on_eof(self, side: _Side) -> None:
        stream = "upstream" if side is self.client else "downstream"
        self.eof[stream] = True
        if self.pumps[stream] is None and not self.queues[stream]:
            self._spawn(self._finish(stream))

    async def _pump(self, stream: str) -> None:
        q = self.queues[stream]
        dest = self._ends(stream)[1]
        try:
            while q and not self.closed:
                arrival, data = q.popleft()
                self.queued[stream] -= len(data)
                if self.queued[stream] < QUEUE_HIGH // 2:
                    self._hold_stream(stream, "queue", False)
                toxics = self.proxy.stream_toxics(stream, self)
                if any(t.type == "timeout" for t in toxics):
                    continue  # black-holed while a timeout toxic is in place
                delay = 0.0
                for t in toxics:
                    if t.type == "latency":
                        jit = t.attributes["jitter"]
                        delay += max(0.0, t.attributes["latency"] + self.rng.uniform(-jit, jit)) / 1000.0
                if delay > 0:
                    await asyncio.sleep(max(0.0, arrival + delay - self.loop.time()))
                cut = False
                for t in toxics:
                    if t.type == "limit_data":
                        left = t.attributes["bytes"] - self.counted.get(t.uid, 0)
                        if len(data) >= left:
                            data, cut = data[: max(0, left)], True
                        self.counted[t.uid] = self.counted.get(t.uid, 0) + len(data)
                await self._write_shaped(dest, data, toxics)
                if cut:
                    self.close()
                    return
            if self.eof[stream] and not self.closed:
                await self._finish(stream)
        finally:
            self.pumps[stream] = None

    async def _write_shaped(self, dest: _Side, data: bytes, toxics: list[Toxic]) -> None:
        """Write ``data`` through the slicer and bandwidth toxics, honouring the writer's buffer."""
        slicer = next((t for t in toxics if t.type == "slicer" and t.attributes["average_size"] > 0), None)
        rates = [t.attributes["rate"] for t in toxics if t.type == "bandwidth" and t.attributes["rate"] > 0]
        rate = min(rates, default=0)
        pieces: list[bytes] = [data]
        gap = 0.0
        if slicer is not None:
            avg, var = slicer.attributes["average_size"], slicer.attributes["size_variation"]
            pieces, i = [], 0
            while i < len(data):
                size = max(1, avg + (self.rng.randint(-var, var) if var else 0))
                pieces.append(data[i : i + size])
                i += size
            gap = slicer.attributes["delay"] / 1e6
        if rate > 0:
            step = max(1, rate * 100)  # 100 ms worth per write keeps the rate smooth
            pieces = [pc[j : j + step] for pc in pieces for j in range(0, len(pc), step)]
        for n, piece in enumerate(pieces):
            if n and gap:
                await asyncio.sleep(gap)
            if rate > 0:
                await asyncio.sleep(len(piece) / (rate * 1000.0))
            await dest.writable.wait()
            if self.closed or dest.lost or dest.transport is None:
                return
            dest.transport.write(piece)

    async def _finish(self, stream: str) -> None:
        """The source half-closed: after any slow_close delay, half-close the destination."""
        if self.finished[stream]:
            return
        self.finished[stream] = True
        for t in self.proxy.stream_toxics(stream, self):
            if t.type == "slow_close":
                await asyncio.sleep(t.attributes["delay"] / 1000.0)
        dest = self._ends(stream)[1]
        if self.closed or dest.transport is None or dest.lost:
            return
        try:
            if dest.transport.can_write_eof():
                dest.transport.write_eof()
            else:
                self.close()
        except (OSError, RuntimeError):
            self.close()
        if all(self.finished.values()):
            self.close()

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.upstream):
            tr = side.transport
            if tr is None:
                continue
            if reset:
                sock = tr.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                tr.abort()
            else:
                tr.close()
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self.proxy.links.discard(self)


@dataclass
class _Proxy:
    name: str
    listen: str
    upstream: str
    enabled: bool
    toxics: dict[str, Toxic] = field(default_factory=dict)
    server: asyncio.Server | None = None
    links: set[_Link] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [t.to_json() for t in self.toxics.values()],
        }

    def notify(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def stream_toxics(self, stream: str, link: _Link) -> list[Toxic]:
        return [t for t in self.toxics.values() if t.stream == stream and link.active(t)]


class FaultProxy:
    """The proxies, their toxics and the API dispatcher. Lives on one event loop; not thread-safe.

    Args:
        allow_remote: keep non-loopback listen addresses instead of rewriting them to 127.0.0.1.
    """

    def __init__(self, allow_remote: bool = False) -> None:
        self.allow_remote = allow_remote
        self.proxies: dict[str, _Proxy] = {}
        self._uid = 0

    # --- proxy lifecycle ------------------------------------------------------------------------------

    def _listen_addr(self, listen: str) -> tuple[str, int]:
        host, port = _split_hostport(listen, "listen")
        if host not in LOOPBACK and not self.allow_remote:
            host = "127.0.0.1"
        return host, port

    async def _start(self, p: _Proxy) -> None:
        host, port = self._listen_addr(p.listen)
        try:
            loop = asyncio.get_running_loop()
            p.server = await loop.create_server(lambda: _ClientSide(self, p), host, port)
        except OSError as exc:
            raise ApiError(500, f"proxy {p.name}: cannot listen on {host}:{port}: {exc}") from exc
        sockname = p.server.sockets[0].getsockname()
        shown = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
        p.listen = f"{shown}:{sockname[1]}"
        p.enabled = True

    async def _stop(self, p: _Proxy) -> None:
        if p.server is not None:
            p.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.server.wait_closed(), 1.0)
            p.server = None
        for link in list(p.links):
            link.close()
        p.enabled = False

    async def create(self, body: Any) -> _Proxy:
        if not isinstance(body, dict):
            raise ApiError(400, "proxy: expected a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not name or "/" in name or len(name) > 128:
            raise ApiError(400, f"proxy name {name!r} is not valid")
        if name in self.proxies:
            raise ApiError(409, f"proxy {name} already exists")
        if len(self.proxies) >= MAX_PROXIES:
            raise ApiError(400, f"at most {MAX_PROXIES} proxies")
        upstream = body.get("upstream")
        _split_hostport(str(upstream), "upstream")
        p = _Proxy(name, str(body.get("listen") or "127.0.0.1:0"), str(upstream), False)
        if body.get("enabled", True):
            await self._start(p)
        self.proxies[name] = p
        return p

    async def update(self, name: str, body: Any) -> _Proxy:
        p = self._get(name)
        if not isinstance(body, dict):
            raise ApiError(400, "proxy: expected a JSON object")
        if "upstream" in body:
            _split_hostport(str(body["upstream"]), "upstream")
            p.upstream = str(body["upstream"])
        relisten = "listen" in body and str(body["listen"]) != p.listen
        if relisten:
            self._listen_addr(str(body["listen"]))
            await self._stop(p)
            p.listen = str(body["listen"])
        want = bool(body.get("enabled", p.enabled or relisten))
        if want and p.server is None:
            await self._start(p)
        elif not want and p.server is not None:
            await self._stop(p)
        return p

    async def delete(self, name: str) -> None:
        p = self._get(name)
        await self._stop(p)
        del self.proxies[name]

    async def reset(self) -> None:
        """Remove every toxic and re-enable every proxy (proxies stay)."""
        for p in self.proxies.values():
            p.toxics.clear()
            p.notify()
            if p.server is None:
                await self._start(p)

    async def populate(self, body: Any) -> list[_Proxy]:
        if not isinstance(body, list):
            raise ApiError(400, "populate: expected a JSON list of proxies")
        out = []
        for item in body:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ApiError(400, "populate: every entry needs a name")
            existing = self.proxies.get(item["name"])
            if existing is not None and (
                existing.upstream != item.get("upstream")
                or (
                    item.get("listen")
                    and self._listen_addr(str(item["listen"]))[1] != 0
                    and str(item["listen"]) != existing.listen
                )
            ):
                await self.delete(existing.name)
                existing = None
            out.append(existing if existing is not None else await self.create(item))
        return out

    def _get(self, name: str) -> _Proxy:
        p = self.proxies.get(name)
        if p is None:
            raise ApiError(404, f"proxy {name} not found")
        return p

    async def close(self) -> None:
        for p in list(self.proxies.values()):
            await self._stop(p)
        self.proxies.clear()

    # --- toxics ---------------------------------------------------------------------------------------

    def add_toxic(self, name: str, body: Any) -> Toxic:
        p = self._get(name)
        self._uid += 1
        t = _parse_toxic(body, self._uid, asyncio.get_running_loop().time())
        if t.name in p.toxics:
            raise ApiError(409, f"toxic {t.name} already exists on {name}")
        if len(p.toxics) >= MAX_TOXICS:
            raise ApiError(400, f"at most {MAX_TOXICS} toxics per proxy")
        p.toxics[t.name] = t
        p.notify()
        return t

    def update_toxic(self, name: str, toxic: str, body: Any) -> Toxic:
        p = self._get(name)
        t = p.toxics.get(toxic)
        if t is None:
            raise ApiError(404, f"toxic {toxic} not found on {name}")
        if not isinstance(body, dict):
            raise ApiError(400, "toxic: expected a JSON object")
        t.attributes.update(_attributes(t.type, body.get("attributes") or {}))
        if "toxicity" in body:
            tox = body["toxicity"]
            if not isinstance(tox, (int, float)) or not 0.0 <= float(tox) <= 1.0:
                raise ApiError(400, f"toxicity {tox!r}: expected a number in [0, 1]")
            t.toxicity = float(tox)
        p.notify()
        return t

    def remove_toxic(self, name: str, toxic: str) -> None:
        p = self._get(name)
        if p.toxics.pop(toxic, None) is None:
            raise ApiError(404, f"toxic {toxic} not found on {name}")
        p.notify()

    # --- data path ------------------------------------------------------------------------------------

    async def _open_upstream(self, p: _Proxy, client: _ClientSide) -> None:
        """Dial the upstream for an accepted client, then let data flow."""
        if client.transport is None:
            return
        if len(p.links) >= MAX_LINKS or p.server is None:
            client.transport.close()
            return
        host, port = _split_hostport(p.upstream, "upstream")
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(loop.create_connection(_Side, host, port), CONNECT_S)
        except (OSError, TimeoutError):
            client.transport.close()
            return
        if client.lost:
            if upstream.transport is not None:
                upstream.transport.close()
            return
        link = _Link(p, client, upstream)
        client.link = upstream.link = link
        p.links.add(link)
        link._spawn(self._monitor(link))
        client.transport.resume_reading()

    async def _monitor(self, link: _Link) -> None:
        """Fire ``timeout`` and ``reset_peer`` toxics on time, data or not."""
        loop = asyncio.get_running_loop()
        while not link.closed:
            changed = link.proxy.changed
            due: tuple[float, Toxic] | None = None
            for t in link.proxy.toxics.values():
                if t.type not in ("timeout", "reset_peer") or not link.active(t):
                    continue
                ms = t.attributes.get("timeout", 0)
                if t.type == "timeout" and ms == 0:
                    continue
                at = max(t.created, link.started) + ms / 1000.0
                if due is None or at < due[0]:
                    due = (at, t)
            wait = None if due is None else max(0.0, due[0] - loop.time())
            try:
                await asyncio.wait_for(changed.wait(), wait)
            except TimeoutError:
                if due is not None and due[1].name in link.proxy.toxics:
                    link.close(reset=due[1].type == "reset_peer")
                    return

    # --- API ------------------------------------------------------------------------------------------

    async def dispatch(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Route one API call. Returns (status, JSON-able payload or None)."""
        parts = [unquote(x) for x in path.strip("/").split("/")] if path.strip("/") else []
        match (method, parts):
            case ("GET", ["version"]):
                return 200, {"version": VERSION}
            case ("POST", ["reset"]):
                await self.reset()
                return 204, None
            case ("POST", ["populate"]):
                return 201, {"proxies": [p.to_json() for p in await self.populate(body)]}
            case ("GET", ["proxies"]):
                return 200, {n: p.to_json() for n, p in self.proxies.items()}
            case ("POST", ["proxies"]):
                return 201, (await self.create(body)).to_json()
            case ("GET", ["proxies", name]):
                return 200, self._get(name).to_json()
            case ("POST" | "PATCH", ["proxies", name]):
                return 200, (await self.update(name, body)).to_json()
            case ("DELETE", ["proxies", name]):
                await self.delete(name)
                return 204, None
            case ("GET", ["proxies", name, "toxics"]):
                return 200, [t.to_json() for t in self._get(name).toxics.values()]
            case ("POST", ["proxies", name, "toxics"]):
                return 200, self.add_toxic(name, body).to_json()
            case ("GET", ["proxies", name, "toxics", toxic]):
                t = self._get(name).toxics.get(toxic)
                if t is None:
                    raise ApiError(404, f"toxic {toxic} not found on {name}")
                return 200, t.to_json()
            case ("POST" | "PATCH", ["proxies", name, "toxics", toxic]):
                return 200, self.update_toxic(name, toxic, body).to_json()
            case ("DELETE", ["proxies", name, "toxics", toxic]):
                self.remove_toxic(name, toxic)
                return 204, None
        raise ApiError(
            404 if method in ("GET", "POST", "DELETE", "PATCH") else 405, f"no route {method} {path}"
        )

    async def handle_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve HTTP/1.1 API requests on one connection (keep-alive, bounded, timed out)."""
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), API_IDLE_S)
                if not line:
                    return
                try:
                    method, target, version = line.decode("latin-1").split()
                except ValueError:
                    return
                headers: dict[str, str] = {}
                for _ in range(100):
                    h = await asyncio.wait_for(reader.readline(), API_READ_S)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                status, payload = await self._answer(method, target, headers, reader)
                body = b"" if payload is None else json.dumps(payload).encode()
                head = (
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
                )
                writer.write(head.encode("latin-1") + body)
                await writer.drain()
                if not keep or status == 413:
                    return
        except (
            TimeoutError,
            ConnectionError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.CancelledError,  # the proxy stopping: asyncio would log the cancelled task's traceback
        ):
            return
        finally:
            writer.close()

    async def _answer(
        self, method: str, target: str, headers: dict[str, str], reader: asyncio.StreamReader
    ) -> tuple[int, Any]:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return 411, {"error": "send a Content-Length", "status": 411}
        try:
            n = int(headers.get("content-length", "0"))
        except ValueError:
            return 400, {"error": "bad Content-Length", "status": 400}
        if n > MAX_BODY or n < 0:
            return 413, {"error": f"body over {MAX_BODY} bytes", "status": 413}
        raw = await asyncio.wait_for(reader.readexactly(n), API_READ_S) if n else b""
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            return 400, {"error": "body is not JSON", "status": 400}
        try:
            return await self.dispatch(method.upper(), urlsplit(target).path, body)
        except ApiError as exc:
            return exc.status, {"error": exc.message, "status": exc.status}
        except Exception as exc:  # a bug must answer 500, not hang the client
            _log.exception("fault proxy API %s %s failed", method, target)
            return 500, {"error": f"{type(exc).__name__}: {exc}", "status": 500}


_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Payload Too Large",
    500: "Internal Server Error",
}


class FaultProxyServer:
    """Runs a :class:`FaultProxy` and its API on an event loop in a daemon thread.

    Args:
        host: API listen host (loopback by default).
        port: API port (0 = ephemeral).
        allow_remote: let proxies listen on non-loopback addresses.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False) -> None:
        self.host = host
        self.port = port
        self.proxy = FaultProxy(allow_remote=allow_remote)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """The API base URL (after :meth:`start`)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 5.0) -> str:
        """Start the loop thread and the API listener. Returns :attr:`url`.

        Raises:
            RuntimeError: already started, or the API did not come up within ``timeout_s``.
            OSError: the API port could not be bound.
        """
        if self._thread is not None:
            raise RuntimeError("fault proxy already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._open(), loop)
        try:
            fut.result(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self.proxy.handle_api, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.proxy.close()
        # API connections still open (keep-alive clients) and link tasks end here, not at loop teardown.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def call(self, fn: Callable[[FaultProxy], Any], timeout_s: float = 5.0) -> Any:
        """Run ``fn(proxy)`` on the loop thread (in-process inspection) and return its result."""
        if self._loop is None:
            raise RuntimeError("fault proxy not started")

        async def _run() -> Any:
            return fn(self.proxy)

        return asyncio.run_coroutine_threadsafe(_run(), self._loop).result(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close every proxy and the API, stop the loop and join the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout_s)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    def __enter__(self) -> FaultProxyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve(host: str, port: int, allow_remote: bool, ready: Callable[[int], None]) -> None:
    proxy = FaultProxy(allow_remote=allow_remote)
    server = await asyncio.start_server(proxy.handle_api, host, port)
    ready(int(server.sockets[0].getsockname()[1]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await proxy.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m chaos.faultproxy [--host H] [--port P] [--allow-remote]``; prints the URL, runs."""
    ap = argparse.ArgumentParser(prog="python -m chaos.faultproxy", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="API host (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8474, help="API port (default 8474, 0 = ephemeral)")
    ap.add_argument("--allow-remote", action="store_true", help="let proxies listen beyond loopback")
    args = ap.parse_args(argv)

    def ready(port: int) -> None:
        print(f"http://{args.host}:{port}", flush=True)

    asyncio.run(_serve(args.host, args.port, args.allow_remote, ready))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
