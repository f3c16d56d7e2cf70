"""`sre-hub rollout ...`, `sre-hub recall`, `sre-hub fleet status|token`, `sre-hub channels ...`,
`sre-hub dora`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sre_core.cli import JsonOpt, emit_json, out_console
from sre_core.errors import InputError

__all__ = ["register"]

RepoOpt = Annotated[
    Path, typer.Option("--repo", help="Hub repository directory (created by `sre-hub init`).")
]
ChannelOpt = Annotated[str, typer.Option("--channel", "-c", help="Release channel.")]


def _service(repo: Path) -> Any:
    from hub.repository import HubRepository
    from hub.rollouts import RolloutService

    if not (repo / "repo.json").is_file():
        raise InputError(f"open {repo}", "not a hub repository", "run `sre-hub init --repo DIR` first")
    return RolloutService(HubRepository(repo))


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(
            f"--{what} {text!r}", "expected comma-separated integers", "e.g. 10,50,100"
        ) from None


def _group(path: Path) -> list[str]:
    try:
        ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError as exc:
        raise InputError(f"read --group {path}", str(exc), "pass a file of device ids, one a line") from exc
    if not ids:
        raise InputError(f"read --group {path}", "no device ids in it")
    return ids


def _bar(done: int, total: int, width: int = 20) -> Any:
    from rich.progress_bar import ProgressBar

    return ProgressBar(total=max(total, 1), completed=min(done, max(total, 1)), width=width)


def _print_rollout(st: Any) -> None:
    from rich.table import Table

    d = st.to_dict()
    color = {"running": "green", "completed": "cyan", "halted": "red", "paused": "yellow"}.get(
        d["state"], "white"
    )
    out_console().print(
        f"[bold]{d['id']}[/bold]  {d['module']} {d['baseline'] or '-'} -> {d['version']}  "
        f"[{color}]{d['state']}[/{color}]  wave {d['wave']} ({d['percent']} %)"
    )
    t = Table(title=f"rollout waves ({d['channel']})")
    for c in (
        "wave",
        "cumulative",
        "gate",
        "open",
        "members seen",
        "reachable",
        "on candidate",
        "healthy",
        "failed",
        "",
    ):
        t.add_column(c)
    for w in d["waves"]:
        t.add_row(
            str(w["index"]), f"{w['percent']} %", w["gate"], "yes" if w["open"] else "no",
            str(w["members_known"]), str(w["reachable"]), str(w["on_candidate"]), str(w["healthy"]),
            f"[red]{w['failed']}[/red]" if w["failed"] else "0", _bar(w["healthy"], w["members_known"]),
        )  # fmt: skip
    out_console().print(t)
    out_console().print(f"next gate: {d['gate_reason']}")
    if d["open_failures"]:
        out_console().print(
            f"[red]open failures ({len(d['open_failures'])}):[/red] {', '.join(d['open_failures'])}"
        )


def register(app: typer.Typer) -> None:
    ro = typer.Typer(help="Fleet rollouts in waves: start, watch, gate, halt, abort.", no_args_is_help=True)
    app.add_typer(ro, name="rollout")

    @ro.command("start")
    def start(
        repo: RepoOpt,
        channel: ChannelOpt,
        module: Annotated[str, typer.Option("--module", "-m", help="Module to roll out.")],
        version: Annotated[str, typer.Option("--version", "-v", help="A version published in the channel.")],
        waves: Annotated[str, typer.Option("--waves", help="Cumulative percentages.")] = "10,50,100",
        gates: Annotated[
            str, typer.Option("--gates", help="Gate per wave after the first: auto|manual.")
        ] = "",
        soak: Annotated[int, typer.Option("--soak", help="Seconds a wave soaks before an auto gate.")] = 600,
        min_devices: Annotated[
            int, typer.Option("--min-devices", help="Healthy devices an auto gate needs.")
        ] = 3,
        halt_after: Annotated[int, typer.Option("--halt-after", help="Failed devices that halt it.")] = 1,
        group: Annotated[
            Path | None,
            typer.Option("--group", help="File of device ids (one a line): a device-group rollout."),
        ] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Start a rollout: wave 1 opens now; devices decide membership themselves."""
        from pydantic import ValidationError

        from hub.rollouts import RolloutSpec

        try:
            spec = RolloutSpec(
                channel=channel, module=module, version=version, waves=_ints(waves, "waves"),
                gates=[g.strip() for g in gates.split(",")] if gates else None,  # type: ignore[misc]
                soak_s=soak, min_devices=min_devices, halt_after=halt_after,
                group=_group(group) if group else None,
            )  # fmt: skip
        except ValidationError as exc:
            raise InputError("rollout start", exc.errors()[0]["msg"], "see --help") from exc
        svc = _service(repo)
        svc.start(spec)
        if json_out:
            emit_json(svc.status(channel).to_dict())
        else:
            _print_rollout(svc.status(channel))

    @ro.command("status")
    def status(repo: RepoOpt, channel: ChannelOpt, json_out: JsonOpt = False) -> None:
        """Per-wave progress of the channel's newest rollout."""
        st = _service(repo).status(channel)
        emit_json(st.to_dict()) if json_out else _print_rollout(st)

    def _verb(name: str, doc: str) -> None:
        def cmd(repo: RepoOpt, channel: ChannelOpt, json_out: JsonOpt = False) -> None:
            svc = _service(repo)
            getattr(svc, name)(channel)
            st = svc.status(channel)
            emit_json(st.to_dict()) if json_out else _print_rollout(st)

        cmd.__doc__ = doc
        ro.command(name)(cmd)

    @ro.command("approve")
    def approve(
        repo: RepoOpt,
        channel: ChannelOpt,
        wave: Annotated[
            int | None,
            typer.Option(
                "--wave",
                min=1,
                help="The wave this approval opens (its index in `rollout status`; the number of waves: "
                "complete). Refused when that gate was already passed, so a repeated approval never "
                "opens the wave after it.",
            ),
        ] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Open the next wave now (a manual gate), or complete after the last wave."""
        svc = _service(repo)
        svc.approve(channel, wave=wave)
        st = svc.status(channel)
        emit_json(st.to_dict()) if json_out else _print_rollout(st)

    _verb("pause", "Stop opening waves; nobody starts the candidate while paused.")
    _verb("resume", "Resume a paused rollout.")
    _verb(
        "ack", "Acknowledge the failures that halted the rollout (it becomes paused; then resume or abort)."
    )

    @ro.command("abort")
    def abort(
        repo: RepoOpt,
        channel: ChannelOpt,
        keep: Annotated[
            bool, typer.Option("--keep", help="Devices on the candidate keep it; no more waves.")
        ] = False,
        revert: Annotated[
            bool, typer.Option("--revert", help="Every device returns to the baseline.")
        ] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """End the rollout: --keep or --revert (one of them)."""
        if keep == revert:
            raise InputError("rollout abort", "give exactly one of --keep or --revert")
        svc = _service(repo)
        svc.abort(channel, revert=revert)
        st = svc.status(channel)
        emit_json(st.to_dict()) if json_out else _print_rollout(st)

    @ro.command("tick")
    def tick(
        repo: RepoOpt,
        channel: Annotated[
            str | None, typer.Option("--channel", "-c", help="Only this channel (default: every channel).")
        ] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Evaluate halt rules and automatic gates now (the server does this on every report; cron)."""
        done = list(_service(repo).tick(channel))
        if json_out:
            emit_json({"actions": done})
        else:
            out_console().print(", ".join(done) or "nothing to do")

    @app.command("recall")
    def recall(
        repo: RepoOpt,
        channel: ChannelOpt,
        module: Annotated[str, typer.Option("--module", "-m", help="Module whose versions to recall.")],
        withdraw: Annotated[list[str], typer.Option("--withdraw", help="Version to withdraw (repeatable).")],
        to: Annotated[
            str, typer.Option("--to", help="Replacement: newer = roll forward, older = roll down.")
        ],
        reason: Annotated[
            str, typer.Option("--reason", help="Why, for the signed recall and the audit.")
        ] = "",
        json_out: JsonOpt = False,
    ) -> None:
        """Withdraw a release fleet-wide; devices move to --to at their next sync (online or bundle)."""
        out = _service(repo).recall(channel, module, withdraw, to, reason)
        if json_out:
            emit_json(out)
        else:
            out_console().print(
                f"recalled {module} {', '.join(out['withdrawn'])} in {channel}: roll {out['kind']} to "
                f"{out['to_version']} (desired state serial {out['serial']})"
            )

    fleet = typer.Typer(help="The fleet at a glance.", no_args_is_help=True)
    app.add_typer(fleet, name="fleet")

    @fleet.command("status")
    def fleet_status(
        repo: RepoOpt,
        sync_slo: Annotated[
            int, typer.Option("--sync-slo", help="Seconds since last sync before SLO breach.")
        ] = 86400,
        limit: Annotated[int, typer.Option("--limit", help="Device rows to show.")] = 50,
        site_max_age: Annotated[
            float, typer.Option("--site-max-age", help="Seconds since a site's last sync before SLO breach.")
        ] = 3600.0,
        json_out: JsonOpt = False,
    ) -> None:
        """Devices, versions, last sync, drift SLOs, safe mode, open escalations, regional sites."""
        from rich.table import Table

        from hub.fleet_status import fleet_status as build

        doc = build(_service(repo), sync_slo, site_max_age)
        if json_out:
            emit_json(doc)
            return
        s = doc["summary"]
        con = out_console()
        con.print(
            f"[bold]{s['devices']}[/bold] devices ({s['reporting']} reporting), safe mode {s['safe_mode']}, "
            f"sync SLO breaches {s['sync_slo_breaches']}, drifting {s['drifting']}, "
            f"open escalations {s['open_escalations']}"
        )
        vt = Table(title="versions")
        for c in ("module", "version", "devices", ""):
            vt.add_column(c)
        for m, counts in s["versions"].items():
            total = sum(counts.values())
            for v, n in counts.items():
                vt.add_row(m, v, str(n), _bar(n, total))
        con.print(vt)
        ct = Table(title="channels")
        for c in ("channel", "serial", "modules", "rollout"):
            ct.add_column(c)
        for ch, info in doc["channels"].items():
            r = info["rollout"]
            ro_txt = f"{r['version']} {r['state']} {r['percent']} %" if r else "-"
            mods = ", ".join(f"{m} {v}" for m, v in info["modules"].items())
            ct.add_row(ch, str(info["serial"]), mods, ro_txt)
        con.print(ct)
        dt = Table(title=f"devices (first {limit})")
        for c in (
            "device",
            "channel",
            "versions",
            "last sync",
            "sync SLO",
            "drift",
            "safe mode",
            "escalations",
        ):
            dt.add_column(c)
        for d in doc["devices"][:limit]:
            dt.add_row(
                d["device_id"], str(d["channel"] or "-"),
                ", ".join(f"{m} {v}" for m, v in d["versions"].items()) or "-",
                d["last_sync"] or "never", "[green]ok[/green]" if d["sync_slo_ok"] else "[red]breach[/red]",
                ", ".join(d["drift"]) or "-", "[red]yes[/red]" if d["safe_mode"] else "no",
                str(d["open_escalations"]),
            )  # fmt: skip
        con.print(dt)
        if doc["sites"]:
            from hub.cli.regional import sites_table

            con.print(sites_table(doc["sites"]))

    @fleet.command("token")
    def token(
        repo: RepoOpt, name: Annotated[str, typer.Argument(help="Operator name.")], json_out: JsonOpt = False
    ) -> None:
        """Issue an operator API token (printed once; the hub keeps its hash)."""
        from hub.fleet_api import issue_operator_token

        _service(repo)
        tok = issue_operator_token(repo, name)
        if json_out:
            emit_json({"operator": name, "token": tok})
        else:
            print(tok)

    @app.command("dora")
    def dora(
        repo: RepoOpt,
        window: Annotated[int, typer.Option("--window", help="Days.")] = 30,
        json_out: JsonOpt = False,
    ) -> None:
        """Deployment frequency, lead time (disconnected time apart), change failure rate, MTTR."""
        from rich.table import Table

        from hub.dora import compute_dora

        svc = _service(repo)
        rep = compute_dora(svc.repo, svc.reports, window).to_dict()
        if json_out:
            emit_json(rep)
            return

        def fmt(s: dict[str, Any], unit: str) -> str:
            if not s.get("n"):
                return "no data"
            return f"median {s['median']:.0f} {unit}, p90 {s['p90']:.0f} {unit} (n={int(s['n'])})"

        t = Table(title=f"DORA, last {window} days")
        t.add_column("metric")
        t.add_column("value")
        t.add_row(
            "deployment frequency", f"{rep['deployments']} ({rep['deployment_frequency_per_day']} / day)"
        )
        t.add_row("lead time (publish -> reconciled)", fmt(rep["lead_time_s"], "s"))
        t.add_row("  of which disconnected", fmt(rep["disconnected_s"], "s"))
        t.add_row("  connected lead time", fmt(rep["lead_time_connected_s"], "s"))
        cfr = rep["change_failure_rate"]
        t.add_row(
            "change failure rate",
            "no data"
            if cfr is None
            else f"{cfr:.2%} ({rep['failures']} of {rep['exposures']} device installs)",
        )
        t.add_row("MTTR (local flip)", fmt(rep["mttr_ms"], "ms"))
        ttr = fmt(rep["time_to_restore_s"], "s")
        if rep["unrestored_devices"]:
            ttr += f"; {rep['unrestored_devices']} device(s) still on a failed release"
        t.add_row("time to restore (hub failure -> devices off it)", ttr)
        out_console().print(t)

    ch = typer.Typer(
        help="Release channels: promotion and customer x SKU x envelope matrices.", no_args_is_help=True
    )
    app.add_typer(ch, name="channels")

    @ch.command("matrix")
    def matrix(
        repo: RepoOpt,
        customer: Annotated[list[str], typer.Option("--customer", help="Customer (repeatable).")],
        sku: Annotated[list[str], typer.Option("--sku", help="Hardware SKU (repeatable).")],
        envelope: Annotated[list[str], typer.Option("--envelope", help="Regulatory envelope (repeatable).")],
        json_out: JsonOpt = False,
    ) -> None:
        """Create one channel (own delegated key) per customer x SKU x regulatory envelope."""
        from hub.channels import Channels

        names = Channels(_service(repo)).ensure_matrix(customer, sku, envelope)
        emit_json({"channels": names}) if json_out else out_console().print("\n".join(names))

    @ch.command("promote")
    def promote(
        repo: RepoOpt,
        module: Annotated[str, typer.Option("--module", "-m", help="Module to promote.")],
        version: Annotated[str, typer.Option("--version", "-v", help="Version released in --from.")],
        src: Annotated[str, typer.Option("--from", help="Channel it proved itself in.")],
        dst: Annotated[str, typer.Option("--to", help="Channel to release it to.")],
        soak: Annotated[int, typer.Option("--soak", help="Seconds it must have run in --from.")] = 3600,
        min_healthy: Annotated[
            int, typer.Option("--min-healthy", help="Devices in --from that must report it healthy.")
        ] = 3,
        max_failures: Annotated[
            int, typer.Option("--max-failures", help="Failed devices in --from tolerated.")
        ] = 0,
        force: Annotated[
            bool, typer.Option("--force", help="Promote although the criteria do not hold (audited).")
        ] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Promote a version (staging -> pre-prod -> fleet) once its criteria hold."""
        from hub.channels import Channels, PromotionCriteria

        out = Channels(_service(repo)).promote(
            module, version, src, dst, PromotionCriteria(soak, min_healthy, max_failures), force
        )
        emit_json(out) if json_out else out_console().print(f"promoted {module} {version}: {src} -> {dst}")
