"""End to end: a real device state (ONNX models installed into A/B slots by ``deployment.slots``), the
real ``sre-agent verify`` / ``sre-agent gates`` commands in child processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import yaml

from policies.verification import load_verification_policy
from sre_core.clock import FakeClock
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from verification import Harness, Status
from verification.adapters import build_context, read_clock_floor
from verification.samples import install_sample_module

Run = Callable[..., Any]


def _policy_file(tmp_path: Path) -> Path:
    """The default policy with CPU load out of the picture (the CI machine is shared and busy)."""
    doc = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "policies/defaults/verification.yaml").read_text()
    )
    doc["reserves"]["max_load_per_cpu"] = 1000.0
    doc["reserves"]["min_available_memory_mb"] = 1
    doc["reserves"]["min_free_disk_mb"] = 1
    doc["reserves"]["min_free_disk_pct"] = 0
    path = tmp_path / "verification.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_harness_on_a_real_slot_state(state: StatePaths, clock: FakeClock) -> None:
    sample = install_sample_module(state, clock)
    policy = load_verification_policy()
    ctx = build_context(
        state,
        policy,
        clock=clock,
        input_samples={"classifier": {"input": sample.baseline[:1000]}},
    )
    assert {(s.role, s.version) for s in ctx.slots} == {("active", "1.1.0"), ("standby", "1.0.0")}
    results = {r.check: r for r in Harness(policy, sink=MemorySink()).run_once(ctx)}
    for name in ("model.golden", "integrity.slots", "integrity.audit_chain", "rollback.readiness"):
        assert results[name].status is Status.PASS, (name, results[name].summary)
    assert results["drift.inputs"].status is Status.PASS

    shifted = sample.baseline[:1000] + np.float32(2.0)
    drifted = build_context(state, policy, clock=clock, input_samples={"classifier": {"input": shifted}})
    assert Harness(policy).run_once(drifted, only="drift.inputs")[0].status is Status.FAIL


def test_read_clock_floor(tmp_path: Path) -> None:
    f = tmp_path / "clock.json"
    f.write_text(json.dumps({"high_water": "2026-05-01T00:00:00+00:00", "source": "timestamp.json"}))
    floor = read_clock_floor(f)
    assert floor is not None and floor.isoformat() == "2026-05-01T00:00:00+00:00"
    f.write_text("{torn")
    assert read_clock_floor(f) is None


def test_cli_verify_once_then_a_corrupted_standby(
    state: StatePaths, clock: FakeClock, tmp_path: Path, run_cli: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    install_sample_module(state, clock)
    policy = _policy_file(tmp_path)
    args = ["verify", "--state", str(state.root), "--policy", str(policy), "--once"]
    ok = run_cli("sre-agent", *args, "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    doc = json.loads(ok.stdout)
    statuses = {r["check"]: r["status"] for r in doc["results"]}
    assert statuses["rollback.readiness"] == "pass" and statuses["model.golden"] == "pass"
    assert doc["ok"] is True
    con = duckdb.connect(str(state.telemetry_db), read_only=True)
    try:
        stored = [json.loads(b) for (b,) in con.execute("SELECT body FROM verification_results").fetchall()]
    finally:
        con.close()
    assert sorted(r["check"] for r in stored) == sorted(statuses)

    status = json.loads((state.module("classifier") / "state.json").read_text())
    standby = state.module("classifier") / ("a" if status["active"] == "b" else "b") / "model.onnx"
    standby.write_bytes(standby.read_bytes()[: standby.stat().st_size // 2])  # a torn copy

    bad = run_cli("sre-agent", *args)
    assert bad.returncode == 1
    assert "integrity.slots" in bad.stdout and "rollback.readiness" in bad.stdout
    one = run_cli("sre-agent", *args, "--check", "rollback.readiness", "--json")
    assert one.returncode == 1
    only = json.loads(one.stdout)["results"]
    assert [r["check"] for r in only] == ["rollback.readiness"]
    assert "not intact" in only[0]["evidence"]["classifier"]["reason"]
    con = duckdb.connect(str(state.telemetry_db), read_only=True)
    try:
        incidents = [
            json.loads(a)
            for (a,) in con.execute("SELECT attrs FROM events WHERE kind = 'incident'").fetchall()
        ]
    finally:
        con.close()
    assert {"integrity.slots", "rollback.readiness"} <= {i["check"] for i in incidents}
    assert all(i["modules"] == ["classifier"] for i in incidents if i["check"] == "rollback.readiness")

    from sre_agent.cli import main

    assert main([*args, "--check", "no.such.check"]) == 2
    assert "no such check" in capsys.readouterr().err


def test_cli_gates(
    state: StatePaths, tmp_path: Path, run_cli: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    from sre_agent.cli import main

    root = str(state.root)
    added = run_cli(
        "sre-agent", "gates", "add", "mem-floor", "--check", "resources.headroom",
        "--measurement", "memory_available_mb", "--op", ">=", "--threshold", "1e12",
        "--reason", "OOM during the memory-pressure experiment", "--state", root,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    # A condition missing its threshold is bad input: exit 2, nothing written.
    assert main(["gates", "add", "half", "--check", "resources.headroom", "--op", "<", "--state", root]) == 2
    capsys.readouterr()
    assert main(["gates", "list", "--state", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in listed["gates"]] == ["mem-floor"]
    assert listed["gates"][0]["reason"] == "OOM during the memory-pressure experiment"

    policy = _policy_file(tmp_path)
    res = run_cli(
        "sre-agent", "verify", "--state", root, "--policy", str(policy), "--once",
        "--check", "gate.mem-floor", "--json",
    )  # fmt: skip
    assert res.returncode == 1
    assert json.loads(res.stdout)["results"][0]["status"] == "fail"

    assert main(["gates", "remove", "mem-floor", "--state", root]) == 0
    assert main(["gates", "remove", "mem-floor", "--state", root]) == 2
    audit = [json.loads(line)["event"] for line in state.audit_log.read_text().splitlines()]
    assert audit == ["gate.added", "gate.removed"]


def test_the_daemon_service_runs_every_check_on_a_real_device(state: StatePaths, clock: FakeClock) -> None:
    import time

    from policies.verification import ScheduleDefaults
    from sre_core.clock import SystemClock
    from verification import SampleRecorder
    from verification.scheduler import build_service

    sample = install_sample_module(state, clock)
    recorder = SampleRecorder()
    recorder.observe("classifier", {"input": sample.baseline[:400]})
    policy = load_verification_policy().model_copy(update={"defaults": ScheduleDefaults(jitter_s=0)})
    policy = policy.model_copy(
        update={"checks": {k: v.model_copy(update={"jitter_s": 0}) for k, v in policy.checks.items()}}
    )
    sink = MemorySink()
    service = build_service(state, SystemClock(), sink, policy=policy, recorder=recorder)
    service.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len({r["check"] for _, r in sink.records}) < len(policy.checks):
            time.sleep(0.1)
    finally:
        service.stop()
    by = {r["check"]: r for _, r in sink.records}
    assert set(by) == set(policy.checks)
    assert by["drift.inputs"]["status"] == "pass"
    assert by["rollback.readiness"]["status"] == "pass"


def test_cli_verify_list_shows_the_schedule(state: StatePaths, capsys: pytest.CaptureFixture[str]) -> None:
    from sre_agent.cli import main
    from verification import GateDefinition, GateStore

    GateStore(state.root / "gates").add(GateDefinition(name="audit-ok", check="integrity.audit_chain"))
    assert main(["verify", "--state", str(state.root), "--list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["check"]: r for r in doc["checks"]}
    assert rows["resources.headroom"]["interval_s"] == 60 and rows["resources.headroom"]["jitter_s"] == 10
    assert rows["model.golden"]["source"] == "builtin" and rows["gate.audit-ok"]["source"] == "gate"
    assert doc["problems"] == []
