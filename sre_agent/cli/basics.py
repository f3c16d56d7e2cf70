"""`sre-agent version`, `config show|validate`, `init`."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from sre_agent.cli._common import ConfigOpt, JsonOpt, StateOpt, emit_json, out_console, settings_for
from sre_agent.provision import provision
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
        """Print the effective settings after merging the TOML file and SRE_AGENT_* variables."""
        settings = settings_for(state, config)
        data = json.loads(settings.model_dump_json())
        if json_out:
            emit_json(data)
            return
        from rich.table import Table

        table = Table(title="effective configuration", show_lines=False)
        table.add_column("key")
        table.add_column("value")

        def walk(prefix: str, obj: object) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                table.add_row(prefix, json.dumps(obj))

        walk("", data)
        out_console().print(table)

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
        json_out: JsonOpt = False,
    ) -> None:
        """Provision a device: state layout, identity key pair (0600), pinned trust anchor, safe modules.

        Idempotent: running it again keeps the existing identity.
        """
        result = provision(
            StatePaths(state),
            root=root,
            hub=hub,
            channel=channel,
            device_id=device_id,
            safe_modules=safe_module or [],
        )
        if json_out:
            emit_json(result)
            return
        con = out_console()
        verb = "created" if result["identity_created"] else "kept"
        con.print(f"device [bold]{result['device_id']}[/bold] ({verb} identity) in {result['state']}")
        if result.get("root_sha256"):
            con.print(f"pinned trust anchor root.json sha256={result['root_sha256']}")
        for m in result.get("safe_modules", []):
            con.print(f"safe module {m['module']} sha256={m['sha256']}")
