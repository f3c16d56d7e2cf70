"""The hub's fleet API: device reports (device-signed) and operator endpoints (operator credential).

Public API::

    fleet_routes(repo_dir, service=None, clock=None, fleet=None) -> list[Route]
    issue_operator_token(repo_dir, name) -> str     (shown once; the hub keeps only its sha256)
    operator_for(repo_dir, authorization) -> str | None
    OperatorTokens(repo_dir)

Authentication (every hub API except the static repository reads ``/metadata/*``, ``/targets/*`` and
``/healthz``):

- devices sign requests with their enrolled Ed25519 key (RFC 9421, :mod:`sre_core.signing`, the same
  scheme as telemetry ingest); the report's ``device_id`` must be the signing key's id.
- operators send ``Authorization: Bearer <token>``; tokens are random 256-bit values, stored hashed
  in the hub store (table ``operator_tokens``) and compared in constant time.

Refusals: 401 (no or bad credential), 403 (revoked device), 400 (bad body), 413 (too large).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deployment.rollout import DeviceReport
from hub.fleetdb import FleetDB
from hub.repository import HubRepository
from hub.rollouts import RolloutService, RolloutSpec
from hub.sites import RELAYED_BY, SiteRegistry, relay_fresh, relay_target
from hub.store import HubStore, open_store, store_config
from hub.store._schema import operator_tokens
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError, SreError
from sre_core.signing import SignatureRefused, verify_request

__all__ = ["OperatorTokens", "fleet_routes", "issue_operator_token", "operator_for"]

MAX_REPORT_BYTES = 256 * 1024
_log = logging.getLogger(__name__)


class OperatorTokens:
    """Hashed operator API tokens in the hub store (table ``operator_tokens``)."""

    def __init__(self, repo_dir: Path, store: HubStore | None = None) -> None:
        self.store = store or open_store(store_config(Path(repo_dir)).database_url)

    def issue(self, name: str) -> str:
        if not name or not all(c.isalnum() or c in "._-@" for c in name) or len(name) > 64:
            raise InputError(f"operator token for {name!r}", "names are letters, digits, . _ - @")
        token = "sre_op_" + secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self.store.tx() as conn:
            conn.execute(
                self.store.insert(operator_tokens)
                .values(name=name, sha256=digest)
                .on_conflict_do_update(index_elements=["name"], set_={"sha256": digest})
            )
        return token

    def revoke(self, name: str) -> bool:
        with self.store.tx() as conn:
            return bool(conn.execute(delete(operator_tokens).where(operator_tokens.c.name == name)).rowcount)

    def operator(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        digest = hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
        with self.store.tx() as conn:
            rows = conn.execute(select(operator_tokens.c.name, operator_tokens.c.sha256)).all()
        found = None
        for name, stored in rows:
            if hmac.compare_digest(str(stored), digest):
                found = str(name)
        return found


def issue_operator_token(repo_dir: Path, name: str) -> str:
    """A new bearer token for operator ``name`` (replaces the previous one)."""
    return OperatorTokens(repo_dir).issue(name)


def operator_for(repo_dir: Path, authorization: str | None) -> str | None:
    """The operator a ``Authorization`` header authenticates, or None."""
    return OperatorTokens(repo_dir).operator(authorization)


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        {"refused": "unauthorized", "detail": "send Authorization: Bearer <operator token>"},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="sre-hub"'},
    )


def fleet_routes(
    repo_dir: Path,
    service: RolloutService | None = None,
    clock: Clock | None = None,
    fleet: FleetDB | None = None,
    window_s: float = 300.0,
) -> list[Route]:
    """Routes: ``GET /metrics`` (OpenMetrics), ``POST /v1/fleet/reports`` (device), ``GET /v1/fleet/status``,
    ``GET /v1/dora``,
    ``GET /v1/rollouts/{channel}``, ``POST /v1/rollouts/{channel}/{action}``, ``POST /v1/recalls/{channel}``
    (operator)."""
    repo_dir = Path(repo_dir)
    clk = clock or SystemClock()
    svc = service or RolloutService(HubRepository(repo_dir, clk), clock=clk)
    db = fleet or FleetDB(svc.fleet_dir, clk, store=svc.store)
    nonces = db.nonces(window_s)
    tokens = OperatorTokens(repo_dir, svc.store)
    sites = SiteRegistry(svc.store, clk)

    def _stale(report: dict[str, Any], relayed: bool) -> bool:
        """True when the device's held report is newer by the device's (trusted) time: a delayed copy
        (through a regional hub, or a transparent tier) must not take the root's view back in time.
        Equal times: a relayed copy is a re-forward (no-op); a direct one is the device's latest word."""
        held = svc.reports.get(str(report["device_id"]))
        if held is None or not report.get("time") or not held.get("time"):
            return False
        new = datetime.fromisoformat(str(report["time"]))
        old = datetime.fromisoformat(str(held["time"]))
        return new < old or (relayed and new == old)

    async def report(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_REPORT_BYTES:
            return JSONResponse({"error": "report too large", "limit": MAX_REPORT_BYTES}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REPORT_BYTES:
                return JSONResponse({"error": "report too large"}, status_code=413)
        try:
            # forwarded by a regional hub (site token): verified over the URI the device signed (hub.sites)
            relay = await run_in_threadpool(relay_target, request.headers, str(request.url), sites)
            vr = await run_in_threadpool(
                verify_request, request.method, relay.uri if relay else str(request.url),
                list(request.headers.items()), body, db.resolve_key, clk.now().timestamp(),
                relay.nonces if relay else nonces,
            )  # fmt: skip
            if relay:
                relay_fresh(vr.created, clk.now().timestamp(), window_s)
        except SignatureRefused as exc:
            _log.warning("refused fleet report: %s", exc)
            status = 403 if exc.reason == "revoked" else 401
            return JSONResponse({"refused": exc.reason, "detail": exc.detail}, status_code=status)
        try:
            doc = json.loads(body)
        except ValueError:
            return JSONResponse({"error": "the report is not JSON"}, status_code=400)
        if not isinstance(doc, dict) or doc.get("device_id") != vr.key_id:
            return JSONResponse(
                {"error": "the report's device_id is not the signing device"}, status_code=400
            )
        try:
            clean = DeviceReport.model_validate(doc).model_dump(mode="json", exclude_none=True)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            return JSONResponse({"error": f"bad report: {where}: {err['msg']}"}, status_code=400)
        if await run_in_threadpool(_stale, clean, relay is not None):
            # older than the report held (delayed, re-forwarded or replayed): a no-op, newest wins
            return JSONResponse({"status": "duplicate", "events": []})
        if relay:
            clean[RELAYED_BY] = relay.site  # the root's own record: the site that relayed it (hub.sites)
        try:
            events = await run_in_threadpool(svc.observe, clean)
        except InputError as exc:
            return JSONResponse(exc.to_dict(), status_code=400)
        return JSONResponse({"status": "stored", "events": events})

    def _operator(request: Request) -> str | None:
        return tokens.operator(request.headers.get("authorization"))

    async def fleet_status(request: Request) -> JSONResponse:
        if _operator(request) is None:
            return _unauthorized()
        from hub.fleet_status import fleet_status as build

        return JSONResponse(await run_in_threadpool(build, svc))

    async def dora(request: Request) -> JSONResponse:
        if _operator(request) is None:
            return _unauthorized()
        from hub.dora import compute_dora

        return JSONResponse(await run_in_threadpool(lambda: compute_dora(svc.repo, svc.reports).to_dict()))

    async def rollout_status(request: Request) -> JSONResponse:
        if _operator(request) is None:
            return _unauthorized()
        try:
            st = await run_in_threadpool(svc.status, request.path_params["channel"])
        except SreError as exc:
            return JSONResponse(exc.to_dict(), status_code=404)
        return JSONResponse(st.to_dict())

    async def rollout_action(request: Request) -> JSONResponse:
        who = _operator(request)
        if who is None:
            return _unauthorized()
        channel, action = request.path_params["channel"], request.path_params["action"]
        try:
            if action == "start":
                spec = RolloutSpec.model_validate({**(await request.json()), "channel": channel})
                r = await run_in_threadpool(svc.start, spec, who)
            elif action == "approve" and request.query_params.get("wave", "").isdigit():
                wave = int(request.query_params["wave"])
                r = await run_in_threadpool(svc.approve, channel, who, wave)
            elif action in {"approve", "pause", "resume", "ack"}:
                r = await run_in_threadpool(getattr(svc, action), channel, who)
            elif action in {"abort-keep", "abort-revert"}:
                r = await run_in_threadpool(svc.abort, channel, action == "abort-revert", who)
            else:
                return JSONResponse({"error": f"unknown action {action!r}"}, status_code=404)
        except SreError as exc:
            return JSONResponse(exc.to_dict(), status_code=409 if exc.exit_code == 2 else 500)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"id": r.id, "state": r.state, "wave": r.wave, "percent": r.percent})

    async def recall(request: Request) -> JSONResponse:
        who = _operator(request)
        if who is None:
            return _unauthorized()
        try:
            body = await request.json()
            out = await run_in_threadpool(
                svc.recall, request.path_params["channel"], str(body["module"]), list(body["withdrawn"]),
                str(body["to_version"]), str(body.get("reason", "")), who,
            )  # fmt: skip
        except SreError as exc:
            return JSONResponse(exc.to_dict(), status_code=409)
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad recall body: {exc}"}, status_code=400)
        return JSONResponse(out)

    from hub.metrics import hub_metrics
    from sre_core.metrics import metrics_route

    return [
        metrics_route(lambda: hub_metrics(svc, db)),  # OpenMetrics for Prometheus (unauthenticated)
        Route("/v1/fleet/reports", report, methods=["POST"]),
        Route("/v1/fleet/status", fleet_status, methods=["GET"]),
        Route("/v1/dora", dora, methods=["GET"]),
        Route("/v1/rollouts/{channel}", rollout_status, methods=["GET"]),
        Route("/v1/rollouts/{channel}/{action}", rollout_action, methods=["POST"]),
        Route("/v1/recalls/{channel}", recall, methods=["POST"]),
    ]
