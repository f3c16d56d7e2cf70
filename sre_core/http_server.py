"""Run an ASGI app under uvicorn in a background thread (TCP on loopback or a unix socket).

Used by the inference server, the hub, the daemon's admin API and by tests that need a real server.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

__all__ = ["ServerThread", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn in a daemon thread with a bounded start and stop.

    Args:
        app: the ASGI application.
        host, port: TCP address (port 0 picks a free one).
        uds: a unix socket path instead of TCP.
        startup_timeout_s: how long :meth:`start` waits for the server to listen.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        uds: str | None = None,
        startup_timeout_s: float = 15.0,
        **uvicorn_kwargs: Any,
    ) -> None:
        self.host = host
        self.port = port or (free_port(host) if uds is None else 0)
        self.uds = uds
        self.startup_timeout_s = startup_timeout_s
        kwargs: dict[str, Any] = {"log_level": "warning", "access_log": False, "lifespan": "off"}
        kwargs.update(uvicorn_kwargs)
        if uds is not None:
            self.config = uvicorn.Config(app, uds=uds, **kwargs)
        else:
            self.config = uvicorn.Config(app, host=host, port=self.port, **kwargs)
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        """Start serving; returns once the socket listens. Raises RuntimeError on timeout."""
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.uds or self.url} exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.uds or self.url} did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to finish in-flight requests and exit; wait at most ``timeout_s``."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(2.0)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
