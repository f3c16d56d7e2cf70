"""The systemd notification protocol (``sd_notify``): readiness, watchdog pings and status lines.

A few newline-separated ``KEY=VALUE`` lines in one datagram to the unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Without the variable (not started by
systemd with ``Type=notify``) every call is a no-op. A send that fails is logged, never raised: the
daemon must not die because its supervisor's socket went away.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SystemdNotifier"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SystemdNotifier:
    """Sends notifications to the service manager.

    Args:
        socket_path: ``$NOTIFY_SOCKET`` (None: not supervised, every send is a no-op).
        watchdog_usec: ``$WATCHDOG_USEC`` when the watchdog is on for this process, else None.
    """

    socket_path: str | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> SystemdNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (the watchdog is for ``pid``)."""
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and (not owner or owner == str(pid)):
            usec = int(raw)
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the watchdog timeout, as systemd recommends (None: no watchdog)."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one notification; True when it was delivered."""
        if not self.socket_path:
            return False
        addr = self.socket_path
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), addr)
        except OSError as exc:
            _log.warning("systemd notification to %s failed: %s", self.socket_path, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """The service is up (``Type=notify`` units count as started only now)."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """Still alive: systemd restarts the unit when pings stop for ``WatchdogSec``."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))
