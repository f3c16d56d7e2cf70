"""`sre-agent telemetry status | query "SQL"` and `sre-agent uplink flush`.

While the daemon runs it holds ``<state>/telemetry.duckdb`` (DuckDB lets no second process open it), so
``status`` and ``query`` ask it over its admin API; otherwise they open the file directly, read-only.
``uplink flush`` needs the file itself and fails with a clear message while the daemon runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sre_agent.cli._common import ConfigOpt, JsonOpt, StateOpt, emit_json, out_console, settings_for
from sre_core.errors import InputError, SreError

__all__ = ["register"]


def _policy(state_root: Path) -> Any:
    from policies.telemetry import load_telemetry_policy

    custom = state_root / "policies" / "telemetry.yaml"
    return load_telemetry_policy(custom if custom.exists() else None)


def _mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _plain_rows(tbl: Any) -> list[dict[str, Any]]:
    """Arrow rows as JSON-friendly dicts (timestamps as ISO strings)."""
    import pyarrow as pa

    cols = [
        c.cast(pa.string()) if pa.types.is_timestamp(f.type) or pa.types.is_date(f.type) else c
        for f, c in zip(tbl.schema, tbl.columns, strict=True)
    ]
    return list(pa.Table.from_arrays(cols, names=tbl.column_names).to_pylist())


def _daemon_call(state_root: Path, method: str, path: str, body: Any = None) -> Any:
    """The running daemon's answer over its admin API, or None when no daemon runs.

    Raises:
        InputError: the daemon refused the request (e.g. SQL that is not one SELECT).
    """
    from sre_agent.admin import admin_client
    from sre_core.paths import StatePaths

    client = admin_client(StatePaths(state_root))
    if client is None:
        return None
    try:
        resp = client.request(method, path, json=body)
    finally:
        client.close()
    if resp.status_code == 400:
        raise InputError(f"telemetry {path}", str(resp.json().get("error")), "check the SQL")
    resp.raise_for_status()
    return resp.json()


def register(app: typer.Typer) -> None:
    tel = typer.Typer(help="The local telemetry store (DuckDB): sizes, budgets, backlog, queries.")
    up = typer.Typer(help="Store-and-forward upload of telemetry to the hub.")
    app.add_typer(tel, name="telemetry", no_args_is_help=True)
    app.add_typer(up, name="uplink", no_args_is_help=True)

    @tel.command("status")
    def status(state: StateOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
        """Sizes per table against the budgets, the upload backlog, and every fold and drop counted."""
        import duckdb

        from sre_agent.telemetry import open_readonly, status_of
        from sre_core.clock import SystemClock

        settings = settings_for(state, config)
        db = settings.state_dir / "telemetry.duckdb"
        policy = _policy(settings.state_dir)
        live = _daemon_call(settings.state_dir, "GET", "/telemetry/status")
        if live is not None:  # the daemon holds the file: ask it
            info = live
        else:
            con = open_readonly(db)
            try:
                now_us = int(SystemClock().now().timestamp() * 1_000_000)
                try:
                    info = status_of(con, policy, now_us)
                except duckdb.CatalogException as exc:
                    raise SreError(f"read {db}", "not a telemetry database", "check --state") from exc
            finally:
                con.close()
            info["file_bytes"] = db.stat().st_size
        if json_out:
            emit_json(info)
            return
        from rich.table import Table

        t = Table(title=f"telemetry {db} ({_mib(info['file_bytes'])} of {_mib(policy.total_bytes)})")
        for col in (
            "table",
            "class",
            "rows",
            "bytes",
            "produced",
            "uploaded",
            "folded",
            "dropped",
            "unsealed",
        ):
            t.add_column(col, justify="left" if col in ("table", "class") else "right")
        for name, row in info["tables"].items():
            t.add_row(
                name,
                row["class"],
                str(row["rows"]),
                _mib(row["bytes"]),
                str(row["produced"]),
                str(row["uploaded"]),
                str(row["folded"]),
                str(row["dropped"]),
                str(row["unsealed"]),
            )
        con_out = out_console()
        con_out.print(t)
        b = info["backlog"]
        con_out.print(
            f"backlog: {b['outbox_batches']} sealed batches ({_mib(b['outbox_bytes'])}), "
            f"{b['unsealed_rows']} unsealed rows; oldest unacked {b['oldest_unacked_age_s']} s; "
            f"last ack {b['since_last_ack_s']} s ago"
        )
        con_out.print("budgets: " + ", ".join(f"{k} {_mib(v)}" for k, v in info["budgets"].items()))
        if info["stop_nonessential"]:
            con_out.print("[red]essential space is full: non-essential work is stopped[/red]")

    @tel.command("query")
    def query(
        sql: Annotated[
            str, typer.Argument(help='SQL, e.g. "SELECT name, avg(value) FROM metrics GROUP BY 1".')
        ],
        state: StateOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Run read-only SQL on the local store (metrics, metrics_1m, metrics_1h, events, logs, ...)."""
        import duckdb

        from sre_agent.telemetry import open_readonly

        settings = settings_for(state, config)
        live = _daemon_call(settings.state_dir, "POST", "/telemetry/query", {"sql": sql})
        if live is not None:  # the daemon holds the file: it runs the (read-only) query
            columns, rows = list(live["columns"]), list(live["rows"])
        else:
            con = open_readonly(settings.state_dir / "telemetry.duckdb")
            try:
                tbl = con.sql(sql).to_arrow_table()
            except duckdb.Error as exc:
                raise InputError("run telemetry query", str(exc).splitlines()[0], "check the SQL") from exc
            finally:
                con.close()
            columns, rows = tbl.column_names, _plain_rows(tbl)
        if json_out:
            emit_json({"columns": columns, "rows": rows})
            return
        from rich.table import Table

        t = Table(title=f"{len(rows)} rows")
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*["" if v is None else str(v) for v in r.values()])
        out_console().print(t)

    @up.command("flush")
    def flush(
        state: StateOpt = None,
        config: ConfigOpt = None,
        hub: Annotated[
            str | None, typer.Option("--hub", help="Hub URL (default: [hub] urls, then url, in order).")
        ] = None,
        attempts: Annotated[int, typer.Option("--attempts", min=1, max=100, help="Retries per batch.")] = 5,
        json_out: JsonOpt = False,
    ) -> None:
        """Seal pending rows and upload everything the hub acknowledges (exit 1 if anything is left)."""
        from sre_agent.telemetry import Store
        from sre_agent.uplink import Uplink, receipt_root
        from sre_core.clock import SystemClock
        from sre_core.identity import load_identity
        from sre_core.paths import StatePaths

        settings = settings_for(state, config)
        hubs = [hub] if hub else [u for u in settings.hub.hubs() if u.startswith(("http://", "https://"))]
        if not hubs or not hubs[0].startswith(("http://", "https://")):
            raise InputError("uplink flush", f"no hub URL ({hub!r})", "pass --hub URL or set [hub] url")
        paths = StatePaths(settings.state_dir)
        ident = load_identity(paths)
        clock = SystemClock()
        store = Store(paths.telemetry_db, _policy(paths.root), clock, ident.device_id)
        bw = settings.uplink.bandwidth_kbps
        try:
            uplink = Uplink(store, ident, hubs, clock, bandwidth_bps=bw * 1000 / 8 if bw else None,
                            receipt_root=receipt_root(paths))  # fmt: skip
            try:
                report = uplink.flush(max_attempts=attempts)
            finally:
                uplink.close()
        finally:
            store.close()
        info = report.to_dict()
        if json_out:
            emit_json(info)
        else:
            out_console().print(
                f"uploaded {info['uploaded']} batches ({info['rows']} rows, {_mib(report.bytes)}), "
                f"{info['duplicates']} already at the hub, {info['pending_after']} pending"
            )
        if report.refused:
            raise SreError(
                "uplink flush", f"the hub refused this device ({report.refused})", "enroll the device"
            )
        if report.pending_after:
            raise SreError(
                "uplink flush",
                f"{report.pending_after} batches are still pending (link down: {report.link_down})",
                "they are kept; try again when the hub is reachable",
            )
