"""Hub ingest: the HTTP routes devices upload sealed batches and attestations to.

Every request must carry an RFC 9421 signature by an enrolled, unrevoked device key, with a fresh
``created`` and an unused nonce (:mod:`sre_core.signing`). Refusals: 401 (unsigned, malformed, forged,
stale, replayed, unknown device), 403 (revoked), 400 (content that is not a batch of that device),
413 (too large). Batches are idempotent by id: a second upload of the same id answers 200 "duplicate".

Plug into the hub app with ``build_hub_app(repo, extra_routes=ingest_routes(repo / "fleet"))``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hub.fleetdb import FleetDB
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError
from sre_core.signing import NonceCache, SignatureRefused, verify_request

__all__ = ["ATTEST_PATH", "BATCH_PATH", "MAX_BODY_BYTES", "ingest_routes"]

BATCH_PATH = "/v1/telemetry/batches/{batch_id}"
ATTEST_PATH = "/v1/telemetry/attestations/{att_id}"
MAX_BODY_BYTES = 64 * 1024 * 1024
_log = logging.getLogger(__name__)


class _TooLargeError(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLargeError()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLargeError()
        chunks.append(chunk)
    return b"".join(chunks)


def _refused(exc: SignatureRefused) -> JSONResponse:
    status = 403 if exc.reason == "revoked" else 401
    return JSONResponse({"refused": exc.reason, "detail": exc.detail}, status_code=status)


def ingest_routes(
    fleet_dir: Path,
    clock: Clock | None = None,
    window_s: float = 300.0,
    fleet: FleetDB | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> list[Route]:
    """Starlette routes for batch and attestation upload.

    Args:
        fleet_dir: where devices.json and the lake live (normally ``<repo>/fleet``).
        clock: the hub clock for signature freshness.
        window_s: allowed skew of ``created``; nonces are remembered this long.
        fleet: an existing FleetDB to share (default: one over ``fleet_dir``).
    """
    clk = clock or SystemClock()
    db = fleet or FleetDB(fleet_dir, clk)
    nonces = NonceCache(window_s)

    async def _verified(request: Request, body: bytes) -> str:
        vr = await run_in_threadpool(
            verify_request,
            request.method,
            str(request.url),
            [(k, v) for k, v in request.headers.items()],
            body,
            db.resolve_key,
            clk.now().timestamp(),
            nonces,
        )
        return vr.key_id

    async def batch(request: Request) -> JSONResponse:
        batch_id = request.path_params["batch_id"]
        try:
            body = await _read_body(request, max_body_bytes)
            device = await _verified(request, body)
            res = await run_in_threadpool(db.land_batch, device, batch_id, body)
        except _TooLargeError:
            return JSONResponse({"error": "batch too large", "limit": max_body_bytes}, status_code=413)
        except SignatureRefused as exc:
            _log.warning("refused batch %s: %s", batch_id[:16], exc)
            return _refused(exc)
        except InputError as exc:
            return JSONResponse(exc.to_dict(), status_code=400)
        return JSONResponse(
            {"status": res.status, "batch_id": res.batch_id, "table": res.table, "rows": res.rows}
        )

    async def attestation(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, 1024 * 1024)
            device = await _verified(request, body)
            predicate = await run_in_threadpool(db.land_attestation, device, body)
        except _TooLargeError:
            return JSONResponse({"error": "attestation too large"}, status_code=413)
        except SignatureRefused as exc:
            _log.warning("refused attestation: %s", exc)
            return _refused(exc)
        return JSONResponse({"status": "verified", "device_id": device, "time": predicate.get("time")})

    return [
        Route(BATCH_PATH, batch, methods=["POST"]),
        Route(ATTEST_PATH, attestation, methods=["POST"]),
    ]
