"""`sre-agent pull`: refresh signed metadata, fetch and verify the channel's desired state and artifacts.

Exit codes: 0 the device holds a usable desired state (fresh, or stale while offline); 1 a check
refused what the source sent, a download could not finish, or the held state expired / none is held
while offline; 2 bad usage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from deployment.artifacts import PullResult, TrustStatus
from deployment.pull import Puller, PullError
from sre_agent.cli._common import (
    ConfigOpt,
    JsonOpt,
    StateOpt,
    emit_json,
    err_console,
    out_console,
    settings_for,
)
from sre_core.errors import InputError, SreError
from sre_core.paths import StatePaths

__all__ = ["register", "result_dict"]


def result_dict(result: PullResult) -> dict[str, Any]:
    """A JSON-ready summary of a pull result."""
    return {
        "trust": str(result.trust),
        "online": result.online,
        "trusted_now": result.trusted_now.isoformat(),
        "desired": json.loads(result.desired.model_dump_json()) if result.desired else None,
        "artifacts": {
            m: {
                "version": a.version,
                "target": a.target,
                "sha256": a.sha256,
                "length": a.length,
                "path": str(a.path),
            }
            for m, a in result.artifacts.items()
        },
        "messages": result.messages,
    }


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None]] | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console(),
        transient=False,
    ) as bar:

        def factory(name: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(name, total=total)
            return lambda n: bar.advance(task, n)

        yield factory


def register(app: typer.Typer) -> None:
    @app.command()
    def pull(
        state: StateOpt = None,
        source: Annotated[
            str | None,
            typer.Option(
                "--from",
                help="Hub URL or bundle directory, the only source tried (default: [hub] urls, url, "
                "then mirrors, in order).",
            ),
        ] = None,
        channel: Annotated[
            str | None, typer.Option("--channel", help="Channel (default: the provisioned one).")
        ] = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Refresh TUF metadata, fetch the desired state and its artifacts into the cache, verify, report.

        Offline, the device keeps what it holds and says so. Interrupted downloads resume on the next pull.
        """
        settings = settings_for(state, config)
        paths = StatePaths(settings.state_dir)
        # settings include what `init` provisioned; --from pulls from that one source only
        hubs = settings.hub.hubs()
        src = source or (hubs[0] if hubs else None)
        fallbacks = [] if source else settings.hub.pull_fallbacks()
        ch = channel or settings.hub.channel
        if not src:
            raise InputError(
                "pull", "no hub or bundle is configured", "pass --from URL_OR_DIR or run sre-agent init --hub"
            )
        if not (src.startswith(("http://", "https://")) or Path(src).is_dir()):
            raise InputError(
                f"pull from {src}", "not an http(s) URL or an existing directory", "check --from"
            )
        show_bar = not json_out and sys.stderr.isatty()
        try:
            with _progress(show_bar) as factory:
                result = Puller(
                    paths,
                    src,
                    ch,
                    progress=factory,
                    metadata_url=settings.hub.metadata_url,
                    targets_url=settings.hub.targets_url,
                    fallbacks=fallbacks,
                    sticky_s=settings.hub.sticky_s,
                ).pull()
        except PullError as exc:
            if json_out:
                emit_json({**exc.to_dict(), "refused": exc.refused, "held": result_dict(exc.held)})
                raise typer.Exit(1) from exc
            raise
        data = result_dict(result)
        usable = result.trust in (TrustStatus.FRESH, TrustStatus.STALE)
        if json_out:
            emit_json(data)
        else:
            con = out_console()
            color = {"fresh": "green", "stale": "yellow"}.get(str(result.trust), "red")
            is_bundle = not str(src).startswith(("http://", "https://"))
            where = f"from bundle {src}" if is_bundle else ("online" if result.online else "offline")
            con.print(
                f"trust [{color}]{result.trust}[/{color}] ({where}), trusted time {data['trusted_now']}"
            )
            from rich.table import Table

            if result.artifacts:
                table = Table(
                    title=f"channel {ch}" + (f", serial {result.desired.serial}" if result.desired else "")
                )
                for col in ("module", "version", "sha256", "bytes"):
                    table.add_column(col)
                for m, a in sorted(result.artifacts.items()):
                    table.add_row(m, a.version, a.sha256[:16], str(a.length))
                con.print(table)
            for msg in result.messages:
                con.print(f"- {msg}")
        if not usable:
            if json_out:
                raise typer.Exit(1)
            raise SreError(
                f"pull from {src}",
                f"trust is {result.trust}: no usable signed desired state",
                "connect to the hub or bring a fresh bundle; the device stays in safe mode until then",
            )
