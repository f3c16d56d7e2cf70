"""Signed config modules take effect: validate, activate atomically as the signed configuration layer.

Public API::

    ConfigModuleError(InputError)                      a config module is refused (nothing activated)
    ConfigCheck                                        the agent's check of a candidate signed layer
    config_document(path, manifest, max_bytes) -> dict   the TOML table a module carries (parsed, pure)
    ConfigActivator(paths, audit, check, clock)
        .check(artifact) -> dict                        read + validate a verified artifact (before install)
        .activate(module, version, sha256, values, issued)   one atomic write of the whole signed layer
        .restore(module, values | None, ...)            the previous version's values, or none (no layer)
        .sync(slots)                                    on start/rollback: the layer agrees with the slots
        .active() -> dict[str, dict]                    ``<state>/config/signed.json`` (module -> record)
    signed_layer(paths) -> (values, labels)             what the agent's configuration loader reads

A ``kind: config`` module is one TOML document (``format: file``, a ``.toml`` file name) with the same
tables and keys as ``agent.toml``. This package never imports ``sre_agent``: the schema check is the
injected :class:`ConfigCheck` (``sre_agent.config.signed_layer_check``), which validates the whole
effective configuration *with* the candidate layer, refuses keys a signed layer may not set, and says
which changed keys need a restart. The layer of every active config module lives in one file,
``<state>/config/signed.json``, written with write-temp/fsync/rename: a reader sees the old layer or the
new one, never a mix. A key set by two config modules is refused (no silent precedence between them).
"""

from __future__ import annotations

import json
import tomllib
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from deployment.artifacts import VerifiedArtifact
from deployment.manifest import ModuleManifest
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError
from sre_core.paths import StatePaths

if TYPE_CHECKING:
    from deployment.slots import SlotManager

__all__ = [
    "LAYER_FILE",
    "ConfigActivator",
    "ConfigCheck",
    "ConfigModuleError",
    "config_document",
    "layer_path",
    "signed_layer",
]

LAYER_FILE = "config/signed.json"
MAX_DOC_BYTES = 256 << 10


class ConfigModuleError(InputError):
    """A config module is refused: unreadable, not TOML, a forbidden key, or invalid with the rest."""


class ConfigCheck(Protocol):
    """Validate the effective configuration with ``layer`` as the signed layer.

    Returns the keys (dotted) whose new value needs an agent restart to apply; raises
    :class:`sre_core.errors.InputError` (or ``ConfigError``) naming the key and value when invalid.
    """

    def __call__(self, layer: dict[str, Any], previous: dict[str, Any]) -> list[str]: ...


def layer_path(paths: StatePaths) -> Path:
    """``<state>/config/signed.json``: every active config module's values and record."""
    return paths.root / LAYER_FILE


def config_document(path: Path, manifest: ModuleManifest, max_bytes: int = MAX_DOC_BYTES) -> dict[str, Any]:
    """The TOML table a config module carries.

    Raises:
        ConfigModuleError: a tar bundle, not a ``.toml`` file, too big, not UTF-8 TOML, or empty.
    """
    what = f"config module {manifest.name} {manifest.version}"
    if manifest.format != "file" or not manifest.filename.endswith(".toml"):
        raise ConfigModuleError(
            what, "a config module is one TOML file", "publish an agent.toml-shaped file named *.toml"
        )
    try:
        if path.stat().st_size > max_bytes:
            raise ConfigModuleError(what, f"{manifest.filename} is over {max_bytes} bytes")
        values = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigModuleError(what, f"not a readable TOML document: {exc}", "republish it") from exc
    if not values:
        raise ConfigModuleError(what, "the module sets no key", "republish it")
    return values


def _leaves(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _merge(mods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every module's values as one nested table (module name order; conflicts were refused)."""
    merged: dict[str, Any] = {}
    for _, rec in sorted(mods.items()):
        for key, value in _leaves(rec.get("values") or {}).items():
            cur = merged
            *parents, last = key.split(".")
            for part in parents:
                cur = cur.setdefault(part, {})
            cur[last] = value
    return merged


def signed_layer(paths: StatePaths) -> tuple[dict[str, Any], dict[str, str]]:
    """The signed layer the configuration loader applies: (values, dotted key -> "module@version")."""
    try:
        data = json.loads(layer_path(paths).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, {}
    mods = data.get("modules") if isinstance(data, dict) else None
    if not isinstance(mods, dict):
        return {}, {}
    labels = {
        key: f"{name}@{rec.get('version')}"
        for name, rec in sorted(mods.items())
        for key in _leaves(rec.get("values") or {})
    }
    return _merge(mods), labels


class ConfigActivator:
    """Makes committed config modules the signed layer of the agent's configuration (and takes it back)."""

    def __init__(
        self, paths: StatePaths, audit: AuditLog, check: ConfigCheck | None, clock: Clock | None = None
    ) -> None:
        self.paths = paths
        self.audit = audit
        self.checker = check
        self.clock = clock or SystemClock()
        self.file = layer_path(paths)

    def active(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        mods = data.get("modules") if isinstance(data, dict) else None
        return dict(mods) if isinstance(mods, dict) else {}

    def _validate(self, module: str, values: dict[str, Any], what: str) -> list[str]:
        """The restart-needing keys of the layer with ``module`` set to ``values``.

        Raises:
            ConfigModuleError: no check is wired here, a key another module sets, or the check refused.
        """
        if self.checker is None:
            raise ConfigModuleError(
                what,
                "this process has no configuration model to check a config module against",
                "the agent (sre-agent run / reconcile --once) applies config modules",
            )
        mods = self.active()
        previous = _merge(mods)
        others = {k for name, rec in mods.items() if name != module for k in _leaves(rec.get("values") or {})}
        clash = sorted(others & set(_leaves(values)))
        if clash:
            raise ConfigModuleError(what, f"keys set by another config module: {', '.join(clash)}")
        mods[module] = {"values": values}
        try:
            return sorted(self.checker(_merge(mods), previous))
        except InputError as exc:
            raise ConfigModuleError(what, exc.why, exc.fix) from exc

    def check(self, art: VerifiedArtifact) -> dict[str, Any]:
        """Read and validate a verified config artifact (from the content store, before any install).

        Raises:
            ConfigModuleError: see :func:`config_document` and :class:`ConfigCheck`.
        """
        what = f"config module {art.module} {art.version}"
        values = config_document(art.path, art.manifest)
        self._validate(art.module, values, what)
        return values

    def activate(
        self, module: str, version: str, sha256: str, values: dict[str, Any], issued: datetime | None
    ) -> list[str]:
        """Validate again, then write the whole layer in one atomic replace. Returns the keys that need
        a restart to apply (recorded and audited)."""
        restart = self._validate(module, values, f"config module {module} {version}")
        mods = self.active()
        mods[module] = {
            "version": version,
            "sha256": sha256,
            "values": values,
            "issued": issued.isoformat() if issued else None,
            "activated_at": self.clock.now().isoformat(),
            "restart_required": restart,
        }
        self.file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.file, {"modules": mods})
        self.audit.append(
            "config.activated", module=module, version=version, sha256=sha256,
            keys=sorted(_leaves(values)), restart_required=restart,
        )  # fmt: skip
        return restart

    def restore(
        self,
        module: str,
        values: dict[str, Any] | None,
        version: str | None = None,
        sha256: str | None = None,
        issued: str | None = None,
    ) -> None:
        """Put back the previous version's values, or (``values`` None) drop the module from the layer."""
        if values is not None and version is not None and sha256 is not None:
            try:
                when = datetime.fromisoformat(issued) if issued else None
                self.activate(module, version, sha256, values, when)
                self.audit.append("config.restored", module=module, version=version)
                return
            except ConfigModuleError as exc:  # the previous values no longer validate: drop the layer
                self.audit.append("config.restore_failed", module=module, version=version, why=exc.message)
        mods = self.active()
        mods.pop(module, None)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.file, {"modules": mods})
        self.audit.append("config.restored", module=module, version=None)

    def sync(self, slots: SlotManager) -> dict[str, str]:
        """The layer matches the active slots (after a crash between activation and commit, or an
        operator rollback). Returns module -> what was done. Without a check (a process that does not
        know the agent's model) nothing is touched."""
        done: dict[str, str] = {}
        if self.checker is None:
            return done
        mods = self.active()
        for module in slots.modules():
            act = slots.status(module).active
            kind = act.record.manifest.get("kind") if act else None
            have = mods.get(module, {}).get("sha256")
            if act is not None and kind == "config" and have != act.sha256:
                try:
                    manifest = ModuleManifest.model_validate(act.record.manifest)
                    values = config_document(act.artifact_path, manifest)
                    self.activate(module, act.version, act.sha256, values, None)
                    done[module] = f"re-activated config {act.version}"
                except (ConfigModuleError, ValueError) as exc:
                    self.restore(module, None)
                    self.audit.append("config.sync_failed", module=module, why=str(exc)[:300])
                    done[module] = "dropped its config layer"
            elif act is None and module in mods:
                self.restore(module, None)
                done[module] = "dropped its config layer"
        return done
