"""`sre-hub version`."""

from __future__ import annotations

import platform
from importlib import metadata

import typer

from sre_core.cli import JsonOpt, emit_json, out_console

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def version(json_out: JsonOpt = False) -> None:
        """Print the hub version and its runtime."""
        try:
            v = metadata.version("sre-agent")
        except metadata.PackageNotFoundError:
            v = "0+unknown"
        info = {"sre_hub": v, "python": platform.python_version()}
        if json_out:
            emit_json(info)
        else:
            out_console().print(f"sre-hub {info['sre_hub']} (python {info['python']})")
