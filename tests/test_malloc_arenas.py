"""sre_core.malloc: the daemon caps glibc's malloc arenas, so threads share free memory (flat RSS)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from sre_core import malloc

pytestmark = pytest.mark.skipif(malloc._glibc() is None, reason="glibc only")

# Eight threads alive at once, each allocating from C (bytearray -> malloc), then glibc's own count of
# its arenas (malloc_info: one <heap> element per arena).
SCRIPT = textwrap.dedent(
    """
    import ctypes, os, sys, tempfile, threading
    from sre_core.malloc import limit_arenas
    if sys.argv[1] == "limit":
        print("limited", limit_arenas())
    barrier = threading.Barrier(8)
    keep = []
    def work():
        keep.append(bytearray(200_000))
        barrier.wait()
        for _ in range(200):
            bytearray(50_000)
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    path = os.path.join(tempfile.mkdtemp(), "info.xml")
    fp = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print("arenas", open(path).read().count("<heap nr="))
    """
)


def _arenas(mode: str, env_extra: dict[str, str] | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | (env_extra or {})
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=60, check=True
    ).stdout
    return int(out.split("arenas")[-1]), out


def test_limit_arenas_bounds_the_number_of_malloc_arenas() -> None:
    free, _ = _arenas("free")
    assert free > malloc.ARENA_MAX  # without the cap, eight concurrent threads get arenas of their own
    limited, out = _arenas("limit")
    assert "limited True" in out
    assert limited <= malloc.ARENA_MAX


def test_operator_setting_stands() -> None:
    limited, out = _arenas("limit", {"MALLOC_ARENA_MAX": "4"})
    assert "limited False" in out  # glibc read the operator's value at start-up; we leave it
    assert limited <= 4


def test_long_running_commands_limit_arenas_before_starting_threads() -> None:
    import inspect

    from sre_agent.cli import run, serve

    src = inspect.getsource(run)
    assert src.index("limit_arenas()") < src.index("build_daemon(")
    src = inspect.getsource(serve)
    assert src.index("limit_arenas()") < src.index("ServingPlane(")
