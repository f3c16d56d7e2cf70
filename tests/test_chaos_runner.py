"""The guarded runner end to end: real child processes, real chaoslib, real faults, real cleanup."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos.faults import FaultRegistry
from chaos.runner import Verdict, judge, learned_gates, recover, run_experiment_guarded
from sre_core.audit import AuditLog
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink

pytestmark = pytest.mark.xdist_group("chaos_runner")


def _exists_probe(name: str, path: Path, expect: bool) -> dict[str, Any]:
    return {
        "type": "probe",
        "name": name,
        "tolerance": expect,
        "provider": {
            "type": "python",
            "module": "os.path",
            "func": "exists",
            "arguments": {"path": str(path)},
        },
    }


def _action(name: str, func: str, module: str = "chaos.actions", **args: Any) -> dict[str, Any]:
    return {
        "type": "action",
        "name": name,
        "provider": {"type": "python", "module": module, "func": func, "arguments": args},
    }


def _experiment(title: str, probes: list[dict[str, Any]], method: list[dict[str, Any]], rollbacks=()) -> dict:
    return {
        "version": "1.0.0",
        "title": title,
        "description": "test",
        "steady-state-hypothesis": {"title": "steady", "probes": probes},
        "method": method,
        "rollbacks": list(rollbacks),
    }


def _skew_file(state: StatePaths) -> Path:
    return state.root / "run" / "chaos" / "clock_skew.json"


def _ballast(state: StatePaths) -> Path:
    return state.root / "run" / "chaos" / "fill.bin"


def _no_faults_left(state: StatePaths) -> None:
    assert FaultRegistry(state.root).list() == []
    assert not _skew_file(state).exists()
    assert not _ballast(state).exists()
    assert not (state.run / "chaos.lease").exists()


# --- pure decisions -----------------------------------------------------------------------------------


def test_judge_maps_every_outcome() -> None:
    assert judge({"status": "completed", "deviated": False}, budget_hit=False)[0] is Verdict.PASSED
    dev = {"status": "completed", "deviated": True, "steady_states": {"after": {"probes": []}}}
    assert judge(dev, budget_hit=False)[0] is Verdict.DEVIATED
    assert judge({"status": "failed"}, budget_hit=False)[0] is Verdict.ABORTED
    assert judge({"status": "aborted"}, budget_hit=False)[0] is Verdict.ABORTED
    assert judge({"status": "interrupted"}, budget_hit=False)[0] is Verdict.INTERRUPTED
    assert judge(None, budget_hit=False, exit_code=3)[0] is Verdict.ERROR
    assert judge({"status": "completed"}, budget_hit=True)[0] is Verdict.INTERRUPTED
    assert judge({"status": "completed"}, budget_hit=False, trip={"reasons": ["x"]})[0] is Verdict.INTERRUPTED
    assert judge({"status": "completed"}, budget_hit=False, armed=False)[0] is Verdict.ERROR


def test_learned_gates_only_for_deviations_and_valid_for_verification() -> None:
    from verification.gates import GateDefinition

    journal = {
        "status": "completed",
        "deviated": True,
        "steady_states": {
            "after": {"probes": [{"tolerance_met": False, "activity": {"name": "standby-ok"}}]}
        },
        "run": [{"activity": {"type": "action", "provider": {"func": "corrupt_standby_slot"}}}],
    }
    gates = learned_gates(
        journal, "r1", "sha256:" + "ab" * 32, "Standby Corruption!", "2026-01-01T00:00:00+00:00"
    )
    assert [g["check"] for g in gates] == ["integrity.slots"]
    gd = GateDefinition.model_validate(dict(gates[0]))
    assert gd.source == "chaos" and "standby-ok" in gd.reason
    assert learned_gates({**journal, "deviated": False}, "r1", "sha256:00", "t", "2026-01-01") == []


# --- real runs ------------------------------------------------------------------------------------------


def test_passing_run_with_uplink_toxic_is_journaled_audited_and_clean(state: StatePaths) -> None:
    # the uplink goes through a proxy; latency on it is tolerated (the state dir stays there)
    sink = MemorySink()
    audit = AuditLog(state.audit_log)
    exp = _experiment(
        "uplink latency is tolerated",
        [_exists_probe("state-present", state.root, True)],
        [
            _action("lag", "slow_uplink", latency_ms=50, jitter_ms=5),
            _action("check", "uplink_toxics", module="chaos.probes") | {"type": "probe"},
        ],
        [_action("restore", "restore_uplink")],
    )
    res = run_experiment_guarded(
        exp,
        state=state,
        budget_s=60,
        configuration={"uplink_upstream": "127.0.0.1:9"},
        telemetry=sink,
        audit=audit,
    )
    assert res.verdict is Verdict.PASSED, res.reasons
    assert res.journal is not None and res.journal["status"] == "completed"
    runs = {r["activity"]["name"]: r for r in res.journal["run"]}
    assert runs["lag"]["status"] == "succeeded"
    assert [t["type"] for t in runs["check"]["output"]] == ["latency"]
    _no_faults_left(state)
    assert res.cleanup.ok
    assert [t for t, _ in sink.records] == ["chaos_journals"]
    row = sink.records[0][1]
    assert row["verdict"] == "passed" and row["journal"]["status"] == "completed"
    events = [r.event for r in audit.records()]
    assert events == ["chaos.run.started", "chaos.run.finished"]
    assert audit.verify() == (2, None)


def test_deviated_run_becomes_learned_gate_and_is_rolled_back(state: StatePaths) -> None:
    exp = _experiment(
        "agent tolerates clock skew",
        [_exists_probe("no-skew", _skew_file(state), False)],
        [_action("skew", "skew_agent_clock", offset_s=7200, duration_s=60)],
    )
    res = run_experiment_guarded(exp, state=state, budget_s=60)
    assert res.verdict is Verdict.DEVIATED
    assert [g["check"] for g in res.gates] == ["trust.clock"]
    from verification.gates import GateStore

    gates, problems = GateStore(state.root / "gates").list()
    assert problems == [] and [g.name for g in gates] == [res.gates[0]["name"]]
    _no_faults_left(state)
    # an unsanctioned deviated run produces no gate
    other = run_experiment_guarded({**exp, "title": "other"}, state=state, budget_s=60, sanctioned=False)
    assert other.verdict is Verdict.DEVIATED and other.gates == []


def test_budget_exceeded_run_is_interrupted_and_leaves_no_fault(state: StatePaths) -> None:
    """A method that hangs: SIGUSR1 at the budget; faults (with no rollback declared) are undone anyway."""
    exp = _experiment(
        "hangs",
        [_exists_probe("state-present", state.root, True)],
        [
            _action("skew", "skew_agent_clock", offset_s=60, duration_s=600),
            _action("fill", "fill_disk", reserve_mb=0, max_mb=2),
            _action("hang", "fill_disk", reserve_mb=0, max_mb=1) | {"pauses": {"after": 120}},
        ],
    )
    res = run_experiment_guarded(exp, state=state, budget_s=4, grace_s=(5, 2))
    assert res.verdict is Verdict.INTERRUPTED
    assert res.signals[0] == "SIGUSR1"
    assert any("budget" in r for r in res.reasons)
    assert sorted(res.cleanup.cleared) and res.cleanup.ok
    _no_faults_left(state)


def test_child_deaf_to_signals_is_killed_and_cleaned(state: StatePaths, tmp_path: Path, monkeypatch) -> None:
    """An activity that blocks SIGUSR1/SIGUSR2: the runner escalates to SIGKILL; cleanup still runs."""
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "stubborn.py").write_text(
        textwrap.dedent(
            """
            import signal, time
            def deaf_sleep(secs):
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM})
                time.sleep(secs)
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(mod))
    exp = _experiment(
        "deaf",
        [_exists_probe("state-present", state.root, True)],
        [
            _action("skew", "skew_agent_clock", offset_s=60, duration_s=600),
            _action("deaf", "deaf_sleep", module="stubborn", secs=120),
        ],
    )
    res = run_experiment_guarded(exp, state=state, budget_s=3, grace_s=(1, 1))
    assert res.signals == ["SIGUSR1", "SIGUSR2", "SIGKILL"]
    assert res.verdict is Verdict.INTERRUPTED and res.journal is None
    _no_faults_left(state)


class _Health:
    """A v2 health endpoint that turns unready while the clock-skew fault file exists."""

    def __init__(self, flag: Path) -> None:
        flag_path = flag

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path == "/v2/health/ready" and not flag_path.exists()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def health(state: StatePaths) -> Iterator[_Health]:
    h = _Health(_skew_file(state))
    yield h
    h.close()


def test_guardrail_interrupts_mid_activity_and_rollbacks_run(state: StatePaths, health: _Health) -> None:
    exp = _experiment(
        "skew breaks serving",
        [_exists_probe("state-present", state.root, True)],
        [
            _action("skew", "skew_agent_clock", offset_s=60, duration_s=600),
            _action("long", "fill_disk", reserve_mb=0, max_mb=1) | {"pauses": {"after": 60}},
        ],
        [_action("mark", "clear_faults")],
    )
    res = run_experiment_guarded(exp, state=state, budget_s=90, serving_url=health.url, guard_interval_s=0.2)
    assert res.verdict is Verdict.INTERRUPTED
    assert res.signals == [], "the guardrail, not the budget, stopped it"
    assert any("serving not ready" in r for r in res.reasons)
    assert res.journal is not None and res.journal["status"] == "interrupted"
    assert [r["activity"]["name"] for r in res.journal["rollbacks"]] == ["mark"]
    assert res.journal["rollbacks"][0]["output"]["cleared"], "the rollback undid the skew"
    _no_faults_left(state)


def test_guardrail_is_fail_closed(state: StatePaths) -> None:
    """A serving URL nobody answers: the guardrail trips before anything is injected."""
    exp = _experiment(
        "never starts",
        [_exists_probe("state-present", state.root, True)],
        [_action("skew", "skew_agent_clock", offset_s=60, duration_s=600)],
    )
    res = run_experiment_guarded(exp, state=state, budget_s=60, serving_url="http://127.0.0.1:9")
    assert res.verdict is Verdict.INTERRUPTED
    assert res.journal is not None and res.journal["run"] == []
    assert res.cleanup.cleared == []
    _no_faults_left(state)


@pytest.mark.slow
def test_dead_mans_switch_clears_faults_when_agent_dies(state: StatePaths, tmp_path: Path) -> None:
    exp = _experiment(
        "agent dies",
        [_exists_probe("state-present", state.root, True)],
        [
            _action("hang", "fill_disk", reserve_mb=0, max_mb=1) | {"pauses": {"after": 120}},
        ],
    )
    (tmp_path / "exp.json").write_text(json.dumps(exp))
    script = (
        "import sys; from chaos.runner import run_experiment_guarded; from sre_core.paths import StatePaths;"
        f"run_experiment_guarded({str(tmp_path / 'exp.json')!r}, state=StatePaths({str(state.root)!r}),"
        " budget_s=300)"
    )
    agent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not FaultRegistry(state.root).list():
            time.sleep(0.1)
        assert [f.kind for f in FaultRegistry(state.root).list()] == ["disk_fill"]
        assert _ballast(state).exists()
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (state.run / "chaos.lease").exists():
            time.sleep(0.1)
        _no_faults_left(state)
        audit = AuditLog(state.audit_log)
        reports = recover(state, audit)
        assert len(reports) == 1 and "agent pid" in reports[0]["why"]
        import psutil

        child = reports[0]["lease"]["child_pid"]
        assert child and (not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie")
        assert [r.event for r in audit.records()] == ["chaos.deadman"]
    finally:
        if agent.poll() is None:
            agent.kill()


def test_stale_lease_recovered_on_start(state: StatePaths) -> None:
    """Power cut: agent and watchdog both gone; the next start undoes the faults."""
    from chaos import actions

    cfg = {"state_dir": str(state.root)}
    actions.skew_agent_clock(30, 600, configuration=cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (state.run / "chaos.lease").write_text(
        json.dumps({"run_id": "old", "state_dir": str(state.root), "agent_pid": dead.pid, "child_pid": None})
    )
    reports = recover(state)
    assert [r["run_id"] for r in reports] == ["old", "old"]  # fired now + its report
    _no_faults_left(state)


def test_examples_style_experiment_runs_under_plain_chaos_cli(state: StatePaths, tmp_path: Path) -> None:
    """Our extension works under the stock `chaos run` command (no runner)."""
    exp = _experiment(
        "plain chaos run",
        [_exists_probe("no-skew", _skew_file(state), False)],
        [
            _action("skew", "skew_agent_clock", offset_s=60, duration_s=60),
            _action("fill", "fill_disk", reserve_mb=0, max_mb=1),
        ],
        [_action("undo", "clear_faults")],
    )
    exp["configuration"] = {"state_dir": str(state.root)}
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(exp))
    chaos = Path(sys.executable).parent / "chaos"
    proc = subprocess.run(
        [
            str(chaos),
            "--no-version-check",
            "run",
            "--rollback-strategy",
            "always",
            "--journal-path",
            str(tmp_path / "journal.json"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    journal = json.loads((tmp_path / "journal.json").read_text())
    assert journal["status"] == "completed" and journal["deviated"] is True, proc.stderr[-2000:]
    assert [r["status"] for r in journal["run"]] == ["succeeded", "succeeded"]
    assert journal["rollbacks"][0]["output"]["ok"] is True
    _no_faults_left(state)


def test_one_run_at_a_time_and_stop_request(state: StatePaths) -> None:
    """A second run is refused while one holds the device; a stop request interrupts the first."""
    from chaos.runner import ChaosBusyError

    exp = _experiment(
        "long",
        [_exists_probe("state-present", state.root, True)],
        [_action("hang", "fill_disk", reserve_mb=0, max_mb=1) | {"pauses": {"after": 120}}],
    )
    stop = threading.Event()
    out: list[Any] = []
    t = threading.Thread(
        target=lambda: out.append(run_experiment_guarded(exp, state=state, budget_s=120, stop=stop))
    )
    t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not FaultRegistry(state.root).list():
            time.sleep(0.05)
        with pytest.raises(ChaosBusyError):
            run_experiment_guarded(exp, state=state, budget_s=10)
    finally:
        stop.set()
        t.join(60)
    (res,) = out
    assert res.verdict is Verdict.INTERRUPTED and "a stop was requested" in res.reasons
    assert res.signals[0] == "SIGUSR1"
    _no_faults_left(state)


def test_cleanup_sweeps_side_files_even_when_registry_is_lost(state: StatePaths) -> None:
    from chaos import actions
    from chaos.watchdog import cleanup

    cfg = {"state_dir": str(state.root)}
    actions.skew_agent_clock(30, 600, configuration=cfg)
    actions.fill_disk(reserve_mb=0, max_mb=1, configuration=cfg)
    (state.run / "faults.json").write_text("{not json")  # registry lost (torn, edited...)
    report = cleanup(state.root, None)
    assert sorted(n for n in report.notes if n.startswith("swept")) == [
        "swept unregistered clock_skew.json",
        "swept unregistered fill.bin",
    ]
    assert (state.run / "faults.corrupt").exists(), "the unreadable registry is kept for a human"
    _no_faults_left(state)


def test_guardrail_decision_is_fail_closed() -> None:
    from chaos.controls import GuardLimits, Guardrail, Readings

    g = Guardrail(GuardLimits(max_error_rate=0.05, max_p95_ms=100, max_uplink_backlog=10, disk_reserve_mb=50))
    assert (
        g.breaches(Readings(ready=True, p95_ms=50, error_rate=0.0, uplink_backlog=3, free_disk_mb=80)) == []
    )
    assert g.breaches(Readings()) == [], "nothing configured to read: nothing to breach"
    tripped = g.breaches(
        Readings(
            ready=False, p95_ms=150, error_rate=0.2, uplink_backlog=11, free_disk_mb=10, stop_requested=True
        )
    )
    assert len(tripped) == 6
    assert g.breaches(Readings(errors=["serving: ConnectError"])) == ["probe failed: serving: ConnectError"]
    assert Guardrail(GuardLimits(max_p95_ms=None)).breaches(Readings(p95_ms=1e9)) == []
