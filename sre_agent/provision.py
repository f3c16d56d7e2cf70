"""Provisioning a device: the state layout, its identity, the pinned trust anchor, factory safe modules."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from sre_core.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError
from sre_core.identity import load_or_create_identity
from sre_core.paths import StatePaths

__all__ = ["pin_root", "provision", "read_device_file"]


def read_device_file(paths: StatePaths) -> dict[str, Any]:
    """Provisioning facts (hub, channel, root digest); empty when not provisioned."""
    if not paths.device_file.exists():
        return {}
    data: dict[str, Any] = json.loads(paths.device_file.read_text())
    return data


def pin_root(paths: StatePaths, root_file: Path) -> str:
    """Validate a TUF root.json (type, signatures by its own keys at threshold) and pin it.

    Returns its sha256. Raises InputError when the file is not a self-consistent TUF root.
    """
    from tuf.api.exceptions import UnsignedMetadataError
    from tuf.api.metadata import Metadata
    from tuf.api.metadata import Root as TufRoot
    from tuf.api.serialization.json import CanonicalJSONSerializer

    try:
        data = Path(root_file).read_bytes()
    except OSError as exc:
        raise InputError(f"pin trust anchor {root_file}", str(exc), "check the path") from exc
    try:
        md = Metadata[TufRoot].from_bytes(data)
    except Exception as exc:
        raise InputError(
            f"pin trust anchor {root_file}",
            f"not TUF root metadata ({exc})",
            "pass the root.json that `sre-hub init` wrote",
        ) from exc
    if not isinstance(md.signed, TufRoot):
        raise InputError(f"pin trust anchor {root_file}", f"role is {md.signed.type}, not root")
    try:
        payload = CanonicalJSONSerializer().serialize(md.signed)
        md.signed.verify_delegate(TufRoot.type, payload, md.signatures)
    except (UnsignedMetadataError, ValueError) as exc:
        raise InputError(
            f"pin trust anchor {root_file}",
            f"root is not signed by its own keys at threshold: {exc}",
            "get an intact root.json from the hub operators",
        ) from exc
    atomic_write_bytes(paths.root_json, data, mode=0o644)
    return hashlib.sha256(data).hexdigest()


def provision(
    paths: StatePaths,
    root: Path | None = None,
    hub: str | None = None,
    channel: str | None = None,
    device_id: str | None = None,
    safe_modules: list[str] | None = None,
    clock: Clock | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Create or complete a device's state directory. Idempotent; never replaces an existing identity.

    Pinning the same root again is a no-op; replacing a pinned trust anchor with a different one needs
    ``force`` and is audited (``trust.repinned`` with both digests): everything trusted under the old
    anchor is dropped at the next pull.

    Raises:
        InputError: a bad root.json or safe-module argument, or a different root without ``force``.
    """
    clock = clock or SystemClock()
    paths.create()
    identity, created = load_or_create_identity(paths, device_id)
    audit = AuditLog(paths.audit_log, clock)
    device = read_device_file(paths)
    device["device_id"] = identity.device_id
    result: dict[str, Any] = {
        "state": str(paths.root),
        "device_id": identity.device_id,
        "identity_created": created,
        "public_key": str(paths.public_key),
    }
    if created:
        audit.append("identity.created", actor="operator", device_id=identity.device_id)
    if root is not None:
        old = hashlib.sha256(paths.root_json.read_bytes()).hexdigest() if paths.root_json.is_file() else None
        try:
            new = hashlib.sha256(Path(root).read_bytes()).hexdigest()
        except OSError as exc:
            raise InputError(f"pin trust anchor {root}", str(exc), "check the path") from exc
        if old is not None and old != new and not force:
            audit.append("trust.repin_refused", actor="operator", root_sha256=old, offered_sha256=new)
            raise InputError(
                f"pin trust anchor {root}",
                f"this device already pins a different trust anchor (sha256 {old[:16]}); replacing it "
                "would trust whoever signed the new root",
                "check that the new root.json really comes from your hub operators, then re-run with --force",
            )
        digest = pin_root(paths, root)
        device["root_sha256"] = digest
        result["root_sha256"] = digest
        if old is not None and old != digest:
            audit.append("trust.repinned", actor="operator", root_sha256=digest, previous_sha256=old)
        elif old is None:
            audit.append("trust.pinned", actor="operator", root_sha256=digest)
    if hub is not None:
        device["hub"] = hub
    if channel is not None:
        device["channel"] = channel
    installed = []
    for spec in safe_modules or []:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise InputError(f"install safe module {spec!r}", "expected MODULE=FILE")
        src = Path(file)
        if not src.is_file():
            raise InputError(f"install safe module {name}", f"{src} is not a file", "check the path")
        dest_dir = paths.safe / name
        if dest_dir.exists():
            for p in dest_dir.iterdir():
                p.chmod(0o644)
            shutil.rmtree(dest_dir)
        dest_dir.mkdir(parents=True)
        dest = dest_dir / src.name
        atomic_write_bytes(dest, src.read_bytes(), mode=0o444)
        digest = hashlib.sha256(dest.read_bytes()).hexdigest()
        atomic_write_json(dest_dir / "safe.json", {"module": name, "file": src.name, "sha256": digest})
        (dest_dir / "safe.json").chmod(0o444)
        fsync_dir(dest_dir)
        installed.append({"module": name, "sha256": digest, "path": str(dest)})
        audit.append("safe_module.installed", actor="operator", module=name, sha256=digest)
    if installed:
        device["safe_modules"] = device.get("safe_modules", {}) | {
            m["module"]: m["sha256"] for m in installed
        }
        result["safe_modules"] = installed
    result["hub"] = device.get("hub")
    result["channel"] = device.get("channel")
    atomic_write_json(paths.device_file, device)
    return result
