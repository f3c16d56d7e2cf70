"""Configuration: TOML file + SRE_AGENT_* environment, precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sre_agent.config import load_settings
from sre_core.errors import ConfigError


def test_defaults_without_file_or_env(tmp_path: Path) -> None:
    s = load_settings(env={}, state_dir=tmp_path)
    assert s.state_dir == tmp_path
    assert s.serving.port == 8000
    assert s.hub.channel == "stable"


def test_file_then_env_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('log_format = "json"\n[serving]\nport = 9001\n[hub]\nchannel = "edge-eu"\n')
    s = load_settings(config_file=cfg, env={"SRE_AGENT_SERVING__PORT": "9002"})
    assert s.log_format == "json"
    assert s.hub.channel == "edge-eu"
    assert s.serving.port == 9002  # environment wins over the file


def test_state_dir_agent_toml_is_found(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("[llm]\nenabled = false\n")
    assert load_settings(env={}, state_dir=tmp_path).llm.enabled is False


def test_error_names_key_value_and_expected_form(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[serving]\nport = 70000\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(config_file=cfg, env={})
    msg = exc.value.message
    assert "serving.port" in msg
    assert "70000" in msg
    assert "less than or equal to 65535" in msg
    assert str(cfg) in msg  # the file set it: the file is blamed (not the environment)


def test_env_error_is_precise() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(env={"SRE_AGENT_LOG_FORMAT": "xml"})
    assert "log_format" in exc.value.message
    assert "'xml'" in exc.value.message
    assert "'human' or 'json'" in exc.value.message


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[serving]\nprot = 1\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(config_file=cfg, env={})
    assert "unknown key 'serving.prot'" in exc.value.message


def test_bad_toml_syntax(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[serving\nport=1\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(config_file=cfg, env={})
    assert "not valid TOML" in exc.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_file=tmp_path / "nope.toml", env={})


def test_env_is_not_leaked_into_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SRE_AGENT_SERVING__PORT", "1234")
    assert load_settings(env={}).serving.port == 8000
    assert load_settings().serving.port == 1234
