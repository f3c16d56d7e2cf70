"""Content-addressed cache of downloaded artifacts (``<state>/cas``).

Public API::

    ContentStore(root)
        .path_for(sha256) -> Path          where a verified blob lives (``sha256/<hex>``, read-only)
        .get(sha256, length) -> Path|None  a complete blob of that length, if held
        .partial(sha256) -> Path           the resumable partial download (``partial/<hex>.part``)
        .read_resume(sha256) / .write_resume(sha256, info)   the validator (ETag) for If-Range
        .commit(sha256, length, what) -> Path   verify the partial, then rename it into place atomically
                                           (raises HashMismatchError and deletes the partial)
        .adopt(sha256, verified_path) -> Path   move a file the caller verified into place
        .discard(sha256)                   drop a partial (failed verification)
        .remove_stale()                    delete temp files left by a crash
        .blobs() -> set[str]               held digests
        .prune(keep) -> list[str]          delete blobs not in ``keep``
    hash_file(path) -> (length, sha256_hex)

A blob is only ever reachable under its digest after its bytes hashed to that digest, so nothing in
``sha256/`` is half-written or unverified. Partial files keep their ETag beside them so an interrupted
download resumes with ``Range`` + ``If-Range`` instead of starting over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from sre_core.atomic import atomic_write_json, fsync_dir, remove_stale_temps
from sre_core.errors import SreError

__all__ = ["ContentStore", "HashMismatchError", "hash_file"]

_HEX = re.compile(r"^[0-9a-f]{64}$")


class HashMismatchError(SreError):
    """Downloaded bytes do not match the signed length or digest."""


def hash_file(path: Path) -> tuple[int, str]:
    """Length and sha256 of a file (hashlib's zero-copy file reader; the length from fstat)."""
    with Path(path).open("rb", buffering=0) as fh:
        length = os.fstat(fh.fileno()).st_size
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return length, digest


class ContentStore:
    """The cache. Paths are derived from digests only, never from names the hub chose."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "sha256"
        self.partial_dir = self.root / "partial"

    def _check(self, sha256: str) -> str:
        if not _HEX.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return sha256

    def path_for(self, sha256: str) -> Path:
        return self.blobs_dir / self._check(sha256)

    def get(self, sha256: str, length: int) -> Path | None:
        """The blob if held with the right length (its digest was checked when it was committed)."""
        p = self.path_for(sha256)
        try:
            return p if p.stat().st_size == length else None
        except FileNotFoundError:
            return None

    def blobs(self) -> set[str]:
        if not self.blobs_dir.is_dir():
            return set()
        return {p.name for p in self.blobs_dir.iterdir() if _HEX.match(p.name)}

    def partial(self, sha256: str) -> Path:
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        return self.partial_dir / f"{self._check(sha256)}.part"

    def _resume_file(self, sha256: str) -> Path:
        return self.partial_dir / f"{self._check(sha256)}.json"

    def read_resume(self, sha256: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._resume_file(sha256).read_text())
        except (OSError, ValueError):
            return {}
        return data

    def write_resume(self, sha256: str, info: dict[str, Any]) -> None:
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._resume_file(sha256), info)

    def discard(self, sha256: str) -> None:
        for p in (self.partial(sha256), self._resume_file(sha256)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def commit(self, sha256: str, length: int, what: str) -> Path:
        """Verify the partial against the signed length and digest, then move it into place.

        Raises:
            HashMismatchError: wrong length or digest; the partial is deleted.
        """
        part = self.partial(sha256)
        n, digest = hash_file(part)
        if n != length or digest != sha256:
            self.discard(sha256)
            raise HashMismatchError(
                f"verify artifact {what}",
                f"downloaded {n} bytes with sha256 {digest[:16]}..., the signed target says {length} bytes "
                f"with sha256 {sha256[:16]}... (tampered or corrupted in transit)",
                "nothing was installed; pull again, and report the hub if it repeats",
            )
        return self.adopt(sha256, part)

    def adopt(self, sha256: str, verified: Path) -> Path:
        """Move a file whose digest the caller just verified into place (fsync, rename, fsync dir)."""
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        with Path(verified).open("rb") as fh:
            os.fsync(fh.fileno())
        Path(verified).chmod(0o444)
        dest = self.path_for(sha256)
        Path(verified).replace(dest)
        fsync_dir(self.blobs_dir)
        with contextlib.suppress(FileNotFoundError):
            self._resume_file(sha256).unlink()
        return dest

    def remove_stale(self) -> list[Path]:
        return remove_stale_temps(self.blobs_dir) + remove_stale_temps(self.partial_dir)

    def prune(self, keep: set[str]) -> list[str]:
        """Delete blobs not in ``keep`` (digests). Returns the deleted digests."""
        gone = []
        for d in self.blobs() - keep:
            with contextlib.suppress(FileNotFoundError):
                self.path_for(d).unlink()
                gone.append(d)
        return gone
