"""`sre-agent verify` (run the verification harness) and `sre-agent gates list|add|remove`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from sre_agent.cli._common import ConfigOpt, JsonOpt, StateOpt, emit_json, out_console, settings_for
from sre_core.errors import InputError
from sre_core.paths import StatePaths

__all__ = ["register"]

_STYLE = {
    "pass": "green",
    "warn": "yellow",
    "fail": "bold red",
    "error": "bold red",
    "timeout": "bold red",
    "inconclusive": "dim",
}

PolicyOpt = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="Verification policy file (default: <state>/policies/verification.yaml, else the shipped one).",
    ),
]


def _paths(state: Path | None, config: Path | None) -> StatePaths:
    paths = StatePaths(settings_for(state, config).state_dir)
    if not paths.root.is_dir():
        raise InputError(
            f"verify {paths.root}", "no such state directory", f"run `sre-agent init --state {paths.root}`"
        )
    return paths


def _telemetry(paths: StatePaths, clock: Any) -> tuple[Any, Any, Any]:
    """(sink, query, close) on the device's DuckDB store; a memory sink when the daemon holds the file
    (the daemon runs verification itself and records its own results)."""
    from policies.telemetry import load_telemetry_policy
    from sre_agent.telemetry import Store, TelemetryLockedError, TelemetryWriter
    from sre_core.telemetry import MemorySink

    device_id = paths.device_id_file.read_text().strip() if paths.device_id_file.is_file() else "unknown"
    try:
        store = Store(paths.telemetry_db, load_telemetry_policy(), clock, device_id)
    except TelemetryLockedError:
        from sre_core.cli import err_console

        err_console().print("[yellow]note[/yellow]: the daemon holds telemetry; results are not stored")
        return MemorySink(), None, lambda: None
    writer = TelemetryWriter(store)

    def query(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row.values()) for row in store.query(sql).to_pylist()]

    def close() -> None:
        try:
            writer.flush()
        finally:
            store.close()

    return writer, query, close


def _table(results: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title="verification", show_lines=False)
    table.add_column("check", no_wrap=True)
    for col in ("status", "severity", "took", "summary"):
        table.add_column(col, overflow="fold")
    for r in results:
        style = _STYLE.get(r.status.value, "")
        table.add_row(
            r.check,
            f"[{style}]{r.status.value}[/{style}]" if style else r.status.value,
            r.severity.value,
            f"{r.duration_s * 1000:.0f} ms",
            r.summary,
        )
    return table


def register(app: typer.Typer) -> None:
    gates_app = typer.Typer(
        help="Learned gates: conditions from chaos findings or operators, run like checks."
    )
    app.add_typer(gates_app, name="gates")

    @app.command()
    def verify(
        state: StateOpt = None,
        config: ConfigOpt = None,
        once: Annotated[bool, typer.Option("--once", help="Run every check once and exit.")] = False,
        list_only: Annotated[
            bool, typer.Option("--list", help="Show the schedule (checks, gates, sources) and exit.")
        ] = False,
        check: Annotated[
            str | None, typer.Option("--check", help="Run only this check (or gate.NAME).")
        ] = None,
        policy: PolicyOpt = None,
        duration: Annotated[
            float | None, typer.Option(help="Without --once: stop the schedule after this many seconds.")
        ] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Verify the device: golden vectors on both slots, slot digests, DuckDB and audit integrity,
        drift, rollback readiness, trust horizon, clock, resource headroom, learned gates.

        With --once: run once, print a table (or --json), exit 0 when nothing failed, 1 when a check
        failed, errored or timed out. Without --once: run the policy's schedule in the foreground.
        """
        from policies.verification import load_verification_policy
        from sre_core.clock import SystemClock
        from verification.adapters import build_context
        from verification.context import SessionCache
        from verification.harness import Harness

        paths = _paths(state, config)
        pol = load_verification_policy(policy or (paths.policies if paths.policies.is_dir() else None))
        clock = SystemClock()
        harness = Harness(pol, gates_dir=paths.root / "gates", clock=clock)
        sessions = SessionCache()
        if check is not None:
            known = set(harness.registry.names())
            if not check.startswith("gate.") and check not in known:
                raise InputError(
                    f"verify --check {check}", "no such check", f"installed: {', '.join(sorted(known))}"
                )
        if list_only:
            planned, problems = harness.plan(check)
            rows = [
                {
                    "check": p.spec.name,
                    "source": harness.registry.source(p.spec.name)
                    if not p.spec.name.startswith("gate.")
                    else "gate",
                    "interval_s": p.spec.interval_s,
                    "jitter_s": p.spec.jitter_s,
                    "timeout_s": p.spec.timeout_s,
                    "severity": p.spec.severity.value,
                    "isolation": p.spec.isolation,
                    "description": p.check.description,
                }
                for p in planned
            ]
            broken = [{"check": r.check, "error": r.summary} for r in problems]
            if json_out:
                emit_json({"checks": rows, "problems": broken})
                return
            from rich.table import Table

            table = Table(title="verification schedule")
            table.add_column("check", no_wrap=True)
            for col in ("source", "every", "timeout", "severity", "isolation"):
                table.add_column(col, overflow="fold")
            for r in rows:
                table.add_row(
                    str(r["check"]),
                    str(r["source"]),
                    f"{r['interval_s']:g} s ± {r['jitter_s']:g}",
                    f"{r['timeout_s']:g} s",
                    str(r["severity"]),
                    str(r["isolation"]),
                )
            console = out_console()
            console.print(table)
            for b in broken:
                console.print(f"[red]{b['check']}[/red]: {b['error']}")
            return
        if once:
            sink, query, close = _telemetry(paths, clock)
            harness.runner.sink = sink
            try:
                ctx = build_context(paths, pol, clock=clock, sessions=sessions, telemetry_query=query)
                results = harness.run_once(ctx, only=check)
            finally:
                close()
            failing = [r for r in results if r.status.failing]
            if json_out:
                emit_json({"ok": not failing, "results": [r.to_dict() for r in results]})
            else:
                out_console().print(_table(results))
            raise typer.Exit(1 if failing else 0)

        from verification.scheduler import VerificationScheduler

        console = out_console()

        sink, query, close = _telemetry(paths, clock)
        if hasattr(sink, "start"):
            sink.start()

        class _Echo:
            def metric(self, *args: Any, **kwargs: Any) -> None:
                sink.metric(*args, **kwargs)

            def event(self, *args: Any, **kwargs: Any) -> None:
                sink.event(*args, **kwargs)

            def record(self, table: str, row: dict[str, Any]) -> None:
                sink.record(table, row)
                style = _STYLE.get(str(row["status"]), "")
                line = f"{row['ts']:%H:%M:%S} {row['check']}: [{style}]{row['status']}[/]"
                console.print(f"{line} {row['summary']}")

        harness.runner.sink = _Echo()
        sched = VerificationScheduler(
            harness,
            lambda: build_context(paths, pol, clock=clock, sessions=sessions, telemetry_query=query),
            clock=clock,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        sched.start()
        try:
            stop.wait(duration)
        except KeyboardInterrupt:
            pass
        finally:
            sched.stop(wait=True)
            if hasattr(sink, "stop"):
                sink.stop()
            close()

    @gates_app.command("list")
    def gates_list(state: StateOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
        """List learned gates (and gate files that do not parse)."""
        from verification.gates import GateStore

        gates, bad = GateStore(_paths(state, config).root / "gates").list()
        if json_out:
            emit_json(
                {
                    "gates": [g.model_dump(mode="json") for g in gates],
                    "invalid": [{"file": f"{stem}.json", "error": msg} for stem, msg in bad],
                }
            )
            return
        from rich.table import Table

        table = Table(title="learned gates")
        for col in ("name", "condition", "severity", "source", "created", "reason"):
            table.add_column(col, overflow="fold")
        for g in gates:
            created = g.created.isoformat(timespec="seconds") if g.created else ""
            table.add_row(g.name, g.describe(), g.severity, g.source, created, g.reason)
        console = out_console()
        console.print(table)
        for stem, msg in bad:
            console.print(f"[red]invalid gate file {stem}.json[/red]: {msg}")

    @gates_app.command("add")
    def gates_add(
        name: Annotated[str, typer.Argument(help="Gate name (a-z, 0-9, . _ -).")],
        check: Annotated[str, typer.Option("--check", help="The check whose result the gate judges.")],
        measurement: Annotated[str | None, typer.Option(help="A measurement of that check.")] = None,
        op: Annotated[str | None, typer.Option(help="One of < <= > >= ==.")] = None,
        threshold: Annotated[
            float | None, typer.Option(help="Value the measurement is compared with.")
        ] = None,
        severity: Annotated[str, typer.Option(help="info, warning or critical.")] = "warning",
        reason: Annotated[str, typer.Option(help="Why the gate exists.")] = "",
        state: StateOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Add an operator gate: `--check C` must pass, or `--measurement M --op OP --threshold T` holds."""
        from pydantic import ValidationError

        from sre_core.audit import AuditLog
        from sre_core.clock import SystemClock
        from verification.gates import GateDefinition, GateStore

        paths = _paths(state, config)
        clock = SystemClock()
        try:
            gate = GateDefinition.model_validate(
                {
                    "name": name,
                    "check": check,
                    "measurement": measurement,
                    "op": op,
                    "threshold": threshold,
                    "severity": severity,
                    "reason": reason,
                    "source": "operator",
                }
            )
        except ValidationError as exc:
            raise InputError(f"add gate {name}", str(exc), "see `sre-agent gates add --help`") from exc
        store = GateStore(
            paths.root / "gates", audit=AuditLog(paths.audit_log, clock=clock), clock_now=clock.now
        )
        gate = store.add(gate)
        if json_out:
            emit_json(gate.model_dump(mode="json"))
        else:
            out_console().print(f"gate {gate.name} added: {gate.describe()}")

    @gates_app.command("remove")
    def gates_remove(
        name: Annotated[str, typer.Argument(help="Gate name.")],
        state: StateOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Remove a learned gate (audited). Exit 2 if there is no such gate."""
        from sre_core.audit import AuditLog
        from sre_core.clock import SystemClock
        from verification.gates import GateStore

        paths = _paths(state, config)
        store = GateStore(paths.root / "gates", audit=AuditLog(paths.audit_log, clock=SystemClock()))
        gate = store.remove(name)
        if json_out:
            emit_json({"removed": gate.name})
        else:
            out_console().print(f"gate {gate.name} removed ({gate.describe()})")
