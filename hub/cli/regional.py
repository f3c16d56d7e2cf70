"""`sre-hub regional`: run a regional hub (a verified mirror + store-and-forward relay for one site)."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Annotated

import typer

from sre_core.cli import JsonOpt, emit_json, err_console
from sre_core.errors import InputError

__all__ = ["register"]

SITE_TOKEN_ENV = "SRE_HUB_SITE_TOKEN"  # noqa: S105 (the variable's name, not a secret)


def _site_token(token_file: Path | None) -> str | None:
    if token_file is not None:
        try:
            return token_file.read_text().strip() or None
        except OSError as exc:
            raise InputError(
                "read --site-token-file", str(exc), "pass the file `sre-hub sites add` wrote"
            ) from exc
    return os.environ.get(SITE_TOKEN_ENV) or None


def register(app: typer.Typer) -> None:
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
        channel: Annotated[
            list[str] | None, typer.Option("--channel", help="Channel to pre-fetch (repeat; default all).")
        ] = None,
        site_token_file: Annotated[
            Path | None,
            typer.Option("--site-token-file", help=f"File with the site token (or env {SITE_TOKEN_ENV})."),
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
