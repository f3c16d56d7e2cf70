"""Unpacking a verified tar bundle into a slot without trusting its member headers.

``tarfile.extractall`` (even with the 3.12 ``data`` filter) still writes whatever sizes the stream
delivers and leaves partial trees behind on error; here each member is checked before anything is
written, bytes are counted while they stream (a header can lie about its size), and the caller
extracts into a staging directory that is discarded whole on any refusal.

Refused: symbolic and hard links, absolute names, ``..`` components, device files and FIFOs, more
members or bytes than :class:`policies.deployment.ExtractLimits` allows, or an expansion ratio beyond it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path, PurePosixPath

from policies.deployment import ExtractLimits
from sre_core.errors import InputError

__all__ = ["ExtractError", "extract_tar", "safe_member_name"]

_CHUNK = 1 << 20


class ExtractError(InputError):
    """A bundle was refused; nothing of it is usable (the caller discards the staging directory)."""


def safe_member_name(name: str) -> PurePosixPath:
    """The member name as a relative path, or raise :class:`ExtractError` (absolute, ``..``, empty)."""
    if not name or "\x00" in name:
        raise ExtractError("extract bundle", f"member name {name!r} is empty or holds NUL")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ExtractError("extract bundle", f"member {name!r} has an absolute path", "rebuild the bundle")
    parts = [p for p in PurePosixPath(name).parts if p not in {"", "."}]
    if any(p == ".." for p in parts):
        raise ExtractError("extract bundle", f"member {name!r} climbs out with '..'", "rebuild the bundle")
    if not parts:
        raise ExtractError("extract bundle", f"member name {name!r} names no file")
    return PurePosixPath(*parts)


def _refuse_kind(member: tarfile.TarInfo) -> None:
    kind = None
    if member.issym():
        kind = "a symbolic link"
    elif member.islnk():
        kind = "a hard link"
    elif member.ischr() or member.isblk():
        kind = "a device file"
    elif member.isfifo():
        kind = "a FIFO"
    elif not (member.isfile() or member.isdir()):
        kind = f"an unsupported member type {member.type!r}"
    if kind is not None:
        raise ExtractError(
            "extract bundle",
            f"member {member.name!r} is {kind}; bundles may hold only regular files and directories",
            "rebuild the bundle without links or special files",
        )


def extract_tar(archive: Path, dest: Path, limits: ExtractLimits) -> dict[str, str]:
    """Extract ``archive`` (tar, optionally gz/bz2/xz) into the empty or absent directory ``dest``.

    Files are written 0644, directories 0755, every file fsynced. Returns ``{relative path: sha256}``
    of the regular files written.

    Raises:
        ExtractError: a refused member or a limit exceeded. ``dest`` may hold a partial tree: the
            caller owns it and must discard it.
    """
    archive = Path(archive)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive_size = max(archive.stat().st_size, 1)
    budget = min(limits.max_total_bytes, int(archive_size * limits.max_ratio))
    total = 0
    members = 0
    digests: dict[str, str] = {}
    try:
        tf = tarfile.open(archive, mode="r:*")  # noqa: SIM115 - closed in finally
    except (tarfile.TarError, OSError) as exc:
        raise ExtractError("extract bundle", f"{archive.name} is not a readable tar archive: {exc}") from exc
    try:
        while True:
            try:
                member = tf.next()
            except tarfile.TarError as exc:
                raise ExtractError("extract bundle", f"corrupt archive: {exc}") from exc
            if member is None:
                break
            members += 1
            if members > limits.max_members:
                raise ExtractError("extract bundle", f"more than {limits.max_members} members (size bomb)")
            _refuse_kind(member)
            rel = safe_member_name(member.name)
            target = dest.joinpath(*rel.parts)
            # Parents were created by us, never links; still, re-check nothing escapes dest.
            if not target.resolve().is_relative_to(dest.resolve()):
                raise ExtractError("extract bundle", f"member {member.name!r} resolves outside the slot")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(0o755)
                continue
            if member.size > limits.max_file_bytes:
                raise ExtractError(
                    "extract bundle", f"member {member.name!r} declares {member.size} bytes, over the limit"
                )
            if str(rel) in digests or target.exists():
                raise ExtractError("extract bundle", f"member {member.name!r} appears twice")
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            if src is None:
                raise ExtractError("extract bundle", f"member {member.name!r} has no data")
            h = hashlib.sha256()
            written = 0
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                while True:
                    try:
                        chunk = src.read(_CHUNK)
                    except (tarfile.TarError, OSError, EOFError) as exc:
                        why = f"corrupt data in {member.name!r}: {exc}"
                        raise ExtractError("extract bundle", why) from exc
                    if not chunk:
                        break
                    written += len(chunk)
                    total += len(chunk)
                    if written > limits.max_file_bytes or total > budget:
                        raise ExtractError(
                            "extract bundle",
                            f"expanded past {budget} bytes (limit, or {limits.max_ratio}x the archive)",
                            "raise extract limits in the deployment policy if the bundle is genuine",
                        )
                    h.update(chunk)
                    os.write(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            if not stat.S_ISREG(target.lstat().st_mode):
                raise ExtractError("extract bundle", f"member {member.name!r} did not land as a regular file")
            digests[rel.as_posix()] = h.hexdigest()
    finally:
        tf.close()
    return digests
