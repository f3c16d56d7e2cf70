"""Approvals come down: a device fetches the signed decisions on its escalations from the hub.

Public API::

    APPROVALS_PATH = "/v1/devices/{device_id}/approvals"
    MAX_IDS = 64
    approval_routes(repo_dir, fleet=None, clock=None, window_s=300) -> list[Route]
    decisions_for(repo_dir, ids) -> list[dict]     the signed approvals/rejections of those escalations

``GET /v1/devices/{device_id}/approvals?ids=esc-a,esc-b`` must be signed by that device (RFC 9421 over an
empty body, as every device request), directly or relayed by a regional hub (site token, see
:mod:`hub.sites`). The answer lists every decision the hub database holds for the named escalations:
exactly the documents operators signed (``sre-hub escalations approve|reject``), which the device
verifies against its operator roster before anything changes (``EscalationStore.decide``, the path
``sre-agent escalations apply`` takes). A decision is bound to its escalation's content hash, so one
served to the wrong device is useless to it; the device id in the path must still be the signer.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hub.fleetdb import FleetDB
from hub.sites import SiteRegistry, relay_fresh, relay_target
from sre_core.clock import Clock, SystemClock
from sre_core.signing import SignatureRefused, verify_request

__all__ = ["APPROVALS_PATH", "MAX_IDS", "approval_routes", "decisions_for", "parse_ids"]

APPROVALS_PATH = "/v1/devices/{device_id}/approvals"
MAX_IDS = 64
_ESC_RE = re.compile(r"^[A-Za-z0-9._-]{1,80}$")
_log = logging.getLogger(__name__)


def parse_ids(raw: str) -> list[str] | None:
    """The escalation ids of a ``?ids=`` value (None when malformed or more than :data:`MAX_IDS`)."""
    ids = [x for x in raw.split(",") if x]
    if len(ids) > MAX_IDS or not all(_ESC_RE.match(x) for x in ids):
        return None
    return list(dict.fromkeys(ids))


def decisions_for(repo_dir: Path, ids: list[str], clock: Clock | None = None) -> list[dict[str, Any]]:
    """The signed decisions the hub database holds for ``ids`` (each an approval document)."""
    from hub.operators import HubEscalations

    esc = HubEscalations(Path(repo_dir), clock)
    return [d["approval"] for i in ids for d in esc.decisions(i)]


def approval_routes(
    repo_dir: Path, fleet: FleetDB | None = None, clock: Clock | None = None, window_s: float = 300.0
) -> list[Route]:
    """``GET`` :data:`APPROVALS_PATH` (device-signed, or relayed by a site)."""
    repo_dir = Path(repo_dir)
    clk = clock or SystemClock()
    db = fleet or FleetDB(repo_dir / "fleet", clk)
    nonces = db.nonces(window_s)
    sites = SiteRegistry(db.store, clk)

    async def approvals(request: Request) -> JSONResponse:
        device = request.path_params["device_id"]
        try:
            relay = await run_in_threadpool(relay_target, request.headers, str(request.url), sites)
            vr = await run_in_threadpool(
                verify_request, "GET", relay.uri if relay else str(request.url),
                list(request.headers.items()), b"", db.resolve_key, clk.now().timestamp(),
                relay.nonces if relay else nonces,
            )  # fmt: skip
            if relay:
                relay_fresh(vr.created, clk.now().timestamp(), window_s)
        except SignatureRefused as exc:
            _log.warning("refused approvals request: %s", exc)
            status = 403 if exc.reason == "revoked" else 401
            return JSONResponse({"refused": exc.reason, "detail": exc.detail}, status_code=status)
        if vr.key_id != device:
            return JSONResponse({"refused": "another device's approvals"}, status_code=403)
        ids = parse_ids(request.query_params.get("ids", ""))
        if ids is None:
            return JSONResponse(
                {"error": f"ids: up to {MAX_IDS} escalation ids, comma-separated"}, status_code=400
            )
        found = await run_in_threadpool(decisions_for, repo_dir, ids, clk)
        return JSONResponse({"device_id": device, "approvals": found})

    return [Route(APPROVALS_PATH, approvals, methods=["GET"])]
