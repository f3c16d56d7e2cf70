"""`sre-hub devices enroll | revoke | list` and `sre-hub query "SQL"` (fleet data under <repo>/fleet)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sre_core.cli import JsonOpt, emit_json, out_console
from sre_core.errors import InputError

__all__ = ["register"]

RepoOpt = Annotated[
    Path, typer.Option("--repo", help="Hub repository directory (fleet data in <repo>/fleet).")
]


def _fleet(repo: Path) -> Any:
    from hub.fleetdb import FleetDB, require_fleet_dir

    return FleetDB(require_fleet_dir(repo / "fleet"))


def _table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    cols = list(rows[0]) if rows else []
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if r[c] is None else str(r[c]) for c in cols])
    out_console().print(t)


def register(app: typer.Typer) -> None:
    register_lake(app)
    devices = typer.Typer(help="Devices allowed to upload telemetry and attestations.", no_args_is_help=True)
    app.add_typer(devices, name="devices")

    @devices.command("enroll")
    def enroll(
        repo: RepoOpt,
        device_id: Annotated[str, typer.Option("--id", help="The device id (`sre-agent status` shows it).")],
        key: Annotated[
            str,
            typer.Option("--key", help="The device's Ed25519 public key: a PEM file path or the PEM text."),
        ],
        json_out: JsonOpt = False,
    ) -> None:
        """Enroll a device key: from now on its signed uploads are accepted."""
        p = Path(key)
        if "BEGIN PUBLIC KEY" in key:
            pem = key
        elif p.is_file():
            pem = p.read_text()
        else:
            raise InputError(
                f"enroll {device_id}", f"{key} is neither a file nor a PEM key", "pass the *.pub.pem"
            )
        rec = _fleet(repo).enroll(device_id, pem)
        info = {"device_id": rec.device_id, "enrolled_at": rec.enrolled_at}
        if json_out:
            emit_json(info)
        else:
            out_console().print(f"enrolled {rec.device_id} ({rec.enrolled_at})")

    @devices.command("revoke")
    def revoke(
        repo: RepoOpt,
        device_id: Annotated[str, typer.Argument(help="The device to refuse from now on.")],
        json_out: JsonOpt = False,
    ) -> None:
        """Revoke a device: the hub refuses its uploads and attestations from now on."""
        rec = _fleet(repo).revoke(device_id)
        if json_out:
            emit_json({"device_id": rec.device_id, "revoked_at": rec.revoked_at})
        else:
            out_console().print(f"revoked {rec.device_id} ({rec.revoked_at})")

    @devices.command("list")
    def list_devices(repo: RepoOpt, json_out: JsonOpt = False) -> None:
        """Enrolled devices with their reported and attested state."""
        fleet = _fleet(repo)
        rows = []
        for r in fleet.devices():
            st = fleet.state(r.device_id)
            att = st.get("attested") or {}
            rows.append(
                {
                    "device_id": r.device_id,
                    "status": "revoked" if r.revoked else "enrolled",
                    "last_seen": st.get("last_seen"),
                    "batches": st.get("batches", 0),
                    "attested": att.get("time"),
                    "safe_mode": att.get("safe_mode"),
                    "policy": att.get("policy_version"),
                }
            )
        if json_out:
            emit_json({"devices": rows})
        elif rows:
            _table(rows, "devices")
        else:
            out_console().print("no devices enrolled (sre-hub devices enroll --id D --key PUB)")

    @devices.command("feedback")
    def feedback(repo: RepoOpt, json_out: JsonOpt = False) -> None:
        """Device feedback (suggested gates, findings) waiting for an operator; never applied by itself."""
        queue = _fleet(repo).review_queue()
        if json_out:
            emit_json({"feedback": queue})
            return
        rows = [
            {
                "batch": q["batch_id"][:12],
                "device_id": q["device_id"],
                "status": q["status"],
                "items": len(q["items"]),
            }
            for q in queue
        ]
        if rows:
            _table(rows, "device feedback (review queue)")
        else:
            out_console().print("no device feedback waiting for review")

    @app.command("query")
    def query(
        repo: RepoOpt,
        sql: Annotated[
            str, typer.Argument(help='SQL over the fleet lake, e.g. "SELECT count(*) FROM metrics".')
        ],
        json_out: JsonOpt = False,
    ) -> None:
        """Query uploaded fleet telemetry with DuckDB (one view per table; columns date, device_id)."""
        tbl = _fleet(repo).query(sql)
        rows = _plain_rows(tbl)
        if json_out:
            emit_json({"columns": tbl.column_names, "rows": rows})
        else:
            _table(rows, f"{len(rows)} rows")


def _plain_rows(tbl: Any) -> list[dict[str, Any]]:
    """Arrow rows as JSON-friendly dicts (timestamps as ISO strings, without needing pytz)."""
    import pyarrow as pa

    cols = []
    for f, col in zip(tbl.schema, tbl.columns, strict=True):
        cols.append(
            col.cast(pa.string()) if pa.types.is_timestamp(f.type) or pa.types.is_date(f.type) else col
        )
    return list(pa.Table.from_arrays(cols, names=tbl.column_names).to_pylist())


def register_lake(app: typer.Typer) -> None:
    """``sre-hub lake compact``: bound the files per lake partition."""
    lake = typer.Typer(help="The fleet telemetry lake (Hive Parquet).", no_args_is_help=True)
    app.add_typer(lake, name="lake")

    @lake.command("compact")
    def compact(
        repo: RepoOpt,
        max_files: Annotated[
            int, typer.Option("--max-files", min=1, help="Merge partitions holding more files than this.")
        ] = 1,
        json_out: JsonOpt = False,
    ) -> None:
        """Merge each partition's small files into one (queries then open one file per day and table)."""
        info = _fleet(repo).compact(max_files)
        if json_out:
            emit_json(info)
        else:
            out_console().print(
                f"merged {info['partitions_merged']} partitions ({info['files_removed']} files) "
                f"in {info['seconds']} s"
            )
