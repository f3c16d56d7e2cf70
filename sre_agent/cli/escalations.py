"""`sre-agent escalations list | show | approve | reject | apply`: operators decide at the device.

Approve and reject sign with an operator key (``sre-hub operators keygen``) listed in the signed operator
policy ``<state>/policies/operators.yaml``; the device verifies the signature, the binding to the
escalation's content hash and the expiry before it records the decision. The daemon carries out approved
actions, verifying the approval once more right before it acts. ``apply`` takes an approval signed at the
hub (``sre-hub escalations approve``).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from sre_agent.cli._common import ConfigOpt, JsonOpt, StateOpt, emit_json, out_console, state_paths
from sre_core.errors import InputError

__all__ = ["register"]

KeyOpt = Annotated[
    Path, typer.Option("--key", help="Operator private key (PEM, 0600) from `sre-hub operators keygen`.")
]
OperatorOpt = Annotated[str, typer.Option("--operator", help="Operator id as listed in operators.yaml.")]
TtlOpt = Annotated[
    int, typer.Option("--ttl", help="Seconds the approval stays valid (policy caps it).", min=60)
]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the audit trail).")]


def _store(state: Path | None, config: Path | None) -> Any:
    from sre_agent.escalations import EscalationStore, escalations_dir
    from sre_core.audit import AuditLog
    from sre_core.clock import SystemClock

    paths = state_paths(state, config)
    if not paths.root.is_dir():
        raise InputError(f"open device state {paths.root}", "it does not exist", "pass --state DIR")
    clock = SystemClock()
    return EscalationStore(escalations_dir(paths), AuditLog(paths.audit_log, clock), clock), paths


def _roster(paths: Any) -> Any:
    from policies.approvals import load_roster

    return load_roster(paths.policies / "operators.yaml")


def _summary_row(esc: Any) -> dict[str, Any]:
    from sre_core.textsafe import neutralise_tree

    return dict(neutralise_tree(_raw_row(esc)))


def _raw_row(esc: Any) -> dict[str, Any]:
    inc = esc.content["incident"]
    return {
        "id": esc.id,
        "status": esc.status.value,
        "created": str(esc.content["created_at"])[:19],
        "kind": inc["kind"],
        "module": f"{inc['module']} {inc.get('version') or ''}".strip(),
        "proposed": esc.proposed_action,
        "what": str(esc.content["what"])[:60],
    }


def _print_decided(esc: Any, json_out: bool) -> None:
    if json_out:
        emit_json({"id": esc.id, "status": esc.status.value, "approval": esc.approval})
        return
    verb = "approved" if esc.status.value == "approved" else esc.status.value
    out_console().print(f"[bold]{esc.id}[/bold] {verb}")
    if verb == "approved":
        out_console().print("the agent will carry it out after verifying the approval again")


def _register_triage(app: typer.Typer) -> None:
    triage_app = typer.Typer(help="Dry-run the triage policy on incident files.", no_args_is_help=True)
    app.add_typer(triage_app, name="triage")

    @triage_app.command("explain")
    def explain(
        incident_file: Annotated[Path, typer.Argument(help="Incident (YAML/JSON), or a labelled case file.")],
        policy_file: Annotated[
            Path | None, typer.Option("--policy", help="Triage policy (default: the shipped one).")
        ] = None,
        llm: Annotated[bool, typer.Option("--llm", help="Also ask the local model (slower).")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Show which rule matches, what is allowed, and what the gate would do. Changes nothing."""
        import yaml

        from policies.base import load_document
        from policies.triage import TriagePolicy, default_triage_policy
        from sre_agent.incidents import Incident
        from sre_agent.triage import TriageEngine

        try:
            raw = yaml.safe_load(incident_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"read incident {incident_file}", str(exc), "pass a YAML/JSON file") from exc
        labelled = raw if isinstance(raw, dict) and "incident" in raw and "expected" in raw else None
        if isinstance(raw, dict) and "incident" in raw:
            raw = raw["incident"]
        try:
            incident = Incident.model_validate(raw)
        except ValueError as exc:
            raise InputError(f"read incident {incident_file}", str(exc)[:500], "fix the document") from exc
        policy = load_document(TriagePolicy, policy_file) if policy_file else default_triage_policy()
        engine = TriageEngine(policy)
        advice = None
        if llm:
            from sre_agent.config import LlmSettings
            from sre_agent.llm import LlmAdvisor, LlmError, LocalModel

            settings = LlmSettings()
            try:
                advice = LlmAdvisor(LocalModel.from_settings(settings), settings)(
                    incident, engine.match(incident)
                )
            except LlmError as exc:
                out_console().print(f"model unavailable, rule default stands: {exc.message}", markup=False)
        d = engine.decide(incident, advice)
        verdict = _against_label(labelled, incident_file, d) if labelled is not None else None
        if json_out:
            emit_json({**d.to_dict(), **({"label": verdict} if verdict else {})})
            if verdict and not verdict["agrees"]:
                raise typer.Exit(1)
            return
        con = out_console()
        con.print(f"rule [bold]{d.rule}[/bold]  certainty {d.certainty:.2f}")
        con.print(f"allowed: {', '.join(a.value for a in d.allowed)}  default: {d.default.value}")
        verb = "escalate, proposing" if d.escalated else "execute"
        now = ", ".join(a.value for a in d.execute_now)
        con.print(f"verdict: [bold]{verb} {d.action.value}[/bold]; runs now: {now}")
        from sre_core.textsafe import neutralise

        for r in d.reasons:
            con.print(f"  - {neutralise(r)}", markup=False)
        con.print(f"summary: {neutralise(d.summary)}", markup=False)
        if verdict is not None:
            con.print(verdict["text"], markup=False)
            if not verdict["agrees"]:
                raise typer.Exit(1)  # a labelled case that disagrees fails, with the reason printed above


def _against_label(case: dict[str, Any], source: Path, d: Any) -> dict[str, Any]:
    """Compare a decision with a labelled case's ``expected`` (as `triage eval` scores it)."""
    from sre_agent.triage_eval import TriageCase, score

    try:
        tc = TriageCase.model_validate({"name": source.stem, **case})
    except ValueError as exc:
        raise InputError(f"read labelled case {source}", str(exc)[:500], "fix its 'expected' block") from exc
    r = score(tc, d)
    exp = tc.expected
    want = f"{exp.action.value}{' with approval' if exp.requires_approval else ''}"
    got = f"{d.action.value}{' with approval' if d.escalated else ''}"
    if r.correct:
        return {"agrees": True, "expected": want, "got": got, "text": f"label: agrees ({want})"}
    why = "; ".join(r.why_unsafe) or ("acceptable alternative" if r.acceptable else "different action")
    return {
        "agrees": False,
        "expected": want,
        "got": got,
        "text": f"label: DISAGREES: expected {want}, the policy decides {got} (rule {d.rule}): {why}; exit 1",
    }


def register(app: typer.Typer) -> None:
    _register_triage(app)
    esc_app = typer.Typer(
        help="Incidents the agent would not handle alone: review, approve (signed) or reject.",
        no_args_is_help=True,
    )
    app.add_typer(esc_app, name="escalations")

    @esc_app.command("list")
    def list_(
        state: StateOpt = None,
        config: ConfigOpt = None,
        status: Annotated[str | None, typer.Option("--status", help="open, approved, rejected, ...")] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """List escalations, newest first."""
        from sre_agent.escalations import EscalationStatus

        store, _ = _store(state, config)
        try:
            want = EscalationStatus(status) if status else None
        except ValueError:
            choices = ", ".join(s.value for s in EscalationStatus)
            raise InputError(
                "list escalations", f"unknown status {status!r}", f"use one of {choices}"
            ) from None
        rows = [_summary_row(e) for e in store.select(want)]
        if json_out:
            emit_json({"escalations": rows})
            return
        from rich.markup import escape
        from rich.table import Table

        cols = ("id", "status", "created", "kind", "module", "proposed", "what")
        table = Table(title=f"escalations ({len(rows)})")
        for col in cols:
            table.add_column(col)
        for r in rows:
            table.add_row(*[escape(str(r[c])) for c in cols])
        out_console().print(table)

    @esc_app.command("show")
    def show(
        esc_id: Annotated[str, typer.Argument(help="Escalation id (esc-...).")],
        state: StateOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Everything an operator needs to decide: what, why, device state, evidence, model summary."""
        store, _ = _store(state, config)
        esc = store.get(esc_id)
        if json_out:
            emit_json(json.loads(esc.model_dump_json()))
            return
        from sre_core.textsafe import neutralise, neutralise_tree

        # everything below may carry text from logs, titles or the model: shown, never obeyed
        c = neutralise_tree(esc.content)
        con = out_console()
        con.print(f"[bold]{esc.id}[/bold]  status [bold]{esc.status.value}[/bold]  hash {esc.content_hash}")
        con.print(f"what: {c['what']}", markup=False)
        con.print(f"proposed: {c['proposed_action']}  allowed: {', '.join(c['allowed'])}", markup=False)
        con.print(
            f"created {c['created_at']}  expires {c['expires_at']}  device {c['device_id']}", markup=False
        )
        con.print("why:")
        for reason in c["why"]:
            con.print(f"  - {reason}", markup=False)
        con.print(f"summary: {c['llm_summary']}", markup=False)
        con.print(f"device state: {json.dumps(c['device_state'])}", markup=False)
        inc = c["incident"]
        con.print(
            f"incident: {inc['kind']} {inc['module']} {inc.get('version')} facts={json.dumps(inc['facts'])}",
            markup=False,
        )
        ev = inc["evidence"]
        if ev["metrics"]:
            con.print(f"metrics: {json.dumps(ev['metrics'])}", markup=False)
        for v in ev["verification"]:
            con.print(f"check {v['check']}: {'pass' if v['passed'] else 'FAIL'} {v['detail']}", markup=False)
        for e in ev["events"]:
            con.print(f"event {e['ts']} {e['kind']}: {e['message']!r}", markup=False)
        for line in ev["logs"]:
            con.print(f"log (untrusted): {line!r}", markup=False)
        for h in esc.history:
            con.print(neutralise(f"  {h.ts.isoformat()} {h.event} by {h.actor} {h.detail}"), markup=False)

    def _decide(
        decision: str,
        esc_id: str,
        key: Path,
        operator: str,
        action: str | None,
        ttl: int,
        reason: str,
        state: Path | None,
        config: Path | None,
    ) -> Any:
        from policies.approvals import load_operator_key, sign_approval

        store, paths = _store(state, config)
        roster = _roster(paths)
        esc = store.get(esc_id)
        approval = sign_approval(
            load_operator_key(key),
            operator=operator,
            escalation_id=esc.id,
            escalation_hash=esc.content_hash,
            decision="approve" if decision == "approve" else "reject",
            action=(action or esc.proposed_action) if decision == "approve" else None,
            now=store.clock.now(),
            ttl=timedelta(seconds=ttl),
            reason=reason,
        )
        return store.decide(approval, roster)

    @esc_app.command("approve")
    def approve(
        esc_id: Annotated[str, typer.Argument(help="Escalation id (esc-...).")],
        key: KeyOpt,
        operator: OperatorOpt,
        action: Annotated[
            str | None, typer.Option("--action", help="Action to approve (default: the proposed one).")
        ] = None,
        ttl: TtlOpt = 3600,
        reason: ReasonOpt = "",
        state: StateOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Sign and record an approval. Exit 2 when the key, operator, action or escalation is refused."""
        _print_decided(
            _decide("approve", esc_id, key, operator, action, ttl, reason, state, config), json_out
        )

    @esc_app.command("reject")
    def reject(
        esc_id: Annotated[str, typer.Argument(help="Escalation id (esc-...).")],
        key: KeyOpt,
        operator: OperatorOpt,
        reason: ReasonOpt = "",
        ttl: TtlOpt = 3600,
        state: StateOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Sign and record a rejection: the proposed action will never run."""
        _print_decided(_decide("reject", esc_id, key, operator, None, ttl, reason, state, config), json_out)

    @esc_app.command("apply")
    def apply(
        approval_file: Annotated[Path, typer.Argument(help="Approval JSON signed at the hub.")],
        state: StateOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Verify and record an approval or rejection signed at the hub (`sre-hub escalations approve`)."""
        from policies.approvals import load_approval

        store, paths = _store(state, config)
        try:
            data = approval_file.read_bytes()
        except OSError as exc:
            raise InputError(f"read approval {approval_file}", str(exc), "check the path") from exc
        _print_decided(store.decide(load_approval(data), _roster(paths)), json_out)
