"""`sre-hub escalations list | show | approve | reject` and `sre-hub operators keygen`.

Escalations reach the hub with device telemetry (the ``escalations`` lake table) or as files (``--from``
a copied ``<state>/escalations`` directory). Approvals are signed here with an operator key listed in the
operator policy (``<repo>/policies/operators.yaml`` by default, the document published to devices), written
to ``<repo>/escalations/approvals/`` and applied on the device with ``sre-agent escalations apply FILE``.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from sre_core.cli import JsonOpt, emit_json, out_console

__all__ = ["register"]

RepoOpt = Annotated[Path, typer.Option("--repo", help="Hub repository directory.")]
FromOpt = Annotated[
    list[Path] | None,
    typer.Option("--from", help="Also read escalation files from this directory (repeatable)."),
]
KeyOpt = Annotated[Path, typer.Option("--key", help="Operator private key (PEM, 0600).")]
OperatorOpt = Annotated[str, typer.Option("--operator", help="Operator id as listed in operators.yaml.")]
RosterOpt = Annotated[
    Path | None,
    typer.Option("--roster", help="Operator policy (default: <repo>/policies/operators.yaml)."),
]
TtlOpt = Annotated[int, typer.Option("--ttl", help="Seconds the approval stays valid.", min=60)]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the hub audit trail).")]


def _hub(repo: Path) -> Any:
    from hub.operators import HubEscalations
    from sre_core.errors import InputError

    if not repo.is_dir():
        raise InputError(f"open hub repository {repo}", "it does not exist", "pass --repo DIR")
    return HubEscalations(repo)


def _row(doc: dict[str, Any]) -> dict[str, str]:
    from sre_core.textsafe import neutralise_tree

    return dict(neutralise_tree(_raw_row(doc)))


def _raw_row(doc: dict[str, Any]) -> dict[str, str]:
    c = doc["content"]
    inc = c["incident"]
    return {
        "id": doc["id"],
        "device": str(doc.get("device_id", "")),
        "status": str(doc.get("status", "")),
        "created": str(c["created_at"])[:19],
        "kind": inc["kind"],
        "module": f"{inc['module']} {inc.get('version') or ''}".strip(),
        "proposed": str(c["proposed_action"]),
        "signed": ", ".join(doc.get("hub_decisions", [])) or "-",
    }


def register(app: typer.Typer) -> None:
    esc = typer.Typer(help="Review device escalations and sign decisions.", no_args_is_help=True)
    ops = typer.Typer(help="Operator keys for signing approvals.", no_args_is_help=True)
    app.add_typer(esc, name="escalations")
    app.add_typer(ops, name="operators")

    @esc.command("list")
    def list_(
        repo: RepoOpt,
        from_: FromOpt = None,
        status: Annotated[str | None, typer.Option("--status", help="Only this status.")] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Escalations from every device, newest first (content hashes checked)."""
        docs = _hub(repo).load(from_)
        rows = sorted((_row(d) for d in docs.values()), key=lambda r: r["created"], reverse=True)
        if status:
            rows = [r for r in rows if r["status"] == status]
        if json_out:
            emit_json({"escalations": rows})
            return
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"fleet escalations ({len(rows)})")
        cols = ["id", "device", "status", "created", "kind", "module", "proposed", "signed"]
        for c in cols:
            table.add_column(c)
        for r in rows:
            table.add_row(*[escape(r[c]) for c in cols])
        out_console().print(table)

    @esc.command("show")
    def show(
        esc_id: Annotated[str, typer.Argument(help="Escalation id (esc-...).")],
        repo: RepoOpt,
        from_: FromOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """The full escalation: what, why, device state, evidence, model summary, history."""
        doc = _hub(repo).get(esc_id, from_)
        if json_out:
            emit_json(doc)
            return
        from sre_core.textsafe import neutralise_tree

        # device-supplied text (titles, logs, summaries) is shown with controls and bidi neutralised
        doc = neutralise_tree(doc)
        c = doc["content"]
        con = out_console()
        con.print(f"{doc['id']} on {doc.get('device_id')}  status {doc.get('status')}", markup=False)
        con.print(f"what: {c['what']}", markup=False)
        con.print(f"proposed: {c['proposed_action']}  allowed: {', '.join(c['allowed'])}", markup=False)
        con.print(f"expires {c['expires_at']}  content hash {doc['content_hash']}", markup=False)
        for reason in c["why"]:
            con.print(f"  - {reason}", markup=False)
        con.print(f"summary: {c['llm_summary']}", markup=False)
        con.print(f"device state: {json.dumps(c['device_state'])}", markup=False)
        con.print(f"incident: {json.dumps(c['incident'], indent=1)}", markup=False)
        for name in doc.get("hub_decisions", []):
            con.print(f"signed here: {name}", markup=False)

    def _decide(
        decision: Literal["approve", "reject"],
        esc_id: str,
        repo: Path,
        key: Path,
        operator: str,
        roster: Path | None,
        action: str | None,
        ttl: int,
        reason: str,
        from_: list[Path] | None,
        json_out: bool,
    ) -> None:
        approval, path = _hub(repo).decide(
            esc_id,
            key_path=key,
            operator=operator,
            decision=decision,
            roster_path=roster or repo / "policies" / "operators.yaml",
            action=action,
            ttl=timedelta(seconds=ttl),
            reason=reason,
            sources=from_,
        )
        if json_out:
            emit_json({"approval": json.loads(approval.model_dump_json()), "path": str(path)})
            return
        con = out_console()
        con.print(
            f"{decision} of {esc_id} signed by {operator}, valid until {approval.expires_at.isoformat()}"
        )
        con.print(f"deliver {path} to the device: sre-agent escalations apply {path.name}")

    @esc.command("approve")
    def approve(
        esc_id: Annotated[str, typer.Argument(help="Escalation id (esc-...).")],
        repo: RepoOpt,
        key: KeyOpt,
        operator: OperatorOpt,
        action: Annotated[
            str | None, typer.Option("--action", help="Action to approve (default: the proposed one).")
        ] = None,
        roster: RosterOpt = None,
        ttl: TtlOpt = 3600,
        reason: ReasonOpt = "",
        from_: FromOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Sign an approval bound to the escalation's content hash (exit 2 when refused)."""
        _decide("approve", esc_id, repo, key, operator, roster, action, ttl, reason, from_, json_out)

    @esc.command("reject")
    def reject(
        esc_id: Annotated[str, typer.Argument(help="Escalation id (esc-...).")],
        repo: RepoOpt,
        key: KeyOpt,
        operator: OperatorOpt,
        roster: RosterOpt = None,
        ttl: TtlOpt = 3600,
        reason: ReasonOpt = "",
        from_: FromOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Sign a rejection: the device will never run the proposed action."""
        _decide("reject", esc_id, repo, key, operator, roster, None, ttl, reason, from_, json_out)

    @ops.command("keygen")
    def keygen_cmd(
        operator: OperatorOpt,
        out: Annotated[Path, typer.Option("--out", help="Directory for the key files.")],
        force: Annotated[bool, typer.Option("--force", help="Replace an existing key.")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Make an operator key pair; add the printed entry to operators.yaml and publish the policy."""
        from hub.operators import keygen

        files = keygen(out, operator, force)
        if json_out:
            emit_json({"key": str(files.key_path), "public_key": files.public_b64, "entry": files.entry})
            return
        import yaml

        con = out_console()
        con.print(f"private key {files.key_path} (0600): keep it secret")
        con.print("add to operators.yaml under `operators:` and publish the policy module:")
        con.print(yaml.safe_dump([files.entry], sort_keys=False).rstrip(), markup=False)
