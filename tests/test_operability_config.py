"""One configuration model: provisioning writes what configuration reads, every value has a source,
unknown SRE_AGENT_* variables are errors, and errors blame the source that set the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sre_agent.cli import main
from sre_agent.config import load_effective, load_settings
from sre_core.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("SRE_AGENT_"):
            monkeypatch.delenv(k)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_init_hub_is_what_config_show_and_uplink_flush_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    st = tmp_path / "dev"
    hub = "http://127.0.0.1:9"  # nothing listens: the flush must try it, not say "no hub URL"
    rc, _, err = _run(capsys, "init", "--state", str(st), "--hub", hub, "--channel", "edge")
    assert rc == 0, err
    rc, out, err = _run(capsys, "config", "show", "--state", str(st), "--json")
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["hub"]["url"] == hub and shown["hub"]["channel"] == "edge"
    assert shown["sources"]["hub.url"] == "provisioning"
    assert shown["sources"]["serving.port"] == "default"
    rc, out, err = _run(capsys, "uplink", "flush", "--state", str(st), "--attempts", "1", "--json")
    assert "no hub URL" not in err
    assert rc == 0, err  # nothing was pending, so nothing is left
    assert json.loads(out)["pending_after"] == 0


def test_text_show_has_a_source_column_and_no_python_none(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, out, _ = _run(capsys, "config", "show", "--state", str(tmp_path))
    assert rc == 0
    assert "source" in out and "default" in out
    assert "None" not in out and "null" not in out


def test_file_and_env_layer_over_provisioning(tmp_path: Path) -> None:
    (tmp_path / "device.json").write_text(json.dumps({"hub": "http://prov:1", "channel": "edge"}))
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[hub]\nurl = "http://file:2"\n')
    eff = load_effective(config_file=cfg, env={"SRE_AGENT_HUB__TIMEOUT_S": "3"}, state_dir=tmp_path)
    assert eff.settings.hub.url == "http://file:2"
    assert eff.settings.hub.channel == "edge"
    assert eff.sources["hub.url"] == "file"
    assert eff.sources["hub.channel"] == "provisioning"
    assert eff.sources["hub.timeout_s"] == "env"
    assert eff.sources["state_dir"] == "flag"


def test_misspelt_env_variable_is_an_error_with_the_closest_name(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SRE_AGENT_SERVNG__PORT", "8100")
    rc, _, err = _run(capsys, "config", "validate", "--state", str(tmp_path))
    assert rc == 2
    assert "SRE_AGENT_SERVNG__PORT" in err and "did you mean $SRE_AGENT_SERVING__PORT" in err
    with pytest.raises(ConfigError, match="did you mean \\$SRE_AGENT_LOG_LEVEL"):
        load_settings(env={"SRE_AGENT_LOGLEVEL": "debug"})


def test_env_error_blames_the_variable_not_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[serving]\nport = 8080\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(config_file=cfg, env={"SRE_AGENT_SERVING__PORT": "99999"})
    msg = exc.value.message
    assert "$SRE_AGENT_SERVING__PORT" in msg and str(cfg) not in msg


def test_file_error_blames_the_file_not_the_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[serving]\nport = 99999\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(config_file=cfg, env={})
    msg = exc.value.message
    assert str(cfg) in msg and "$SRE_AGENT" not in msg


def test_unknown_file_key_suggests_the_closest(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[serving]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'serving\.port'"):
        load_settings(config_file=cfg, env={})


def test_init_refuses_a_channel_configuration_cannot_load(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    st = tmp_path / "dev"
    rc, _, err = _run(capsys, "init", "--state", str(st), "--channel", "Bad Channel")
    assert rc == 2 and "--channel" in err
    assert not (st / "device.json").exists()  # refused before anything was written


def test_init_says_when_the_file_overrides_what_it_records(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    st = tmp_path / "dev"
    st.mkdir()
    (st / "agent.toml").write_text('[hub]\nurl = "http://file:2"\n')
    rc, _, err = _run(capsys, "init", "--state", str(st), "--hub", "http://prov:1")
    assert rc == 0
    assert "hub.url stays 'http://file:2'" in err
