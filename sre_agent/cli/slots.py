"""`sre-agent reconcile`, `status`, `rollback`, `safe-mode enter|exit`, `slots verify|clear-bad`, `audit`.

Exit codes: 0 ok; 1 a reconcile pass rolled back, refused or failed something, or the audit chain is
broken; 2 bad usage or a refused request (unknown module, nothing to roll back to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sre_agent.cli._common import ConfigOpt, JsonOpt, StateOpt, emit_json, out_console, settings_for
from sre_core.errors import InputError, SreError
from sre_core.paths import StatePaths

__all__ = ["device_status", "register"]

ModuleArg = Annotated[str, typer.Argument(help="Module name, as in the desired state.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit trail).")]


def _paths(state: Path | None, config: Path | None) -> StatePaths:
    paths = StatePaths(settings_for(state, config).state_dir)
    if not paths.root.is_dir():
        raise InputError(
            f"open state directory {paths.root}", "it does not exist", "run sre-agent init first"
        )
    return paths


def _trust(paths: StatePaths) -> dict[str, Any]:
    """Trust freshness from what the puller holds, else from the last reconcile record."""
    from deployment.reconcile import read_last_reconcile

    last = read_last_reconcile(paths)
    info: dict[str, Any] = {
        "trust": last.get("trust", "none"),
        "trusted_now": last.get("trusted_now"),
        "serial": (last.get("desired") or {}).get("serial"),
        "expires": (last.get("desired") or {}).get("expires"),
    }
    try:
        from deployment.pull import load_held

        held = load_held(paths)
    except (ImportError, SreError, OSError, ValueError):
        return info
    if held.desired is not None:
        info |= {
            "trust": held.trust.value,
            "trusted_now": held.trusted_now.isoformat(),
            "serial": held.desired.serial,
            "expires": held.desired.expires.isoformat(),
        }
    return info


def device_status(paths: StatePaths) -> dict[str, Any]:
    """Everything `sre-agent status` shows, as one JSON-ready dict."""
    from deployment.reconcile import read_last_reconcile
    from deployment.safemode import read_safe_mode
    from deployment.serving import canary_progress, loading_models
    from deployment.slots import SlotManager
    from sre_agent.respond import operator_view
    from sre_core.audit import AuditLog

    slots = SlotManager(paths, AuditLog(paths.audit_log))
    last = read_last_reconcile(paths)
    return {
        "state": str(paths.root),
        "modules": [slots.status(m).to_dict() for m in slots.modules()],
        "trust": _trust(paths),
        "safe_mode": read_safe_mode(paths).to_dict(),
        "last_sync": last.get("last_sync"),
        "last_reconcile": last.get("last_run"),
        "last_outcomes": {o["module"]: o["result"] for o in (last.get("report") or {}).get("outcomes", [])},
        "last_pull_refused": (last.get("report") or {}).get("pull_refused"),
        "canaries": canary_progress(paths),
        "loading": loading_models(paths),
        "daemon": _daemon_status(paths),
        **operator_view(paths),
    }


def _daemon_status(paths: StatePaths) -> dict[str, Any] | None:
    """The running daemon's own status over its admin API (None when no daemon runs)."""
    from sre_agent.admin import admin_client

    client = admin_client(paths)
    if client is None:
        return None
    try:
        resp = client.get("/status")
    finally:
        client.close()
    if resp.status_code != 200:
        return None
    doc: dict[str, Any] = resp.json()
    return doc


def _short(d: str | None) -> str:
    return d[:12] if d else "-"


def _print_status(data: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = out_console()
    trust = data["trust"]
    color = {"fresh": "green", "stale": "yellow"}.get(str(trust["trust"]), "red")
    con.print(
        f"trust [{color}]{trust['trust']}[/{color}]  serial {trust['serial'] or '-'}  "
        f"expires {trust['expires'] or '-'}  trusted time {trust['trusted_now'] or '-'}"
    )
    sm = data["safe_mode"]
    if sm["active"]:
        con.print(f"[bold red]SAFE MODE[/bold red] since {sm['since']}: {sm['reason']} ({sm['detail']})")
    else:
        con.print("safe mode: [green]off[/green]")
    con.print(f"last sync {data['last_sync'] or 'never'}, last reconcile {data['last_reconcile'] or 'never'}")
    if data.get("last_pull_refused"):
        con.print(f"[bold red]last pull refused[/bold red]: {escape(str(data['last_pull_refused']))}")
    d = data.get("daemon")
    if d:
        failing = sorted(k for k, j in d["jobs"].items() if j.get("consecutive_failures"))
        con.print(
            f"daemon: [green]running[/green] (pid {d['pid']}, since {d['started']}); "
            f"serving {(d.get('serving') or {}).get('url') or '-'}; "
            f"failing jobs: {', '.join(failing) or 'none'}"
        )
    else:
        con.print("daemon: not running")
    table = Table(title="modules")
    for col in ("module", "phase", "serving", "active", "standby", "last-known-good", "bad", "last outcome"):
        table.add_column(col)
    for m in data["modules"]:
        act, sb, lkg = m["active"], m["standby"], m["last_known_good"]
        table.add_row(
            m["module"],
            m["phase"],
            str(m["serving"] or "-"),
            f"{act['version']} {_short(act['sha256'])} ({act['slot']})" if act else "-",
            f"{sb['version']} {_short(sb['sha256'])} ({sb['slot']})" if sb else "-",
            f"{lkg['version']} {_short(lkg['sha256'])}" if lkg else "-",
            str(len(m["bad"])),
            data["last_outcomes"].get(m["module"], "-"),
        )
    con.print(table)
    for ld in data.get("loading") or []:
        con.print(
            f"[cyan]loading[/cyan] {escape(str(ld.get('module')))} {escape(str(ld.get('version')))} "
            f"({escape(str(ld.get('kind')))}) since {str(ld.get('since'))[:19]}"
        )
    if data.get("canaries"):
        _print_canaries(con, data["canaries"])
    _print_operator_view(con, data)


def _print_operator_view(con: Any, data: dict[str, Any]) -> None:
    """Open incidents (with what was tried), failing checks and escalations waiting for an operator."""
    from rich.markup import escape
    from rich.table import Table

    from sre_core.textsafe import neutralise_tree

    # titles and names come from devices and logs: controls and bidi are shown, never obeyed
    checks = neutralise_tree(data.get("failing_checks") or [])
    con.print(f"failing checks: {escape(', '.join(checks)) if checks else 'none'}")
    incidents = neutralise_tree(data.get("open_incidents") or [])
    if incidents:
        table = Table(title="open incidents")
        for col in (
            "opened",
            "kind",
            "module",
            "version",
            "sightings",
            "done",
            "failed",
            "escalation",
            "what",
        ):
            table.add_column(col)
        for e in incidents:
            table.add_row(
                str(e.get("opened_at", "-"))[:19], str(e.get("kind", "-")), str(e.get("module", "-")),
                str(e.get("version") or "-"), str(e.get("count", 1)),
                ", ".join(e.get("actions") or []) or "-", ", ".join(e.get("failed") or []) or "-",
                str(e.get("escalation") or "-"),
                escape(str(e.get("title", ""))[:80]),
            )  # fmt: skip
        con.print(table)
    else:
        con.print("open incidents: none")
    pending = neutralise_tree(data.get("pending_escalations") or [])
    if pending:
        table = Table(title="escalations waiting for an operator")
        for col in ("id", "status", "proposed", "module", "expires", "what"):
            table.add_column(col)
        for p in pending:
            table.add_row(
                p["id"], p["status"], p["proposed"], str(p["module"]), p["expires"][:19],
                escape(p["what"][:80]),
            )  # fmt: skip
        con.print(table)
    else:
        con.print("pending escalations: none")


def _print_canaries(con: Any, canaries: list[dict[str, Any]]) -> None:
    """One row per canary: where it stands in its steps, its evidence, and each gate's verdict."""
    from rich.table import Table

    table = Table(title="canaries")
    for col in ("module", "candidate", "vs", "phase", "step", "weight", "samples", "gates", "reason"):
        table.add_column(col)
    colors = {"promoted": "green", "aborted": "red", "inconclusive": "yellow", "cancelled": "yellow"}
    for c in canaries:
        phase = str(c.get("phase", "-"))
        color = colors.get(phase, "cyan")
        gates = c.get("gates") or {}
        items = gates.items() if isinstance(gates, dict) else enumerate(gates)
        verdicts = ", ".join(
            f"{g.get('gate', k) if isinstance(g, dict) else k}="
            f"{g.get('verdict', g) if isinstance(g, dict) else g}"
            for k, g in items
        )
        table.add_row(
            str(c.get("module", "-")),
            str(c.get("candidate", "-")),
            str(c.get("incumbent", "-")),
            f"[{color}]{phase}[/{color}]",
            f"{c.get('step', '-')}/{c.get('steps', '-')}",
            f"{float(c.get('weight') or 0) * 100:.0f} %",
            f"{c.get('samples', '-')}/{c.get('min_samples', '-')}",
            verdicts or "-",
            str(c.get("reason") or ""),
        )
    con.print(table)


def _source(paths: StatePaths, src: str | None, channel: str | None, config: Path | None) -> Any:
    """The production source: the TUF puller (held state when offline or refused)."""
    from deployment.pull import Puller, load_held

    settings = settings_for(paths.root, config)
    hubs = settings.hub.hubs()  # settings include what `init` provisioned
    where = src or (hubs[0] if hubs else None)
    fallbacks = [] if src else settings.hub.pull_fallbacks()  # --from: that source only
    ch = channel or settings.hub.channel

    def pull() -> Any:
        if not where:
            return load_held(paths)
        # Refused or failed: keep enforcing what is held (already audited); the pass reports it.
        hub = settings.hub  # a CDN/mirror for the signed files, when configured
        return Puller(
            paths,
            where,
            ch,
            metadata_url=hub.metadata_url,
            targets_url=hub.targets_url,
            fallbacks=fallbacks,
            sticky_s=hub.sticky_s,
        ).pull_or_held()

    return pull


def _report_to_hub(
    paths: StatePaths, online: bool, src: str | None, channel: str | None, config: Path | None
) -> str:
    """Send the device report after a pass (as the daemon does), so gates and the halt rule see
    devices driven by ``reconcile --once`` too. Returns "sent", "offline" or the error."""
    from deployment.rollout import device_report, send_report
    from sre_core.clock import SystemClock

    settings = settings_for(paths.root, config)
    hubs = [src] if src else [u for u in settings.hub.hubs() if u.startswith(("http://", "https://"))]
    if not online or not hubs or not hubs[0].startswith(("http://", "https://")):
        return "offline"
    clock = SystemClock()
    try:  # the first hub that takes it (a regional hub first, the root as fallback)
        send_report(hubs, paths, device_report(paths, channel or settings.hub.channel, clock), clock)
    except Exception as exc:  # the hub hears from us at the next pass
        return f"{type(exc).__name__}: {exc}"[:200]
    return "sent"


def _modules_known(paths: StatePaths, module: str) -> None:
    from deployment.slots import SlotManager
    from sre_core.audit import AuditLog

    known = SlotManager(paths, AuditLog(paths.audit_log)).modules()
    if module not in known:
        raise InputError(
            f"module {module}", "no such module on this device", f"known: {', '.join(known) or 'none'}"
        )


def register(app: typer.Typer) -> None:
    safe_app = typer.Typer(
        help="Enter or leave safe mode (factory safe modules served; no chaos, no canaries)."
    )
    audit_app = typer.Typer(help="The hash-chained audit trail: verify the chain, show the last records.")
    slots_app = typer.Typer(help="Slot maintenance: re-hash slots, clear bad digests.")
    app.add_typer(safe_app, name="safe-mode")
    app.add_typer(audit_app, name="audit")
    app.add_typer(slots_app, name="slots")

    @app.command()
    def reconcile(
        state: StateOpt = None,
        once: Annotated[
            bool, typer.Option("--once", help="One pass, then exit (the daemon schedules passes).")
        ] = False,
        source: Annotated[
            str | None,
            typer.Option("--from", help="Hub URL or bundle directory (default: the provisioned hub)."),
        ] = None,
        channel: Annotated[
            str | None, typer.Option("--channel", help="Channel (default: the provisioned one).")
        ] = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Pull, then bring every module to the signed desired state: install into the standby slot, probe,
        commit or roll back; safe mode when the desired state expired. Exit 1 when anything rolled back.
        """
        from rich.text import Text

        from deployment.reconcile import Reconciler
        from policies.deployment import load_deployment_policy

        if not once:
            raise InputError(
                "reconcile", "only single passes run from the command line", "pass --once (the daemon loops)"
            )
        paths = _paths(state, config)
        policy = load_deployment_policy(paths.policies / "deployment.yaml")
        from sre_agent.config import signed_layer_check

        check = signed_layer_check(paths.root, config)  # kind: config modules are checked by this agent
        report = Reconciler(
            paths, _source(paths, source, channel, config), policy=policy, config_check=check
        ).run_once()
        data = report.to_dict()
        data["report"] = _report_to_hub(paths, report.online, source, channel, config)
        if json_out:
            emit_json(data)
        else:
            con = out_console()
            where = "online" if data["online"] else "offline"
            con.print(f"trust {data['trust']} ({where}), serial {data['serial']}")
            if data.get("pull_refused"):
                con.print(Text(f"pull refused, holding what was verified before: {data['pull_refused']}"))
            if data["safe_mode_changed"]:
                con.print(f"[bold]safe mode {data['safe_mode_changed']}[/bold]")
            if data["safe_mode"]:
                con.print("[bold red]device is in SAFE MODE[/bold red]: nothing installed")
            for o in data["outcomes"]:
                style = {"committed": "green", "noop": "dim", "rolled_back": "red", "refused": "red"}.get(
                    o["result"], ""
                )
                why = f" - {o['reason']}" if o["reason"] else ""
                con.print(Text(f"{o['module']}: {o['result']} {o['version'] or ''}{why}", style=style))
        if not report.ok:
            raise typer.Exit(1)

    @app.command()
    def status(state: StateOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
        """Modules (active/standby versions and digests), trust freshness, safe mode, last sync."""
        data = device_status(_paths(state, config))
        if json_out:
            emit_json(data)
        else:
            _print_status(data)

    @app.command()
    def rollback(
        module: ModuleArg,
        state: StateOpt = None,
        reason: ReasonOpt = "operator rollback",
        keep: Annotated[bool, typer.Option("--keep", help="Do not mark the current version bad.")] = False,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Make the last-known-good standby active; the current version is marked bad (unless --keep)."""
        from deployment.slots import SlotManager
        from sre_core.audit import AuditLog

        paths = _paths(state, config)
        _modules_known(paths, module)
        audit = AuditLog(paths.audit_log)
        audit.append("operator.rollback", actor="operator", module=module, reason=reason, mark_bad=not keep)
        slots = SlotManager(paths, audit)
        st = slots.rollback(module, reason=reason, actor="operator", mark_bad=not keep)
        from deployment.policy_modules import PolicyActivator

        PolicyActivator(paths, audit).sync(slots)  # a policy module's documents follow at once
        from deployment.config_modules import ConfigActivator
        from sre_agent.config import signed_layer_check

        ConfigActivator(paths, audit, signed_layer_check(paths.root, config)).sync(slots)  # and config
        if json_out:
            emit_json(st.to_dict())
        else:
            act = st.active
            out_console().print(
                f"{module}: now serving {act.version if act else 'nothing'} (slot {st.serving})"
            )

    def _safe(paths: StatePaths) -> Any:
        from deployment.safemode import SafeMode
        from deployment.slots import SlotManager
        from policies.deployment import load_deployment_policy
        from sre_core.audit import AuditLog

        audit = AuditLog(paths.audit_log)
        policy = load_deployment_policy(paths.policies / "deployment.yaml")
        return SafeMode(
            paths, SlotManager(paths, audit, policy=policy), audit, flapping=policy.flapping
        ), audit

    @safe_app.command("enter")
    def safe_enter(
        state: StateOpt = None,
        reason: ReasonOpt = "operator",
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Serve the factory safe modules now, until a newer signed desired state or `safe-mode exit`."""
        from deployment.manifest import DesiredState
        from deployment.reconcile import read_last_reconcile

        paths = _paths(state, config)
        sm, audit = _safe(paths)
        audit.append("operator.safe_mode_enter", actor="operator", reason=reason)
        held = read_last_reconcile(paths).get("desired")
        desired = DesiredState.model_validate(held) if held else None
        st = sm.enter("operator", reason, actor="operator", desired=desired)
        if json_out:
            emit_json(st.to_dict())
        else:
            out_console().print(f"[bold red]safe mode entered[/bold red] ({reason})")

    @safe_app.command("exit")
    def safe_exit(
        state: StateOpt = None,
        reason: ReasonOpt = "operator",
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Serve the active slots again."""
        paths = _paths(state, config)
        sm, audit = _safe(paths)
        audit.append("operator.safe_mode_exit", actor="operator", reason=reason)
        st = sm.exit(reason, actor="operator")
        if json_out:
            emit_json(st.to_dict())
        else:
            out_console().print("safe mode: [green]off[/green]")

    @slots_app.command("verify")
    def slots_verify(state: StateOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
        """Re-hash every installed slot against the digests recorded at install. Exit 1 on a mismatch."""
        from deployment.slots import SlotManager
        from sre_core.audit import AuditLog

        paths = _paths(state, config)
        sm = SlotManager(paths, AuditLog(paths.audit_log))
        checks: list[dict[str, Any]] = []
        for m in sm.modules():
            st = sm.status(m)
            for view in (st.active, st.standby):
                if view is not None:
                    chk = sm.verify_slot(m, view.slot)
                    checks.append(
                        {
                            "module": m,
                            "slot": chk.slot,
                            "version": view.version,
                            "ok": chk.ok,
                            "problems": chk.problems,
                        }
                    )
        if json_out:
            emit_json({"checks": checks})
        else:
            for c in checks:
                mark = "ok" if c["ok"] else "MISMATCH " + "; ".join(c["problems"])
                out_console().print(f"{c['module']} slot {c['slot']} ({c['version']}): {mark}", markup=False)
        if not all(c["ok"] for c in checks):
            raise typer.Exit(1)

    @slots_app.command("clear-bad")
    def clear_bad(
        module: ModuleArg,
        digest: Annotated[
            str | None, typer.Argument(help="Digest (or prefix) to clear; all when omitted.")
        ] = None,
        state: StateOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Allow a digest marked bad to be installed again (operator decision, audited)."""
        from deployment.slots import SlotManager
        from sre_core.audit import AuditLog

        paths = _paths(state, config)
        _modules_known(paths, module)
        cleared = SlotManager(paths, AuditLog(paths.audit_log)).clear_bad(module, digest, actor="operator")
        if json_out:
            emit_json({"module": module, "cleared": cleared})
        else:
            out_console().print(f"{module}: cleared {len(cleared)} bad digest(s)")

    @audit_app.command("verify")
    def audit_verify(state: StateOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
        """Walk the hash chain; exit 1 with the first broken line and why."""
        from sre_core.audit import AuditLog

        paths = _paths(state, config)
        n, broken = AuditLog(paths.audit_log).verify()
        data = {"records": n, "intact": broken is None, "line": broken.line if broken else None,
                "reason": broken.reason if broken else None}  # fmt: skip
        if json_out:
            emit_json(data)
        elif broken is None:
            out_console().print(f"audit trail intact: {n} records")
        if broken is not None:
            if not json_out:
                raise SreError(
                    f"verify audit trail {paths.audit_log}",
                    f"chain broken at line {broken.line}: {broken.reason} ({n} records verified before it)",
                    "keep the file as evidence; report the device",
                )
            raise typer.Exit(1)

    @audit_app.command("tail")
    def audit_tail(
        state: StateOpt = None,
        n: Annotated[int, typer.Option("-n", "--lines", help="How many records.", min=1, max=10000)] = 20,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Show the last records of the audit trail."""
        from sre_core.audit import AuditLog

        recs = AuditLog(_paths(state, config).audit_log).tail(n)
        if json_out:
            emit_json({"records": [r.to_dict() for r in recs]})
            return
        from rich.table import Table

        table = Table(title="audit trail")
        for col in ("seq", "time", "actor", "event", "data"):
            table.add_column(col, overflow="fold")
        for r in recs:
            data = ", ".join(f"{k}={v}" for k, v in r.data.items())
            table.add_row(str(r.seq), r.ts, r.actor, r.event, data[:200])
        out_console().print(table)
