"""The regional hub's ASGI app: the same repository routes and cache headers as the root hub.

Routes: ``GET/HEAD /metadata/{name}`` (the verified mirror), ``GET/HEAD /targets/{path}`` (fetched on
demand when signed and not yet held), ``GET /healthz``, ``GET /v1/regional/status``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hub.http import FileServer, repository_routes, target_cache_control
from hub.regional._hub import RegionalHub

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

    meta = [r for r in repository_routes(mirror.repo_dir) if getattr(r, "path", "").startswith("/metadata")]
    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/v1/regional/status", status),
        Route("/targets/{path:path}", get_target, methods=["GET", "HEAD"]),
        *meta,
    ]
    app = Starlette(routes=routes)
    app.state.regional = hub
    return app
