"""Offline bundles for sneakernet: the repository's metadata plus one channel's targets, as files.

Public API::

    export_bundle(repo, channel, out) -> dict   (counts and bytes)
    seed_regional(hub, bundle) -> SyncResult    a regional hub takes a bundle as its upstream once

A device pulls from the bundle directory exactly as from the hub (``sre-agent pull --from DIR``): the
same TUF checks apply, so a bundle carried on a USB stick is trusted only as far as its signatures.
A regional hub is seeded the same way (``sre-hub bundle seed DIR --state ...``): python-tuf verifies the
bundle against the regional hub's pinned root before anything is served, exactly as a down-sync from the
root would; a bundle older than what the site serves is refused (rollback protection), and a target whose
bytes do not match its signed digest is not served (the site fetches it from the root on demand later).

The bundle is written to ``<out>.tmp-*`` and renamed into place, so a half-written bundle never looks
complete. Re-sign the timestamp with a longer expiry (``sre-hub timestamp --expires 7d``) before
exporting a bundle that travels for days.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployment.manifest import manifest_from_custom
from deployment.pull import DESIRED_STATE
from hub.repository import HubRepository
from sre_core.atomic import fsync_dir
from sre_core.errors import InputError, SreError

if TYPE_CHECKING:
    from hub.regional import RegionalHub, SyncResult

__all__ = ["export_bundle", "seed_regional"]


def _existing(src: Path, channel: str) -> Path:
    if not src.is_file():
        raise SreError(
            f"export bundle of {channel}", f"target file {src} is missing", "republish that version"
        )
    return src


def export_bundle(repo: HubRepository, channel: str, out: Path) -> dict[str, Any]:
    """Write ``out/metadata`` (every published metadata file) and the targets of the channel's current
    desired state (the desired state, its artifacts and their signatures) under ``out/targets``.

    Raises:
        InputError: unknown channel, or ``out`` exists and is not empty.
    """
    out = Path(out)
    targets = repo.channel_targets(channel)
    desired = repo.desired_state(channel)
    if desired is None:
        raise InputError(
            f"export bundle of {channel}", "nothing was released in this channel", "run sre-hub release"
        )
    needed = [f"{channel}/{DESIRED_STATE}"]
    for dm in desired.modules.values():
        needed.append(dm.target)
        manifest = manifest_from_custom(targets[dm.target].custom)
        if manifest is not None:
            needed.extend(a.target for a in manifest.attestations if a.target in targets)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"export bundle to {out}", "the directory is not empty", "choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "metadata").mkdir()
        n_meta = 0
        for f in sorted(repo.metadata_dir.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, tmp / "metadata" / f.name)
                n_meta += 1
        dest = tmp / "targets" / channel
        dest.mkdir(parents=True)
        size = 0
        for path in needed:
            tf = targets[path]
            name = f"{tf.hashes['sha256']}.{path.split('/', 1)[1]}"
            src = _existing(repo.targets_dir / channel / name, channel)
            shutil.copy2(src, dest / name)
            size += tf.length
        if out.exists():
            out.rmdir()
        tmp.replace(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "bundle": str(out),
        "channel": channel,
        "metadata_files": n_meta,
        "targets": len(needed),  # copied into the bundle (not every target the channel ever had)
        "target_bytes": size,
    }


def seed_regional(hub: RegionalHub, bundle: Path) -> SyncResult:
    """Seed ``hub`` (a regional hub) from a bundle directory: one down-sync that reads the bundle instead
    of the upstream, with the same verification against the hub's pinned root. Run it while the regional
    hub's server is stopped, or through the hub object it serves (one sync at a time per process).

    Raises:
        InputError: ``bundle`` is not a bundle directory.
        SreError: the bundle failed verification (audited by the hub; nothing of it is served).
    """
    bundle = Path(bundle)
    if not (bundle / "metadata" / "timestamp.json").is_file() or not (bundle / "targets").is_dir():
        raise InputError(
            f"seed the regional hub from {bundle}",
            "not a bundle directory (no metadata/timestamp.json or targets/)",
            "export one with sre-hub bundle export --channel C DIR",
        )
    result = hub.sync_down(source=str(bundle.resolve()))
    if not result.published:
        raise SreError(
            f"seed the regional hub from {bundle}",
            result.error or "nothing was published",
            "nothing of the bundle is served; export a fresh bundle from the root hub (one signed by the "
            "root this site pins, newer than what the site serves)",
        )
    return result
