"""Red team of escalation approvals through the public CLIs (`sre-agent escalations`, `sre-hub escalations`).

How each promise was attacked (issue 15, "approvals exact"):

- *More severe than proposed*: an escalation proposes a mild action but allows harsher ones; the operator
  names a harsher allowed action at the device, at the hub, or signs one with their own tooling and
  carries it to the device. It must be refused with a clear message and an audit record, and never run.
- *Executed once*: after an approved escalation ran, its file's ``status`` (and ``approval``) are edited on
  disk back to ``approved``/``open``; the device must not run it again, must refuse a new approval for it,
  and the hub must not sign one (neither from the device's file nor from a stale lake row).
- *Expired*: the hub must not sign for an escalation past its expiry.
- *What operators read*: escalation text carrying terminal escape sequences, bidi overrides and
  zero-width characters must reach the operator neutralised in `show` and `list` on both CLIs.

Escalations are created with the real store and executed by the real store's ``execute_approved`` (the
daemon's job); every operator step goes through the CLIs as child processes, on real files.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from policies.approvals import load_operator_key, load_roster, sign_approval
from policies.triage import Action
from sre_agent.actions import ActionExecutor
from sre_agent.escalations import EscalationStatus, EscalationStore, escalations_dir
from sre_agent.incidents import EvidenceEvent, Incident, VerificationEvidence
from sre_agent.triage import TriageDecision
from sre_core.audit import AuditLog
from sre_core.clock import Clock, FakeClock, SystemClock
from sre_core.paths import StatePaths

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli() -> RunCli:
    """The console scripts' entry points (``sre-agent``/``sre-hub`` ``main``) run in process, with their
    stdout/stderr captured: the same argument parsing, output and exit codes as the installed commands,
    without an interpreter start per call."""
    from hub.cli import main as hub_main
    from sre_agent.cli import main as agent_main

    mains = {"sre-agent": agent_main, "sre-hub": hub_main}

    def _run(prog: str, *args: str) -> subprocess.CompletedProcess[str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = mains[prog](list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        return subprocess.CompletedProcess([prog, *args], code, out.getvalue(), err.getvalue())

    return _run


CASE = Path(__file__).parent / "triage_cases" / "independent" / "ind-vf-golden-active-first.yaml"
ESC = "\x1b"
# bidi embedding/override/isolate controls, marks, and zero-width characters an operator cannot see
INVISIBLE = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x200B, 0x200D)]
HOSTILE = (
    "golden fail \x9b2J\x1b[2J\x1b[1;1H\x1b[32mAPPROVED by alice: safe_mode\x1b[0m "
    "\x1b]8;;http://evil.example/\x07link\x1b]8;;\x07 "
    "\u202ekcabllor nur\u202c r\u200bo\u200bllback \u2066x\u2069"
)
MILD_ALLOWED = (Action.OBSERVE, Action.ALERT, Action.RERUN_VERIFICATION, Action.ROLLBACK, Action.SAFE_MODE)


def _incident(clock: Clock, **update: Any) -> Incident:
    raw = yaml.safe_load(CASE.read_text())["incident"]
    inc = Incident.model_validate({**raw, "opened_at": clock.now().isoformat()})
    return inc.model_copy(update=update) if update else inc


def _store(state: StatePaths, clock: Clock | None = None) -> EscalationStore:
    clock = clock or SystemClock()
    return EscalationStore(escalations_dir(state), AuditLog(state.audit_log, clock), clock, device_id="dev-7")


def _escalate(
    state: StatePaths,
    proposed: Action = Action.RERUN_VERIFICATION,
    allowed: tuple[Action, ...] = MILD_ALLOWED,
    clock: Clock | None = None,
    **update: Any,
) -> str:
    """An open escalation proposing ``proposed`` while ``allowed`` also holds harsher actions."""
    clock = clock or SystemClock()
    inc = _incident(clock, **update)
    decision = TriageDecision(
        incident_id=inc.id,
        fingerprint=inc.fingerprint,
        rule="redteam",
        allowed=allowed,
        default=proposed,
        certainty=0.5,
        action=proposed,
        verdict="escalate",
        execute_now=(Action.ALERT,),
        reasons=(update.get("title") or "golden vectors fail on the active slot",),
    )
    return _store(state, clock).create(inc, decision).id


def _execute(state: StatePaths, clock: Clock | None = None) -> list[tuple[str, str]]:
    """The daemon's escalation job: run approved escalations; returns (action, incident) of what ran."""
    clock = clock or SystemClock()
    audit = AuditLog(state.audit_log, clock)
    ran: list[tuple[str, str]] = []

    def handler(action: Action) -> Callable[[Incident], str]:
        return lambda inc: ran.append((action.value, inc.id)) or f"{action.value} done"

    executor = ActionExecutor({a: handler(a) for a in Action}, audit=audit)
    _store(state, clock).execute_approved(executor, load_roster(state.policies / "operators.yaml"))
    return ran


def _esc_file(state: StatePaths, esc_id: str) -> Path:
    return escalations_dir(state) / f"{esc_id}.json"


def _edit(state: StatePaths, esc_id: str, **fields: Any) -> None:
    """What an attacker with write access to the state directory does: edit the status fields only."""
    path = _esc_file(state, esc_id)
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


def _events(path: Path) -> list[str]:
    return [r.event for r in AuditLog(path).records()] if path.exists() else []


@pytest.fixture
def world(tmp_path: Path, state: StatePaths, cli: RunCli) -> dict[str, Path]:
    keys = tmp_path / "keys"
    r = cli("sre-hub", "operators", "keygen", "--operator", "alice", "--out", str(keys), "--json")
    assert r.returncode == 0, r.stderr
    roster = {"version": 1, "max_ttl_s": 7200, "operators": [json.loads(r.stdout)["entry"]]}
    (state.policies / "operators.yaml").write_text(yaml.safe_dump(roster))
    repo = tmp_path / "hub"
    (repo / "policies").mkdir(parents=True)
    (repo / "policies" / "operators.yaml").write_text(yaml.safe_dump(roster))
    return {"key": keys / "alice.key.pem", "repo": repo}


def _device_approve(cli: RunCli, state: StatePaths, key: Path, esc_id: str, *extra: str) -> Any:
    return cli(
        "sre-agent", "escalations", "approve", esc_id, "--state", str(state.root),
        "--key", str(key), "--operator", "alice", *extra,
    )  # fmt: skip


def _hub_approve(cli: RunCli, repo: Path, key: Path, esc_id: str, *extra: str) -> Any:
    return cli(
        "sre-hub", "escalations", "approve", esc_id, "--repo", str(repo),
        "--key", str(key), "--operator", "alice", "--json", *extra,
    )  # fmt: skip


def _hub_approval_files(repo: Path) -> list[Path]:
    d = repo / "escalations" / "approvals"
    return sorted(d.glob("*")) if d.exists() else []


# --------------------------------------------------------------------------------------------------
# an approval may name the proposed action or a milder allowed one, never a more severe one


@pytest.mark.parametrize("harsher", ["rollback", "safe_mode"])
def test_device_refuses_an_approval_more_severe_than_proposed(world, state, cli, harsher):
    esc = _escalate(state)
    r = _device_approve(cli, state, world["key"], esc, "--action", harsher)
    assert r.returncode == 2, r.stdout
    assert "severe" in r.stderr or "milder" in r.stderr, r.stderr
    assert _store(state).get(esc).status == EscalationStatus.OPEN
    assert "escalation.approval_refused" in _events(state.audit_log)
    assert _execute(state) == []
    # the proposed action itself, or a milder allowed one, is fine and runs once
    r = _device_approve(cli, state, world["key"], esc, "--action", "alert")
    assert r.returncode == 0, r.stderr
    assert [a for a, _ in _execute(state)] == ["alert"]


def test_hub_refuses_an_approval_more_severe_than_proposed_and_audits_it(world, state, cli):
    esc = _escalate(state)
    repo = world["repo"]
    r = _hub_approve(
        cli, repo, world["key"], esc, "--action", "safe_mode", "--from", str(escalations_dir(state))
    )
    assert r.returncode == 2, r.stdout
    assert "severe" in r.stdout + r.stderr or "milder" in r.stdout + r.stderr, r.stdout
    assert _hub_approval_files(repo) == []
    hub_events = _events(repo / "escalations" / "audit.jsonl")
    assert any("refused" in e for e in hub_events), hub_events


def test_a_signed_more_severe_approval_carried_to_the_device_never_runs(world, state, cli, tmp_path):
    """The operator bypasses both CLIs' checks with their own signing tool; the device must still refuse."""
    esc_id = _escalate(state)
    esc = _store(state).get(esc_id)
    approval = sign_approval(
        load_operator_key(world["key"]),
        operator="alice",
        escalation_id=esc_id,
        escalation_hash=esc.content_hash,
        decision="approve",
        action="safe_mode",
        now=datetime.now(tz=UTC),
        ttl=timedelta(minutes=30),
    )
    path = tmp_path / "approval.json"
    path.write_text(approval.model_dump_json())
    r = cli("sre-agent", "escalations", "apply", str(path), "--state", str(state.root))
    assert r.returncode == 2, r.stdout
    assert _store(state).get(esc_id).status == EscalationStatus.OPEN
    assert "escalation.approval_refused" in _events(state.audit_log)
    # planted straight into the escalation file: the executor verifies again before acting
    _edit(state, esc_id, status="approved", approval=json.loads(approval.model_dump_json()))
    assert _execute(state) == []


# --------------------------------------------------------------------------------------------------
# executed once: enforced by a record the device can verify, not by the status field


def _approve_and_execute(world: dict[str, Path], state: StatePaths, cli: RunCli) -> str:
    esc = _escalate(state)
    r = _device_approve(cli, state, world["key"], esc)
    assert r.returncode == 0, r.stderr
    ran = _execute(state)
    assert [a for a, _ in ran] == ["rerun_verification"]
    assert _store(state).get(esc).status == EscalationStatus.EXECUTED
    return esc


def test_replay_after_editing_the_status_field_back_to_approved_does_not_run_again(world, state, cli):
    esc = _approve_and_execute(world, state, cli)
    _edit(state, esc, status="approved")
    assert _execute(state) == []
    _edit(state, esc, status="approved", result=None)
    assert _execute(state) == []


def test_an_executed_escalation_edited_back_to_open_cannot_be_approved_again(world, state, cli):
    esc = _approve_and_execute(world, state, cli)
    _edit(state, esc, status="open", approval=None, result=None)
    r = _device_approve(cli, state, world["key"], esc)
    assert r.returncode == 2, r.stdout
    assert "execut" in r.stderr, r.stderr
    assert _execute(state) == []


def test_a_hub_approval_for_an_executed_escalation_is_refused_at_the_device(world, state, cli, tmp_path):
    """The hub is shown an old copy (status open); the device's own record says it ran."""
    esc = _escalate(state)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / f"{esc}.json").write_text(_esc_file(state, esc).read_text())
    assert _device_approve(cli, state, world["key"], esc).returncode == 0
    assert len(_execute(state)) == 1
    r = _hub_approve(cli, world["repo"], world["key"], esc, "--from", str(stale))
    assert r.returncode == 0, r.stderr  # the hub could not know from this copy
    path = Path(json.loads(r.stdout)["path"])
    _edit(state, esc, status="open", approval=None, result=None)
    r = cli("sre-agent", "escalations", "apply", str(path), "--state", str(state.root))
    assert r.returncode == 2, r.stdout
    assert _execute(state) == []


def test_hub_refuses_to_sign_for_an_executed_escalation(world, state, cli):
    esc = _approve_and_execute(world, state, cli)
    r = _hub_approve(cli, world["repo"], world["key"], esc, "--from", str(escalations_dir(state)))
    assert r.returncode == 2, r.stdout
    assert "execut" in r.stdout + r.stderr, r.stdout
    assert _hub_approval_files(world["repo"]) == []


@pytest.mark.parametrize("clock_stepped_back", [False, True])
def test_hub_refuses_to_sign_when_the_lake_holds_a_later_executed_row(world, state, cli, clock_stepped_back):
    """The uplink lands the open row first, the executed row later: the hub must go by what happened, also
    when the device's clock stepped back between the two rows (an executed escalation never reopens)."""
    esc = _escalate(state)
    open_row = _store(state).get(esc).row()
    assert _device_approve(cli, state, world["key"], esc).returncode == 0
    assert len(_execute(state)) == 1
    done_row = _store(state).get(esc).row()
    lake = world["repo"] / "fleet" / "lake" / "table=escalations" / "date=2026-01-01"
    lake.mkdir(parents=True)
    now = datetime.now(tz=UTC)
    tbl = pa.table(
        {
            "seq": [1, 2],
            "ts": pa.array(
                [now, now - timedelta(hours=2)] if clock_stepped_back else [now - timedelta(minutes=5), now],
                pa.timestamp("us", tz="UTC"),
            ),
            "body": [json.dumps(open_row, default=str), json.dumps(done_row, default=str)],
            "device_id": ["dev-7", "dev-7"],
        }
    )
    pq.write_table(tbl, lake / ("0" * 40 + ".parquet"))
    r = _hub_approve(cli, world["repo"], world["key"], esc)
    assert r.returncode == 2, r.stdout
    assert _hub_approval_files(world["repo"]) == []


def test_hub_refuses_to_sign_for_an_expired_escalation(world, state, cli):
    old = FakeClock(datetime.now(tz=UTC) - timedelta(days=3))
    esc = _escalate(state, clock=old)
    r = _hub_approve(cli, world["repo"], world["key"], esc, "--from", str(escalations_dir(state)))
    assert r.returncode == 2, r.stdout
    assert "expire" in r.stdout + r.stderr, r.stdout
    assert _hub_approval_files(world["repo"]) == []
    # and the device does not take one either
    r = _device_approve(cli, state, world["key"], esc)
    assert r.returncode == 2, r.stdout
    assert _execute(state) == []


# --------------------------------------------------------------------------------------------------
# what an operator reads is neutralised


def _assert_neutral(text: str) -> None:
    assert ESC not in text, repr(text[:400])
    assert "\x07" not in text and "\x9b" not in text, repr(text[:400])
    bad = sorted({f"U+{ord(c):04X}" for c in text if c in INVISIBLE})
    assert not bad, bad


def _hostile(state: StatePaths) -> str:
    """Hostile text in every free-text field an escalation carries to an operator."""
    base = _incident(SystemClock())
    ev = base.evidence
    evidence = ev.model_copy(
        update={
            "logs": [HOSTILE],
            "events": [EvidenceEvent(ts="2026-01-01T00:00:00Z", kind="log" + HOSTILE[:40], message=HOSTILE)],
            "metrics": {"latency{" + HOSTILE[:60] + "}": 1.0},
            "verification": [VerificationEvidence(check="model.golden", passed=False, detail=HOSTILE)],
            "slot": ev.slot.model_copy(update={"active_version": "2.0.0" + HOSTILE[:40]}),
        }
    )
    return _escalate(
        state,
        title=HOSTILE[:200],
        version="2.0.0" + HOSTILE[:40],
        facts={**base.facts, "experiment": HOSTILE[:120]},
        evidence=evidence,
    )


@pytest.mark.parametrize("cmd", ["show", "list"])
def test_device_cli_neutralises_terminal_escapes_and_bidi(state, cli, cmd):
    esc = _hostile(state)
    args = [esc] if cmd == "show" else []
    r = cli("sre-agent", "escalations", cmd, *args, "--state", str(state.root))
    assert r.returncode == 0, r.stderr
    assert "golden fail" in r.stdout
    _assert_neutral(r.stdout)
    r = cli("sre-agent", "escalations", cmd, *args, "--state", str(state.root), "--json")
    assert r.returncode == 0, r.stderr
    assert ESC not in r.stdout and "\u202e" not in r.stdout


@pytest.mark.parametrize("cmd", ["show", "list"])
def test_hub_cli_neutralises_terminal_escapes_and_bidi(world, state, cli, cmd):
    esc = _hostile(state)
    args = [esc] if cmd == "show" else []
    r = cli(
        "sre-hub",
        "escalations",
        cmd,
        *args,
        "--repo",
        str(world["repo"]),
        "--from",
        str(escalations_dir(state)),
    )
    assert r.returncode == 0, r.stderr
    assert cmd == "list" or "golden fail" in r.stdout
    _assert_neutral(r.stdout)


def test_device_html_report_neutralises_escalation_text(state, cli, tmp_path):
    _hostile(state)
    out = tmp_path / "report.html"
    r = cli("sre-agent", "report", "--state", str(state.root), "--html", str(out))
    assert r.returncode == 0, r.stderr
    html = out.read_text(encoding="utf-8")
    assert "golden fail" in html
    _assert_neutral(html)


@pytest.mark.parametrize(
    "spelled", ["SAFE_MODE", " safe_mode", "safe_mode\u200b", "s\u0430fe_mode", "rollback\x1b[0m"]
)
def test_odd_spellings_of_a_harsher_action_are_refused(world, state, cli, spelled):
    esc = _escalate(state)
    r = _device_approve(cli, state, world["key"], esc, "--action", spelled)
    assert r.returncode == 2, r.stdout
    assert _store(state).get(esc).status == EscalationStatus.OPEN
    assert _execute(state) == []


def test_a_rejection_stays_final_after_editing_the_status_field(world, state, cli):
    esc = _escalate(state)
    r = cli(
        "sre-agent", "escalations", "reject", esc, "--state", str(state.root),
        "--key", str(world["key"]), "--operator", "alice",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    _edit(state, esc, status="open", approval=None)
    r = _device_approve(cli, state, world["key"], esc)
    assert r.returncode == 2, r.stdout
    assert _execute(state) == []


def test_operator_reason_and_device_id_are_neutralised_where_operators_read_them(world, state, cli):
    """An operator's --reason and a device id are text too: `show`/`list` on both sides neutralise them."""
    esc = _escalate(state)
    r = _device_approve(cli, state, world["key"], esc, "--action", "alert", "--reason", HOSTILE)
    assert r.returncode == 0, r.stderr
    r = cli("sre-agent", "escalations", "show", esc, "--state", str(state.root))
    assert r.returncode == 0, r.stderr
    _assert_neutral(r.stdout)
    row = _store(state).get(esc).row()
    lake = world["repo"] / "fleet" / "lake" / "table=escalations" / "date=2026-01-01"
    lake.mkdir(parents=True)
    hostile_device = "dev-7\x1b[2J\u202e"
    tbl = pa.table(
        {
            "seq": [1],
            "ts": pa.array([datetime.now(tz=UTC)], pa.timestamp("us", tz="UTC")),
            "body": [json.dumps({**row, "device_id": hostile_device}, default=str)],
            "device_id": [hostile_device],
        }
    )
    pq.write_table(tbl, lake / ("1" * 40 + ".parquet"))
    for cmd in (["list"], ["show", esc]):
        r = cli("sre-hub", "escalations", *cmd, "--repo", str(world["repo"]))
        assert r.returncode == 0, r.stderr
        _assert_neutral(r.stdout)


def test_hub_refuses_to_sign_for_a_rejected_escalation(world, state, cli):
    """A rejection is final: a hub that has the device's rejected row does not sign an approval."""
    esc = _escalate(state)
    r = cli(
        "sre-agent", "escalations", "reject", esc, "--state", str(state.root),
        "--key", str(world["key"]), "--operator", "alice",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _hub_approve(cli, world["repo"], world["key"], esc, "--from", str(escalations_dir(state)))
    assert r.returncode == 2, r.stdout
    assert _hub_approval_files(world["repo"]) == []


def test_an_approval_outliving_its_escalation_does_not_run_after_the_escalation_expired(world, state, cli):
    """Approved a minute before the escalation's expiry with an hour's TTL: past the escalation's expiry the
    device must not act on evidence that old, although the approval itself is still valid."""
    now = datetime.now(tz=UTC)
    esc = _escalate(state, clock=FakeClock(now - timedelta(hours=24) + timedelta(minutes=2)))
    r = _device_approve(cli, state, world["key"], esc, "--ttl", "3600")
    assert r.returncode == 0, r.stderr
    assert _execute(state, FakeClock(now + timedelta(minutes=10))) == []
    assert _store(state).get(esc).status != EscalationStatus.EXECUTED


def test_two_executors_at_once_run_an_approved_escalation_once(world, state, cli):
    """The daemon's job and a second process (or a restarted daemon) racing on the same escalation."""
    esc = _escalate(state)
    assert _device_approve(cli, state, world["key"], esc).returncode == 0
    barrier = threading.Barrier(4)
    results: list[list[tuple[str, str]]] = []

    def worker() -> None:
        barrier.wait()
        results.append(_execute(state))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(len(r) for r in results) == 1, results
    assert _execute(state) == []


def test_device_status_neutralises_escalation_text(state, cli):
    """`sre-agent status` lists escalations waiting for an operator: another place their text is read."""
    _escalate(state, title="golden fail \u202e\x1b[2J\x9b2J\x1b[32mAPPROVED: safe_mode\x1b[0m \u200b")
    r = cli("sre-agent", "status", "--state", str(state.root))
    assert r.returncode == 0, r.stderr
    assert "golden fail" in r.stdout
    _assert_neutral(r.stdout)


def test_hub_html_report_neutralises_escalation_text(world, state, cli, tmp_path):
    esc = _hostile(state)
    repo = tmp_path / "hubrepo"
    assert cli("sre-hub", "init", "--repo", str(repo)).returncode == 0
    lake = repo / "fleet" / "lake" / "table=escalations" / "date=2026-01-01"
    lake.mkdir(parents=True)
    tbl = pa.table(
        {
            "seq": [1],
            "ts": pa.array([datetime.now(tz=UTC)], pa.timestamp("us", tz="UTC")),
            "body": [json.dumps(_store(state).get(esc).row(), default=str)],
            "device_id": ["dev-7"],
        }
    )
    pq.write_table(tbl, lake / ("0" * 40 + ".parquet"))
    out = tmp_path / "fleet.html"
    r = cli("sre-hub", "report", "--repo", str(repo), "--html", str(out))
    assert r.returncode == 0, r.stderr
    html = out.read_text(encoding="utf-8")
    assert esc in html
    _assert_neutral(html)
