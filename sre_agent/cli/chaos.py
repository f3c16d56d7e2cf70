"""`sre-agent chaos list|validate|preflight|run`: experiments, their pre-flight verdicts, guarded runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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

__all__ = ["register"]

PolicyOpt = Annotated[
    Path | None,
    typer.Option("--policy", help="Chaos policy YAML (default: <state>/policies/chaos.yaml, else shipped)."),
]
ApproveOpt = Annotated[
    Path | None,
    typer.Option(
        "--approve",
        help="A signed operator approval file (`sre-agent chaos approve`), verified against "
        "<state>/policies/operators.yaml. Sanctions the static escalations of this exact content until "
        "it expires, except the never-approvable rules; device state still decides.",
    ),
]
FileArg = Annotated[Path, typer.Argument(help="Experiment file (.json, .yaml, .yml).", show_default=False)]
_SUFFIXES = (".json", ".yaml", ".yml")
_STYLE = {"run": "green", "escalate": "yellow", "reject": "red"}


def _policy(policy: Path | None, state_root: Path | None) -> Any:
    from policies.base import load_document
    from policies.chaos import ChaosPolicy, default_chaos_policy

    if policy is not None:
        return load_document(ChaosPolicy, policy)
    if state_root is not None and (state_root / "policies" / "chaos.yaml").exists():
        return load_document(ChaosPolicy, state_root / "policies" / "chaos.yaml")
    return default_chaos_policy()


def _experiments_dir(directory: Path | None, state: Path | None, config: Path | None) -> Path:
    if directory is not None:
        return directory
    configured = settings_for(state, config).chaos.experiments_dir
    return configured if configured is not None else Path("experiments")


def _audit(state_root: Path, event: str, **data: Any) -> None:
    if not state_root.is_dir():
        return
    from sre_core.audit import AuditLog

    AuditLog(state_root / "audit.jsonl").append(event, actor="cli", **data)


def _read_approval(path: Path) -> Any:
    from chaos.approval import read_approval

    return read_approval(path)


def _print_result(res: Any, json_out: bool) -> None:
    if json_out:
        emit_json(res.to_dict())
        return
    con = out_console()
    style = _STYLE[res.verdict]
    h = f" {res.experiment_hash[:19]}" if res.experiment_hash else ""
    con.print(f"[bold {style}]{res.verdict}[/bold {style}] {res.source}{h}", highlight=False)
    for r in res.reasons:
        con.print(f"  - {r}", highlight=False, markup=False)


def _print_plan(packet: Any) -> None:
    """The plan table of an escalation, for the operator reading the terminal."""
    from rich.table import Table

    table = Table(title="plan (what would run)", show_lines=False)
    for col in ("step", "path", "provider", "breaks", "restored by", "fault s"):
        table.add_column(col)
    for row in packet.plan:
        fault = "unbounded" if row.fault_s is None else f"{row.fault_s:g}"
        table.add_row(str(row.step), row.path, row.provider, row.breaks, row.restored_by, fault)
    con = out_console()
    con.print(table)
    est = packet.estimated_duration_s
    con.print(
        f"estimated duration: {'unbounded' if est is None else f'{est:g}s'} (budget {packet.budget_s:g}s)"
    )


def _write_packet(packet: Any, path: Path) -> None:
    from sre_core.atomic import atomic_write_json

    atomic_write_json(path, packet.to_dict())


def _run_via_daemon(client: Any, file: Path, approval: Any, budget_s: float | None) -> dict[str, Any]:
    """POST the experiment's bytes (what this command read is what the daemon judges) to the daemon."""
    import base64

    from chaos.loader import MAX_BYTES

    try:
        with file.open("rb") as fh:
            content = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise InputError(f"read experiment {file}", exc.strerror or str(exc), "check the path") from exc
    body = {
        "source": str(file),
        "content_b64": base64.b64encode(content).decode(),
        "approval": approval.model_dump(mode="json") if approval is not None else None,
        "budget_s": budget_s,
    }
    resp = client.post("/chaos/run", json=body)
    doc: dict[str, Any] = resp.json()
    if resp.status_code != 200:
        raise InputError("run chaos through the daemon", str(doc.get("error", resp.text))[:1000], "see above")
    return doc


def _run_locally(
    file: Path,
    paths: Any,
    settings: Any,
    pol: Any,
    approval: Any,
    budget_s: float | None,
    serving_url: str | None,
    model: str | None,
) -> dict[str, Any]:
    """No daemon: act on the device's configuration (serving port, proxy, hub link); journal to DuckDB."""
    from urllib.parse import urlsplit

    from chaos.pipeline import guarded_run
    from policies.telemetry import load_telemetry_policy
    from sre_agent.telemetry.service import TelemetryService
    from sre_core.clock import SystemClock
    from sre_core.identity import load_identity

    notes: list[str] = []
    if serving_url is None and settings.serving.enabled:
        configured = f"http://{settings.serving.host}:{settings.serving.port}"
        if _answers(configured):
            serving_url = configured  # the device's own server, on its configured port
        else:
            notes.append(f"no inference server answers at {configured}: the guardrail watches no serving")
    device: dict[str, Any] = {}
    hub = urlsplit(str(settings.hub.url or ""))
    if hub.scheme in ("http", "https") and hub.hostname:
        device["uplink_upstream"] = f"{hub.hostname}:{hub.port or (443 if hub.scheme == 'https' else 80)}"
    clock = SystemClock()
    tel_file = paths.policies / "telemetry.yaml"
    try:
        device_id = load_identity(paths).device_id
    except SreError:
        device_id = "unprovisioned"
    tel_policy = load_telemetry_policy(tel_file if tel_file.exists() else None)
    tel = TelemetryService(paths, tel_policy, clock, device_id)
    tel.start()
    try:
        # this process now holds telemetry.duckdb: publish the backlog the probes and guardrail read
        from sre_core.atomic import atomic_write_json

        store = tel.store
        backlog = sum(b.rows for b in store.pending()) if store is not None else 0
        atomic_write_json(
            paths.run / "uplink_status.json", {"backlog_rows": backlog, "ts": clock.now().isoformat()}
        )
        outcome = guarded_run(
            file,
            paths,
            policy=pol,
            clock=clock,
            approval=approval,
            budget_s=budget_s,
            toxiproxy_url=settings.chaos.toxiproxy_url,
            serving_url=serving_url,
            model=model,
            telemetry=tel.sink,
            actor="cli",
            device_settings=device,
        )
    finally:
        tel.stop()
    doc = {**outcome.to_dict(), "via": "device configuration", "notes": notes}
    if outcome.packet is not None:
        doc["plan"] = [r.model_dump(mode="json") for r in outcome.packet.plan]
    return doc


def _answers(url: str) -> bool:
    """Whether an inference server answers its liveness endpoint at ``url`` (one bounded request)."""
    import httpx

    try:
        return httpx.get(url + "/v2/health/live", timeout=1.0).status_code < 500
    except httpx.HTTPError:
        return False


def _print_outcome(doc: dict[str, Any]) -> None:
    con = out_console()
    style = _STYLE[str(doc["verdict"])]
    h = f" {str(doc.get('experiment_hash') or '')[:19]}"
    con.print(f"[bold {style}]{doc['verdict']}[/bold {style}] {doc.get('source', '')}{h}", highlight=False)
    for r in [*(doc.get("reasons") or []), *(doc.get("notes") or [])]:
        con.print(f"  - {r}", highlight=False, markup=False)
    if not doc.get("ran"):
        con.print(f"not run; escalation packet: {doc.get('packet')}", highlight=False)
        return
    ran = doc["result"]
    style = "green" if ran["verdict"] == "passed" else "red"
    con.print(
        f"[{style}]{ran['verdict']}[/{style}] in {ran['duration_s']:.1f}s (budget {doc['budget_s']:.0f}s, "
        f"via {doc.get('via')}); cleanup ok: {ran['cleanup']['ok']}",
        highlight=False,
    )
    for r in ran["reasons"]:
        con.print(f"  - {r}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    chaos_app = typer.Typer(
        help=(
            "Chaos experiments (Chaos Toolkit format): list, validate, pre-flight and run them.\n\n"
            "Every experiment passes a pre-flight safety check first. [bold]preflight[/bold] exits "
            "0 (run), 10 (escalate to a human) or 2 (reject: invalid)."
        ),
        no_args_is_help=True,
    )
    app.add_typer(chaos_app, name="chaos")

    @chaos_app.command("list")
    def list_(
        directory: Annotated[
            Path | None,
            typer.Option("--dir", help="Experiments directory (default: config, else ./experiments)."),
        ] = None,
        state: StateOpt = None,
        config: ConfigOpt = None,
        policy: PolicyOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """List experiments with their title, content hash and static pre-flight verdict."""
        from chaos.preflight import preflight_file

        root = _experiments_dir(directory, state, config)
        if not root.is_dir():
            raise InputError(f"list experiments in {root}", "not a directory", "pass --dir DIR")
        pol = _policy(policy, state)
        rows = []
        for p in sorted(x for x in root.iterdir() if x.suffix in _SUFFIXES and x.is_file()):
            exp, res = preflight_file(p, pol)
            rows.append(
                {
                    "file": p.name,
                    "title": exp.title if exp else "",
                    "hash": res.experiment_hash,
                    "verdict": res.verdict,
                    "rules": sorted({f.rule for f in res.findings}),
                }
            )
        if json_out:
            emit_json({"directory": str(root), "experiments": rows})
            return
        from rich.table import Table

        table = Table(title=f"experiments in {root} (static pre-flight)")
        for col in ("file", "title", "hash", "verdict", "rules"):
            table.add_column(col)
        for r in rows:
            style = _STYLE[str(r["verdict"])]
            table.add_row(
                str(r["file"]),
                str(r["title"]),
                str(r["hash"] or "")[:19],
                f"[{style}]{r['verdict']}[/{style}]",
                ", ".join(r["rules"]),  # type: ignore[arg-type]
            )
        out_console().print(table)

    @chaos_app.command("validate")
    def validate(
        files: Annotated[list[Path], typer.Argument(help="Experiment files.", show_default=False)],
        policy: PolicyOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Check experiment files the way `chaos run` will: structure, then the static pre-flight.

        Prints each content hash. Exit 2 if any is invalid (reject), else 10 if any would escalate, else 0.
        """
        from chaos.preflight import EXIT_CODES, preflight_file

        pol = _policy(policy, None)
        results: list[dict[str, Any]] = []
        worst = 0
        for f in files:
            exp, res = preflight_file(f, pol)
            code = EXIT_CODES[res.verdict]
            worst = 2 if 2 in (worst, code) else max(worst, code)
            results.append(
                {
                    "file": str(f),
                    "valid": res.verdict != "reject",
                    "verdict": res.verdict,
                    "hash": res.experiment_hash,
                    "title": exp.title if exp else "",
                    "problems": [str(x) for x in res.findings],
                }
            )
        if json_out:
            emit_json({"valid": worst != 2, "files": results})
        else:
            con = out_console()
            for r in results:
                style = _STYLE[str(r["verdict"])]
                if r["valid"]:
                    con.print(f"[{style}]{r['verdict']}[/{style}] {r['file']} {r['hash']}", highlight=False)
                else:
                    err_console().print(f"[red]invalid[/red] {r['file']}", highlight=False)
                for line in r["problems"]:
                    (con if r["valid"] else err_console()).print(f"  - {line}", highlight=False, markup=False)
        if worst:
            raise typer.Exit(worst)

    @chaos_app.command("preflight")
    def preflight(
        file: FileArg,
        state: StateOpt = None,
        config: ConfigOpt = None,
        policy: PolicyOpt = None,
        static_only: Annotated[
            bool, typer.Option("--static", help="Judge the document only (no device state).")
        ] = False,
        packet: Annotated[
            Path | None, typer.Option("--packet", help="Write the escalation packet here when not 'run'.")
        ] = None,
        approve: ApproveOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Pre-flight an experiment against policy and device state. Nothing in it is imported or run.

        Exit codes: 0 run, 10 escalate, 2 reject. --json prints {"verdict", "reasons", "findings", ...}.
        """
        from chaos.devicestate import read_device_state
        from chaos.escalation import build_escalation
        from chaos.preflight import preflight_file
        from sre_core.clock import SystemClock
        from sre_core.paths import StatePaths

        settings = settings_for(state, config)
        paths = StatePaths(settings.state_dir)
        pol = _policy(policy, paths.root)
        clock = SystemClock()
        device = None if static_only else read_device_state(paths, clock)
        exp, res = preflight_file(file, pol, device)
        if exp is not None and approve is not None:
            from chaos.pipeline import approval_findings
            from chaos.preflight import Preflight

            approved, extra, _ = approval_findings(_read_approval(approve), exp, paths, clock)
            res = Preflight(pol).check(exp, device, approved, extra)
        _audit(
            paths.root,
            "chaos.preflight",
            file=str(file),
            experiment_hash=res.experiment_hash,
            verdict=res.verdict,
            rules=sorted({f.rule for f in res.findings}),
            sanctioned=sorted({f.rule for f in res.sanctioned}),
        )
        pkt = build_escalation(res, exp, pol, clock.now(), device) if res.verdict != "run" else None
        if packet is not None and pkt is not None:
            _write_packet(pkt, packet)
        _print_result(res, json_out)
        if pkt is not None and pkt.plan and not json_out:
            _print_plan(pkt)
        raise typer.Exit(res.exit_code)

    @chaos_app.command("approve")
    def approve_(
        file: FileArg,
        key: Annotated[Path, typer.Option("--key", help="The operator's Ed25519 private key (PEM, 0600).")],
        operator: Annotated[str, typer.Option("--operator", help="The operator id in operators.yaml.")],
        out: Annotated[Path, typer.Option("--out", help="Where to write the signed approval (JSON).")],
        ttl_s: Annotated[int, typer.Option("--ttl", min=60, help="Lifetime in seconds.")] = 3600,
        reason: Annotated[str, typer.Option("--reason", help="Why it may run.")] = "",
        json_out: JsonOpt = False,
    ) -> None:
        """Sign an approval to run exactly this experiment content (the device verifies it, and expiry)."""
        from datetime import timedelta

        from chaos.approval import sign_chaos_approval
        from chaos.loader import load_experiment
        from policies.approvals import load_operator_key
        from sre_core.atomic import atomic_write_bytes
        from sre_core.clock import SystemClock

        exp = load_experiment(file)
        approval = sign_chaos_approval(
            load_operator_key(key),
            operator=operator,
            experiment_hash=exp.hash,
            now=SystemClock().now(),
            ttl=timedelta(seconds=ttl_s),
            reason=reason,
        )
        atomic_write_bytes(out, approval.model_dump_json().encode("utf-8"))
        if json_out:
            emit_json(
                {"approval": str(out), "experiment_hash": exp.hash, "expires_at": str(approval.expires_at)}
            )
        else:
            out_console().print(
                f"approved {exp.hash} until {approval.expires_at.isoformat()}: {out}", highlight=False
            )

    @chaos_app.command("run")
    def run(
        file: FileArg,
        state: StateOpt = None,
        config: ConfigOpt = None,
        policy: PolicyOpt = None,
        budget_s: Annotated[
            float | None,
            typer.Option("--budget", min=1, help="Hard wall-clock budget in s (default: from the estimate)."),
        ] = None,
        serving_url: Annotated[
            str | None, typer.Option("--serving-url", help="Inference server the guardrail watches.")
        ] = None,
        model: Annotated[str | None, typer.Option("--model", help="Model the guardrail probes.")] = None,
        approve: ApproveOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Pre-flight, then run the experiment in a guarded child process (only on a 'run' verdict).

        An escalated or rejected experiment is not run: its escalation packet is written under
        <state>/run/chaos/escalations/ and the command exits 10 (escalate) or 2 (reject).
        A run exits 0 when it passed, 1 when it deviated, was aborted, interrupted or failed.
        """
        from chaos.preflight import EXIT_CODES
        from sre_agent.admin import admin_client
        from sre_core.paths import StatePaths

        settings = settings_for(state, config)
        paths = StatePaths(settings.state_dir)
        if not paths.root.is_dir():
            raise InputError(
                f"run chaos on {paths.root}", "the state directory does not exist", "sre-agent init"
            )
        pol = _policy(policy, paths.root)
        approval = _read_approval(approve) if approve is not None else None
        client = admin_client(paths, timeout_s=pol.max_experiment_s + 120)
        if client is not None:
            # a daemon runs: it owns the links, the serving plane and telemetry; the run happens there
            try:
                doc = _run_via_daemon(client, file, approval, budget_s)
            finally:
                client.close()
        else:
            doc = _run_locally(file, paths, settings, pol, approval, budget_s, serving_url, model)
        if json_out:
            emit_json(doc)
        else:
            _print_outcome(doc)
        if not doc.get("ran"):
            raise typer.Exit(EXIT_CODES[str(doc["verdict"])])
        raise typer.Exit(0 if doc["result"]["verdict"] == "passed" else 1)
