"""`sre-agent policy check FILE` and `sre-agent policy show KIND`: author the seven policy documents.

A policy file overlays the shipped default of its kind, so it holds only what changes; ``check`` prints
each problem with its path, the value found and the form expected, and ``show`` prints the effective
document a device would use (its installed file over the default, or the default alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sre_agent.cli._common import ConfigOpt, JsonOpt, StateOpt, emit_json, out_console, settings_for
from sre_core.errors import InputError

__all__ = ["register"]


def _kind_or_fail(name: str | None, file: Path | None = None) -> Any:
    from policies.kinds import KINDS, kind_for_file, kind_named

    kind = kind_named(name) if name else (kind_for_file(file) if file is not None else None)
    if kind is None:
        names = ", ".join(k.name for k in KINDS)
        given = f"kind {name!r}" if name else f"file name {file.name if file else ''!r}"
        raise InputError(
            "policy", f"unknown {given}", f"name one of: {names} (with --kind, or as the file's name)"
        )
    return kind


def _effective_dict(doc: Any) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads(doc.model_dump_json())
    return data


def register(app: typer.Typer) -> None:
    pol = typer.Typer(help="Check and show the policy documents (chaos, deployment, operators, ...).")
    app.add_typer(pol, name="policy", no_args_is_help=True)

    @pol.command("check")
    def check(
        file: Annotated[Path, typer.Argument(help="The policy file (YAML or JSON) to check.")],
        kind: Annotated[
            str | None,
            typer.Option(
                "--kind", help="Document kind (default: the file's name, e.g. chaos.yaml -> chaos)."
            ),
        ] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Validate a policy file as the device would load it (overlaid on the shipped default).

        Exit 0 when valid; 2 with one line per problem (path, value, expected form) when not.
        """
        import yaml

        from policies.base import load_document

        k = _kind_or_fail(kind, file)
        doc = load_document(k.model, file)
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        info = {"file": str(file), "kind": k.name, "valid": True, "keys_set": sorted(raw)}
        if json_out:
            emit_json(info)
            return
        out_console().print(
            f"{file}: valid {k.name} policy ({len(raw)} top-level keys set, the rest from the defaults)"
        )
        del doc

    @pol.command("show")
    def show(
        kind: Annotated[
            str, typer.Argument(help="chaos, deployment, operators, telemetry, triage, trust, verification.")
        ],
        state: StateOpt = None,
        config: ConfigOpt = None,
        default: Annotated[
            bool, typer.Option("--default", help="Show the shipped default, not this device's effective one.")
        ] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Print the effective policy document: <state>/policies/KIND.yaml over the default (as YAML)."""
        import yaml

        from policies.base import load_default, load_document

        k = _kind_or_fail(kind)
        source = "default"
        installed: Path | None = None
        if not default:
            installed = k.installed(settings_for(state, config).state_dir)
            if installed.is_file():
                source = f"{installed} over the default"
        doc = (
            load_document(k.model, installed)
            if installed is not None and installed.is_file()
            else load_default(k.model, k.name)
        )
        data = _effective_dict(doc)
        if json_out:
            emit_json({"kind": k.name, "source": source, "policy": data})
            return
        con = out_console()
        con.print(f"# {k.name} policy ({k.summary}); source: {source}", markup=False, highlight=False)
        con.print(yaml.safe_dump(data, sort_keys=False).rstrip(), markup=False, highlight=False)

    @pol.command("kinds")
    def kinds(json_out: JsonOpt = False) -> None:
        """List the policy documents a device reads, and where it installs each."""
        from policies.kinds import KINDS

        rows = [
            {"kind": k.name, "file": f"<state>/policies/{k.name}.yaml", "summary": k.summary} for k in KINDS
        ]
        if json_out:
            emit_json({"kinds": rows})
            return
        from sre_core.cli import table

        t = table("policy documents", ["kind", "file", "what it bounds"])
        for r in rows:
            t.add_row(r["kind"], r["file"], r["summary"])
        out_console().print(t)
