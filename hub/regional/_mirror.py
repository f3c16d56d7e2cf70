"""The regional hub's down-sync: a verified mirror of the root hub's TUF repository.

Flow of :meth:`Mirror.sync`: python-tuf's ``Updater`` (through :class:`deployment.tuf_adapter.DurableUpdater`
and the device's own :class:`deployment.fetcher.HttpFetcher`: conditional timestamp polls, resumable
target downloads, read deadlines) refreshes against the pinned root and loads every delegated channel
role; the desired state of each mirrored channel is fetched and every target it names (modules, the
rollout candidate, recall replacements, second signatures) is pre-fetched within the byte budget,
verified against its signed length and sha256; only then are the verified metadata files published into
the served directory, versioned files first and ``timestamp.json`` last (consistent snapshots: a device
never sees a timestamp naming a file this hub does not serve).

What is served is exactly the bytes python-tuf verified (its trusted cache, and ``root_history``),
never re-signed: devices verify everything again against their own pinned root. When the upstream is
unreachable the served files stay as they are (devices judge expiry themselves).

A target that was not pre-fetched is fetched on demand (:meth:`Mirror.ensure_target`), but only when it
is a target signed in the mirrored metadata with that sha256: the regional hub never proxies arbitrary
paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater, UpdaterConfig

from deployment.cas import ContentStore, HashMismatchError, hash_file
from deployment.fetcher import DirectoryFetcher, FetchConfig, HttpFetcher, base_urls, make_fetcher
from deployment.manifest import DesiredState, manifest_from_custom
from deployment.pull import DESIRED_STATE, safe_target
from deployment.rollout import recalls_of, rollout_of
from deployment.tuf_adapter import DurableUpdater, set_reference_time
from sre_core.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import SreError

__all__ = ["Mirror", "MirrorOfflineError", "MirrorRefusedError", "SyncResult"]

MAX_DESIRED_STATE_BYTES = 4 * 1024 * 1024


class MirrorOfflineError(SreError):
    """The upstream could not be reached (or stopped mid-transfer): keep serving what is held."""


class MirrorRefusedError(SreError):
    """The upstream sent data that failed verification: nothing of it is served."""


@dataclass
class SyncResult:
    """What one down-sync did."""

    timestamp_version: int = 0
    snapshot_version: int = 0
    channels: list[str] = field(default_factory=list)
    wanted: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    online: bool = True
    error: str | None = None
    bytes_downloaded: int = 0
    held_bytes: int = 0
    requests: int = 0
    not_modified: int = 0
    published: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


class Mirror:
    """A verified copy of the root hub's repository under ``<state>/repo`` (served to devices).

    Args:
        state: the regional hub's state directory.
        upstream: the root hub's (or a parent regional hub's) base URL.
        pinned_root: the trust anchor bytes (the root hub's ``1.root.json`` or a later one).
        clock: time for expiry checks and deadlines.
        fetch_config: transfer bounds (deadlines, retries).
        channels: the channels whose desired state is pre-fetched (None: every delegated channel).
        prefetch_bytes: the byte budget of pre-fetched targets.
        audit: where refusals are recorded.
        transport: an httpx transport for the down-sync (a simulation's link), default real sockets.
    """

    def __init__(
        self,
        state: Path,
        upstream: str,
        pinned_root: bytes,
        clock: Clock | None = None,
        fetch_config: FetchConfig | None = None,
        channels: tuple[str, ...] | None = None,
        prefetch_bytes: int = 16 * 1024**3,
        audit: AuditLog | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if prefetch_bytes < 0:
            raise ValueError("prefetch_bytes must be >= 0")
        self.state = Path(state)
        self.upstream = upstream.rstrip("/")
        self.pinned_root = pinned_root
        self.clock = clock or SystemClock()
        self.fetch_config = fetch_config or FetchConfig(max_stalled_attempts=2, metadata_deadline_s=30.0)
        self.channels = channels
        self.prefetch_bytes = prefetch_bytes
        self.tuf_dir = self.state / "tuf"
        self.repo_dir = self.state / "repo"
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"
        self.cas = ContentStore(self.state / "cas")
        self.audit = audit or AuditLog(self.state / "audit.jsonl", self.clock)
        self._sync_lock = threading.Lock()
        self._target_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.bytes_from_upstream = 0
        self.transport = transport
        self._source = self.upstream  # where the sync in progress reads (the upstream, or a bundle)
        self._stamp_file = self.state / "verified-targets.json"  # sha -> (inode, size, mtime) when verified
        self._stamp_cache: dict[str, list[int]] | None = None

    # ----- down-sync ------------------------------------------------------------------------------
    def sync(self, source: str | None = None) -> SyncResult:
        """Refresh, pre-fetch and publish. One at a time (a second caller waits).

        Args:
            source: read from here instead of the upstream: a sneakernet bundle directory
                (``sre-hub bundle export``) seeds the site with the same verification; targets the
                bundle lacks are fetched on demand later.

        Raises:
            MirrorOfflineError: the upstream was unreachable before anything new was verified.
            MirrorRefusedError: the upstream's metadata failed verification (audited; nothing published).
        """
        with self._sync_lock:
            self.cas.remove_stale()
            self._source = source or self.upstream
            fetcher = make_fetcher(
                self._source, self.fetch_config, self.clock, self._held_timestamp, self.transport
            )
            result = SyncResult()
            try:
                updater = self._updater(fetcher)
                self._tuf(updater.refresh)
                roles = self._load_roles(updater, result)
                result.channels = sorted(c for c in (self.channels or roles) if c in roles)
                self._prefetch(updater, fetcher, result)
                result.timestamp_version, result.snapshot_version = self._publish()
                result.published = True
            finally:
                result.requests = fetcher.requests
                result.not_modified = getattr(fetcher, "not_modified", 0)
                fetcher.close()
            self.audit.append(
                "regional.synced",
                upstream=self._source,
                timestamp=result.timestamp_version,
                fetched=result.fetched,
                over_budget=result.over_budget,
                failed=result.failed,
                bytes=result.bytes_downloaded,
            )
            return result

    def _held_timestamp(self, url: str) -> bytes | None:
        if not url.endswith("/timestamp.json"):
            return None
        with contextlib.suppress(OSError):
            return (self.tuf_dir / "timestamp.json").read_bytes()
        return None

    def _updater(self, fetcher: HttpFetcher | DirectoryFetcher) -> Updater:
        anchor = self.state / "anchor.sha256"
        pinned_sha = hashlib.sha256(self.pinned_root).hexdigest()
        if not anchor.is_file() or anchor.read_text().strip() != pinned_sha:
            # A new trust anchor: nothing trusted (or served) under the old one stays.
            for d in (self.tuf_dir, self.metadata_dir):
                shutil.rmtree(d, ignore_errors=True)
            self.state.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(anchor, pinned_sha.encode())
        self.tuf_dir.mkdir(parents=True, exist_ok=True)
        config = UpdaterConfig(targets_max_length=64 * 1024 * 1024, snapshot_max_length=16 * 1024 * 1024)
        meta_url, _ = base_urls(self._source)
        updater: Updater | None = None
        if (self.tuf_dir / "root.json").is_file():
            with contextlib.suppress(exceptions.RepositoryError, OSError, ValueError):
                updater = DurableUpdater(str(self.tuf_dir), meta_url, fetcher, config, None)
        if updater is None:
            try:
                updater = DurableUpdater(str(self.tuf_dir), meta_url, fetcher, config, self.pinned_root)
            except exceptions.RepositoryError as exc:
                raise self._refused("load the pinned root", exc) from exc
        set_reference_time(updater, self.clock.now())
        return updater

    def _refused(self, what: str, exc: Exception) -> MirrorRefusedError:
        self.audit.append(
            "regional.refused", upstream=self.upstream, what=what, why=f"{type(exc).__name__}: {exc}"
        )
        return MirrorRefusedError(
            what,
            f"the upstream sent data that fails TUF verification ({type(exc).__name__}: {exc})",
            "nothing new is served; devices keep what this hub served before; tell the root operators",
        )

    def _tuf(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except exceptions.DownloadError as exc:
            raise MirrorOfflineError(
                f"sync from {self.upstream}",
                f"the upstream cannot be reached ({exc})",
                "it retries on its own",
            ) from exc
        except exceptions.RepositoryError as exc:
            raise self._refused(f"refresh metadata from {self.upstream}", exc) from exc

    def _load_roles(self, updater: Updater, result: SyncResult) -> list[str]:
        """Load every delegated role the snapshot names, so all of them can be served. A role that is
        validly signed but expired (a channel nobody re-signed) is left out, audited, and the other
        channels are still mirrored; any other verification failure refuses the whole sync (nothing new
        is published, the site keeps serving the consistent set it had).

        Raises:
            MirrorRefusedError: a role failed verification other than by expiry.
        """
        snap = Metadata[Snapshot].from_bytes((self.tuf_dir / "snapshot.json").read_bytes()).signed
        loaded = []
        for name in snap.meta:
            role = name[: -len(".json")]
            if role == "targets":
                continue
            try:
                self._tuf(updater.get_targetinfo, f"{role}/{DESIRED_STATE}")
            except MirrorRefusedError as exc:
                if not isinstance(exc.__cause__, exceptions.ExpiredMetadataError):
                    # altered on the way (signature, version, hash): publishing the new timestamp would
                    # name a role this site cannot serve; keep serving the consistent set held, say so
                    raise
                result.failed[name] = exc.message  # genuinely signed but expired: the root's own state
                continue
            loaded.append(role)
        return loaded

    def _names_of(self, updater: Updater, channel: str, desired: DesiredState) -> list[str]:
        names = [dm.target for dm in desired.modules.values()]
        ro = rollout_of(desired)
        if ro is not None:
            names.append(ro.target)
        names += [rc.to_target for rc in recalls_of(desired)]
        out: list[str] = []
        for name in names:
            if not safe_target(name, channel) or name in out:
                continue
            out.append(name)
            info = self._tuf(updater.get_targetinfo, name)
            custom = info.custom if info is not None and isinstance(info.custom, dict) else {}
            with contextlib.suppress(ValidationError, ValueError, TypeError):
                manifest = manifest_from_custom(custom)
                for ref in manifest.attestations if manifest is not None else []:
                    if safe_target(ref.target, channel) and ref.target not in out:
                        out.append(ref.target)
        return out

    def _prefetch(
        self, updater: Updater, fetcher: HttpFetcher | DirectoryFetcher, result: SyncResult
    ) -> None:
        wanted: list[TargetFile] = []
        for channel in result.channels:
            info = self._tuf(updater.get_targetinfo, f"{channel}/{DESIRED_STATE}")
            if info is None or info.length > MAX_DESIRED_STATE_BYTES:
                continue
            try:
                path = self._fetch(info, fetcher, result, self._source)
                desired = DesiredState.model_validate_json(path.read_bytes())
            except (SreError, ValidationError) as exc:
                result.failed[info.path] = str(exc)
                continue
            for name in self._names_of(updater, channel, desired):
                ti = self._tuf(updater.get_targetinfo, name)
                if ti is not None and "sha256" in ti.hashes and ti not in wanted:
                    wanted.append(ti)
        used = sum(ti.length for ti in wanted if self._held(ti) is not None)
        for ti in wanted:
            result.wanted.append(ti.path)
            if self._held(ti) is not None:
                continue
            if used + ti.length > self.prefetch_bytes:
                result.over_budget.append(ti.path)
                continue
            try:
                self._fetch(ti, fetcher, result, self._source)
                used += ti.length
            except SreError as exc:
                result.failed[ti.path] = exc.message
        result.held_bytes = used

    # ----- targets --------------------------------------------------------------------------------
    def served_path(self, info: TargetFile) -> Path:
        dirname, _, base = info.path.rpartition("/")
        return self.targets_dir / dirname / f"{info.hashes['sha256']}.{base}"

    def _held(self, info: TargetFile) -> Path | None:
        """The served file of ``info`` when it is intact. A file whose (inode, size, mtime) differs from
        when it was verified is hashed again; one that no longer matches its signed digest (tampering,
        bit rot) is removed with its cached blob, audited, and fetched again by the caller."""
        p = self.served_path(info)
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        sha = info.hashes["sha256"]
        stamp = [st.st_ino, st.st_size, st.st_mtime_ns]
        if st.st_size == info.length and self._stamps().get(sha) == stamp:
            return p
        if hash_file(p) == (info.length, sha):
            self._stamp(sha, stamp)
            return p
        self.audit.append("regional.target_damaged", target=info.path, sha256=sha, size=st.st_size)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.cas.path_for(sha).unlink()
        return None

    def _stamps(self) -> dict[str, list[int]]:
        if self._stamp_cache is None:
            try:
                self._stamp_cache = dict(json.loads(self._stamp_file.read_text()))
            except (OSError, ValueError, TypeError):
                self._stamp_cache = {}
        return self._stamp_cache

    def _stamp(self, sha: str, stamp: list[int]) -> None:
        with self._locks_lock:
            stamps = self._stamps()
            stamps[sha] = stamp
            atomic_write_json(self._stamp_file, stamps)

    @contextlib.contextmanager
    def _target_lock(self, sha: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._target_locks.setdefault(sha, threading.Lock())
        with lock:
            yield

    def _fetch(
        self,
        info: TargetFile,
        fetcher: HttpFetcher | DirectoryFetcher,
        result: SyncResult | None = None,
        source: str | None = None,
    ) -> Path:
        """Download a signed target (resuming), verify length and sha256, link it into the served tree.

        Raises:
            MirrorOfflineError: the transfer failed (resumes next time).
            MirrorRefusedError: the bytes do not match the signed length or hash (discarded, audited).
        """
        sha = info.hashes["sha256"]
        with self._target_lock(sha):
            held = self._held(info)
            if held is not None:
                return held
            blob = self.cas.get(sha, info.length)
            if blob is None:
                dirname, _, base = info.path.rpartition("/")
                _, targets = base_urls(source or self.upstream)
                url = f"{targets}{quote(dirname)}/{sha}.{quote(base)}"
                validator = self.cas.read_resume(sha).get("etag")
                part = self.cas.partial(sha)
                if validator is None and part.exists():
                    part.unlink()
                try:
                    stats = fetcher.download_to(
                        url,
                        part,
                        info.length,
                        validator,
                        on_validator=lambda etag: self.cas.write_resume(sha, {"url": url, "etag": etag}),
                    )
                except exceptions.DownloadLengthMismatchError as exc:
                    self.cas.discard(sha)
                    raise self._refused(f"target {info.path}", exc) from exc
                except exceptions.DownloadError as exc:
                    raise MirrorOfflineError(
                        f"fetch {info.path}", str(exc), "it resumes at the next sync"
                    ) from exc
                self.bytes_from_upstream += stats.bytes_received
                if result is not None:
                    result.bytes_downloaded += stats.bytes_received
                try:
                    blob = self.cas.commit(sha, info.length, info.path)
                except HashMismatchError as exc:
                    raise self._refused(f"target {info.path}", exc) from exc
                if result is not None:
                    result.fetched.append(info.path)
            dest = self.served_path(info)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.link")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.link(blob, tmp)
            tmp.replace(dest)
            fsync_dir(dest.parent)
            st = dest.stat()
            self._stamp(sha, [st.st_ino, st.st_size, st.st_mtime_ns])
            return dest

    def signed_target(self, rel: str) -> TargetFile | None:
        """The signed target a served path ``<channel>/<sha256>.<name>`` stands for, from the verified
        cache (None when no mirrored role signs a target of that name and hash)."""
        channel, _, fname = rel.partition("/")
        sha, dot, name = fname.partition(".")
        if not dot or len(sha) != 64 or not safe_target(f"{channel}/{name}", channel):
            return None
        try:
            role = Metadata[Targets].from_bytes((self.tuf_dir / f"{quote(channel, '')}.json").read_bytes())
        except (OSError, ValueError, exceptions.RepositoryError):
            return None
        info = role.signed.targets.get(f"{channel}/{name}")
        if info is None or info.hashes.get("sha256") != sha:
            return None
        return info

    def ensure_target(self, rel: str) -> bool:
        """Make sure a served target is present, fetching a signed one from upstream on demand.

        Returns False when ``rel`` is not a signed target or the upstream cannot provide it now.
        """
        info = self.signed_target(rel)
        if info is None:
            return False
        if self._held(info) is not None:
            return True
        fetcher = make_fetcher(self.upstream, self.fetch_config, self.clock, None, self.transport)
        try:
            self._fetch(info, fetcher)
        except SreError:
            return False
        finally:
            fetcher.close()
        return True

    # ----- publishing -----------------------------------------------------------------------------
    def _put(self, name: str, data: bytes) -> None:
        dest = self.metadata_dir / name
        with contextlib.suppress(OSError):
            if dest.read_bytes() == data:
                return
        atomic_write_bytes(dest, data)

    def _publish(self) -> tuple[int, int]:
        """Copy the verified cache into the served directory: versioned files first, timestamp last.

        Raises:
            MirrorRefusedError: the cache does not hold the snapshot or top-level targets the timestamp
                names (a bug or tampering at rest): nothing new is published.
        """
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        roots = sorted(
            (self.tuf_dir / "root_history").glob("*.root.json"), key=lambda p: int(p.name.split(".", 1)[0])
        )
        for p in roots:
            self._put(p.name, p.read_bytes())
        ts_bytes = (self.tuf_dir / "timestamp.json").read_bytes()
        ts = Metadata[Timestamp].from_bytes(ts_bytes).signed
        snap_bytes = (self.tuf_dir / "snapshot.json").read_bytes()
        snap = Metadata[Snapshot].from_bytes(snap_bytes).signed
        if snap.version != ts.snapshot_meta.version:
            raise self._refused(
                "publish", ValueError("the cached snapshot is not the one the timestamp names")
            )
        staged: list[tuple[str, bytes]] = []
        for name, meta in snap.meta.items():
            role = name[: -len(".json")]
            try:
                data = (self.tuf_dir / f"{quote(role, '')}.json").read_bytes()
                version = Metadata[Targets].from_bytes(data).signed.version
            except (OSError, ValueError, exceptions.RepositoryError):
                data, version = b"", -1
            if version == meta.version:
                staged.append((f"{version}.{name}", data))
            elif role == "targets":
                raise self._refused(
                    f"publish {name}", ValueError(f"cached version {version} != {meta.version}")
                )
            # else: a channel role refused at load (audited, in the result): that channel is not served
        for name, data in staged:
            self._put(name, data)
        self._put(f"{snap.version}.snapshot.json", snap_bytes)
        if roots:
            newest = roots[-1].read_bytes()
            Metadata[Root].from_bytes(newest)
            self._put("root.json", newest)
        fsync_dir(self.metadata_dir)
        self._put("timestamp.json", ts_bytes)
        return ts.version, snap.version

    def served_timestamp(self) -> dict[str, Any] | None:
        """Version and expiry of the timestamp this hub serves (None before the first sync)."""
        try:
            ts = Metadata[Timestamp].from_bytes((self.metadata_dir / "timestamp.json").read_bytes()).signed
        except (OSError, ValueError, exceptions.RepositoryError):
            return None
        return {"version": ts.version, "expires": ts.expires.isoformat()}
