"""`sre-hub report`: a self-contained HTML page with plots of the fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sre_core.cli import JsonOpt, emit_json, out_console

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        repo: Annotated[Path, typer.Option("--repo", help="Hub repository directory.")],
        html: Annotated[Path, typer.Option("--html", help="Write the HTML report to this file.")],
        json_out: JsonOpt = False,
    ) -> None:
        """Write an HTML report: releases, canaries and gates across the fleet, latency and errors per
        slot, uplink backlog and arrivals, sync SLOs, chaos verdicts, escalations, DORA. Inline SVG only.
        """
        from hub.report import collect_hub, render_hub
        from sre_core.atomic import atomic_write_text

        data = collect_hub(repo)
        html.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(html, render_hub(data))
        info = {
            "html": str(html),
            "devices": len(data.devices),
            "batches": len(data.receipts),
            "escalations": len(data.escalations),
            "notes": data.notes,
        }
        if json_out:
            emit_json(info)
            return
        out_console().print(f"report written to [bold]{html}[/bold] ({len(data.devices)} devices)")
        for n in data.notes:
            out_console().print(f"[yellow]{n}[/yellow]")
