"""Crash-safe file replacement: write a temp file, fsync it, rename over the target, fsync the directory.

After a power cut or ``kill -9`` at any instant the target holds either the old or the new content,
never a mix. python-tuf and most libraries skip the fsyncs; on flash storage we cannot.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "remove_stale_temps",
    "replace_atomic",
]


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Raises:
        OSError: the write failed (e.g. disk full); the old file is untouched and no temp file remains.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise
    fsync_dir(directory)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Write ``obj`` as canonical, sorted JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode("utf-8"), mode)


def replace_atomic(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` (same filesystem) and fsync the destination directory."""
    Path(src).replace(dst)
    fsync_dir(Path(dst).parent)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temp files left by writes interrupted with ``kill -9`` (call on start). Returns them."""
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed
