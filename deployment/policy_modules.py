"""Signed policy modules take effect: validate, activate atomically into ``<state>/policies``, roll back.

Public API::

    PolicyModuleError(InputError)                      a policy module is refused (nothing activated)
    policy_documents(path, manifest, max_bytes) -> dict[str, bytes]   the documents a module carries
    slot_documents(slot_dir) -> dict[str, bytes]       the documents an installed slot holds
    validate_documents(docs) -> dict[str, BaseModel]   each parsed by the agent's own policy model (pure)
    PolicyActivator(paths, audit, clock)
        .check(artifact) -> dict[str, bytes]           read + validate a verified artifact (before install)
        .activate(module, version, sha256, docs, issued) write each document atomically, then the record
        .restore(module, docs | None)                  the previous version's documents, or the factory ones
        .sync(slots)                                   on start: make the files agree with the active slots
        .active() -> dict[str, dict]                   ``<state>/policies/active.json`` (module -> record)
    active_policy_issued(paths) -> datetime | None     issue time of the active signed policy (policy age)

A ``kind: policy`` module is a YAML document named for its kind (``triage.yaml``, ``chaos.yaml``,
``operators.yaml``...; see :mod:`policies.kinds`) or a tar bundle of several. Each is parsed by the
model the agent itself loads it with, before any slot is written; an unknown name or an invalid document
refuses the whole module. Activation writes each document with write-temp/fsync/rename (every reader
sees the old or the new document, never half of one), then the record; the files that were there
before the first signed policy (the factory defaults from provisioning) are kept under
``policies/.factory/`` so a rollback with no older signed version restores them. The daemon reads
``<state>/policies`` on every use (chaos on each tick, triage per incident), so no restart is needed.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from deployment.artifacts import VerifiedArtifact
from deployment.manifest import ModuleManifest
from policies.base import parse_document
from policies.kinds import KINDS, kind_for_file
from sre_core.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError
from sre_core.paths import StatePaths

if TYPE_CHECKING:
    from deployment.slots import SlotManager

__all__ = [
    "PolicyActivator",
    "PolicyModuleError",
    "active_policy_issued",
    "policy_documents",
    "slot_documents",
    "validate_documents",
]

RECORD = "active.json"
FACTORY = ".factory"
MAX_DOC_BYTES = 1 << 20


class PolicyModuleError(InputError):
    """A policy module is refused: unreadable, an unknown document, or a document its model rejects."""


def policy_documents(
    path: Path, manifest: ModuleManifest, max_bytes: int = MAX_DOC_BYTES
) -> dict[str, bytes]:
    """The documents a policy module carries: ``{file name: bytes}`` (a file, or a tar's regular files).

    Raises:
        PolicyModuleError: unreadable, too big, nested paths, or no document at all.
    """
    what = f"policy module {manifest.name} {manifest.version}"
    docs: dict[str, bytes] = {}
    try:
        if manifest.format == "file":
            if path.stat().st_size > max_bytes:
                raise PolicyModuleError(what, f"{manifest.filename} is over {max_bytes} bytes")
            docs[manifest.filename] = path.read_bytes()
        else:
            with tarfile.open(path) as tf:
                for member in tf.getmembers()[:64]:
                    if member.isdir():
                        continue
                    name = member.name.removeprefix("./")
                    if not member.isfile() or "/" in name or name.startswith("."):
                        raise PolicyModuleError(
                            what, f"bundle member {member.name!r} is not a plain document"
                        )
                    if member.size > max_bytes:
                        raise PolicyModuleError(what, f"{name} is over {max_bytes} bytes")
                    fh = tf.extractfile(member)
                    docs[name] = fh.read() if fh is not None else b""
    except (OSError, tarfile.TarError) as exc:
        raise PolicyModuleError(what, f"cannot read the module: {exc}", "republish it") from exc
    if not docs:
        raise PolicyModuleError(what, "the module carries no policy document", "republish it")
    return docs


def slot_documents(slot_dir: Path) -> dict[str, bytes]:
    """The documents an installed policy slot holds (its top-level regular files)."""
    return {p.name: p.read_bytes() for p in sorted(Path(slot_dir).iterdir()) if p.is_file()}


def validate_documents(docs: dict[str, bytes]) -> dict[str, BaseModel]:
    """Parse every document with the agent's policy model for its kind. Pure.

    Raises:
        PolicyModuleError: a document is not named for a known kind or does not match its model.
    """
    out: dict[str, BaseModel] = {}
    known = ", ".join(f"{k.name}.yaml" for k in KINDS)
    for name, data in sorted(docs.items()):
        kind = kind_for_file(Path(name))
        if kind is None or not name.endswith((".yaml", ".yml", ".json")):
            raise PolicyModuleError(
                f"policy document {name}", "not named for a policy kind", f"name it one of: {known}"
            )
        try:
            out[name] = parse_document(kind.model, data.decode("utf-8"), name)
        except UnicodeDecodeError as exc:
            raise PolicyModuleError(f"policy document {name}", "not UTF-8 text") from exc
        except InputError as exc:
            raise PolicyModuleError(exc.what, exc.why, exc.fix) from exc
    return out


def _target_name(name: str) -> str:
    kind = kind_for_file(Path(name))
    return f"{kind.name}.yaml" if kind is not None else name


class PolicyActivator:
    """Makes committed policy modules the policies the daemon reads (and takes them back)."""

    def __init__(self, paths: StatePaths, audit: AuditLog, clock: Clock | None = None) -> None:
        self.paths = paths
        self.audit = audit
        self.clock = clock or SystemClock()
        self.dir = paths.policies

    # ------------------------------------------------------------------ reading
    def active(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.dir / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        mods = data.get("modules") if isinstance(data, dict) else None
        return dict(mods) if isinstance(mods, dict) else {}

    def check(self, art: VerifiedArtifact) -> dict[str, bytes]:
        """Read and validate a verified policy artifact (from the content store, before any install).

        Raises:
            PolicyModuleError: see :func:`policy_documents` and :func:`validate_documents`.
        """
        docs = policy_documents(art.path, art.manifest)
        validate_documents(docs)
        return docs

    # ------------------------------------------------------------------ writing
    def _keep_factory(self, names: list[str]) -> None:
        factory = self.dir / FACTORY
        factory.mkdir(parents=True, exist_ok=True)
        owned = {f for rec in self.active().values() for f in rec.get("files", [])}
        for name in names:
            src, keep = self.dir / name, factory / name
            marker = factory / f"{name}.absent"
            if name in owned or keep.exists() or marker.exists():
                continue
            if src.is_file():
                atomic_write_bytes(keep, src.read_bytes(), mode=0o644)
            else:
                atomic_write_bytes(marker, b"", mode=0o644)

    def activate(
        self, module: str, version: str, sha256: str, docs: dict[str, bytes], issued: datetime | None
    ) -> None:
        """Validate again, then write each document atomically and record the module as active."""
        validate_documents(docs)
        self.dir.mkdir(parents=True, exist_ok=True)
        files = {_target_name(n): d for n, d in docs.items()}
        self._keep_factory(sorted(files))
        for name, data in sorted(files.items()):
            atomic_write_bytes(self.dir / name, data, mode=0o644)
        mods = self.active()
        mods[module] = {
            "version": version,
            "sha256": sha256,
            "files": sorted(files),
            "issued": issued.isoformat() if issued else None,
            "activated_at": self.clock.now().isoformat(),
        }
        atomic_write_json(self.dir / RECORD, {"modules": mods})
        self.audit.append(
            "policy.activated", module=module, version=version, sha256=sha256, files=sorted(files)
        )

    def restore(
        self,
        module: str,
        docs: dict[str, bytes] | None,
        version: str | None = None,
        sha256: str | None = None,
        issued: str | None = None,
    ) -> None:
        """Put back the previous version's documents, or (``docs`` None) the factory ones."""
        mods = self.active()
        rec = mods.get(module, {})
        if docs is not None and version is not None and sha256 is not None:
            when = datetime.fromisoformat(issued) if issued else None
            self.activate(module, version, sha256, docs, when)
            stale = set(rec.get("files", [])) - {_target_name(n) for n in docs}
        else:
            stale = set(rec.get("files", []))
            mods.pop(module, None)
        factory = self.dir / FACTORY
        for name in sorted(stale):
            keep = factory / name
            if keep.is_file():
                atomic_write_bytes(self.dir / name, keep.read_bytes(), mode=0o644)
            else:
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / name).unlink()
        fsync_dir(self.dir)
        if docs is None:
            atomic_write_json(self.dir / RECORD, {"modules": mods})
        self.audit.append("policy.restored", module=module, version=version, restored=sorted(stale))

    def sync(self, slots: SlotManager) -> dict[str, str]:
        """On start: every policy module's files match its active slot (a crash between activating and
        committing, or a rollback, left them behind). Returns module -> what was done."""
        done: dict[str, str] = {}
        mods = self.active()
        for module in slots.modules():
            st = slots.status(module)
            act = st.active
            kind = act.record.manifest.get("kind") if act else None
            have = mods.get(module, {}).get("sha256")
            if act is not None and kind == "policy" and have != act.sha256:
                try:
                    self.activate(module, act.version, act.sha256, slot_documents(act.path), None)
                    done[module] = f"re-activated {act.version}"
                except PolicyModuleError as exc:
                    self.audit.append("policy.sync_failed", module=module, why=exc.message)
            elif act is None and module in mods:
                self.restore(module, None)
                done[module] = "restored the factory policy"
        return done


def active_policy_issued(paths: StatePaths) -> datetime | None:
    """When the newest active signed policy module was issued (None: only factory policy is active)."""
    try:
        data = json.loads((paths.policies / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    times = []
    for rec in (data.get("modules") or {}).values() if isinstance(data, dict) else []:
        with contextlib.suppress(TypeError, ValueError):
            if rec.get("issued"):
                times.append(datetime.fromisoformat(rec["issued"]))
    return max(times) if times else None
