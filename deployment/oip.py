"""The Open Inference Protocol (KServe "v2", as Triton speaks it) over HTTP, on starlette.

Endpoints: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{v}]`` (metadata), ``.../ready`` and ``POST .../infer`` with JSON tensors
and the binary tensor data extension (``Inference-Header-Content-Length``: a JSON header followed by
raw little-endian tensor bytes), so Triton and KServe clients (``tritonclient.http``) work unchanged.

Each inference goes through the model's :class:`~deployment.router.Router`, so canary routing, mirroring
and per-version evidence apply to every request; the response's ``model_version`` names the version that
answered. Without a version in the path the router picks; with one, that loaded version answers
(never counted as canary evidence; pinning the version under canary is refused with 403 unless the
policy allows it). Bounded: request bodies above ``max_body_bytes`` are refused before they are read in
full, and a body that stalls for ``body_timeout_s`` is answered 408 (uvicorn closes idle keep-alive
connections after its ``timeout_keep_alive``).

Triton extensions: model configuration (``GET /v2/models/{name}/config``), repository index
(``POST /v2/repository/index``) and statistics (``GET /v2/models[/{name}]/stats``); repository control
(load/unload) is not offered and answers a JSON error. Every error, 404s included, is a JSON body
``{"error": ...}``. Responses are strict JSON: an output holding NaN or infinity cannot be sent as JSON
and is refused with advice to ask for binary output. ``BYTES`` tensors are supported in JSON (strings)
and binary form (4-byte little-endian length prefixes).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deployment.router import InferenceError, PinRefusedError, Router
from deployment.serving import ModelRepository
from deployment.sessions import ModelSession

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "OipApp",
    "ProtocolError",
    "create_app",
    "decode_inputs",
    "decode_request",
    "encode_response",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
DEFAULT_MAX_BODY = 64 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_V2_OF_KIND = {dt: name for name, dt in DATATYPES.items()}


class ProtocolError(Exception):
    """A malformed or unsupported request; answered with HTTP ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _shape(raw: Any, what: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise ProtocolError(f"{what}: 'shape' must be a list of non-negative integers")
    return tuple(raw)


def decode_request(
    body: bytes, header_length: int | None, model: ModelSession
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse an infer request into input arrays (validated against the model) and the request JSON.

    Raises:
        ProtocolError: malformed JSON, unknown input, wrong datatype or shape, short binary data.
    """
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {header_length} does not fit a {len(body)}-byte body")
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request is not valid JSON: {exc}") from exc
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    return decode_inputs(req["inputs"], binary, model), req


def decode_inputs(items: list[Any], binary: memoryview, model: ModelSession) -> dict[str, np.ndarray]:
    """Input arrays from v2 input entries (JSON ``data`` or ``binary_data_size`` slices of ``binary``),
    validated against the model. Shared by the REST and gRPC front ends.

    Raises:
        ProtocolError: unknown input, wrong datatype or shape, short or left-over binary data.
    """
    expected = {i.name: i for i in model.inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("each input needs a 'name'")
        name = item["name"]
        spec = expected.get(name)
        if spec is None:
            raise ProtocolError(f"model {model.name} has no input {name!r} (inputs: {sorted(expected)})")
        if name in feeds:
            raise ProtocolError(f"input {name!r} given twice")
        datatype = item.get("datatype")
        dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
        if dtype is None and datatype != "BYTES":
            raise ProtocolError(f"input {name!r}: unsupported datatype {datatype!r}")
        if datatype != spec.datatype:
            raise ProtocolError(
                f"input {name!r}: datatype {datatype} given, the model expects {spec.datatype}"
            )
        shape = _shape(item.get("shape"), f"input {name!r}")
        if len(shape) != len(spec.shape) or any(
            e not in (-1, g) for e, g in zip(spec.shape, shape, strict=True)
        ):
            raise ProtocolError(
                f"input {name!r}: shape {list(shape)} does not fit the model's {list(spec.shape)}"
            )
        count = math.prod(shape)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if dtype is None:  # BYTES
            if size is not None:
                if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                    raise ProtocolError(f"input {name!r}: the body holds fewer binary bytes than declared")
                arr = _bytes_from_binary(binary[offset : offset + size], count, name).reshape(shape)
                offset += size
            else:
                arr = _bytes_from_json(item.get("data"), count, name).reshape(shape)
            feeds[name] = arr
            continue
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise ProtocolError(
                    f"input {name!r}: binary_data_size {size} != {count} x {dtype.itemsize} bytes"
                )
            if offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: the body holds fewer binary bytes than declared")
            arr = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            data = item.get("data")
            if data is None:
                raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
            try:
                arr = np.asarray(data, dtype=dtype)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"input {name!r}: data is not {datatype}: {exc}") from exc
            if arr.size != count:
                raise ProtocolError(f"input {name!r}: {arr.size} values for shape {list(shape)}")
            arr = arr.reshape(shape)
        feeds[name] = arr
    missing = sorted(set(expected) - set(feeds))
    if missing:
        raise ProtocolError(f"missing inputs: {missing}")
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} binary bytes left over after the last input")
    return feeds


def _bytes_from_json(data: Any, count: int, name: str) -> np.ndarray:
    flat: list[Any] = []

    def walk(v: Any) -> None:
        if isinstance(v, list):
            for e in v:
                walk(e)
        elif isinstance(v, str):
            flat.append(v)
        else:
            raise ProtocolError(f"input {name!r}: BYTES data must be strings, got {type(v).__name__}")

    if data is None:
        raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
    walk(data)
    if len(flat) != count:
        raise ProtocolError(f"input {name!r}: {len(flat)} values for {count} elements")
    return np.array(flat, dtype=object)


def _bytes_from_binary(raw: memoryview, count: int, name: str) -> np.ndarray:
    out: list[str] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: BYTES element {len(out)} has no length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(f"input {name!r}: BYTES element {len(out)} runs past its data")
        try:
            out.append(bytes(raw[pos : pos + n]).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"input {name!r}: BYTES element {len(out)} is not UTF-8 text") from exc
        pos += n
    if pos != len(raw):
        raise ProtocolError(f"input {name!r}: {len(raw) - pos} bytes left over after {count} elements")
    return np.array(out, dtype=object)


def encode_response(
    req: Mapping[str, Any], outputs: Mapping[str, np.ndarray], model_name: str, version: str
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when binary tensor data follows it.

    Raises:
        ProtocolError: an unknown output was requested.
    """
    params = req.get("parameters") or {}
    binary_default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    wanted: list[tuple[str, bool]]
    asked = req.get("outputs")
    if asked:
        if not isinstance(asked, list):
            raise ProtocolError("'outputs' must be a list")
        wanted = []
        for o in asked:
            if not isinstance(o, dict) or o.get("name") not in outputs:
                name = o.get("name") if isinstance(o, dict) else o
                raise ProtocolError(f"model {model_name} has no output {name!r} (outputs: {sorted(outputs)})")
            op = o.get("parameters") or {}
            if isinstance(op, dict) and op.get("classification"):
                raise ProtocolError("the classification extension is not supported")
            binary = op.get("binary_data", binary_default) if isinstance(op, dict) else binary_default
            wanted.append((o["name"], bool(binary)))
    else:
        wanted = [(name, binary_default) for name in outputs]
    items = []
    blobs = []
    entry: dict[str, Any]
    for name, binary in wanted:
        arr = np.ascontiguousarray(outputs[name])
        if arr.dtype.kind in "OUS":  # strings (ONNX tensor(string)): the BYTES datatype
            entry = {"name": name, "datatype": "BYTES", "shape": list(arr.shape)}
            values = [v.decode() if isinstance(v, bytes) else str(v) for v in arr.ravel().tolist()]
            if binary:
                raw = b"".join(struct.pack("<I", len(e)) + e for e in (v.encode() for v in values))
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                entry["data"] = values
            items.append(entry)
            continue
        datatype = _V2_OF_KIND.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
        if datatype is None:
            raise ProtocolError(f"output {name!r} has a type ({arr.dtype}) the protocol cannot carry", 500)
        entry = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ProtocolError(
                    f"output {name!r} holds NaN or infinity, which JSON cannot carry; ask for it as "
                    "binary data (parameters: binary_data: true)",
                    500,
                )
            entry["data"] = arr.ravel().tolist()
        items.append(entry)
    resp: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": items}
    if "id" in req:
        resp["id"] = req["id"]
    head = json.dumps(resp, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def create_app(
    repository: ModelRepository,
    *,
    server_name: str = "sre-agent",
    server_version: str = "0",
    max_body_bytes: int = DEFAULT_MAX_BODY,
    offload: bool = True,
    offload_above_s: float = 1e-3,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> OipApp:
    """The v2 inference app serving every model in ``repository``.

    Args:
        offload: run inference of slow models in the thread pool: ONNX Runtime releases the GIL, so
            requests then run in parallel on every core while the event loop parses the next ones.
        offload_above_s: "slow" means a typical ``session.run`` of at least this long; below it the
            thread hop costs more than it frees (on a 2-core box shared with the client, a 0.13 ms
            model served 0.88x as fast offloaded as inline).
        body_timeout_s: a request body that stalls this long between chunks is answered 408.
    """

    def router_for(request: Request) -> Router:
        name = request.path_params["name"]
        router = repository.get(name)
        if router is None:
            raise ProtocolError(f"unknown model {name!r} (served: {repository.names()})", 404)
        version = request.path_params.get("version")
        if version is not None and version not in _loaded_versions(router):
            raise ProtocolError(f"model {name!r} has no loaded version {version!r}", 404)
        return router

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": server_name, "version": server_version, "extensions": EXTENSIONS})

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        ok = bool(repository.names())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def model_metadata(request: Request) -> Response:
        try:
            router = router_for(request)
        except ProtocolError as exc:
            return _error(str(exc), exc.status)
        r = router.routing
        active = r.active
        return JSONResponse(
            {
                "name": router.name,
                "versions": _loaded_versions(router),
                "platform": "onnxruntime_onnx",
                "inputs": [i.to_v2() for i in active.inputs],
                "outputs": [o.to_v2() for o in active.outputs],
                "parameters": {
                    "active_version": active.version,
                    "canary_version": r.canary.version if r.canary else None,
                    "canary_weight": r.weight,
                },
            }
        )

    async def model_ready(request: Request) -> Response:
        try:
            router_for(request)
        except ProtocolError as exc:
            return _error(str(exc), exc.status)
        return JSONResponse({"name": request.path_params["name"], "ready": True})

    async def model_config(request: Request) -> Response:
        try:
            router = router_for(request)
        except ProtocolError as exc:
            return _error(str(exc), exc.status)
        return JSONResponse(model_config_of(router))

    async def repository_index(request: Request) -> Response:
        return JSONResponse(repository_index_of(repository))

    async def repository_control(request: Request) -> Response:
        return _error("model repository control (load/unload) is not offered: the agent manages models", 400)

    async def statistics(request: Request) -> Response:
        name = request.path_params.get("name")
        try:
            routers = [router_for(request)] if name is not None else _all_routers(repository)
        except ProtocolError as exc:
            return _error(str(exc), exc.status)
        return JSONResponse({"model_stats": [s for r in routers for s in statistics_of(r)]})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return _error(f"{request.method} {request.url.path}: {detail}", status)

    routes = [
        Route("/v2/models/stats", statistics),  # before /v2/models/{name}, which would take it
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/config", model_config),
        Route("/v2/models/{name}/versions/{version}/config", model_config),
        Route("/v2/models/{name}/stats", statistics),
        Route("/v2/models/{name}/versions/{version}/stats", statistics),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_control, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_control, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    return OipApp(repository, app, max_body_bytes, offload_above_s if offload else None, body_timeout_s)


EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "statistics"]
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}  # fmt: skip


def model_config_of(router: Router) -> dict[str, Any]:
    """Triton's model configuration (JSON form) for the active version."""
    active = router.routing.active

    def io(t: Any) -> dict[str, Any]:
        return {"name": t.name, "data_type": _TRITON_TYPES.get(t.datatype, t.datatype), "dims": list(t.shape)}

    return {
        "name": router.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 0,
        "input": [io(t) for t in active.inputs],
        "output": [io(t) for t in active.outputs],
        "version_policy": {"specific": {"versions": _loaded_versions(router)}},
    }


def repository_index_of(repository: ModelRepository) -> list[dict[str, Any]]:
    """Triton's repository index: every served model's loaded versions, all READY."""
    return [
        {"name": r.name, "version": v, "state": "READY", "reason": ""}
        for r in _all_routers(repository)
        for v in _loaded_versions(r)
    ]


def statistics_of(router: Router) -> list[dict[str, Any]]:
    """Triton's per-version inference statistics from the router's counters (times from the
    latency histogram's bucket midpoints: approximate to 2.5 %)."""
    snap = router.snapshot()
    out = []
    for version in _loaded_versions(router):
        st = snap.served(version)
        ok = st.requests - st.errors
        ns = 0.0
        for i, c in enumerate(st.latency.counts):
            if c:
                lo, hi = st.latency.lower_edge(i), st.latency.upper_edge(i)
                ns += c * (lo if math.isinf(hi) else (lo + hi) / 2) * 1e9
        out.append(
            {
                "name": router.name,
                "version": version,
                "inference_count": ok,
                "execution_count": st.requests,
                "inference_stats": {
                    "success": {"count": ok, "ns": int(ns)},
                    "fail": {"count": st.errors, "ns": 0},
                },
            }
        )
    return out


def _all_routers(repository: ModelRepository) -> list[Router]:
    return [r for r in (repository.get(n) for n in repository.names()) if r is not None]


def _infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version) when ``path`` is an infer endpoint, else None."""
    parts = path.split("/")
    if len(parts) == 5 and parts[1] == "v2" and parts[2] == "models" and parts[4] == "infer" and parts[3]:
        return parts[3], None
    if (
        len(parts) == 7
        and parts[1] == "v2"
        and parts[2] == "models"
        and parts[4] == "versions"
        and parts[6] == "infer"
        and parts[3]
        and parts[5]
    ):
        return parts[3], parts[5]
    return None


class _DisconnectedError(Exception):
    """The client went away before sending its whole body."""


class OipApp:
    """The ASGI app: ``POST .../infer`` handled straight on the ASGI messages (the hot path skips
    starlette's request, routing and response objects), everything else by the starlette app."""

    def __init__(
        self,
        repository: ModelRepository,
        other: Starlette,
        max_body_bytes: int,
        offload_above_s: float | None,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.repository = repository
        self.other = other
        self.max_body_bytes = max_body_bytes
        self.offload_above_s = offload_above_s
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = _infer_target(scope["path"])
            if target is not None:
                await self._infer(scope, receive, send, *target)
                return
        await self.other(scope, receive, send)

    def _router(self, name: str) -> Router:
        router = self.repository.get(name)
        if router is None:
            raise ProtocolError(f"unknown model {name!r} (served: {self.repository.names()})", 404)
        return router

    async def _infer(self, scope: Any, receive: Any, send: Any, name: str, pin: str | None) -> None:
        headers: dict[bytes, bytes] = dict(scope["headers"])
        extra: list[tuple[bytes, bytes]] = []
        media = b"application/json"
        try:
            router = self._router(name)
            model = _session(router, pin)
            body = await _receive_body(receive, headers, self.max_body_bytes, self.body_timeout_s)
            raw_len = headers.get(HEADER_LENGTH.lower().encode())
            try:
                header_length = int(raw_len) if raw_len is not None else None
            except ValueError:
                raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {raw_len!r}") from None
            feeds, req = decode_request(body, header_length, model)
            if self.offload_above_s is not None and router.typical_s >= self.offload_above_s:
                answer = await run_in_threadpool(router.infer, feeds, pin)
            else:
                answer = router.infer(feeds, pin)
            content, head_len = encode_response(req, answer.outputs, router.name, answer.version)
            status = 200
            if head_len is not None:
                media = b"application/octet-stream"
                extra.append((HEADER_LENGTH.lower().encode(), str(head_len).encode()))
        except _DisconnectedError:
            return
        except ProtocolError as exc:
            status, content = exc.status, json.dumps({"error": str(exc)}).encode()
        except InferenceError as exc:
            status, content = 500, json.dumps({"error": exc.message}).encode()
        except PinRefusedError as exc:
            status, content = 403, json.dumps({"error": str(exc)}).encode()
        except LookupError as exc:  # the pinned version was unloaded meanwhile
            status, content = 404, json.dumps({"error": str(exc)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", media),
                    (b"content-length", str(len(content)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})


def _loaded_versions(router: Router) -> list[str]:
    """Versions a request may name: the canary only where the policy allows pinning it."""
    r = router.routing
    canary = r.canary if r.allow_pin else None
    return [s.version for s in (r.active, canary, r.standby) if s is not None]


def _session(router: Router, version: str | None) -> ModelSession:
    r = router.routing
    if version is None:
        return r.active
    if r.canary is not None and r.canary.version == version and not r.allow_pin:
        raise ProtocolError(
            f"model {router.name!r} version {version!r} is being canaried; requests may not pin it", 403
        )
    for s in (r.active, r.canary, r.standby):
        if s is not None and s.version == version:
            return s
    raise ProtocolError(f"model {router.name!r} has no loaded version {version!r}", 404)


async def _receive_body(
    receive: Any, headers: Mapping[bytes, bytes], limit: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S
) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"request body of {declared.decode()} bytes exceeds the {limit}-byte limit", 413)
    chunks = []
    size = 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except TimeoutError:
            raise ProtocolError(f"the request body stalled for {timeout_s:g} s", 408) from None
        if message["type"] == "http.disconnect":
            raise _DisconnectedError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"request body exceeds the {limit}-byte limit", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get(b"content-encoding", b"").decode("latin-1").lower()
    if encoding in ("gzip", "deflate"):
        try:
            d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
            body = d.decompress(body, limit + 1)
        except (zlib.error, gzip.BadGzipFile) as exc:
            raise ProtocolError(f"the {encoding} body does not decompress: {exc}") from exc
        if len(body) > limit or d.unconsumed_tail:
            raise ProtocolError(f"the decompressed body exceeds the {limit}-byte limit", 413)
    elif encoding not in ("", "identity"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r}", 415)
    return body
