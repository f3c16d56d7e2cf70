"""The daemon's local admin API: how CLI commands reach live data while the daemon holds the DuckDB file.

DuckDB lets no second process open a file another process holds, so while ``sre-agent run`` is up the
CLI talks to it over HTTP on a unix socket in ``<state>/run/`` (directory 0700) and presents a bearer
token read from ``<state>/run/admin.token`` (0600): only the device's own operator account can do either.
When no daemon runs, :func:`admin_client` returns None and commands open files directly.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sre_core.atomic import atomic_write_text
from sre_core.http_server import ServerThread
from sre_core.paths import StatePaths

__all__ = ["AdminServer", "admin_client", "socket_path", "token_path"]


def socket_path(paths: StatePaths) -> Path:
    return paths.run / "admin.sock"


def token_path(paths: StatePaths) -> Path:
    return paths.run / "admin.token"


class _TokenAuth(BaseHTTPMiddleware):
    def __init__(self, app: object, token: str) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self._expected = f"Bearer {token}".encode()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, self._expected):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return await call_next(request)


class AdminServer:
    """Serves ``routes`` on the state directory's admin socket with token authentication."""

    def __init__(self, paths: StatePaths, routes: Sequence[BaseRoute]) -> None:
        self.paths = paths
        paths.run.mkdir(parents=True, exist_ok=True)
        paths.run.chmod(0o700)
        self.token = secrets.token_urlsafe(32)
        ping = Route("/ping", lambda _r: JSONResponse({"ok": True}))
        self.app = Starlette(routes=[ping, *routes], middleware=[Middleware(_TokenAuth, token=self.token)])
        sock = socket_path(paths)
        sock.unlink(missing_ok=True)
        self._server = ServerThread(self.app, uds=str(sock))

    def start(self) -> AdminServer:
        atomic_write_text(token_path(self.paths), self.token, mode=0o600)
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
        socket_path(self.paths).unlink(missing_ok=True)
        token_path(self.paths).unlink(missing_ok=True)


def admin_client(paths: StatePaths, timeout_s: float = 10.0) -> httpx.Client | None:
    """A client for the running daemon's admin API, or None when no daemon answers."""
    sock, tok = socket_path(paths), token_path(paths)
    if not sock.exists() or not tok.exists():
        return None
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)),
        base_url="http://sre-agent",
        headers={"Authorization": f"Bearer {tok.read_text().strip()}"},
        timeout=timeout_s,
    )
    try:
        client.get("/ping").raise_for_status()
    except httpx.HTTPError:
        client.close()
        return None
    return client
