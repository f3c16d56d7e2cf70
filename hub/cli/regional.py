"""`sre-hub regional` (run a regional hub: a verified mirror + store-and-forward relay for one site) and
`sre-hub sites add | list | remove` (the sites the root hub knows, their sync age and backlog)."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from sre_core.cli import JsonOpt, emit_json, err_console, out_console
from sre_core.errors import InputError

__all__ = ["register", "sites_table"]

RepoOpt = Annotated[
    Path, typer.Option("--repo", help="Hub repository directory (created by `sre-hub init`).")
]

SITE_TOKEN_ENV = "SRE_HUB_SITE_TOKEN"  # noqa: S105 (the variable's name, not a secret)


def _site_token(token_file: Path | None) -> str | None:
    if token_file is not None:
        return _read_token(token_file, "--site-token-file")
    return os.environ.get(SITE_TOKEN_ENV) or None


def _read_token(path: Path, option: str) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError as exc:
        raise InputError(f"read {option}", str(exc), "pass a readable file holding the token") from exc


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def sites_table(rows: list[dict[str, Any]]) -> Any:
    """A rich table of :meth:`hub.sites.SiteRegistry.rows`."""
    from rich.table import Table

    t = Table(title="regional sites")
    for c in ("site", "last sync", "age", "in sync", "sync SLO", "backlog", "timestamp", "last seen"):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r["site"], r["last_sync"] or "never", _age(r["sync_age_s"]),
            "yes" if r["in_sync"] else "[yellow]no[/yellow]"
            + (f" ({len(r['devices_behind'])} devices behind)" if r.get("devices_behind") else ""),
            "[red]breach[/red]" if r["breach"] else "[green]ok[/green]",
            "-" if r["backlog"] is None else str(r["backlog"]),
            "-" if r["timestamp_version"] is None else f"v{r['timestamp_version']}",
            r["last_seen"] or "never",
        )  # fmt: skip
    return t


def _registry(repo: Path) -> Any:
    from hub.sites import SiteRegistry
    from hub.store import open_store, store_config

    if not (repo / "repo.json").is_file():
        raise InputError(f"open {repo}", "not a hub repository", "run `sre-hub init --repo DIR` first")
    return SiteRegistry(open_store(store_config(repo).database_url))


def register(app: typer.Typer) -> None:
    sites = typer.Typer(help="Regional hub sites: tokens, last sync, backlog.", no_args_is_help=True)
    app.add_typer(sites, name="sites")

    @sites.command("add")
    def sites_add(
        repo: RepoOpt,
        name: Annotated[str, typer.Argument(help="Site name (letters, digits, . _ -).")],
        json_out: JsonOpt = False,
    ) -> None:
        """Issue a site token (printed once; the hub keeps its sha256). Replaces the site's old token."""
        token = _registry(repo).add(name)
        if json_out:
            emit_json({"site": name, "token": token})
        else:
            print(token)

    @sites.command("remove")
    def sites_remove(
        repo: RepoOpt, name: Annotated[str, typer.Argument(help="Site name.")], json_out: JsonOpt = False
    ) -> None:
        """Revoke a site's token (its regional hub can no longer forward or report). Exit 2 if unknown."""
        if not _registry(repo).remove(name):
            raise InputError(f"remove site {name}", "no such site", "see sre-hub sites list")
        if json_out:
            emit_json({"site": name, "removed": True})
        else:
            out_console().print(f"site {name} removed")

    @sites.command("list")
    def sites_list(
        repo: RepoOpt,
        max_age: Annotated[
            float, typer.Option("--max-age", help="Seconds since a site's last sync before SLO breach.")
        ] = 3600.0,
        json_out: JsonOpt = False,
    ) -> None:
        """Each site: last sync and its age, whether it serves the current timestamp, backlog."""
        from hub.repository import HubRepository
        from hub.sites import current_desired, current_timestamp

        rows = _registry(repo).rows(current_timestamp(repo), max_age, current_desired(HubRepository(repo)))
        if json_out:
            emit_json({"current_timestamp": current_timestamp(repo), "max_age_s": max_age, "sites": rows})
        else:
            out_console().print(sites_table(rows))

    @app.command()
    def regional(
        upstream: Annotated[
            str, typer.Option("--upstream", help="The root hub's URL (or a parent regional hub's).")
        ],
        root: Annotated[
            Path, typer.Option("--root", help="The pinned trust anchor: the root hub's root.json.")
        ],
        state: Annotated[Path, typer.Option("--state", help="This regional hub's state directory.")],
        store: Annotated[
            str | None,
            typer.Option("--store", help="SQLAlchemy URL of the relay store (default sqlite in --state)."),
        ] = None,
        prefetch_bytes: Annotated[
            int, typer.Option("--prefetch-bytes", help="Byte budget of targets pre-fetched for the channels.")
        ] = 16 * 1024**3,
        site: Annotated[str, typer.Option("--site", help="This site's name at the root hub.")] = "site",
        spool_max_bytes: Annotated[
            int, typer.Option("--spool-max-bytes", help="Byte budget of uploads waiting to be forwarded.")
        ] = 8 * 1024**3,
        channel: Annotated[
            list[str] | None, typer.Option("--channel", help="Channel to pre-fetch (repeat; default all).")
        ] = None,
        site_token_file: Annotated[
            Path | None,
            typer.Option("--site-token-file", help=f"File with the site token (or env {SITE_TOKEN_ENV})."),
        ] = None,
        view_token_file: Annotated[
            Path | None,
            typer.Option(
                "--view-token-file",
                help="File with the bearer token of this site's GET /v1/fleet/status (not a root token).",
            ),
        ] = None,
        host: Annotated[str, typer.Option("--host", help="Listen address.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="Listen port (0: any free port).")] = 8081,
        interval: Annotated[
            float, typer.Option("--interval", help="Seconds between syncs (jittered).")
        ] = 30.0,
        once: Annotated[bool, typer.Option("--once", help="Sync once, print the result and exit.")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Mirror the root hub's signed repository for this site's devices and relay what they send.

        Serves /metadata and /targets exactly as verified (never re-signed; devices verify again) and keeps
        serving them while the upstream is unreachable. Exit 0 when stopped by Ctrl-C/SIGTERM (or after
        --once with a published sync), 1 when the upstream could not be synced with --once or the port is
        in use, 2 for bad options.
        """
        from hub.regional import RegionalConfig, RegionalHub, build_regional_app
        from sre_core.http_server import bind_tcp, serve_forever

        if interval <= 0:
            raise InputError("regional hub", "--interval must be positive", "pass seconds > 0")
        conf = RegionalConfig(
            upstream=upstream,
            root=root,
            state=state,
            store_url=store,
            prefetch_bytes=prefetch_bytes,
            site=site,
            site_token=_site_token(site_token_file),
            channels=tuple(channel) if channel else None,
            spool_max_bytes=spool_max_bytes,
            view_token=_read_token(view_token_file, "--view-token-file") if view_token_file else None,
        )
        hub = RegionalHub(conf)
        if once:
            out = hub.sync_once()
            if json_out:
                emit_json(out)
            else:
                down = out["down"]
                err_console().print(
                    f"site {site}: timestamp v{down['timestamp_version']}, {len(down['fetched'])} targets "
                    f"fetched, {len(down['over_budget'])} over budget"
                    + (f"; {down['error']}" if down["error"] else "")
                )
            hub.close()
            if not out["down"]["published"]:
                raise typer.Exit(1)
            return
        sock = bind_tcp(host, port)
        url = f"http://{host}:{sock.getsockname()[1]}"
        stop = threading.Event()

        def loop() -> None:
            rng = random.Random()
            while not stop.is_set():
                hub.sync_once()
                stop.wait(interval * rng.uniform(0.8, 1.2))

        worker = threading.Thread(target=loop, name="regional-sync", daemon=True)
        worker.start()
        if json_out:
            emit_json({"url": url, "site": site, "upstream": upstream, "state": str(state)})
        else:
            err_console().print(f"regional hub {site} serving {url}, upstream {upstream} (Ctrl-C stops)")
        try:
            serve_forever(build_regional_app(hub), sock)
        finally:
            stop.set()
            worker.join(timeout=30)
            hub.close()
