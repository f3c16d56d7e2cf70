"""The hub's ASGI application.

Public API::

    build_hub_app(repo_dir, extra_routes=None) -> Starlette
    build_static_app(repo_dir) -> Starlette     only /metadata and /targets: a CDN or mirror origin

Serves the TUF repository (``/metadata/*``, ``/targets/*``, see :mod:`hub.http`) and ``/healthz``.
Other hub features (telemetry ingest, rollouts) pass their routes in ``extra_routes``; they are matched
before the repository routes, so keep them under their own prefix (e.g. ``/ingest``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from hub.http import repository_routes

__all__ = ["build_hub_app", "build_static_app"]


def build_hub_app(repo_dir: Path, extra_routes: Sequence[BaseRoute] | None = None) -> Starlette:
    """A Starlette app serving ``repo_dir`` plus ``extra_routes``."""
    repo_dir = Path(repo_dir)

    async def healthz(request: Request) -> JSONResponse:
        ok = (repo_dir / "metadata" / "timestamp.json").is_file()
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503)

    routes: list[BaseRoute] = [
        *(extra_routes or []),
        Route("/healthz", healthz),
        *repository_routes(repo_dir),
    ]
    app = Starlette(routes=routes)
    app.state.repo_dir = repo_dir
    return app


def build_static_app(repo_dir: Path) -> Starlette:
    """Only the signed repository files (with cache headers), for a CDN/mirror origin apart from the API."""
    return Starlette(routes=list(repository_routes(Path(repo_dir))))
