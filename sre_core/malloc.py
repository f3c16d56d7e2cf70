"""glibc malloc settings for the long-running daemon.

glibc gives each thread that allocates concurrently an arena of its own, up to 8 per core. The daemon
runs ~30 threads (the HTTP server and its worker pool, APScheduler, ONNX Runtime, DuckDB, the telemetry
writer) and had 19 arenas; freed memory stays in the arena that held it, fragmented around live blocks.
In ``benchmarks/soak.py`` the Python heap stayed flat (tracemalloc) while the arenas' free space grew
during warm-up (mallinfo2 ``fordblks`` 17 -> 29 MB in 4 minutes; ``malloc_trim(0)`` gave back nothing).
Two arenas (what ``MALLOC_ARENA_MAX=2`` sets) share the free space between threads instead: the soak's
RSS sits ~8 MB lower (its 10-minute slope, mostly DuckDB's cache following the file, is unchanged).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["ARENA_MAX", "limit_arenas"]

ARENA_MAX = 2
M_ARENA_MAX = -8  # glibc's <malloc.h>


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(n: int = ARENA_MAX) -> bool:
    """Cap glibc's malloc arenas at ``n`` for the threads that start from now on.

    Call it early, before the daemon starts its threads. Returns False (and changes nothing) where the C
    library is not glibc or where ``MALLOC_ARENA_MAX`` is set in the environment: the operator's value,
    which glibc read at start-up, stands.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(n)))
