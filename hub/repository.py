"""The hub's TUF repository: roles, channel delegations, targets with manifests, signed desired states.

Public API::

    HubRepository.init(repo_dir, root_threshold=1, root_keys=1, channels=("stable",), clock=None)
    HubRepository(repo_dir, clock=None)
        .add_channel(channel)                         -> None
        .publish(channel, artifact, manifest, cosign_key=None, attestation=None)
            -> PublishedModule   (immutable: another artifact under a published version is refused;
                                  a model the device will load is checked first, on every path)
        .release(channel, module, version, expires_in=timedelta(days=14), extra=None) -> DesiredState
        .update_desired(channel, changes, expires_in=timedelta(days=14)) -> DesiredState (rollouts, recalls)
        .timestamp(expires_in=None)                   -> int (new timestamp version)
        .expiring(within)                             -> dict[role, datetime]
        .lock()                                       -> context manager (exclusive, re-entrant)
        .rotate_key(role)                             -> list[str] (new key ids)
        .desired_state(channel)                       -> DesiredState | None
        .channel_targets(channel)                     -> dict[str, TargetFile]
    check_model_artifact(artifact, manifest)          the device's runtime loads it; inputs/outputs match
    target_name(channel, module, version, filename)   -> str
    safe_target_path(path, channel)                   -> bool

Layout of ``DIR``::

    repo.json                    channels and expiry periods
    keys/<role>/<keyid>.pem      private keys (development only; see docs/release-engineering.md)
    metadata/N.root.json, root.json, timestamp.json, N.snapshot.json, N.targets.json, N.<channel>.json
    metadata/current/<role>.json the newest version of each role (what the hub edits next)
    targets/<channel>/<sha256>.<name>   consistent-snapshot target files

Every channel is a delegated targets role restricted to the paths ``<channel>/*`` with its own key set,
so a release engineer holding one channel's key cannot sign for another. Consistent snapshots are on:
metadata and targets are immutable files named by version or hash, so a client mid-update never sees a
mix of old and new files. The timestamp carries the hub's signing time (``x-sre-issued``) so devices can
raise their trusted-time high-water mark on every refresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from deployment.manifest import (
    NAME_RE,
    DesiredModule,
    DesiredState,
    ModuleManifest,
    manifest_from_custom,
    manifest_to_custom,
)
from deployment.pull import DESIRED_STATE, ISSUED_FIELD, safe_target
from deployment.signatures import cosign_sign_file, dsse_sign, intoto_statement
from sre_core.atomic import atomic_write_bytes, atomic_write_json
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError, SreError

__all__ = [
    "DESIRED_STATE",
    "ISSUED_FIELD",
    "Expiry",
    "HubRepository",
    "PublishedModule",
    "check_model_artifact",
    "safe_target_path",
    "target_name",
]

TOP_ROLES = ("root", "targets", "snapshot", "timestamp")
_SERIALIZER = JSONSerializer(compact=False)


@dataclass(frozen=True)
class Expiry:
    """How long each role's signature stays valid (seconds)."""

    root: float = 365 * 86400
    targets: float = 365 * 86400
    channel: float = 180 * 86400
    snapshot: float = 30 * 86400
    timestamp: float = 86400

    def for_role(self, role: str) -> timedelta:
        if role in TOP_ROLES:
            return timedelta(seconds=float(getattr(self, role)))
        return timedelta(seconds=self.channel)


@dataclass(frozen=True)
class PublishedModule:
    """What :meth:`HubRepository.publish` added."""

    channel: str
    target: str
    length: int
    sha256: str
    manifest: ModuleManifest
    extra_targets: list[str] = field(default_factory=list)


def target_name(channel: str, module: str, version: str, filename: str) -> str:
    """The TUF target path of a module artifact: one level under the channel (``<channel>/*``)."""
    return f"{channel}/{module}-{version}-{filename}"


def safe_target_path(path: str, channel: str) -> bool:
    """True when ``path`` is ``<channel>/<plain name>``: no ``..``, no absolute path, no backslash."""
    return safe_target(path, channel)


_LOCK_TIMEOUT_S = 60.0


def _locked[**P, R](method: Callable[P, R]) -> Callable[P, R]:
    """Serialise mutating operations across processes (hub cron, CLI, rollout service)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        repo = args[0]
        if not isinstance(repo, HubRepository):  # pragma: no cover - decorator misuse
            raise TypeError("_locked decorates HubRepository methods")
        with repo.lock():
            return method(*args, **kwargs)

    return wrapper


def _typed[T](value: object, cls: type[T], what: str) -> T:
    if not isinstance(value, cls):
        raise SreError(f"load {what} metadata", f"expected {cls.__name__}, found {type(value).__name__}")
    return value


def _roles(targets: Targets) -> dict[str, DelegatedRole]:
    if targets.delegations is None or targets.delegations.roles is None:
        raise SreError("load targets metadata", "the top-level targets role has no channel delegations")
    return targets.delegations.roles


def _check_channel(channel: str) -> None:
    if not re.match(NAME_RE, channel) or channel in TOP_ROLES or channel == "current":
        raise InputError(
            f"channel {channel!r}",
            "a channel name is lowercase letters, digits, '.', '_' or '-' and not a TUF role name",
            "choose a name like 'stable' or 'beta'",
        )


class HubRepository:
    """A TUF repository on disk. Not safe for concurrent writers (one release engineer at a time).

    Raises:
        SreError: the directory is not a repository, or a key is missing.
        InputError: a bad channel, module, path or argument.
    """

    def __init__(self, repo_dir: Path, clock: Clock | None = None) -> None:
        self.dir = Path(repo_dir)
        self.clock = clock or SystemClock()
        cfg_path = self.dir / "repo.json"
        if not cfg_path.is_file():
            raise SreError(
                f"open repository {self.dir}", "repo.json is missing", "run `sre-hub init --repo DIR` first"
            )
        self._cfg: dict[str, Any] = json.loads(cfg_path.read_text())
        self.expiry = Expiry(**self._cfg.get("expiry", {}))
        self._lock_depth = 0

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive, re-entrant lock on the repository (``DIR/.lock``), waited for at most 60 s.

        Raises:
            SreError: another writer held the lock for too long.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with (self.dir / ".lock").open("a") as fh:
            deadline = time.monotonic() + _LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SreError(
                            f"lock repository {self.dir}", "another writer holds it", "retry when it is done"
                        ) from None
                    time.sleep(0.05)
            self._cfg = json.loads((self.dir / "repo.json").read_text())  # another writer may have changed it
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # ----- layout -------------------------------------------------------------------------------
    @property
    def metadata_dir(self) -> Path:
        return self.dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.dir / "targets"

    @property
    def keys_dir(self) -> Path:
        return self.dir / "keys"

    @property
    def channels(self) -> list[str]:
        return list(self._cfg.get("channels", []))

    def _save_cfg(self) -> None:
        atomic_write_json(self.dir / "repo.json", self._cfg)

    # ----- init ---------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        repo_dir: Path,
        root_threshold: int = 1,
        root_keys: int = 1,
        channels: Iterable[str] = ("stable",),
        clock: Clock | None = None,
        expiry: Expiry | None = None,
    ) -> HubRepository:
        """Create a repository with fresh keys for root (``root_keys`` keys, ``root_threshold`` of them
        must sign), targets, snapshot, timestamp, and one delegated role per channel.

        Raises:
            InputError: the directory already holds a repository, or the threshold is impossible.
        """
        repo_dir = Path(repo_dir)
        if (repo_dir / "repo.json").exists():
            raise InputError(
                f"init repository {repo_dir}", "a repository already exists there", "use another directory"
            )
        if not 1 <= root_threshold <= root_keys:
            raise InputError(
                "init repository",
                f"root threshold {root_threshold} with {root_keys} root keys",
                "use 1 <= --root-threshold <= --root-keys",
            )
        channels = list(channels)
        for ch in channels:
            _check_channel(ch)
        exp = expiry or Expiry()
        repo_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            repo_dir / "repo.json",
            {"spec": 1, "channels": [], "expiry": exp.__dict__, "serials": {}},
        )
        repo = cls(repo_dir, clock)
        repo.metadata_dir.mkdir(exist_ok=True)
        (repo.metadata_dir / "current").mkdir(exist_ok=True)
        repo.targets_dir.mkdir(exist_ok=True)
        now = repo._now()
        root = Root(expires=now + exp.for_role("root"), consistent_snapshot=True)
        for role in TOP_ROLES:
            count = root_keys if role == "root" else 1
            for _ in range(count):
                root.add_key(repo._new_key(role).public_key, role)
        root.roles["root"].threshold = root_threshold
        targets = Targets(expires=now + exp.for_role("targets"))
        targets.delegations = Delegations(keys={}, roles={})
        repo._write_root(Metadata(root), sign_with=[])
        repo._store("targets", Metadata(targets), bump=False)
        repo._store("snapshot", Metadata(Snapshot(expires=now + exp.for_role("snapshot"))), bump=False)
        repo._store("timestamp", Metadata(Timestamp(expires=now + exp.for_role("timestamp"))), bump=False)
        for ch in channels:
            repo.add_channel(ch, _commit=False)
        repo._commit(["targets", *channels], bump=False)
        return repo

    def _now(self) -> datetime:
        return self.clock.now().replace(microsecond=0)

    # ----- keys ---------------------------------------------------------------------------------
    def _new_key(self, role: str) -> CryptoSigner:
        signer = CryptoSigner.generate_ed25519()
        d = self.keys_dir / role
        d.mkdir(parents=True, exist_ok=True)
        self.keys_dir.chmod(0o700)
        atomic_write_bytes(d / f"{signer.public_key.keyid}.pem", signer.private_bytes, mode=0o600)
        return signer

    def _signer(self, role: str, keyid: str, key: Any) -> CryptoSigner | None:
        pem = self.keys_dir / role / f"{keyid}.pem"
        if not pem.is_file():
            return None
        priv = load_pem_private_key(pem.read_bytes(), password=None)
        pub = key if isinstance(key, SSlibKey) else SSlibKey.from_dict(keyid, key.to_dict())
        return CryptoSigner(priv, pub)

    def _signers_for(self, role: str) -> list[CryptoSigner]:
        if role in TOP_ROLES:
            root = self._load("root").signed
            root = _typed(root, Root, "root")
            keyids = root.roles[role].keyids
            keys = root.keys
        else:
            targets = self._load("targets").signed
            targets = _typed(targets, Targets, "targets")
            keyids = _roles(targets)[role].keyids
            keys = targets.delegations.keys if targets.delegations else {}
        signers = [s for k in keyids if (s := self._signer(role, k, keys[k])) is not None]
        if not signers:
            raise SreError(
                f"sign {role} metadata",
                f"no private key for role {role} under {self.keys_dir / role}",
                "sign on the machine that holds this role's key",
            )
        return signers

    def receipt_signer(self) -> CryptoSigner | None:
        """The online timestamp key, which signs batch receipts (:mod:`sre_core.receipts`); None when
        this hub holds no timestamp key."""
        try:
            return self._signers_for("timestamp")[0]
        except (SreError, OSError, ValueError):
            return None

    # ----- metadata storage ---------------------------------------------------------------------
    def _load(self, role: str) -> Metadata[Any]:
        path = self.metadata_dir / "current" / f"{role}.json"
        if not path.is_file():
            raise SreError(f"load {role} metadata", f"{path} is missing", "check the repository directory")
        return Metadata.from_bytes(path.read_bytes())

    def _sign(self, role: str, md: Metadata[Any]) -> None:
        md.signatures.clear()
        for signer in self._signers_for(role):
            md.sign(signer, append=True)

    def _store(
        self, role: str, md: Metadata[Any], bump: bool = True, expires_in: timedelta | None = None
    ) -> int:
        """Bump the version and expiry, sign, write the versioned file and the current copy."""
        signed: Signed = md.signed
        if bump:
            signed.version += 1
        signed.expires = self._now() + (expires_in or self.expiry.for_role(role))
        self._sign(role, md)
        data = md.to_bytes(_SERIALIZER)
        if role == "timestamp":
            atomic_write_bytes(self.metadata_dir / "timestamp.json", data)
        else:
            atomic_write_bytes(self.metadata_dir / f"{signed.version}.{role}.json", data)
        atomic_write_bytes(self.metadata_dir / "current" / f"{role}.json", data)
        return signed.version

    def _write_root(self, md: Metadata[Any], sign_with: list[CryptoSigner]) -> None:
        """Sign root with its own keys plus ``sign_with`` (the previous root keys on rotation)."""
        root = _typed(md.signed, Root, "root")
        md.signatures.clear()
        for s in sign_with:
            md.sign(s, append=True)
        for keyid in root.roles["root"].keyids:
            own = self._signer("root", keyid, root.keys[keyid])
            if own is not None and keyid not in md.signatures:
                md.sign(own, append=True)
        data = md.to_bytes(_SERIALIZER)
        atomic_write_bytes(self.metadata_dir / f"{root.version}.root.json", data)
        atomic_write_bytes(self.metadata_dir / "root.json", data)
        atomic_write_bytes(self.metadata_dir / "current" / "root.json", data)

    def _commit(self, roles: list[str], bump: bool = True) -> None:
        """Re-sign changed targets roles, then a new snapshot and timestamp that name them."""
        for role in roles:
            self._store(role, self._load(role), bump=bump)
        snap = self._load("snapshot")
        _typed(snap.signed, Snapshot, "snapshot").meta = {
            f"{r}.json": MetaFile(self._load(r).signed.version) for r in self._targets_roles()
        }
        snap_version = self._store("snapshot", snap, bump=bump)
        ts = self._load("timestamp")
        ts_signed = _typed(ts.signed, Timestamp, "timestamp")
        ts_signed.snapshot_meta = MetaFile(snap_version)
        ts_signed.unrecognized_fields[ISSUED_FIELD] = self._now().isoformat()
        self._store("timestamp", ts, bump=bump)

    def _targets_roles(self) -> list[str]:
        return ["targets", *self.channels]

    # ----- channels -----------------------------------------------------------------------------
    @_locked
    def add_channel(self, channel: str, _commit: bool = True) -> None:
        """Delegate ``<channel>/*`` to a new role with its own key.

        Raises:
            InputError: a bad or existing channel name.
        """
        _check_channel(channel)
        if channel in self.channels:
            raise InputError(f"add channel {channel}", "the channel exists")
        signer = self._new_key(channel)
        tmd = self._load("targets")
        targets = tmd.signed
        targets = _typed(targets, Targets, "targets")
        if targets.delegations is None:
            targets.delegations = Delegations(keys={}, roles={})
        _roles(targets)[channel] = DelegatedRole(
            name=channel, keyids=[], threshold=1, terminating=True, paths=[f"{channel}/*"]
        )
        targets.add_key(signer.public_key, channel)
        self._put_current("targets", tmd)
        self._cfg["channels"] = [*self.channels, channel]
        self._save_cfg()
        now = self._now()
        # TUF refuses version 0; a channel added later simply starts at version 2 after the commit.
        self._put_current(channel, Metadata(Targets(version=1, expires=now)))
        if _commit:
            self._commit(["targets", channel])

    def _put_current(self, role: str, md: Metadata[Any]) -> None:
        """Stage an edited role (unsigned) for the next :meth:`_store`."""
        atomic_write_bytes(self.metadata_dir / "current" / f"{role}.json", md.to_bytes(_SERIALIZER))

    def _require_channel(self, channel: str) -> None:
        if channel not in self.channels:
            raise InputError(
                f"channel {channel!r}",
                f"the repository has channels {self.channels}",
                "create it with `sre-hub init --channel` or pick an existing one",
            )

    def channel_targets(self, channel: str) -> dict[str, TargetFile]:
        """The channel role's current targets."""
        self._require_channel(channel)
        signed = self._load(channel).signed
        signed = _typed(signed, Targets, "targets")
        return dict(signed.targets)

    # ----- publish ------------------------------------------------------------------------------
    def _add_target_file(
        self, channel: str, path: str, data_path: Path, custom: dict[str, Any]
    ) -> TargetFile:
        if not safe_target_path(path, channel):
            raise InputError(
                f"publish target {path}",
                f"a channel's targets must be '{channel}/<plain name>' (no '..', no absolute path)",
                "use a simpler module name, version or filename",
            )
        tf = TargetFile.from_file(path, str(data_path), ["sha256"])
        if custom:
            tf.unrecognized_fields["custom"] = custom
        dest = self.targets_dir / channel / f"{tf.hashes['sha256']}.{path.split('/', 1)[1]}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(data_path, tmp)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            tmp.replace(dest)
        return tf

    @_locked
    def publish(
        self,
        channel: str,
        artifact: Path,
        manifest: ModuleManifest,
        cosign_key: bytes | None = None,
        attestation: tuple[str, dict[str, Any], bytes] | None = None,
    ) -> PublishedModule:
        """Add ``artifact`` as a target of ``channel`` with ``manifest`` in its ``custom`` field.

        Args:
            cosign_key: a PEM ECDSA P-256 private key: also publish a cosign ``sign-blob`` signature.
            attestation: ``(predicate_type, predicate, pem_private_key)``: also publish a DSSE in-toto
                statement whose subject is the artifact.

        Every publish (this API, ``sre-hub publish``, channel promotion) first loads a model the device
        will run with the runtime its manifest declares (:func:`check_model_artifact`): the manifest
        decides, not the caller, so no path signs bytes the fleet cannot load.

        Releases are immutable: publishing the same version again with other bytes or another manifest
        is refused (publish a new version); the identical artifact and manifest again is a no-op.

        Raises:
            InputError: unknown channel, missing file, unsafe target name, a different artifact or
                manifest under an already published version, or a model that its declared runtime
                cannot load or whose inputs/outputs differ from the manifest.
        """
        self._require_channel(channel)
        artifact = Path(artifact)
        if not artifact.is_file():
            raise InputError(f"publish {artifact}", "not a file", "check the path")
        path = target_name(channel, manifest.name, manifest.version, manifest.filename)
        digest = _sha256_file(artifact)
        existing = self._published(channel, manifest.name, manifest.version)
        if existing is not None:
            tf, man = existing
            if tf.hashes.get("sha256") != digest or tf.path != path or not _same_release(man, manifest):
                raise InputError(
                    f"publish {manifest.name} {manifest.version} in {channel}",
                    f"that version is already published as {tf.path} "
                    f"(sha256 {tf.hashes.get('sha256', '')[:16]}) with other bytes or another manifest; "
                    "releases are immutable",
                    "publish the change under a new version",
                )
            return PublishedModule(channel, tf.path, tf.length, digest, man, [])
        check_model_artifact(artifact, manifest)
        extra: list[tuple[str, bytes]] = []
        refs = []
        if cosign_key is not None:
            sig = cosign_sign_file(cosign_key, artifact)
            extra.append((f"{path}.sig", sig))
            refs.append({"kind": "cosign", "target": f"{path}.sig"})
        if attestation is not None:
            ptype, predicate, key = attestation
            stmt = intoto_statement(path.split("/", 1)[1], digest, ptype, predicate)
            env = dsse_sign(key, "application/vnd.in-toto+json", json.dumps(stmt).encode())
            extra.append((f"{path}.intoto.json", json.dumps(env, indent=1).encode()))
            refs.append({"kind": "dsse", "target": f"{path}.intoto.json", "predicate_type": ptype})
        if refs:
            data = manifest.model_dump(mode="json")
            data["attestations"] = [*data.get("attestations", []), *refs]
            manifest = ModuleManifest.model_validate(data)
        md = self._load(channel)
        targets = md.signed
        targets = _typed(targets, Targets, "targets")
        tf = self._add_target_file(channel, path, artifact, manifest_to_custom(manifest))
        targets.targets[path] = tf
        staging = self.dir / "staging"
        staging.mkdir(exist_ok=True)
        for name, blob in extra:
            tmp = staging / hashlib.sha256(name.encode()).hexdigest()
            tmp.write_bytes(blob)
            targets.targets[name] = self._add_target_file(channel, name, tmp, {})
            tmp.unlink()
        self._put_current(channel, md)
        self._commit([channel])
        return PublishedModule(channel, path, tf.length, digest, manifest, [n for n, _ in extra])

    def _published(self, channel: str, module: str, version: str) -> tuple[TargetFile, ModuleManifest] | None:
        """The target (and its manifest) already published for ``module`` ``version`` in ``channel``."""
        for tf in self.channel_targets(channel).values():
            man = manifest_from_custom(tf.custom)
            if man is not None and man.name == module and man.version == version:
                return tf, man
        return None

    # ----- release ------------------------------------------------------------------------------
    def desired_state(self, channel: str) -> DesiredState | None:
        """The channel's current signed desired state, if one was released."""
        path = f"{channel}/{DESIRED_STATE}"
        tf = self.channel_targets(channel).get(path)
        if tf is None:
            return None
        blob = self.targets_dir / channel / f"{tf.hashes['sha256']}.{DESIRED_STATE}"
        return DesiredState.model_validate_json(blob.read_bytes())

    @_locked
    def release(
        self,
        channel: str,
        module: str,
        version: str,
        expires_in: timedelta = timedelta(days=14),
        extra: dict[str, Any] | None = None,
    ) -> DesiredState:
        """Make ``module`` at ``version`` part of the channel's desired state (serial + 1).

        Args:
            extra: further DesiredState fields to set (e.g. ``rollout``, ``recalls``).

        Raises:
            InputError: the module version was not published in this channel.
        """
        targets = self.channel_targets(channel)
        found = None
        for path, tf in targets.items():
            man = manifest_from_custom(tf.custom)
            if man is not None and man.name == module and man.version == version:
                found = path
        if found is None:
            raise InputError(
                f"release {module} {version} in {channel}",
                "that version was not published in this channel",
                f"run `sre-hub publish --channel {channel} --module {module} --version {version} FILE` first",
            )
        prev = self.desired_state(channel)
        serial = max(prev.serial if prev else 0, int(self._cfg.get("serials", {}).get(channel, 0))) + 1
        modules = dict(prev.modules) if prev else {}
        modules[module] = DesiredModule(version=version, target=found)
        now = self._now()
        fields: dict[str, Any] = {
            "channel": channel,
            "serial": serial,
            "issued": now,
            "expires": now + expires_in,
            "modules": modules,
        }
        if prev is not None:
            fields["rollout"] = prev.rollout
            fields["recalls"] = prev.recalls
        fields.update(extra or {})
        ds = DesiredState.model_validate(fields)
        return self._write_desired(channel, ds)

    @_locked
    def update_desired(
        self, channel: str, changes: dict[str, Any], expires_in: timedelta = timedelta(days=14)
    ) -> DesiredState:
        """Sign a new serial of the channel's desired state with ``changes`` applied to its fields
        (``rollout``, ``recalls``, ``modules``...); issued now, expiring after ``expires_in``.

        Raises:
            InputError: the result is not a valid desired state, or names an unpublished target.
        """
        self._require_channel(channel)
        prev = self.desired_state(channel)
        now = self._now()
        serial = max(prev.serial if prev else 0, int(self._cfg.get("serials", {}).get(channel, 0))) + 1
        fields: dict[str, Any] = prev.model_dump() if prev else {"channel": channel, "modules": {}}
        fields.update(changes)
        fields.update({"channel": channel, "serial": serial, "issued": now, "expires": now + expires_in})
        try:
            ds = DesiredState.model_validate(fields)
        except ValueError as exc:
            raise InputError(f"update desired state of {channel}", str(exc), "fix the changes") from exc
        published = self.channel_targets(channel)
        for name, dm in ds.modules.items():
            if dm.target not in published:
                raise InputError(
                    f"update desired state of {channel}", f"{name} names {dm.target}, which is not published"
                )
        return self._write_desired(channel, ds)

    def _write_desired(self, channel: str, ds: DesiredState) -> DesiredState:
        staging = self.dir / "staging"
        staging.mkdir(exist_ok=True)
        tmp = staging / f"{channel}.{DESIRED_STATE}"
        tmp.write_bytes(ds.model_dump_json(indent=1).encode())
        md = self._load(channel)
        targets = md.signed
        targets = _typed(targets, Targets, "targets")
        path = f"{channel}/{DESIRED_STATE}"
        targets.targets[path] = self._add_target_file(channel, path, tmp, {"serial": ds.serial})
        tmp.unlink()
        self._put_current(channel, md)
        self._commit([channel])
        self._cfg.setdefault("serials", {})[channel] = ds.serial
        self._save_cfg()
        return ds

    # ----- freshness and keys -------------------------------------------------------------------
    @_locked
    def timestamp(self, expires_in: timedelta | None = None) -> int:
        """Re-sign the timestamp (new version, new expiry, new signing time). Run from cron.

        The snapshot is re-signed too when less than half its lifetime is left (both keys are online).
        """
        snap = self._load("snapshot")
        if snap.signed.expires - self._now() < self.expiry.for_role("snapshot") / 2:
            self._commit([])
        ts = self._load("timestamp")
        _typed(ts.signed, Timestamp, "timestamp").unrecognized_fields[ISSUED_FIELD] = self._now().isoformat()
        return self._store("timestamp", ts, expires_in=expires_in)

    def expiring(self, within: timedelta) -> dict[str, datetime]:
        """Roles whose current metadata expires within ``within`` (re-sign them before devices refuse)."""
        limit = self._now() + within
        out = {}
        for role in [*TOP_ROLES, *self.channels]:
            expires = self._load(role).signed.expires
            if expires <= limit:
                out[role] = expires
        return out

    @_locked
    def rotate_key(self, role: str) -> list[str]:
        """Replace every key of ``role`` (a top-level role or a channel) with new ones.

        Old private keys move to ``keys/retired/``. Root rotation signs the new root with the old and
        the new root keys, so devices pinned to the old root follow the chain.

        Returns:
            The new key ids.
        """
        if role not in TOP_ROLES and role not in self.channels:
            raise InputError(f"rotate keys of {role!r}", f"roles are {[*TOP_ROLES, *self.channels]}")
        if role in TOP_ROLES:
            rmd = self._load("root")
            root = rmd.signed
            root = _typed(root, Root, "root")
            old_ids = list(root.roles[role].keyids)
            old_root_signers = self._signers_for("root")
            new_ids = []
            for keyid in old_ids:
                root.revoke_key(keyid, role)
            for _ in old_ids:
                s = self._new_key(role)
                root.add_key(s.public_key, role)
                new_ids.append(s.public_key.keyid)
            root.version += 1
            root.expires = self._now() + self.expiry.for_role("root")
            self._write_root(rmd, sign_with=old_root_signers if role == "root" else [])
            self._retire(role, old_ids)
            if role == "targets":
                self._commit(["targets"])
            elif role == "snapshot":
                self._commit([])
            elif role == "timestamp":
                self.timestamp()
            return new_ids
        tmd = self._load("targets")
        targets = tmd.signed
        targets = _typed(targets, Targets, "targets")
        old_ids = list(_roles(targets)[role].keyids)
        for keyid in old_ids:
            targets.revoke_key(keyid, role)
        s = self._new_key(role)
        targets.add_key(s.public_key, role)
        self._put_current("targets", tmd)
        self._retire(role, old_ids)
        self._commit(["targets", role])
        return [s.public_key.keyid]

    def _retire(self, role: str, keyids: list[str]) -> None:
        retired = self.keys_dir / "retired" / role
        retired.mkdir(parents=True, exist_ok=True)
        for keyid in keyids:
            src = self.keys_dir / role / f"{keyid}.pem"
            if src.exists():
                src.replace(retired / src.name)


def _same_release(published: ModuleManifest, new: ModuleManifest) -> bool:
    """Same manifest, ignoring the second-signature references publish adds."""
    return published.model_copy(update={"attestations": []}) == new.model_copy(update={"attestations": []})


def check_model_artifact(artifact: Path, manifest: ModuleManifest) -> None:
    """Load a model with the runtime its manifest declares and match the declared inputs/outputs.

    Checked: what the device itself loads into ONNX Runtime, i.e. a ``kind: model`` file with
    ``engine: onnxruntime`` in ``mode: managed`` (the agent serves it) or with golden vectors (the agent
    runs them). Not checked, and why: ``mode: file`` without golden vectors (a file handed to an
    application the agent never loads: its runtime is that application's), tar bundles, ``engine:
    none``, configs and policies (the device checks those against its own models before installing).

    Raises:
        InputError: the runtime cannot load the file, or a declared input/output (``runtime.input_name``,
            ``runtime.output_name``, golden vector keys) is not in the model.
    """
    if manifest.kind != "model" or manifest.runtime.engine != "onnxruntime" or manifest.format != "file":
        return
    if manifest.mode != "managed" and manifest.golden is None:
        return
    import onnxruntime as ort

    what = f"publish model {manifest.name} {manifest.version}"
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(artifact), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for every kind of bad model
        raise InputError(
            what,
            f"onnxruntime cannot load {artifact.name}: {str(exc)[:300]}",
            "publish a valid ONNX model, or declare its real runtime (runtime.engine: none, kind: config)",
        ) from exc
    inputs = {i.name for i in sess.get_inputs()}
    outputs = {o.name for o in sess.get_outputs()}
    declared_in = {manifest.runtime.input_name} - {None}
    declared_out = {manifest.runtime.output_name} - {None}
    for vec in manifest.golden.vectors if manifest.golden else []:
        declared_in |= set(vec.inputs)
        declared_out |= set(vec.expected)
    missing = sorted(str(n) for n in declared_in - inputs) + sorted(str(n) for n in declared_out - outputs)
    if missing:
        raise InputError(
            what,
            f"the manifest declares {missing}, which the model does not have "
            f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})",
            "fix runtime.input_name/output_name or the golden vectors in the manifest",
        )


def _sha256_file(path: Path) -> str:
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
