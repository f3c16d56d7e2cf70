"""The regional hub object: configuration, the mirror, the relay, and the steps a loop (or a simulation) runs.

Public API::

    RegionalConfig(upstream, root, state, store_url=None, prefetch_bytes=16 GiB, site="site",
                   site_token=None, channels=None, fetch=None, window_s=300)
    RegionalHub(config, clock=None, client=None, transport=None)
        .sync_down(source=None) -> SyncResult   mirror the upstream's signed repository, or seed it from
                                         a bundle directory (never raises offline)
        .forward_up() -> ForwardResult   forward what devices sent, store-and-forward (see _relay.py)
        .sync_once() -> dict             down-sync, roster, forward, then the site report to the root
        .status() -> dict                last sync, backlog, served timestamp
        .relay                           the spool (accept, backlog, site_reports; see _relay.py)
        .close()
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deployment.fetcher import FetchConfig
from hub.regional._mirror import Mirror, MirrorOfflineError, MirrorRefusedError, SyncResult
from hub.regional._relay import DEFAULT_SPOOL_MAX_BYTES, ForwardResult, Relay
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError

__all__ = ["DEFAULT_PREFETCH_BYTES", "RegionalConfig", "RegionalHub"]

DEFAULT_PREFETCH_BYTES = 16 * 1024**3


@dataclass(frozen=True)
class RegionalConfig:
    """How a regional hub is set up.

    Args:
        upstream: the root hub's base URL (or a parent regional hub's).
        root: the pinned trust anchor (a ``root.json`` of the root hub).
        state: the regional hub's state directory.
        store_url: SQLAlchemy URL of the relay's durable store (default ``sqlite:///<state>/relay.db``).
        prefetch_bytes: byte budget of targets pre-fetched for the mirrored channels.
        site: this site's name at the root (``sre-hub sites add NAME``).
        site_token: the token the root issued for this site (None: no uplink reports or forwarding).
        channels: channels whose desired state is pre-fetched (None: all).
        fetch: transfer bounds for the down-sync.
        window_s: accepted skew of a device request's ``created`` (as at the root).
        spool_max_bytes: byte budget of what waits to be forwarded (above it devices get 503).
        view_token: bearer token of the site's own fleet-status view (root tokens never go to a site).
    """

    upstream: str
    root: Path
    state: Path
    store_url: str | None = None
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES
    site: str = "site"
    site_token: str | None = field(default=None, repr=False)
    channels: tuple[str, ...] | None = None
    fetch: FetchConfig | None = None
    window_s: float = 300.0
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    view_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.upstream.startswith(("http://", "https://")):
            raise InputError(
                "regional hub",
                f"--upstream {self.upstream!r} is not an http(s) URL",
                "pass the root hub's URL",
            )
        if self.prefetch_bytes < 0 or self.spool_max_bytes < 0:
            raise InputError("regional hub", "a byte budget is negative", "pass a byte count >= 0")
        if not self.site or len(self.site) > 64 or not all(c.isalnum() or c in "._-" for c in self.site):
            raise InputError(
                "regional hub", f"site name {self.site!r} is not valid", "use letters, digits, . _ -"
            )


class RegionalHub:
    """One regional hub: a verified mirror served downwards, a durable relay upwards."""

    def __init__(
        self,
        config: RegionalConfig,
        clock: Clock | None = None,
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        state = Path(config.state)
        state.mkdir(parents=True, exist_ok=True)
        try:
            pinned = Path(config.root).read_bytes()
        except OSError as exc:
            raise InputError(
                "regional hub", f"cannot read the pinned root {config.root}: {exc}", "pass --root"
            ) from exc
        self.audit = AuditLog(state / "audit.jsonl", self.clock)
        self.mirror = Mirror(
            state,
            config.upstream,
            pinned,
            self.clock,
            config.fetch,
            config.channels,
            config.prefetch_bytes,
            self.audit,
            transport,
        )
        self.relay = Relay(
            state,
            config.store_url,
            config.upstream,
            config.site,
            config.site_token,
            self.clock,
            self.audit,
            client,
            max_bytes=config.spool_max_bytes,
            view_token=config.view_token,
        )
        self._status_file = state / "sync.json"
        self._lock = threading.Lock()
        self.last_sync: SyncResult | None = None

    # ----- steps ----------------------------------------------------------------------------------
    def sync_down(self, source: str | None = None) -> SyncResult:
        """Mirror the upstream repository once (or seed from ``source``, a bundle directory). Offline or
        refused answers are recorded, not raised."""
        try:
            result = self.mirror.sync(source)
        except MirrorOfflineError as exc:
            result = SyncResult(online=False, error=exc.message)
        except MirrorRefusedError as exc:
            result = SyncResult(online=True, error=exc.message)
        with self._lock:
            self.last_sync = result
            if result.published:
                atomic_write_json(
                    self._status_file,
                    {
                        "last_sync": self.clock.now().isoformat(),
                        "timestamp_version": result.timestamp_version,
                        "snapshot_version": result.snapshot_version,
                    },
                )
        return result

    def forward_up(self, max_items: int = 500) -> ForwardResult:
        """Forward what the site's devices sent (store-and-forward; see :class:`Relay`)."""
        return self.relay.forward_up(max_items)

    def sync_once(self) -> dict[str, Any]:
        """One full step: down-sync, roster, forward, site report. Returns what happened."""
        down = self.sync_down()
        roster = self.relay.refresh_roster()
        up = self.forward_up()
        reported = self.relay.report_status(self._site_status())
        return {"down": down.to_dict(), "roster": roster, "up": up.to_dict(), "reported": reported}

    def _site_status(self) -> dict[str, Any]:
        st = self.status()
        served = st["served_timestamp"] or {}
        return {
            "timestamp_version": served.get("version"),
            "last_sync": st["last_sync"],
            "backlog": st["backlog"],
            "root_unreachable_since": self.relay.unreachable_since,
            "devices": len(self.relay.site_reports()),
        }

    def status(self) -> dict[str, Any]:
        """Where this site stands: last successful sync, served timestamp, backlog."""
        try:
            synced: dict[str, Any] = json.loads(self._status_file.read_text())
        except (OSError, ValueError):
            synced = {}
        return {
            "site": self.config.site,
            "upstream": self.config.upstream,
            "last_sync": synced.get("last_sync"),
            "served_timestamp": self.mirror.served_timestamp(),
            "last_error": self.last_sync.error if self.last_sync is not None else None,
            "backlog": self.relay.backlog(),
            "backlog_bytes": self.relay.backlog_bytes(),
            "roster": self.relay.roster_ready(),
        }

    def close(self) -> None:
        """Release what the hub holds open."""
        self.relay.close()
