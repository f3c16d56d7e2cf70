"""Hub ingest: the HTTP routes devices upload sealed batches and attestations to.

Every request must carry an RFC 9421 signature by an enrolled, unrevoked device key, with a fresh
``created`` and an unused nonce (:mod:`sre_core.signing`); nonces are shared by every replica through
the hub database. Nothing is buffered before it is authenticated: the declared ``Content-Length`` is
checked against the limit and the signature over the headers (which covers ``Content-Digest``) is
verified first; only then is the body read, bounded by the declared length, and matched against the
signed digest. Refusals: 401 (unsigned, malformed, forged, stale, replayed, unknown device), 403
(revoked), 400 (content that is not a batch of that device, or an attestation whose predicate is not
the documented device state, see :mod:`hub.fleetdb`), 411 (no length), 413 (a body above
:data:`MAX_BODY_BYTES`, 64 MiB), 415 (content-encoded bodies), 503 with ``Retry-After`` (the hub-wide
decoding budget, shared by all requests of the process, stayed full). Batches are idempotent by id: a
second upload of the same id answers 200 "duplicate". Both answers carry ``receipt``, the root's
signature over the device and batch id with its online timestamp key (:mod:`sre_core.receipts`): the
only answer a device lets go of a batch for, since a tier in between could say "stored" and drop it.

Plug into the hub app with ``build_hub_app(repo, extra_routes=ingest_routes(repo / "fleet"))``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hub.fleetdb import DecodeBudget, DecodeBusyError, FleetDB
from hub.sites import SiteRegistry, relay_fresh, relay_target
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError, SreError
from sre_core.receipts import sign_receipt
from sre_core.signing import SignatureRefused, verify_request

__all__ = ["ATTEST_PATH", "BATCH_PATH", "MAX_BODY_BYTES", "ingest_routes"]

BATCH_PATH = "/v1/telemetry/batches/{batch_id}"
ATTEST_PATH = "/v1/telemetry/attestations/{att_id}"
MAX_BODY_BYTES = 64 * 1024 * 1024
_RETRY_AFTER_S = 30
_log = logging.getLogger(__name__)


class _TooLargeError(Exception):
    pass


class _NoLengthError(Exception):
    pass


class _EncodedError(Exception):
    pass


_DIGESTS: dict[str, Callable[[bytes], Any]] = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}


def declared_length(headers: Any, limit: int) -> int:
    """The body length a request declares. Raises _NoLengthError / _TooLargeError."""
    declared = str(headers.get("content-length") or "")
    if not declared.isdigit():
        raise _NoLengthError()
    if int(declared) > limit:
        raise _TooLargeError()
    return int(declared)


async def read_declared(request: Request, length: int) -> bytes:
    """Read exactly the declared body; more than declared is refused as too large."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > length:
            raise _TooLargeError()
        chunks.append(chunk)
    return b"".join(chunks)


def check_digest(content_digest: str | None, body: bytes) -> None:
    """Match the body against the (signed) ``Content-Digest`` header (RFC 9530).

    Raises:
        SignatureRefused: forged (no known algorithm, or a digest that does not match the body).
    """
    matched = False
    for item in (content_digest or "").split(","):
        alg, _, value = item.strip().partition("=")
        fn = _DIGESTS.get(alg.strip().lower())
        if fn is None:
            continue
        try:
            want = base64.b64decode(value.strip().strip(":"), validate=True)
        except ValueError:
            raise SignatureRefused("malformed", "Content-Digest is not base64") from None
        if fn(body).digest() != want:
            raise SignatureRefused("forged", "the body does not match the signed Content-Digest")
        matched = True
    if not matched:
        raise SignatureRefused("forged", "no sha-256/sha-512 Content-Digest covers the body")


def _refused(exc: SignatureRefused) -> JSONResponse:
    status = 403 if exc.reason == "revoked" else 401
    return JSONResponse({"refused": exc.reason, "detail": exc.detail}, status_code=status)


def ingest_routes(
    fleet_dir: Path,
    clock: Clock | None = None,
    window_s: float = 300.0,
    fleet: FleetDB | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    decode_budget: DecodeBudget | None = None,
) -> list[Route]:
    """Starlette routes for batch and attestation upload.

    Args:
        fleet_dir: ``<repo>/fleet`` (the store and lake come from ``<repo>/hub.toml``).
        clock: the hub clock for signature freshness.
        window_s: allowed skew of ``created``; nonces are remembered (in the database) twice this long.
        fleet: an existing FleetDB to share (default: one over ``fleet_dir``).
        max_body_bytes: the largest batch body accepted (413 above).
        decode_budget: decoded bytes all batch requests may hold at once (default: one
            :class:`~hub.fleetdb.DecodeBudget` of the per-batch cap for these routes).
    """
    budget = decode_budget or DecodeBudget()
    clk = clock or SystemClock()
    db = fleet or FleetDB(fleet_dir, clk)
    nonces = db.nonces(window_s)
    sites = SiteRegistry(db.store, clk)
    signers: dict[float, Any] = {}  # root.json mtime -> the receipt signer (reloaded on a rotation)

    def _receipt(device: str, batch_id: str) -> dict[str, str] | None:
        """The root's signed receipt for a batch it holds (sre_core.receipts), None without a key."""
        repo_dir = Path(fleet_dir).parent
        try:
            mtime = (repo_dir / "metadata" / "root.json").stat().st_mtime
        except OSError:
            return None
        if mtime not in signers:
            from hub.repository import HubRepository

            try:
                signers.clear()
                signers[mtime] = HubRepository(repo_dir, clk).receipt_signer()
            except SreError:
                return None
        signer = signers[mtime]
        return None if signer is None else sign_receipt(signer, device, batch_id)

    async def _authenticated_body(request: Request, limit: int) -> tuple[str, bytes]:
        """Verify the signed headers, then read and digest-check the body (see the module docstring)."""
        if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
            raise _EncodedError()
        length = declared_length(request.headers, limit)
        # forwarded by a regional hub (site token): verified over the URI the device signed, see hub.sites
        relay = await run_in_threadpool(relay_target, request.headers, str(request.url), sites)
        vr = await run_in_threadpool(
            verify_request,
            request.method,
            relay.uri if relay else str(request.url),
            [(k, v) for k, v in request.headers.items()],
            cast(bytes, None),  # headers only: the body is not read yet
            db.resolve_key,
            clk.now().timestamp(),
            relay.nonces if relay else nonces,
        )
        if relay:
            relay_fresh(vr.created, clk.now().timestamp(), window_s)
        body = await read_declared(request, length)
        check_digest(request.headers.get("content-digest"), body)
        return vr.key_id, body

    async def batch(request: Request) -> JSONResponse:
        batch_id = request.path_params["batch_id"]
        try:
            device, body = await _authenticated_body(request, max_body_bytes)
            res = await run_in_threadpool(db.land_batch, device, batch_id, body, budget)
        except _TooLargeError:
            return JSONResponse({"error": "batch too large", "limit": max_body_bytes}, status_code=413)
        except _NoLengthError:
            return JSONResponse({"error": "send Content-Length"}, status_code=411)
        except _EncodedError:
            return JSONResponse({"error": "content-encoded bodies are not accepted"}, status_code=415)
        except SignatureRefused as exc:
            _log.warning("refused batch %s: %s", batch_id[:16], exc)
            return _refused(exc)
        except InputError as exc:
            return JSONResponse(exc.to_dict(), status_code=400)
        except DecodeBusyError as exc:
            _log.warning("busy, batch %s deferred: %s", batch_id[:16], exc)
            return JSONResponse(
                {**exc.to_dict(), "retry_after_s": _RETRY_AFTER_S},
                status_code=503,
                headers={"Retry-After": str(_RETRY_AFTER_S)},
            )
        receipt = await run_in_threadpool(_receipt, device, res.batch_id)
        return JSONResponse(
            {"status": res.status, "batch_id": res.batch_id, "table": res.table, "rows": res.rows,
             "receipt": receipt}
        )  # fmt: skip

    async def attestation(request: Request) -> JSONResponse:
        try:
            device, body = await _authenticated_body(request, 1024 * 1024)
            predicate = await run_in_threadpool(db.land_attestation, device, body)
        except _TooLargeError:
            return JSONResponse({"error": "attestation too large"}, status_code=413)
        except _NoLengthError:
            return JSONResponse({"error": "send Content-Length"}, status_code=411)
        except _EncodedError:
            return JSONResponse({"error": "content-encoded bodies are not accepted"}, status_code=415)
        except SignatureRefused as exc:
            _log.warning("refused attestation: %s", exc)
            return _refused(exc)
        except InputError as exc:
            return JSONResponse(exc.to_dict(), status_code=400)
        return JSONResponse({"status": "verified", "device_id": device, "time": predicate.get("time")})

    return [
        Route(BATCH_PATH, batch, methods=["POST"]),
        Route(ATTEST_PATH, attestation, methods=["POST"]),
    ]
