"""A small Toxiproxy HTTP API client with a timeout on every call and errors on every non-2xx.

``toxiproxy-python`` and ``chaostoolkit-toxiproxy`` set no timeouts and ignore 5xx answers, so a hung or
failing Toxiproxy would hang or silently fool our actions. This client speaks the same API to a real
Toxiproxy server (``[chaos] toxiproxy_url``) or to our embedded :mod:`chaos.faultproxy`.

Errors (what the caller decides on)::

    ToxiproxyError
    ├── ToxiproxyUnavailableError    transport failure or timeout: the API did not answer in time
    └── ToxiproxyHTTPError      an answer with a non-2xx status (``status``, ``body``)
        ├── ToxiproxyNotFoundError   404
        ├── ToxiproxyConflictError   409
        └── ToxiproxyServerError  5xx
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ToxiproxyClient",
    "ToxiproxyConflictError",
    "ToxiproxyError",
    "ToxiproxyHTTPError",
    "ToxiproxyNotFoundError",
    "ToxiproxyServerError",
    "ToxiproxyUnavailableError",
]

DEFAULT_TIMEOUT_S = 5.0


class ToxiproxyError(Exception):
    """Base of every client error."""


class ToxiproxyUnavailableError(ToxiproxyError):
    """The API could not be reached or did not answer within the timeout."""


class ToxiproxyHTTPError(ToxiproxyError):
    """The API answered with a non-2xx status."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


class ToxiproxyNotFoundError(ToxiproxyHTTPError):
    """404: no such proxy or toxic."""


class ToxiproxyConflictError(ToxiproxyHTTPError):
    """409: the proxy or toxic exists already."""


class ToxiproxyServerError(ToxiproxyHTTPError):
    """5xx: the server failed (e.g. could not listen)."""


def _seg(name: str) -> str:
    """A name as one URL path segment, verbatim: the API unquotes segments, so quote everything."""
    return quote(str(name), safe="")


def _error_for(method: str, url: str, resp: httpx.Response) -> ToxiproxyHTTPError:
    cls: type[ToxiproxyHTTPError] = ToxiproxyHTTPError
    if resp.status_code == 404:
        cls = ToxiproxyNotFoundError
    elif resp.status_code == 409:
        cls = ToxiproxyConflictError
    elif resp.status_code >= 500:
        cls = ToxiproxyServerError
    return cls(method, url, resp.status_code, resp.text)


class ToxiproxyClient:
    """Client for one Toxiproxy API base URL (e.g. ``http://127.0.0.1:8474``).

    Args:
        url: API base URL.
        timeout_s: bound on every call (connect, read, write, pool).
        transport: optional httpx transport (tests).
    """

    def __init__(
        self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, transport: httpx.BaseTransport | None = None
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s), transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ToxiproxyClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            raise ToxiproxyUnavailableError(
                f"{method} {self.url}{path}: no answer within {self.timeout_s}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise ToxiproxyUnavailableError(f"{method} {self.url}{path}: {exc}") from exc
        if not resp.is_success:
            raise _error_for(method, self.url + path, resp)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    # --- server -----------------------------------------------------------------------------------

    def version(self) -> str:
        """The server version string."""
        v = self._call("GET", "/version")
        if isinstance(v, dict):
            return str(v.get("version", ""))
        return str(v).strip()

    def reset(self) -> None:
        """Remove every toxic and re-enable every proxy (proxies stay)."""
        self._call("POST", "/reset")

    def populate(self, proxies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Create or replace proxies in bulk. Returns the proxies now configured."""
        out = self._call("POST", "/populate", proxies)
        return list((out or {}).get("proxies", []))

    # --- proxies ----------------------------------------------------------------------------------

    def proxies(self) -> dict[str, dict[str, Any]]:
        """All proxies by name."""
        return dict(self._call("GET", "/proxies") or {})

    def get_proxy(self, name: str) -> dict[str, Any]:
        """One proxy (raises ToxiproxyNotFoundError)."""
        return dict(self._call("GET", f"/proxies/{_seg(name)}"))

    def create_proxy(
        self, name: str, upstream: str, listen: str = "127.0.0.1:0", enabled: bool = True
    ) -> dict[str, Any]:
        """Create a proxy; ``listen`` defaults to an ephemeral loopback port. Returns it (with ``listen``)."""
        body = {"name": name, "upstream": upstream, "listen": listen, "enabled": enabled}
        return dict(self._call("POST", "/proxies", body))

    def ensure_proxy(self, name: str, upstream: str, listen: str = "127.0.0.1:0") -> dict[str, Any]:
        """The proxy ``name``, created when missing (an existing one is kept as it is)."""
        try:
            return self.get_proxy(name)
        except ToxiproxyNotFoundError:
            pass
        try:
            return self.create_proxy(name, upstream, listen)
        except ToxiproxyConflictError:
            return self.get_proxy(name)

    def update_proxy(self, name: str, **fields: Any) -> dict[str, Any]:
        """Change ``enabled``, ``listen`` or ``upstream``."""
        return dict(self._call("POST", f"/proxies/{_seg(name)}", fields))

    def delete_proxy(self, name: str, missing_ok: bool = False) -> None:
        """Delete a proxy (its connections drop)."""
        try:
            self._call("DELETE", f"/proxies/{_seg(name)}")
        except ToxiproxyNotFoundError:
            if not missing_ok:
                raise

    # --- toxics -----------------------------------------------------------------------------------

    def toxics(self, proxy: str) -> list[dict[str, Any]]:
        """The toxics of a proxy."""
        return list(self._call("GET", f"/proxies/{_seg(proxy)}/toxics") or [])

    def add_toxic(
        self,
        proxy: str,
        type: str,
        attributes: dict[str, Any] | None = None,
        name: str | None = None,
        stream: str = "downstream",
        toxicity: float = 1.0,
    ) -> dict[str, Any]:
        """Add a toxic. Returns it as the server stored it."""
        body = {
            "name": name or f"{type}_{stream}",
            "type": type,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": dict(attributes or {}),
        }
        return dict(self._call("POST", f"/proxies/{_seg(proxy)}/toxics", body))

    def get_toxic(self, proxy: str, toxic: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/proxies/{_seg(proxy)}/toxics/{_seg(toxic)}"))

    def update_toxic(
        self, proxy: str, toxic: str, attributes: dict[str, Any], toxicity: float | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"attributes": attributes}
        if toxicity is not None:
            body["toxicity"] = toxicity
        return dict(self._call("POST", f"/proxies/{_seg(proxy)}/toxics/{_seg(toxic)}", body))

    def remove_toxic(self, proxy: str, toxic: str, missing_ok: bool = False) -> None:
        try:
            self._call("DELETE", f"/proxies/{_seg(proxy)}/toxics/{_seg(toxic)}")
        except ToxiproxyNotFoundError:
            if not missing_ok:
                raise
