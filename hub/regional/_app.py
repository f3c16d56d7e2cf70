"""The regional hub's ASGI app: the same routes, cache headers and answers as the root hub.

Routes: ``GET/HEAD /metadata/{name}`` (the verified mirror), ``GET/HEAD /targets/{path}`` (fetched on
demand when signed and not yet held), ``GET /healthz``, ``GET /v1/regional/status``; device uploads on
the root's paths (``POST`` :data:`hub.ingest.BATCH_PATH`, :data:`hub.ingest.ATTEST_PATH`,
:data:`deployment.rollout.REPORT_PATH`): verified against the mirrored roster (signature, window,
nonce), the body digest-checked, stored durably, then answered 200 ``queued`` (or ``duplicate``); a
batch already forwarded is answered ``duplicate`` with the root's signed receipt, which alone lets the
device drop it (:mod:`sre_core.receipts`);
``GET /v1/fleet/status`` (root operator token): the site's devices from the reports held here;
``GET /v1/devices/{id}/approvals`` (device-signed): relayed to the root, cached for when it is down.

Refusals as at the root: 401 (unsigned, forged, stale, replayed, unknown device), 403 (revoked), 400
(a batch whose id is not its content hash, a report of another device), 411, 413, 415; and 503 with
``Retry-After`` while no roster has been mirrored yet or the spool is at its byte budget (the device
keeps its backlog or tries the next hub).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, cast

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from deployment.rollout import REPORT_PATH
from hub.approvals_api import APPROVALS_PATH, MAX_IDS, parse_ids
from hub.http import FileServer, repository_routes, target_cache_control
from hub.ingest import ATTEST_PATH, BATCH_PATH, MAX_BODY_BYTES
from hub.regional._hub import RegionalHub
from hub.regional._relay import FORWARDED_HEADERS, SpoolFullError, SpoolItem
from sre_core.signing import NonceCache, SignatureRefused, verify_request

_BATCH_RE = re.compile(r"^[0-9a-f]{40}$")
_LIMITS = {"batch": MAX_BODY_BYTES, "attestation": 1024 * 1024, "report": 256 * 1024}
_RETRY_AFTER_S = 60


class _RefusalError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(str(body))
        self.status = status
        self.body = body


def _digest_matches(content_digest: str | None, body: bytes) -> bool:
    """The body against the (signed) ``Content-Digest`` (sha-256 or sha-512, RFC 9530)."""
    matched = False
    for item in (content_digest or "").split(","):
        alg, _, value = item.strip().partition("=")
        fn = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}.get(alg.strip().lower())
        if fn is None:
            continue
        try:
            want = base64.b64decode(value.strip().strip(":"), validate=True)
        except ValueError:
            return False
        if fn(body).digest() != want:
            return False
        matched = True
    return matched


__all__ = ["build_regional_app"]


def build_regional_app(hub: RegionalHub) -> Starlette:
    """A Starlette app serving ``hub``'s mirror (and, later, its relay routes)."""
    mirror = hub.mirror
    targets = FileServer(mirror.targets_dir, lambda rel, path: target_cache_control(rel))

    async def get_target(request: Request) -> Response:
        rel = request.path_params["path"]
        if (mirror.targets_dir / rel).resolve().is_relative_to(mirror.targets_dir.resolve()) and not (
            mirror.targets_dir / rel
        ).is_file():
            await run_in_threadpool(mirror.ensure_target, rel)
        return await run_in_threadpool(targets.respond, request, rel)

    async def healthz(request: Request) -> JSONResponse:
        ok = (mirror.metadata_dir / "timestamp.json").is_file()
        return JSONResponse({"ok": ok, "site": hub.config.site}, status_code=200 if ok else 503)

    async def status(request: Request) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(hub.status))

    relay = hub.relay
    nonces = NonceCache(hub.config.window_s)

    async def _verified(request: Request, kind: str) -> SpoolItem:
        """Authenticate (headers first), read the bounded body, check it, as the root does."""
        if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
            raise _RefusalError(415, {"error": "content-encoded bodies are not accepted"})
        declared = str(request.headers.get("content-length") or "")
        if not declared.isdigit():
            raise _RefusalError(411, {"error": "send Content-Length"})
        if int(declared) > _LIMITS[kind]:
            raise _RefusalError(413, {"error": f"{kind} too large", "limit": _LIMITS[kind]})
        if not relay.roster_ready():
            raise _RefusalError(503, {"error": "this regional hub has no device roster from the root yet"})
        url = str(request.url)
        try:
            vr = await run_in_threadpool(
                verify_request, request.method, url, list(request.headers.items()), cast(bytes, None),
                relay.resolve_key, hub.clock.now().timestamp(), nonces,
            )  # fmt: skip
        except SignatureRefused as exc:
            raise _RefusalError(
                403 if exc.reason == "revoked" else 401, {"refused": exc.reason, "detail": exc.detail}
            ) from exc
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > int(declared):
                raise _RefusalError(413, {"error": f"{kind} larger than declared"})
        if not _digest_matches(request.headers.get("content-digest"), body):
            raise _RefusalError(
                401, {"refused": "forged", "detail": "the body does not match the signed Content-Digest"}
            )
        if kind == "batch":
            batch_id = request.path_params["batch_id"]
            if not _BATCH_RE.match(batch_id) or hashlib.sha256(body).hexdigest()[:40] != batch_id:
                raise _RefusalError(400, {"error": "the batch id is not the sha256 of its content"})
            key = f"batch:{batch_id}"
        else:
            if kind == "report":
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = None
                if not isinstance(doc, dict) or doc.get("device_id") != vr.key_id:
                    raise _RefusalError(400, {"error": "the report's device_id is not the signing device"})
            key = f"{kind}:{hashlib.sha256(body).hexdigest()}"
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return SpoolItem(key, kind, vr.key_id, path, url, headers, body)

    def _upload(kind: str) -> Any:
        async def endpoint(request: Request) -> JSONResponse:
            try:
                item = await _verified(request, kind)
            except _RefusalError as exc:
                headers = {"Retry-After": str(_RETRY_AFTER_S)} if exc.status == 503 else None
                return JSONResponse(exc.body, status_code=exc.status, headers=headers)
            if kind == "batch":
                # forwarded already: the root's receipt lets the device drop it (sre_core.receipts)
                receipt = await run_in_threadpool(relay.receipt, item.key)
                if receipt is not None:
                    return JSONResponse(
                        {"status": "duplicate", "site": hub.config.site,
                         "batch_id": request.path_params["batch_id"], "receipt": receipt}
                    )  # fmt: skip
            try:
                status = await run_in_threadpool(relay.accept, item)
            except SpoolFullError as exc:
                return JSONResponse(
                    {"error": f"this regional hub's spool is full ({exc}); retry later or use another hub"},
                    status_code=503,
                    headers={"Retry-After": str(_RETRY_AFTER_S)},
                )
            out: dict[str, Any] = {"status": status, "site": hub.config.site}
            if kind == "batch":
                out["batch_id"] = request.path_params["batch_id"]
            return JSONResponse(out)

        return endpoint

    async def approvals(request: Request) -> JSONResponse:
        """A device's approvals, relayed to the root (cached here for when the root is unreachable)."""
        if not relay.roster_ready():
            return JSONResponse(
                {"error": "this regional hub has no device roster from the root yet"},
                status_code=503,
                headers={"Retry-After": str(_RETRY_AFTER_S)},
            )
        url = str(request.url)
        try:
            vr = await run_in_threadpool(
                verify_request, "GET", url, list(request.headers.items()), b"",
                relay.resolve_key, hub.clock.now().timestamp(), nonces,
            )  # fmt: skip
        except SignatureRefused as exc:
            status = 403 if exc.reason == "revoked" else 401
            return JSONResponse({"refused": exc.reason, "detail": exc.detail}, status_code=status)
        device = request.path_params["device_id"]
        if vr.key_id != device:
            return JSONResponse({"refused": "another device's approvals"}, status_code=403)
        ids = parse_ids(request.query_params.get("ids", ""))
        if ids is None:
            return JSONResponse({"error": f"ids: up to {MAX_IDS} escalation ids"}, status_code=400)
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        status, doc = await run_in_threadpool(relay.approvals, device, path, url, headers, ids)
        return JSONResponse(doc, status_code=status)

    async def fleet_status(request: Request) -> JSONResponse:
        if not await run_in_threadpool(relay.operator, request.headers.get("authorization")):
            return JSONResponse(
                {"refused": "unauthorized", "detail": "send Authorization: Bearer <operator token>"},
                status_code=401,
            )

        def build() -> dict[str, Any]:
            st = hub.status()
            return {
                "source": "regional",
                "site": hub.config.site,
                "root_unreachable_since": relay.unreachable_since,
                "last_sync": st["last_sync"],
                "backlog": st["backlog"],
                "devices": relay.site_reports(),
            }

        return JSONResponse(await run_in_threadpool(build))

    meta = [r for r in repository_routes(mirror.repo_dir) if getattr(r, "path", "").startswith("/metadata")]
    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/v1/regional/status", status),
        Route(BATCH_PATH, _upload("batch"), methods=["POST"]),
        Route(ATTEST_PATH, _upload("attestation"), methods=["POST"]),
        Route(REPORT_PATH, _upload("report"), methods=["POST"]),
        Route("/v1/fleet/status", fleet_status, methods=["GET"]),
        Route(APPROVALS_PATH, approvals, methods=["GET"]),
        Route("/targets/{path:path}", get_target, methods=["GET", "HEAD"]),
        *meta,
    ]
    app = Starlette(routes=routes)
    app.state.regional = hub
    return app
