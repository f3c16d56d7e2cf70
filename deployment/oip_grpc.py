"""The gRPC half of the Open Inference Protocol (``inference.GRPCInferenceService``), on grpcio.

The service and message classes are the protocol's published stubs as Triton's client package ships
them (``tritonclient.grpc.service_pb2``; install the ``grpc`` extra). Every inference goes through the
same :class:`~deployment.router.Router` as the REST server, so canary routing, mirroring, per-version
evidence and telemetry apply to both; input validation is the REST server's
(:func:`deployment.oip.decode_inputs`), so both reject the same requests with the same messages.

Offered: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (typed
``contents`` or ``raw_input_contents``; outputs always as ``raw_output_contents``), ModelConfig,
ModelStatistics, RepositoryIndex. Everything else (streaming, repository control, shared memory, trace
and log settings) answers UNIMPLEMENTED. A request pinned to the version under canary is refused with
PERMISSION_DENIED unless the policy allows it; pinned requests are never canary evidence.
"""

from __future__ import annotations

import struct
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from deployment.oip import (
    DATATYPES,
    DEFAULT_MAX_BODY,
    EXTENSIONS,
    ProtocolError,
    _loaded_versions,
    _session,
    decode_inputs,
    model_config_of,
    repository_index_of,
    statistics_of,
)
from deployment.router import InferenceError, PinRefusedError, Router
from deployment.serving import ModelRepository

__all__ = ["GrpcServer", "InferenceServicer"]

_V2_OF_KIND = {dt: name for name, dt in DATATYPES.items()}
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 403: grpc.StatusCode.PERMISSION_DENIED}
_STATUS |= {404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}


def _param(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _raw_output(arr: np.ndarray) -> tuple[str, bytes]:
    """(v2 datatype, little-endian bytes; BYTES as 4-byte length-prefixed elements)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.kind in "OUS":
        parts = (v if isinstance(v, bytes) else str(v).encode() for v in arr.ravel().tolist())
        return "BYTES", b"".join(struct.pack("<I", len(e)) + e for e in parts)
    datatype = _V2_OF_KIND.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
    if datatype is None:
        raise ProtocolError(f"an output has a type ({arr.dtype}) the protocol cannot carry", 500)
    return datatype, arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """GRPCInferenceService over a :class:`ModelRepository`."""

    def __init__(self, repository: ModelRepository, server_name: str = "sre-agent", version: str = "0"):
        self.repository = repository
        self.server_name = server_name
        self.version = version

    # -- helpers --------------------------------------------------------------------------------
    def _router(self, name: str, version: str, context: Any) -> Router:
        router = self.repository.get(name)
        if router is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown model {name!r} (served: {self.repository.names()})"
            )
            raise LookupError(name)  # context.abort raised already; never reached
        if version and version not in _loaded_versions(router):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no loaded version {version!r}")
        return router

    # -- health and metadata --------------------------------------------------------------------
    def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (protocol names)
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=bool(self.repository.names()))

    def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        router = self.repository.get(request.name)
        ok = router is not None and (not request.version or request.version in _loaded_versions(router))
        return pb.ModelReadyResponse(ready=ok)

    def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name=self.server_name, version=self.version, extensions=EXTENSIONS)

    def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        router = self._router(request.name, request.version, context)
        active = router.routing.active

        def meta(t: Any) -> Any:
            return pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=list(t.shape)
            )

        return pb.ModelMetadataResponse(
            name=router.name,
            versions=_loaded_versions(router),
            platform="onnxruntime_onnx",
            inputs=[meta(t) for t in active.inputs],
            outputs=[meta(t) for t in active.outputs],
        )

    def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        router = self._router(request.name, request.version, context)
        cfg = model_config_of(router)
        cfg.pop("version_policy", None)  # integer versions only in the proto; ours are strings
        return pb.ModelConfigResponse(config=json_format.ParseDict(cfg, pb.ModelConfigResponse().config))

    def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        if request.name:
            routers = [self._router(request.name, request.version, context)]
        else:
            routers = [r for r in (self.repository.get(n) for n in self.repository.names()) if r]
        stats = [s for r in routers for s in statistics_of(r)]
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        models = repository_index_of(self.repository)
        return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

    # -- inference ------------------------------------------------------------------------------
    def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            return self._infer(request)
        except ProtocolError as exc:
            context.abort(_STATUS.get(exc.status, grpc.StatusCode.INTERNAL), str(exc))
        except PinRefusedError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except InferenceError as exc:
            context.abort(grpc.StatusCode.INTERNAL, exc.message)
        except LookupError as exc:  # the pinned version was unloaded meanwhile
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        raise AssertionError("unreachable: context.abort raises")

    def _infer(self, request: Any) -> Any:
        router = self.repository.get(request.model_name)
        if router is None:
            raise ProtocolError(
                f"unknown model {request.model_name!r} (served: {self.repository.names()})", 404
            )
        pin = request.model_version or None
        model = _session(router, pin)
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        items: list[dict[str, Any]] = []
        for i, t in enumerate(request.inputs):
            item: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            if raw:
                item["parameters"] = {"binary_data_size": len(raw[i])}
            else:
                field = _CONTENTS.get(t.datatype)
                if field is None:
                    raise ProtocolError(f"input {t.name!r}: unsupported datatype {t.datatype!r}")
                values = list(getattr(t.contents, field))
                item["data"] = (
                    [v.decode("utf-8", "replace") for v in values] if t.datatype == "BYTES" else values
                )
            items.append(item)
        feeds = decode_inputs(items, memoryview(b"".join(raw)), model)
        answer = router.infer(feeds, pin)
        names = [o.name for o in request.outputs] or list(answer.outputs)
        response = pb.ModelInferResponse(model_name=router.name, model_version=answer.version, id=request.id)
        for name in names:
            arr = answer.outputs.get(name)
            if arr is None:
                raise ProtocolError(
                    f"model {router.name} has no output {name!r} (outputs: {sorted(answer.outputs)})"
                )
            datatype, data = _raw_output(arr)
            response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
            response.raw_output_contents.append(data)
        return response


class GrpcServer:
    """The gRPC front end on its own port; ``port=0`` picks a free one (read :attr:`port` after start).

    Args:
        repository: the served models (the REST server's, so both share the routers).
        host/port: where to listen. max_message_bytes: request and response size limit.
        workers: threads answering calls (ONNX Runtime releases the GIL while it runs).
    """

    def __init__(
        self,
        repository: ModelRepository,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = DEFAULT_MAX_BODY,
        workers: int = 4,
    ) -> None:
        self.repository = repository
        self.host = host
        self.port = port
        self._server: Any = None
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._workers = workers

    def start(self) -> GrpcServer:
        """Bind and serve. Raises RuntimeError when the address cannot be bound."""
        if self._server is not None:
            raise RuntimeError("the gRPC server is already started")
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._workers), options=self._options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.repository), server)
        try:
            bound = server.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {self.host}:{self.port} for gRPC: {exc}") from exc
        if not bound:
            raise RuntimeError(f"cannot listen on {self.host}:{self.port} for gRPC")
        self.port = bound
        server.start()
        self._server = server
        return self

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        """Finish in-flight calls (at most ``grace_s``), then close."""
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1)
            self._server = None

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
