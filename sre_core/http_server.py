"""Run an ASGI app under uvicorn in a background thread (TCP on loopback or a unix socket).

Used by the inference server, the hub, the daemon's admin API and by tests that need a real server.
A TCP server binds its socket before it says it serves (:func:`bind_tcp`): a bad or busy port is an error
naming the address, never a message about serving followed by uvicorn's own failure.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Any

import uvicorn

from sre_core.errors import InputError, SreError

__all__ = ["ServerThread", "bind_tcp", "free_port", "serve_forever"]


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, for uvicorn to serve on.

    Raises:
        InputError: the port is outside 0..65535 or the address is not one of this machine's.
        SreError: the port is in use, or binding it needs privileges.
    """
    where = f"{host}:{port}"
    if not 0 <= port <= 65535:
        raise InputError(f"listen on {where}", "a TCP port is 1..65535", "pass --port 1..65535")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SreError(
                f"listen on {where}",
                "the port is already in use by another process",
                f"stop that process or pick another port (`ss -ltnp 'sport = :{port}'` shows it)",
            ) from exc
        if exc.errno == errno.EACCES:
            raise SreError(
                f"listen on {where}", "binding a port below 1024 needs privileges", "use a port >= 1024"
            ) from exc
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(exc, socket.gaierror):
            raise InputError(
                f"listen on {where}", f"{host} is not an address of this machine", "check --host"
            ) from exc
        raise SreError(f"listen on {where}", exc.strerror or str(exc)) from exc
    except (socket.gaierror, UnicodeError) as exc:
        sock.close()
        raise InputError(f"listen on {where}", f"{host!r} is not a valid address", "check --host") from exc
    # Listening now means a client that saw "serving on ..." queues instead of being refused.
    sock.listen(2048)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _StoppableServer(uvicorn.Server):
    """uvicorn that ends normally on SIGTERM/SIGINT (uvicorn re-raises them, so a clean stop exits -15)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve_forever(app: Any, sock: socket.socket, **uvicorn_kwargs: Any) -> None:
    """Serve ``app`` on a socket from :func:`bind_tcp` in this thread until SIGTERM/SIGINT, then return."""
    kwargs: dict[str, Any] = {"log_level": "warning", "lifespan": "off"}
    kwargs.update(uvicorn_kwargs)
    _StoppableServer(uvicorn.Config(app, **kwargs)).run(sockets=[sock])


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
        """Start serving; returns once the socket listens.

        Raises:
            SreError: the TCP port cannot be bound (in use, privileged); InputError for a bad address.
            RuntimeError: the server did not start in time.
        """
        sockets = None if self.uds is not None else [bind_tcp(self.host, self.port)]
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": sockets}, name="uvicorn", daemon=True
        )
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
