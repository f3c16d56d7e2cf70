"""`sre-agent report`: a self-contained HTML page with plots of what this device did."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sre_agent.cli._common import (
    ConfigOpt,
    JsonOpt,
    StateOpt,
    emit_json,
    err_console,
    out_console,
    state_paths,
)

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        html: Annotated[Path, typer.Option("--html", help="Write the HTML report to this file.")],
        state: StateOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Write an HTML report: canary steps and gates, latency and errors per slot, uplink backlog,
        SLOs, chaos verdicts, escalations. Inline SVG only: open it anywhere, nothing is fetched.

        While the daemon runs, telemetry comes through its admin API (it holds the DuckDB file);
        otherwise the file is opened read-only. Exit 1 when telemetry could not be read (the page is
        still written, with what could be read).
        """
        from sre_agent.report import collect_device, render_device
        from sre_core.atomic import atomic_write_text

        paths = state_paths(state, config)
        data = collect_device(paths.root)
        html.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(html, render_device(data))
        info = {
            "html": str(html),
            "audit_records": len(data.audit),
            "metric_rows": len(data.metrics),
            "escalations": len(data.escalations),
            "telemetry_note": data.telemetry_note,
        }
        if json_out:
            emit_json(info)
            if data.telemetry_failed:
                raise typer.Exit(1)
            return
        out_console().print(f"report written to [bold]{html}[/bold] ({len(data.audit)} audit records)")
        if data.telemetry_note:
            err_console().print(f"[yellow]{data.telemetry_note}[/yellow]")
        if data.telemetry_failed:
            raise typer.Exit(1)
