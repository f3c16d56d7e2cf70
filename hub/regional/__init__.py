"""A regional hub: a verified mirror of the root hub's signed repository for the devices of one site,
and a durable store-and-forward relay of what those devices send upwards.

Public API::

    RegionalConfig, RegionalHub        the hub object (``sync_down`` / ``forward_up`` / ``sync_once``)
    build_regional_app(hub) -> Starlette   what ``sre-hub regional`` serves
    SyncResult                          what one down-sync did
    MirrorOfflineError, MirrorRefusedError

See docs/fleet.md, "Regional hubs".
"""

from hub.regional._app import build_regional_app
from hub.regional._hub import DEFAULT_PREFETCH_BYTES, RegionalConfig, RegionalHub
from hub.regional._mirror import MirrorOfflineError, MirrorRefusedError, SyncResult

__all__ = [
    "DEFAULT_PREFETCH_BYTES",
    "MirrorOfflineError",
    "MirrorRefusedError",
    "RegionalConfig",
    "RegionalHub",
    "SyncResult",
    "build_regional_app",
]
