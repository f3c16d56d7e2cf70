"""A/B slots per module: install into standby, flip by one atomic rename, commit, roll back, safe mode.

Layout under ``<state>/modules/<name>/``::

    a/ b/            the two slots (a regular file ``<filename>`` or an extracted bundle tree)
    safe/            a view of the factory safe module: ``<filename>`` -> ``<state>/safe/<name>/<file>``
    current          symlink -> ``a`` | ``b`` | ``safe``: what the application serves
    state.json       the record of truth: phase, active slot, each slot's version/digests, pending
                     operation, bad digests, last-known-good, interrupted-attempt counters
    .staging/        an install in progress (discarded on start)
    .lock            flock: one mutating operation per module at a time, across processes

Design: *activation is the rename of* ``current`` (``current.tmp`` -> ``current``, then fsync of the
directory): one atomic step that an application reading ``current/<filename>`` sees either before or
after. ``state.json`` (atomic write, fsync) is written *before* each step with the phase from
:mod:`deployment.lifecycle`, so on start :meth:`SlotManager.recover` finds what was under way and
resolves it through the resume map: an interrupted install is discarded, an unjudged flip goes back to
the version active before it, a rollback is finished; the ``current`` link is always re-pointed at the
slot ``state.json`` names. Nothing is made active that was not re-hashed against the signed digest
when it was installed, and every transition that makes a slot serve or become active (canary start,
flip/promote, rollback, the start-up check of the active slot) re-hashes that slot once more right
before it: bytes that changed since install are refused, audited (``slot.activation_refused`` /
``slot.corrupt``) and their version is marked bad.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deployment.artifacts import VerifiedArtifact
from deployment.extract import ExtractError, extract_tar
from deployment.lifecycle import RESUME, Event, IllegalTransitionError, Phase, next_phase
from deployment.manifest import ModuleManifest
from policies.deployment import DeploymentPolicy
from sre_core.atomic import atomic_write_json, fsync_dir, remove_stale_temps
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError, SreError
from sre_core.paths import StatePaths

__all__ = [
    "ModuleStatus",
    "SlotCheck",
    "SlotError",
    "SlotManager",
    "SlotRecord",
    "SlotView",
    "tree_digest",
]

SlotId = Literal["a", "b"]
SLOTS: tuple[SlotId, SlotId] = ("a", "b")
SAFE_VIEW = "safe"
STATE_FILE = "state.json"
CURRENT = "current"
_CHUNK = 1 << 20
_LOCK_TRIES = 600  # x 50 ms


class SlotError(SreError):
    """A slot operation was refused or failed; the module's state is unchanged or safely resolved."""


class SlotRefusedError(SlotError, InputError):
    """The request itself is refused (bad digest, wrong phase, unknown module): exit 2."""


def tree_digest(files: dict[str, str]) -> str:
    """One digest over ``{relative path: sha256}`` (sorted ``path NUL sha256 LF`` lines)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\x00{files[rel]}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class SlotRecord:
    """What one slot holds, as recorded at install time (re-hashed against the signed digest)."""

    version: str
    sha256: str
    length: int
    target: str
    format: Literal["file", "tar"]
    filename: str
    files: dict[str, str]
    installed_at: str
    manifest: dict[str, Any]

    @property
    def tree_sha256(self) -> str:
        return tree_digest(self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "length": self.length,
            "target": self.target,
            "format": self.format,
            "filename": self.filename,
            "files": dict(self.files),
            "installed_at": self.installed_at,
            "manifest": self.manifest,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlotRecord:
        return cls(
            version=str(d["version"]),
            sha256=str(d["sha256"]),
            length=int(d["length"]),
            target=str(d["target"]),
            format="tar" if d["format"] == "tar" else "file",
            filename=str(d["filename"]),
            files={str(k): str(v) for k, v in d["files"].items()},
            installed_at=str(d["installed_at"]),
            manifest=dict(d["manifest"]),
        )


@dataclass
class _State:
    """The persisted ``state.json`` (mutable inside one locked operation only)."""

    module: str
    phase: Phase = Phase.IDLE
    active: SlotId | None = None
    slots: dict[str, SlotRecord | None] = field(default_factory=lambda: {"a": None, "b": None})
    op: dict[str, Any] | None = None
    bad: dict[str, dict[str, str]] = field(default_factory=dict)
    last_known_good: dict[str, str] | None = None
    interrupted: dict[str, int] = field(default_factory=dict)
    saves: int = 0
    updated: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "module": self.module,
            "phase": self.phase.value,
            "active": self.active,
            "slots": {k: (v.to_dict() if v else None) for k, v in self.slots.items()},
            "op": self.op,
            "bad": self.bad,
            "last_known_good": self.last_known_good,
            "interrupted": self.interrupted,
            "saves": self.saves,
            "updated": self.updated,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _State:
        active = d.get("active")
        return cls(
            module=str(d["module"]),
            phase=Phase(d.get("phase", "idle")),
            active="a" if active == "a" else "b" if active == "b" else None,
            slots={k: (SlotRecord.from_dict(v) if v else None) for k, v in d.get("slots", {}).items()}
            | {k: None for k in SLOTS if k not in d.get("slots", {})},
            op=d.get("op"),
            bad=dict(d.get("bad", {})),
            last_known_good=d.get("last_known_good"),
            interrupted={str(k): int(v) for k, v in d.get("interrupted", {}).items()},
            saves=int(d.get("saves", 0)),
            updated=str(d.get("updated", "")),
        )

    @property
    def standby(self) -> SlotId:
        return "b" if self.active == "a" else "a"


@dataclass(frozen=True)
class SlotView:
    """A read-only view of one slot for other components (serving, verification)."""

    slot: str
    path: Path
    artifact_path: Path
    record: SlotRecord

    @property
    def version(self) -> str:
        return self.record.version

    @property
    def sha256(self) -> str:
        return self.record.sha256

    @property
    def manifest(self) -> ModuleManifest:
        return ModuleManifest.model_validate(self.record.manifest)

    @property
    def artifact_sha256(self) -> str | None:
        """The signed digest of the file at :attr:`artifact_path` (what a loader must hash; None when the
        artifact is a directory)."""
        try:
            rel = self.artifact_path.relative_to(self.path).as_posix()
        except ValueError:
            return None
        return self.record.files.get(rel)


@dataclass(frozen=True)
class ModuleStatus:
    """One module's slot state: what is active, what is standby, what is pending, what is bad."""

    module: str
    phase: Phase
    active: SlotView | None
    standby: SlotView | None
    serving: str | None
    current_link: Path
    last_known_good: dict[str, str] | None
    bad: dict[str, dict[str, str]]
    op: dict[str, Any] | None
    safe_available: bool
    updated: str

    def to_dict(self) -> dict[str, Any]:
        def view(v: SlotView | None) -> dict[str, Any] | None:
            if v is None:
                return None
            return {
                "slot": v.slot,
                "version": v.version,
                "sha256": v.sha256,
                "path": str(v.artifact_path),
                "installed_at": v.record.installed_at,
            }

        return {
            "module": self.module,
            "phase": self.phase.value,
            "serving": self.serving,
            "active": view(self.active),
            "standby": view(self.standby),
            "last_known_good": self.last_known_good,
            "bad": self.bad,
            "op": self.op,
            "safe_available": self.safe_available,
            "updated": self.updated,
        }


@dataclass(frozen=True)
class SlotCheck:
    """Result of re-hashing a slot against its recorded digests."""

    module: str
    slot: str
    ok: bool
    problems: list[str]


class SlotManager:
    """Every slot operation, crash-safe. Decisions come from :mod:`deployment.lifecycle`.

    Args:
        paths: the device state layout.
        audit: the audit trail (each step is recorded).
        clock: time source for records.
        policy: extraction limits and the interrupted-attempt bound.
    """

    def __init__(
        self,
        paths: StatePaths,
        audit: AuditLog,
        clock: Clock | None = None,
        policy: DeploymentPolicy | None = None,
    ) -> None:
        self.paths = paths
        self.audit = audit
        self.clock = clock or SystemClock()
        self.policy = policy or DeploymentPolicy()

    # ----------------------------------------------------------------- reading
    def modules(self) -> list[str]:
        """Modules that have slot state or a factory safe module."""
        names: set[str] = set()
        if self.paths.modules.is_dir():
            names |= {p.name for p in self.paths.modules.iterdir() if (p / STATE_FILE).exists()}
        if self.paths.safe.is_dir():
            names |= {p.name for p in self.paths.safe.iterdir() if (p / "safe.json").exists()}
        return sorted(names)

    def status(self, module: str) -> ModuleStatus:
        """The module's current slot state (no lock; ``state.json`` is replaced atomically)."""
        st = self._load(module)
        mdir = self.paths.module(module)
        serving: str | None
        try:
            serving = str((mdir / CURRENT).readlink())
        except OSError:
            serving = None
        active = self._view(module, st.active, st.slots.get(st.active)) if st.active else None
        sb = st.standby
        standby = self._view(module, sb, st.slots.get(sb))
        return ModuleStatus(
            module=module,
            phase=st.phase,
            active=active,
            standby=standby,
            serving=serving,
            current_link=mdir / CURRENT,
            last_known_good=st.last_known_good,
            bad=dict(st.bad),
            op=st.op,
            safe_available=self._safe_source(module) is not None,
            updated=st.updated,
        )

    def served_path(self, module: str) -> Path:
        """The path an application reads: ``modules/<name>/current/<filename>``."""
        st = self._load(module)
        rec = st.slots.get(st.active) if st.active else None
        name = rec.filename if rec else self._safe_filename(module)
        return self.paths.module(module) / CURRENT / name

    def verify_slot(self, module: str, slot: str) -> SlotCheck:
        """Re-hash a slot's files against the digests recorded at install (no extra files allowed)."""
        return self._verify(module, slot, self._load(module).slots.get(slot))

    def _verify(self, module: str, slot: str, rec: SlotRecord | None) -> SlotCheck:
        if rec is None:
            return SlotCheck(module, slot, False, ["slot is empty"])
        root = self.paths.module(module) / slot
        problems: list[str] = []
        seen: set[str] = set()
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root).as_posix()
                if p.is_symlink() or not (p.is_file() or p.is_dir()):
                    problems.append(f"{rel}: not a regular file")
                elif p.is_file():
                    seen.add(rel)
                    if rel not in rec.files:
                        problems.append(f"{rel}: not part of version {rec.version}")
                    elif _sha256_file(p) != rec.files[rel]:
                        problems.append(f"{rel}: sha256 differs from the signed digest")
        else:
            problems.append("slot directory is missing")
        problems += [f"{rel}: missing" for rel in sorted(set(rec.files) - seen)]
        return SlotCheck(module, slot, not problems, problems)

    # ----------------------------------------------------------------- recovery
    def recover_all(self) -> dict[str, str]:
        """Resolve every module's interrupted work (call on start). Returns module -> what was done."""
        return {m: self.recover(m) for m in self.modules()}

    def recover(self, module: str) -> str:
        """Apply the resume map to one module; re-point ``current`` at what ``state.json`` names."""
        with self._locked(module):
            mdir = self.paths.module(module)
            remove_stale_temps(mdir)
            with contextlib.suppress(FileNotFoundError):
                (mdir / ".current.tmp").unlink()
            st = self._load(module)
            stored = st.phase
            target = RESUME[stored]
            done = "nothing pending"
            checked = False
            if stored is Phase.INSTALLING:
                slot = str((st.op or {}).get("slot", st.standby))
                self._discard_slot(mdir, slot)
                st.slots[slot] = None
                # Not counted for the loop guard: the new version never ran, so it cannot have caused this.
                st.phase, st.op = target, None
                self._save(st)
                done = f"discarded interrupted install into slot {slot}"
                self.audit.append("slot.install_discarded", module=module, slot=slot, reason="interrupted")
            elif target is Phase.ROLLING_BACK:
                op = st.op or {}
                if stored is not Phase.ROLLING_BACK:
                    self._bump_interrupted(st)
                    st.phase = Phase.ROLLING_BACK
                    st.op = op | {"kind": "rollback", "reason": f"interrupted while {stored.value}"}
                    self._save(st)
                done = self._finish_rollback(st, mark_bad=bool(op.get("mark_bad", False)))
                checked = True  # the slot it went back to was re-hashed just now
                self.audit.append(
                    "slot.flip_resolved", module=module, stored_phase=stored.value, active=st.active
                )
            elif stored is Phase.CANARY:
                st.phase, st.op = target, None
                self._bump_interrupted(st)
                self._save(st)
                done = "dropped interrupted canary (standby kept)"
                self.audit.append("slot.canary_dropped", module=module, reason="interrupted")
            if self._discard_staging(mdir):
                done = done if done != "nothing pending" else "removed stale staging"
            if st.phase is Phase.IDLE and st.active is not None and not checked:
                done = self._check_active(st) or done
            self._point_current(module, st)
            return done

    def _check_active(self, st: _State) -> str:
        """On start, re-hash the active slot; a corrupt one is never served again (empty string: fine).

        Its version is marked bad (so a later pass does not reinstall and canary it blindly: the
        incident that would have blocked it may have died with the process). It goes back to a
        last-known-good standby that passes its own re-hash (a standby that fails it is marked bad
        too), else serves nothing; the corrupt slot is emptied.
        """
        module, bad_slot = st.module, st.active
        if bad_slot is None:
            return ""
        chk = self._verify(module, bad_slot, st.slots.get(bad_slot))
        if chk.ok:
            return ""
        rec = st.slots.get(bad_slot)
        sb = st.standby
        lkg = st.last_known_good or {}
        sb_rec = st.slots.get(sb)
        fallback: SlotId | None = None
        if rec is not None:
            self._mark_corrupt(st, rec, f"slot {bad_slot} failed its re-hash at start")
        if sb_rec is not None and lkg.get("sha256") == sb_rec.sha256 and sb_rec.sha256 not in st.bad:
            sb_chk = self._verify(module, sb, sb_rec)
            if sb_chk.ok:
                fallback = sb
            else:
                self._mark_corrupt(st, sb_rec, f"slot {sb} failed its re-hash at start")
                self.audit.append(
                    "slot.corrupt", module=module, slot=sb, version=sb_rec.version,
                    problems=sb_chk.problems[:20], now_active=None,
                )  # fmt: skip
        st.slots[bad_slot] = None
        st.active = fallback
        st.last_known_good = None
        self._save(st)
        self._point_current(module, st)
        self._discard_slot(self.paths.module(module), bad_slot)
        self.audit.append(
            "slot.corrupt", module=module, slot=bad_slot, version=rec.version if rec else None,
            problems=chk.problems[:20], now_active=fallback, marked_bad=rec is not None,
        )  # fmt: skip
        return f"active slot {bad_slot} failed its re-hash; now serving {fallback or 'nothing'}"

    def _mark_corrupt(self, st: _State, rec: SlotRecord, why: str) -> None:
        st.bad[rec.sha256] = {"version": rec.version, "reason": why, "at": self._now()}
        if (st.last_known_good or {}).get("sha256") == rec.sha256:
            st.last_known_good = None

    def _rehash_or_refuse(self, st: _State, slot: SlotId, action: str, actor: str) -> SlotRecord:
        """Re-hash ``slot`` right before it serves or becomes active (one hash per transition).

        Raises:
            SlotRefusedError: the slot is empty or its bytes differ from the digests recorded at
                install; its version is then marked bad (persisted) and ``slot.activation_refused``
                audited. Nothing else in ``st`` changed.
        """
        module = st.module
        rec = st.slots.get(slot)
        chk = self._verify(module, slot, rec)
        if chk.ok and rec is not None:
            return rec
        if rec is not None:
            self._mark_corrupt(st, rec, f"slot {slot} failed its re-hash before {action}")
            self._save(st)
        self.audit.append(
            "slot.activation_refused", actor=actor, module=module, slot=slot, action=action,
            version=rec.version if rec else None, sha256=rec.sha256 if rec else None,
            problems=chk.problems[:20], marked_bad=rec is not None,
        )  # fmt: skip
        raise SlotRefusedError(
            f"{action} {module}",
            f"slot {slot} ({rec.version if rec else 'empty'}) failed its re-hash against the signed "
            f"digest: {'; '.join(chk.problems[:3])}",
            "the version is marked bad; publish a new version (or reinstall it and clear-bad)",
        )

    # ----------------------------------------------------------------- install
    def install(self, artifact: VerifiedArtifact, actor: str = "agent") -> SlotView:
        """Install a verified artifact into the standby slot (re-hashed while copied).

        Returns the standby view. Idempotent: a standby already holding this digest is kept.

        Raises:
            SlotRefusedError: the digest is marked bad, or the module is busy in another phase.
            SlotError: the bytes do not match the signed digest, extraction refused the bundle, or I/O
                failed. The standby is then empty; the active slot was never touched.
        """
        module = artifact.module
        mdir = self.paths.module(module)
        mdir.mkdir(parents=True, exist_ok=True)
        with self._locked(module):
            st = self._load(module)
            if artifact.sha256 in st.bad:
                bad = st.bad[artifact.sha256]
                self.audit.append(
                    "slot.install_refused", actor=actor, module=module, version=artifact.version,
                    sha256=artifact.sha256, reason="digest marked bad",
                )  # fmt: skip
                raise SlotRefusedError(
                    f"install {module} {artifact.version}",
                    f"digest {artifact.sha256[:12]} is marked bad ({bad.get('reason', '')})",
                    f"publish a fixed version, or clear it: sre-agent slots clear-bad {module}",
                )
            sb = st.standby
            have = st.slots.get(sb)
            if st.phase is Phase.IDLE and have is not None and have.sha256 == artifact.sha256:
                return self._slot_view(module, sb, have)
            active_rec = st.slots.get(st.active) if st.active else None
            if active_rec is not None and active_rec.sha256 == artifact.sha256 and st.phase is Phase.IDLE:
                raise SlotRefusedError(
                    f"install {module} {artifact.version}", "that digest is already the active version"
                )
            phase = self._step(st, Event.INSTALL)
            st.phase = phase
            st.op = {
                "kind": "install", "slot": sb, "version": artifact.version, "sha256": artifact.sha256,
                "started": self._now(), "from": st.active,
            }  # fmt: skip
            st.slots[sb] = None
            if (st.last_known_good or {}).get("slot") == sb:
                st.last_known_good = None  # the standby it named is being overwritten
            self._save(st)
            self.audit.append(
                "slot.install_started", actor=actor, module=module, slot=sb, version=artifact.version,
                sha256=artifact.sha256,
            )  # fmt: skip
            try:
                files = self._write_slot(mdir, sb, artifact)
            except (SreError, OSError) as exc:
                self._discard_slot(mdir, sb)
                self._discard_staging(mdir)
                st.phase = self._step(st, Event.INSTALL_FAILED)
                st.op = None
                self._save(st)
                why = exc.message if isinstance(exc, SreError) else str(exc)
                self.audit.append(
                    "slot.install_failed", actor=actor, module=module, slot=sb, version=artifact.version,
                    sha256=artifact.sha256, why=why,
                )  # fmt: skip
                if isinstance(exc, SreError):
                    raise
                raise SlotError(
                    f"install {module} {artifact.version}", why, "check free disk space and retry"
                ) from exc
            rec = SlotRecord(
                version=artifact.version,
                sha256=artifact.sha256,
                length=artifact.length,
                target=artifact.target,
                format=artifact.manifest.format,
                filename=artifact.manifest.filename,
                files=files,
                installed_at=self._now(),
                manifest=artifact.manifest.model_dump(mode="json"),
            )
            st.slots[sb] = rec
            st.phase = self._step(st, Event.INSTALLED)
            st.op = None
            self._save(st)
            self.audit.append(
                "slot.installed", actor=actor, module=module, slot=sb, version=artifact.version,
                sha256=artifact.sha256, tree_sha256=rec.tree_sha256,
            )  # fmt: skip
            return self._slot_view(module, sb, rec)

    def _write_slot(self, mdir: Path, slot: str, artifact: VerifiedArtifact) -> dict[str, str]:
        staging = mdir / ".staging"
        self._discard_staging(mdir)
        tree = staging / "tree"
        tree.mkdir(parents=True)
        manifest = artifact.manifest
        what = f"install {artifact.module} {artifact.version}"
        if manifest.format == "file":
            dest = tree / manifest.filename
            digest, n = _copy_hashing(artifact.path, dest)
            if digest != artifact.sha256 or n != artifact.length:
                raise SlotError(
                    what,
                    f"the cached bytes hash to {digest[:12]} ({n} bytes), not the signed "
                    f"{artifact.sha256[:12]} ({artifact.length} bytes)",
                    "the content cache is corrupt: pull again",
                )
            files = {manifest.filename: digest}
        else:
            bundle = staging / "bundle"
            digest, n = _copy_hashing(artifact.path, bundle)
            if digest != artifact.sha256 or n != artifact.length:
                raise SlotError(what, "the cached bundle does not match its signed digest", "pull again")
            try:
                files = extract_tar(bundle, tree, self.policy.extract)
            except ExtractError as exc:
                raise SlotRefusedError(what, exc.why, exc.fix or "rebuild the bundle") from exc
            bundle.unlink()
        _fsync_tree(tree)
        self._discard_slot(mdir, slot)
        tree.replace(mdir / slot)
        fsync_dir(mdir)
        self._discard_staging(mdir)
        return files

    # ----------------------------------------------------------------- flip / commit / rollback
    def flip(self, module: str, actor: str = "agent") -> ModuleStatus:
        """Make the standby active (one rename of ``current``); phase becomes ``probing``.

        Raises:
            SlotRefusedError: no verified standby, it is marked bad, or another operation is pending.
        """
        with self._locked(module):
            st = self._load(module)
            self._flip_locked(st, Event.FLIP, actor)
        return self.status(module)

    def _flip_locked(self, st: _State, event: Event, actor: str) -> None:
        module = st.module
        sb = st.standby
        rec = st.slots.get(sb)
        if rec is None:
            raise SlotRefusedError(f"flip {module}", "the standby slot holds no verified version")
        if rec.sha256 in st.bad:
            raise SlotRefusedError(f"flip {module}", f"standby version {rec.version} is marked bad")
        self._step(st, event)  # refuse an impossible flip before hashing anything
        self._rehash_or_refuse(st, sb, "flip", actor)
        st.phase = self._step(st, event)
        st.op = {
            "kind": "flip", "from": st.active, "slot": sb, "version": rec.version, "sha256": rec.sha256,
            "started": self._now(), "mark_bad": False,
        }  # fmt: skip
        self._save(st)
        st.active = sb
        self._point_current(module, st)
        st.phase = self._step(st, Event.FLIPPED)
        self._save(st)
        self.audit.append(
            "slot.flipped", actor=actor, module=module, active=sb, version=rec.version,
            sha256=rec.sha256, previous=st.op.get("from"),
        )  # fmt: skip

    def commit(
        self,
        module: str,
        actor: str = "agent",
        evidence: dict[str, Any] | None = None,
        as_last_known_good: bool = False,
    ) -> ModuleStatus:
        """Probes passed: keep the new version; the old one becomes last-known-good standby.

        A previous version marked bad (or recalled) never becomes last-known-good. With
        ``as_last_known_good`` (a recall's target) the committed version itself is recorded as the
        last-known-good: there is nothing older to go back to.
        """
        with self._locked(module):
            st = self._load(module)
            st.phase = self._step(st, Event.PROBES_PASSED)
            prev = (st.op or {}).get("from")
            prev_rec = st.slots.get(str(prev)) if prev else None
            rec = st.slots.get(st.active) if st.active else None
            if as_last_known_good and rec is not None:
                st.last_known_good = {"version": rec.version, "sha256": rec.sha256, "slot": str(st.active)}
            elif prev_rec is not None and prev_rec.sha256 not in st.bad:
                st.last_known_good = {
                    "version": prev_rec.version,
                    "sha256": prev_rec.sha256,
                    "slot": str(prev),
                }
            else:
                st.last_known_good = None
            if rec is not None:
                st.interrupted.pop(rec.sha256, None)
            st.op = None
            self._save(st)
            self.audit.append(
                "slot.committed", actor=actor, module=module, active=st.active,
                version=rec.version if rec else None, sha256=rec.sha256 if rec else None,
                evidence=evidence or {},
            )  # fmt: skip
        return self.status(module)

    def rollback(self, module: str, reason: str, actor: str = "agent", mark_bad: bool = True) -> ModuleStatus:
        """Go back to the version active before (after a failed probe, or on operator command).

        In ``probing`` this undoes the flip; in ``idle`` it swaps to the last-known-good standby.
        The version rolled away from is marked bad when ``mark_bad`` (never reinstalled until cleared).

        Raises:
            SlotRefusedError: nothing to go back to, or an install/canary/safe mode is under way.
        """
        with self._locked(module):
            st = self._load(module)
            event = (
                Event.PROBES_FAILED if (st.phase is Phase.PROBING and actor == "agent") else Event.ROLLBACK
            )
            rehashed = False
            if st.phase is Phase.IDLE:
                sb = st.standby
                rec = st.slots.get(sb)
                if rec is None or st.active is None:
                    raise SlotRefusedError(
                        f"roll back {module}", "no previous version is installed in the standby slot"
                    )
                if rec.sha256 in st.bad:
                    raise SlotRefusedError(
                        f"roll back {module}", f"the standby version {rec.version} is marked bad"
                    )
                lkg = st.last_known_good or {}
                if lkg.get("sha256") != rec.sha256:
                    raise SlotRefusedError(
                        f"roll back {module}",
                        f"the standby holds {rec.version}, which was never committed (no last-known-good)",
                    )
                self._rehash_or_refuse(st, sb, "roll back", actor)
                rehashed = True  # refused before anything changed; not hashed again below
                cur = st.slots[st.active]
                st.op = {
                    "kind": "rollback", "from": sb, "slot": st.active,
                    "version": cur.version if cur else None, "sha256": cur.sha256 if cur else None,
                    "started": self._now(), "away_committed": True,
                }  # fmt: skip
            try:
                st.phase = self._step(st, event)
            except IllegalTransitionError as exc:
                raise SlotRefusedError(
                    f"roll back {module}", f"the module is {st.phase.value}", "wait for it to finish"
                ) from exc
            st.op = (st.op or {}) | {"kind": "rollback", "reason": reason, "mark_bad": mark_bad}
            self._save(st)
            self.audit.append(
                "slot.rollback_started", actor=actor, module=module, reason=reason,
                version=st.op.get("version"), sha256=st.op.get("sha256"),
            )  # fmt: skip
            self._finish_rollback(st, mark_bad=mark_bad, actor=actor, rehashed=rehashed)
        return self.status(module)

    def _finish_rollback(
        self, st: _State, mark_bad: bool, actor: str = "agent", rehashed: bool = False
    ) -> str:
        """ROLLING_BACK: re-hash ``op.from`` (unless ``rehashed``), point ``current`` at it (at nothing
        when its bytes changed) and settle in idle."""
        op = st.op or {}
        back = op.get("from")
        back_slot: SlotId | None = "a" if back == "a" else "b" if back == "b" else None
        if back_slot is not None and st.slots.get(back_slot) is None:
            back_slot = None
        back_rec = st.slots.get(back_slot) if back_slot else None
        if back_slot is not None and back_rec is not None and not rehashed:
            chk = self._verify(st.module, back_slot, back_rec)
            if not chk.ok:  # never go back to changed bytes: serve nothing rather than them
                self._mark_corrupt(st, back_rec, f"slot {back_slot} failed its re-hash before roll back")
                self.audit.append(
                    "slot.activation_refused", actor=actor, module=st.module, slot=back_slot,
                    action="roll back", version=back_rec.version, sha256=back_rec.sha256,
                    problems=chk.problems[:20], marked_bad=True,
                )  # fmt: skip
                back_slot = None
        away_sha = op.get("sha256")
        st.active = back_slot
        self._point_current(st.module, st)
        if mark_bad and away_sha:
            st.bad[str(away_sha)] = {
                "version": str(op.get("version")),
                "reason": str(op.get("reason", "rolled back")),
                "at": self._now(),
            }
        elif away_sha and st.interrupted.get(str(away_sha), 0) >= self.policy.max_resumes:
            st.bad[str(away_sha)] = {
                "version": str(op.get("version")),
                "reason": f"interrupted {st.interrupted[str(away_sha)]} times (loop guard)",
                "at": self._now(),
            }
        st.phase = self._step(st, Event.ROLLED_BACK)
        st.op = None
        away_slot = st.standby if back_slot is not None else None
        away_rec = st.slots.get(away_slot) if away_slot else None
        if op.get("away_committed") and away_rec is not None and away_rec.sha256 not in st.bad:
            st.last_known_good = {
                "version": away_rec.version,
                "sha256": away_rec.sha256,
                "slot": str(away_slot),
            }
        else:
            lkg = st.last_known_good or {}
            if lkg.get("slot") == back_slot or lkg.get("sha256") in st.bad:
                st.last_known_good = None
        self._save(st)
        rec = st.slots.get(back_slot) if back_slot else None
        self.audit.append(
            "slot.rolled_back", actor=actor, module=st.module, active=back_slot,
            version=rec.version if rec else None, sha256=rec.sha256 if rec else None,
            away_version=op.get("version"), away_sha256=away_sha, reason=op.get("reason"),
            marked_bad=bool(mark_bad and away_sha),
        )  # fmt: skip
        return f"rolled back to {rec.version if rec else 'nothing'} (slot {back_slot})"

    # ----------------------------------------------------------------- canary seam (managed serving)
    def begin_canary(self, module: str, actor: str = "agent", recall_target: bool = False) -> SlotView:
        """Hand the standby, re-hashed just now, to a canary driver (phase ``canary``); ``current`` is
        untouched. With ``recall_target`` (a recall moves the device to this version) its promotion
        records it as the last-known-good.

        Raises:
            SlotRefusedError: no good standby, another operation is pending, or the standby's bytes
                changed since install (then marked bad).
        """
        with self._locked(module):
            st = self._load(module)
            rec = st.slots.get(st.standby)
            if rec is None or rec.sha256 in st.bad:
                raise SlotRefusedError(f"start canary for {module}", "no verified, good standby version")
            self._step(st, Event.CANARY_START)
            self._rehash_or_refuse(st, st.standby, "start canary", actor)
            st.phase = self._step(st, Event.CANARY_START)
            st.op = {
                "kind": "canary", "from": st.active, "slot": st.standby, "version": rec.version,
                "sha256": rec.sha256, "started": self._now(), "recall_target": recall_target,
            }  # fmt: skip
            self._save(st)
            self.audit.append(
                "canary.started", actor=actor, module=module, version=rec.version, sha256=rec.sha256
            )
            return self._slot_view(module, st.standby, rec)

    def promote_canary(
        self, module: str, actor: str = "canary", evidence: dict[str, Any] | None = None
    ) -> ModuleStatus:
        """The canary earned 100 %: flip to it (re-hashed first) and commit (the driver judged it).

        A recall target's canary commits it as the last-known-good (there is nothing older to go to).
        """
        with self._locked(module):
            st = self._load(module)
            recall = bool((st.op or {}).get("recall_target", False))
            self._flip_locked(st, Event.CANARY_PROMOTE, actor)
        return self.commit(module, actor=actor, evidence=evidence, as_last_known_good=recall)

    def abort_canary(
        self, module: str, reason: str, actor: str = "canary", mark_bad: bool = True
    ) -> ModuleStatus:
        """End the canary; the active version never changed. A failed gate marks the version bad
        (``mark_bad``); an inconclusive canary should pass ``mark_bad=False`` so it may run again.
        """
        with self._locked(module):
            st = self._load(module)
            op = st.op or {}
            st.phase = self._step(st, Event.CANARY_ABORT)
            if mark_bad and op.get("sha256"):
                st.bad[str(op["sha256"])] = {
                    "version": str(op.get("version")),
                    "reason": reason,
                    "at": self._now(),
                }
            st.op = None
            self._save(st)
            self.audit.append(
                "canary.aborted", actor=actor, module=module, version=op.get("version"),
                sha256=op.get("sha256"), reason=reason, marked_bad=bool(mark_bad and op.get("sha256")),
            )  # fmt: skip
        return self.status(module)

    # ----------------------------------------------------------------- bad digests
    def mark_bad(self, module: str, sha256: str, version: str, reason: str, actor: str = "agent") -> None:
        """Never install ``sha256`` again until an operator clears it."""
        with self._locked(module):
            st = self._load(module)
            st.bad[sha256] = {"version": version, "reason": reason, "at": self._now()}
            self._save(st)
        self.audit.append(
            "slot.marked_bad", actor=actor, module=module, sha256=sha256, version=version, reason=reason
        )

    def mark_recalled(self, module: str, versions: list[str], reason: str, actor: str = "agent") -> list[str]:
        """Mark every installed slot holding one of ``versions`` bad (a fleet recall withdrew them), and
        drop a last-known-good that names one: a recalled version is never a rollback target.

        Returns the versions newly marked (empty, and nothing written, when all were already).
        """
        withdrawn = set(versions)
        with self._locked(module):
            st = self._load(module)
            marked: list[str] = []
            for rec in st.slots.values():
                if rec is not None and rec.version in withdrawn and rec.sha256 not in st.bad:
                    st.bad[rec.sha256] = {"version": rec.version, "reason": reason, "at": self._now()}
                    marked.append(rec.version)
            lkg = st.last_known_good or {}
            if lkg.get("sha256") in st.bad:
                st.last_known_good = None
            if not marked and lkg == (st.last_known_good or {}):
                return []
            self._save(st)
        self.audit.append("slot.recalled", actor=actor, module=module, versions=sorted(marked), reason=reason)
        return marked

    def clear_bad(self, module: str, sha256: str | None = None, actor: str = "operator") -> list[str]:
        """Forget one bad digest (or all when ``sha256`` is None). Returns the digests cleared."""
        with self._locked(module):
            st = self._load(module)
            cleared = [d for d in st.bad if sha256 is None or d == sha256 or d.startswith(sha256)]
            for d in cleared:
                del st.bad[d]
                st.interrupted.pop(d, None)
            self._save(st)
        self.audit.append("slot.bad_cleared", actor=actor, module=module, cleared=cleared)
        return cleared

    # ----------------------------------------------------------------- safe mode
    def enter_safe(self, module: str, reason: str, actor: str = "agent") -> bool:
        """Serve the factory safe module (if one was provisioned). Returns True when it is now served."""
        src = self._safe_source(module)
        if src is None:
            return False
        self.paths.module(module).mkdir(parents=True, exist_ok=True)
        with self._locked(module):
            st = self._load(module)
            if st.phase is Phase.SAFE:
                self._point_current(module, st)
                return True
            if st.phase is Phase.CANARY:
                op = st.op or {}
                self.audit.append("canary.aborted", actor=actor, module=module, version=op.get("version"),
                                  sha256=op.get("sha256"), reason="safe mode")  # fmt: skip
            elif st.phase is not Phase.IDLE:
                raise SlotRefusedError(f"enter safe mode for {module}", f"the module is {st.phase.value}")
            self._make_safe_view(module, src)
            st.phase = self._step(st, Event.ENTER_SAFE)
            st.op = {"kind": "safe", "reason": reason, "started": self._now()}
            self._save(st)
            self._point_current(module, st)
            self.audit.append("slot.safe_served", actor=actor, module=module, sha256=src[1], reason=reason)
            return True

    def leave_safe(self, module: str, actor: str = "agent") -> None:
        """Serve the active slot again, re-hashed first (a corrupt one is handled as at start: marked
        bad, a good last-known-good or nothing served). No-op when the module is not in safe mode."""
        with self._locked(module):
            st = self._load(module)
            if st.phase is not Phase.SAFE:
                return
            st.phase = self._step(st, Event.LEAVE_SAFE)
            st.op = None
            self._save(st)
            self._check_active(st)
            self._point_current(module, st)
            rec = st.slots.get(st.active) if st.active else None
            self.audit.append("slot.safe_left", actor=actor, module=module, active=st.active,
                              version=rec.version if rec else None)  # fmt: skip

    def _safe_source(self, module: str) -> tuple[Path, str] | None:
        meta = self.paths.safe / module / "safe.json"
        try:
            d = json.loads(meta.read_text())
            f = self.paths.safe / module / str(d["file"])
            if f.is_file():
                return f, str(d["sha256"])
        except (OSError, ValueError, KeyError):
            return None
        return None

    def _safe_filename(self, module: str) -> str:
        src = self._safe_source(module)
        return src[0].name if src else "model.onnx"

    def _make_safe_view(self, module: str, src: tuple[Path, str]) -> None:
        mdir = self.paths.module(module)
        st = self._load(module)
        rec = st.slots.get(st.active) if st.active else None
        name = rec.filename if rec else src[0].name
        view = mdir / SAFE_VIEW
        tmp = mdir / ".safe.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / name).symlink_to(os.path.relpath(src[0], view))
        fsync_dir(tmp)
        shutil.rmtree(view, ignore_errors=True)
        tmp.replace(view)
        fsync_dir(mdir)

    # ----------------------------------------------------------------- internals
    def _step(self, st: _State, event: Event) -> Phase:
        try:
            return next_phase(st.phase, event)
        except IllegalTransitionError as exc:
            raise SlotRefusedError(
                f"{event.value} {st.module}",
                f"not possible while the module is {st.phase.value}",
                "wait for the pending operation to finish (see sre-agent status)",
            ) from exc

    def _bump_interrupted(self, st: _State) -> None:
        sha = (st.op or {}).get("sha256")
        if sha:
            st.interrupted[str(sha)] = st.interrupted.get(str(sha), 0) + 1

    def _point_current(self, module: str, st: _State) -> None:
        """Make ``current`` name what ``st`` says is served (one rename; no-op when already so)."""
        mdir = self.paths.module(module)
        link = mdir / CURRENT
        want: str | None = SAFE_VIEW if st.phase is Phase.SAFE else st.active
        try:
            have: str | None = str(link.readlink())
        except FileNotFoundError:
            have = None
        except OSError:
            have = "?"
        if have == want:
            return
        if want is None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            fsync_dir(mdir)
            return
        tmp = mdir / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(want)
        tmp.replace(link)
        fsync_dir(mdir)

    def _discard_slot(self, mdir: Path, slot: str) -> None:
        p = mdir / slot
        if p.exists() or p.is_symlink():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            fsync_dir(mdir)

    def _discard_staging(self, mdir: Path) -> bool:
        staging = mdir / ".staging"
        if staging.exists():
            shutil.rmtree(staging)
            fsync_dir(mdir)
            return True
        return False

    def _view(self, module: str, slot: str | None, rec: SlotRecord | None) -> SlotView | None:
        if slot is None or rec is None:
            return None
        return self._slot_view(module, slot, rec)

    def _slot_view(self, module: str, slot: str, rec: SlotRecord) -> SlotView:
        path = self.paths.module(module) / slot
        art = path / rec.filename if rec.format == "file" or (path / rec.filename).exists() else path
        return SlotView(slot=slot, path=path, artifact_path=art, record=rec)

    def _now(self) -> str:
        return self.clock.now().isoformat()

    def _load(self, module: str) -> _State:
        f = self.paths.module(module) / STATE_FILE
        try:
            raw = json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return _State(module=module)
        except (OSError, ValueError) as exc:
            raise SlotError(
                f"read slot state of {module}", f"{f} is unreadable: {exc}", "restore it from the audit trail"
            ) from exc
        return _State.from_dict(raw)

    def _save(self, st: _State) -> None:
        st.saves += 1
        st.updated = self._now()
        atomic_write_json(self.paths.module(st.module) / STATE_FILE, st.to_dict())

    @contextlib.contextmanager
    def _locked(self, module: str) -> Iterator[None]:
        mdir = self.paths.module(module)
        mdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(mdir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for _ in range(_LOCK_TRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    time.sleep(0.05)  # real time: a fake clock must not spin through the bound
            else:
                raise SlotError(f"lock module {module}", "another process holds it for over 30 s", "retry")
            yield
        finally:
            os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_hashing(src: Path, dest: Path) -> tuple[str, int]:
    """Copy ``src`` to ``dest`` (0644, fsynced) hashing the bytes written. Returns (sha256, length)."""
    h = hashlib.sha256()
    n = 0
    with Path(src).open("rb") as fin:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                n += len(chunk)
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    return h.hexdigest(), n


def _fsync_tree(root: Path) -> None:
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(d)
