"""`sre-agent version`, `config show|validate`, `init`."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from sre_agent.cli._common import (
    ConfigOpt,
    JsonOpt,
    StateOpt,
    effective_for,
    emit_json,
    err_console,
    out_console,
    settings_for,
)
from sre_agent.provision import provision
from sre_core.cli import show_value
from sre_core.paths import StatePaths

__all__ = ["register"]


def _version() -> str:
    try:
        return metadata.version("sre-agent")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Show or validate the effective configuration (file + environment).")
    app.add_typer(config_app, name="config")

    @app.command()
    def version(json_out: JsonOpt = False) -> None:
        """Print the agent version and its runtime."""
        info = {"sre_agent": _version(), "python": platform.python_version()}
        if json_out:
            emit_json(info)
        else:
            out_console().print(f"sre-agent {info['sre_agent']} (python {info['python']})")

    @config_app.command("show")
    def config_show(state: StateOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
        """Print every effective setting and where it came from (default, provisioning, file, signed, env).

        Precedence, lowest first: defaults, what `sre-agent init` wrote (<state>/device.json), the TOML
        file, committed signed config modules (`signed MODULE@VERSION`), SRE_AGENT_* variables.
        """
        eff = effective_for(state, config)
        if json_out:
            data = json.loads(eff.settings.model_dump_json())
            data["sources"] = eff.sources
            emit_json(data)
            return
        from sre_core.cli import table

        title = "effective configuration" + (f" (file {eff.config_file})" if eff.config_file else "")
        t = table(title, ["key", "value", "source"])
        for key, value, source in eff.rows():
            t.add_row(key, show_value(value), source)
        out_console().print(t)

    @config_app.command("validate")
    def config_validate(state: StateOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
        """Check the configuration; exit 0 when valid, 2 with the key, value and expected form when not."""
        settings_for(state, config)
        if json_out:
            emit_json({"valid": True})
        else:
            out_console().print("[green]configuration is valid[/green]")

    @app.command()
    def init(
        state: Annotated[Path, typer.Option("--state", help="State directory to create.")],
        root: Annotated[
            Path | None, typer.Option("--root", help="TUF root.json to pin as the trust anchor.")
        ] = None,
        hub: Annotated[str | None, typer.Option("--hub", help="Hub URL or bundle directory.")] = None,
        channel: Annotated[str | None, typer.Option("--channel", help="Release channel.")] = None,
        device_id: Annotated[str | None, typer.Option("--device-id", help="Use this id.")] = None,
        safe_module: Annotated[
            list[str] | None,
            typer.Option("--safe-module", help="Factory safe module MODULE=FILE (repeatable)."),
        ] = None,
        force: Annotated[
            bool, typer.Option("--force", help="Replace an already pinned, different trust anchor (audited).")
        ] = False,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Provision a device: state layout, identity key pair (0600), pinned trust anchor, safe modules.

        Idempotent: running it again keeps the existing identity.
        """
        _check_hub_values(hub, channel)
        result = provision(
            StatePaths(state),
            root=root,
            hub=hub,
            channel=channel,
            device_id=device_id,
            safe_modules=safe_module or [],
            force=force,
        )
        notes = _overridden(state, config, hub, channel)
        if json_out:
            emit_json({**result, "notes": notes})
            return
        con = out_console()
        verb = "created" if result["identity_created"] else "kept"
        con.print(f"device [bold]{result['device_id']}[/bold] ({verb} identity) in {result['state']}")
        if result.get("root_sha256"):
            con.print(f"pinned trust anchor root.json sha256={result['root_sha256']}")
        for m in result.get("safe_modules", []):
            con.print(f"safe module {m['module']} sha256={m['sha256']}")
        if hub is not None:
            con.print(f"hub {hub} (channel {channel or 'unchanged'}) recorded in device.json")
        for n in notes:
            err_console().print(f"[yellow]note:[/yellow] {n}")


def _check_hub_values(hub: str | None, channel: str | None) -> None:
    """Refuse values provisioning would write but configuration cannot load (before anything is written)."""
    from pydantic import ValidationError

    from sre_agent.config import HubSettings
    from sre_core.errors import InputError

    values = {k: v for k, v in (("url", hub), ("channel", channel)) if v is not None}
    try:
        HubSettings.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = "--hub" if err["loc"][0] == "url" else "--channel"
        raise InputError(
            f"init {flag} {err.get('input')!r}", err["msg"], "use lower-case letters, digits, '.', '_', '-'"
        ) from exc


def _overridden(state: Path, config: Path | None, hub: str | None, channel: str | None) -> list[str]:
    """Where the file or environment overrides what `init` just recorded, say so."""
    eff = effective_for(state, config)
    notes = []
    for key, given in (("hub.url", hub), ("hub.channel", channel)):
        source = eff.sources.get(key, "default")
        if given is not None and source not in ("provisioning", "default"):
            value = getattr(eff.settings.hub, key.split(".")[1])
            notes.append(
                f"{key} stays {value!r}: the {source} sets it, and it takes precedence over what init "
                f"recorded ({given!r}); `sre-agent config show` lists every source"
            )
    return notes
