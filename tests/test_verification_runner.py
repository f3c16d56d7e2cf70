"""The runner's isolation, incidents and telemetry; the registry (built-ins, policy, entry points);
learned gates; the APScheduler schedule."""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import pytest

from policies.verification import CheckPolicy, ScheduleDefaults, VerificationPolicy, load_verification_policy
from sre_core.audit import AuditLog
from sre_core.clock import FakeClock, SystemClock
from sre_core.errors import InputError
from sre_core.paths import StatePaths
from sre_core.telemetry import MemorySink
from verification import (
    Check,
    CheckRegistry,
    CheckResult,
    CheckSpec,
    GateDefinition,
    GateStore,
    Harness,
    PlannedCheck,
    Runner,
    Severity,
    Status,
    VerificationContext,
)
from verification.scheduler import GATES_SYNC_JOB, VerificationScheduler


class Hangs(Check):
    name = "test.hangs"

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.starts = 0

    def run(self, ctx: VerificationContext) -> CheckResult:
        self.starts += 1
        self.release.wait(60)  # stuck until the test lets go
        return CheckResult.ok("released")


class Raises(Check):
    name = "test.raises"

    def run(self, ctx: VerificationContext) -> CheckResult:
        raise RuntimeError("sensor bus went away")


class Passes(Check):
    name = "test.passes"

    def __init__(self) -> None:
        self.runs = 0

    def run(self, ctx: VerificationContext) -> CheckResult:
        self.runs += 1
        return CheckResult.ok("fine", value=42.0)


class Flips(Check):
    """Fails while ``bad`` is set."""

    name = "test.flips"
    bad = True

    def run(self, ctx: VerificationContext) -> CheckResult:
        return CheckResult.fail("broken", {"why": "x"}) if self.bad else CheckResult.ok("fixed")


def _spec(name: str, timeout_s: float = 30.0, isolation: str = "thread") -> CheckSpec:
    return CheckSpec(
        name=name,
        interval_s=60,
        timeout_s=timeout_s,
        severity=Severity.CRITICAL,
        isolation=isolation,  # type: ignore[arg-type]
    )


class BusyLoop(Check):
    """Hangs holding a core: only a process boundary can stop it."""

    name = "test.busy"

    def run(self, ctx: VerificationContext) -> CheckResult:
        n = 0
        while True:
            n += 1


class DiesHard(Check):
    name = "test.dies"

    def run(self, ctx: VerificationContext) -> CheckResult:
        import os

        os._exit(3)


class WhereAmI(Check):
    name = "test.where"

    def run(self, ctx: VerificationContext) -> CheckResult:
        import os

        return CheckResult.ok(
            "ran", {"root": str(ctx.paths.root), "now": ctx.clock.now().isoformat()}, pid=os.getpid()
        )


@pytest.fixture
def ctx(state: StatePaths, clock: FakeClock) -> VerificationContext:
    return VerificationContext(paths=state, policy=load_verification_policy(), clock=clock)


def test_a_hanging_check_times_out_and_a_raising_one_is_reported_while_others_run(
    ctx: VerificationContext,
) -> None:
    release = threading.Event()
    hangs, passes = Hangs(release), Passes()
    sink = MemorySink()
    runner = Runner(sink=sink, clock=ctx.clock, max_parallel=2)
    planned = [
        PlannedCheck(hangs, _spec("test.hangs", timeout_s=0.5)),
        PlannedCheck(Raises(), _spec("test.raises")),
        PlannedCheck(passes, _spec("test.passes")),
    ]
    try:
        results = runner.run(ctx, planned)
        assert [r.check for r in results] == ["test.hangs", "test.raises", "test.passes"]
        hung, raised, ok = results
        assert hung.status is Status.TIMEOUT
        assert "release.wait" in hung.evidence["stack"]  # where it was stuck
        assert raised.status is Status.ERROR
        assert raised.traceback is not None and "sensor bus went away" in raised.traceback
        assert ok.status is Status.PASS and passes.runs == 1

        rows = [r for t, r in sink.records if t == "verification_results"]
        assert sorted(r["status"] for r in rows) == ["error", "pass", "timeout"]
        incidents = [e for e in sink.events if e[0] == "incident"]
        assert sorted(e[3]["check"] for e in incidents) == ["test.hangs", "test.raises"]
        raised_inc = next(e for e in incidents if e[3]["check"] == "test.raises")
        assert raised_inc[2] == "critical" and "sensor bus" in raised_inc[3]["traceback"]

        # While the hung run is still stuck, the check is not started again (one thread at most).
        again = runner.run(ctx, planned[:1])[0]
        assert again.status is Status.TIMEOUT and "still hung" in again.summary
        assert hangs.starts == 1
    finally:
        release.set()
    for _ in range(200):  # bounded: the released thread finishes quickly
        if runner.run(ctx, planned[:1])[0].status is Status.PASS:
            break
        time.sleep(0.05)
    assert hangs.starts == 2
    assert [e[0] for e in sink.events].count("incident_resolved") == 1


def test_incidents_are_raised_once_per_failure_episode_and_repeat_after_the_interval(
    ctx: VerificationContext,
) -> None:
    sink = MemorySink()
    runner = Runner(sink=sink, clock=ctx.clock, incident_repeat_s=3600)
    flips = Flips()
    item = PlannedCheck(flips, _spec("test.flips"))
    for _ in range(3):
        runner.run_one(ctx, item)
    incidents = [e for e in sink.events if e[0] == "incident"]
    assert len(incidents) == 1
    assert incidents[0][3]["evidence"] == {"why": "x"}
    assert incidents[0][3]["dedup_key"] == "verification:test.flips"
    assert incidents[0][3]["facts"] == {"check": "test.flips", "status": "fail", "category": "test"}
    flips.bad = False
    runner.run_one(ctx, item)
    flips.bad = True
    runner.run_one(ctx, item)
    kinds = [e[0] for e in sink.events]
    assert kinds == ["incident", "incident_resolved", "incident"]
    # With no repeat spacing, every failing run re-raises.
    eager = Runner(sink=(s2 := MemorySink()), clock=ctx.clock, incident_repeat_s=0)
    for _ in range(3):
        eager.run_one(ctx, item)
    assert [e[0] for e in s2.events].count("incident") == 3


def test_a_broken_telemetry_sink_does_not_break_the_run(ctx: VerificationContext) -> None:
    class Broken(MemorySink):
        def record(self, table: str, row: dict[str, object]) -> None:
            raise OSError("disk full")

    res = Runner(sink=Broken(), clock=ctx.clock).run_one(ctx, PlannedCheck(Passes(), _spec("test.passes")))
    assert res.status is Status.PASS


# -- registry -----------------------------------------------------------------------------------------


def _plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mod: str) -> None:
    """A real installed distribution (dist-info on sys.path) exposing checks through the entry points."""
    (tmp_path / f"{mod}.py").write_text(
        textwrap.dedent(
            """
            from verification import Check, CheckResult

            class BatteryCheck(Check):
                name = "acme.battery"
                interval_s = 120.0

                def run(self, ctx):
                    return CheckResult.ok("battery 87 %", charge_pct=87.0)

            def make_fan_check():
                class Fan(Check):
                    def run(self, ctx):
                        return CheckResult.fail("fan stalled", {"rpm": 0})
                return Fan()
            """
        )
    )
    dist = tmp_path / f"{mod}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {mod}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[sre_agent.checks]\n"
        f"acme.battery = {mod}:BatteryCheck\n"
        f"acme.fan = {mod}:make_fan_check\n"
        f"acme.broken = {mod}_missing:Nope\n"
        f"model.golden = {mod}:BatteryCheck\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_point_checks_run_when_named_in_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ctx: VerificationContext
) -> None:
    mod = f"acme_checks_{tmp_path.name.replace('-', '_')}"
    _plugin(tmp_path, monkeypatch, mod)
    reg = CheckRegistry.default()
    assert {"acme.battery", "acme.fan", "acme.broken", "model.golden"} <= set(reg.names())
    assert reg.source("model.golden") == "builtin"  # a plugin cannot shadow a built-in
    policy = VerificationPolicy(
        checks={
            "acme.battery": CheckPolicy(),
            "acme.fan": CheckPolicy(severity="critical", interval_s=30),
            "acme.broken": CheckPolicy(),
            "acme.absent": CheckPolicy(),
            "trust.clock": CheckPolicy(enabled=False),
        }
    )
    planned, problems = reg.plan(policy)
    specs = {p.spec.name: p.spec for p in planned}
    assert set(specs) == {"acme.battery", "acme.fan"}
    assert specs["acme.battery"].interval_s == 120.0  # the check's own default
    assert specs["acme.fan"].interval_s == 30 and specs["acme.fan"].severity is Severity.CRITICAL
    assert sorted(p.check for p in problems) == ["acme.absent", "acme.broken"]
    assert all(p.status is Status.ERROR for p in problems)

    sink = MemorySink()
    results = Harness(policy, registry=reg, sink=sink).run_once(ctx)
    by = {r.check: r for r in results}
    assert by["acme.battery"].status is Status.PASS and by["acme.battery"].measurements["charge_pct"] == 87
    assert by["acme.fan"].status is Status.FAIL
    assert by["acme.broken"].status is Status.ERROR and "failed to load" in by["acme.broken"].summary
    assert "no check named acme.absent" in by["acme.absent"].summary
    assert "trust.clock" not in by
    assert {e[3]["check"] for e in sink.events if e[0] == "incident"} == {
        "acme.fan",
        "acme.broken",
        "acme.absent",
    }


def test_default_policy_names_every_builtin() -> None:
    reg = CheckRegistry.default(entry_points=[])
    policy = load_verification_policy()
    planned, problems = reg.plan(policy)
    assert problems == []
    assert {p.spec.name for p in planned} == set(reg.names())
    assert all(p.spec.isolation == "thread" for p in planned)
    isolated = policy.model_copy(update={"checks": {"drift.inputs": CheckPolicy(isolation="process")}})
    assert [p.spec.isolation for p in reg.plan(isolated)[0]] == ["process"]


# -- learned gates ------------------------------------------------------------------------------------


def test_gates_persist_are_evaluated_like_checks_and_are_removable(
    state: StatePaths, clock: FakeClock, ctx: VerificationContext
) -> None:
    audit = AuditLog(state.audit_log, clock=clock)
    store = GateStore(state.root / "gates", audit=audit, clock_now=clock.now)
    store.add(
        GateDefinition(
            name="disk-after-fill",
            check="resources.headroom",
            measurement="disk_free_mb",
            op=">=",
            threshold=1e12,  # more than any test machine has: violated
            source="chaos",
            reason="disk-fill experiment: the agent stalled below this headroom",
            finding={"experiment": "fill-disk", "journal": "j-1"},
        )
    )
    store.add(GateDefinition(name="audit-intact", check="integrity.audit_chain"))
    with pytest.raises(InputError):
        store.add(GateDefinition(name="audit-intact", check="integrity.audit_chain"))
    gates, bad = store.list()
    assert [g.name for g in gates] == ["audit-intact", "disk-after-fill"] and bad == []
    assert gates[1].created == clock.now()
    (state.root / "gates" / "junk.json").write_text("{not json")

    policy = load_verification_policy()
    harness = Harness(policy, gates_dir=state.root / "gates", sink=(sink := MemorySink()))
    results = {r.check: r for r in harness.run_once(ctx)}
    disk = results["gate.disk-after-fill"]
    assert disk.status is Status.FAIL
    assert disk.evidence["source"] == "chaos" and disk.evidence["value"] > 0
    assert results["gate.audit-intact"].status is Status.PASS  # the audit trail has the two adds
    assert results["gate.junk"].status is Status.ERROR and "junk.json" in results["gate.junk"].summary
    assert any(e[0] == "incident" and e[3]["check"] == "gate.disk-after-fill" for e in sink.events)

    only = harness.run_once(ctx, only="gate.audit-intact")
    assert [r.check for r in only] == ["gate.audit-intact"]

    store.remove("disk-after-fill")
    with pytest.raises(InputError):
        store.remove("disk-after-fill")
    assert [g.name for g in store.list()[0]] == ["audit-intact"]
    events = [r.event for r in audit.records()]
    assert events == ["gate.added", "gate.added", "gate.removed"]


def test_gate_definitions_are_validated() -> None:
    with pytest.raises(ValueError, match="go together"):
        GateDefinition(name="x", check="resources.headroom", measurement="disk_free_mb")
    with pytest.raises(ValueError):
        GateDefinition(name="../evil", check="resources.headroom")


# -- scheduler ----------------------------------------------------------------------------------------


class Slow(Check):
    name = "test.slow"

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.runs = 0
        self._lock = threading.Lock()

    def run(self, ctx: VerificationContext) -> CheckResult:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(1.3)  # longer than its 1 s interval
        with self._lock:
            self.active -= 1
            self.runs += 1
        return CheckResult.ok("slow")


def _wait(cond: object, limit_s: float = 30.0) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_scheduler_runs_checks_on_their_intervals_without_overlap(state: StatePaths) -> None:
    slow, fast = Slow(), Passes()
    reg = CheckRegistry()
    reg.register("test.slow", slow)
    reg.register("test.passes", fast)
    policy = VerificationPolicy(
        defaults=ScheduleDefaults(jitter_s=0, max_parallel=2),
        checks={
            "test.slow": CheckPolicy(interval_s=1),
            "test.passes": CheckPolicy(interval_s=1, jitter_s=0.2),
        },
    )
    sink = MemorySink()
    harness = Harness(policy, registry=reg, sink=sink, gates_dir=state.root / "gates")
    ctx = VerificationContext(paths=state, policy=policy, clock=SystemClock())
    sched = VerificationScheduler(harness, lambda: ctx)
    sched.start()
    try:
        jobs = {j["id"]: j for j in sched.jobs()}
        assert set(jobs) == {"test.slow", "test.passes", GATES_SYNC_JOB}
        assert jobs["test.slow"]["max_instances"] == 1 and jobs["test.slow"]["coalesce"] is True
        assert jobs["test.passes"]["jitter_s"] == 0.2
        assert jobs["test.slow"]["misfire_grace_s"] == 120

        GateStore(state.root / "gates").add(GateDefinition(name="fast-ok", check="test.passes"))
        sched.sync_gates()
        assert "gate.fast-ok" in {j["id"] for j in sched.jobs()}

        assert _wait(lambda: slow.runs >= 2 and fast.runs >= 3)
    finally:
        sched.stop()
    assert slow.max_active == 1
    assert any(r["check"] == "test.slow" for t, r in sink.records)
    GateStore(state.root / "gates").remove("fast-ok")


def test_chaos_findings_become_gates_that_run_like_checks(
    state: StatePaths, ctx: VerificationContext
) -> None:
    from dataclasses import replace

    from chaos.runner import learned_gates
    from policies.verification import ResourceReserves
    from sre_core.atomic import atomic_write_json

    journal = {
        "deviated": True,
        "run": [{"activity": {"type": "action", "provider": {"func": "fill_disk"}}}],
        "steady_states": {
            "after": {"probes": [{"tolerance_met": False, "activity": {"name": "inference-p95-under-50ms"}}]}
        },
    }
    gates = learned_gates(
        journal, "run-7", "sha256:0123456789abcdef", "Disk fills up", "2026-01-01T00:00:00+00:00"
    )
    assert [g["check"] for g in gates] == ["resources.headroom"]
    for g in gates:  # as the chaos runner persists them
        atomic_write_json(state.root / "gates" / f"{g['name']}.json", dict(g))

    listed, bad = GateStore(state.root / "gates").list()
    assert bad == [] and [g.source for g in listed] == ["chaos"]
    assert listed[0].finding is not None and listed[0].finding["run_id"] == "run-7"
    # While the disk is under the reserve, the learned gate fails with the finding attached.
    tight = ctx.policy.model_copy(update={"reserves": ResourceReserves(min_free_disk_mb=1e12)})
    results = Harness(tight, gates_dir=state.root / "gates").run_once(replace(ctx, policy=tight))
    gate = next(r for r in results if r.check == f"gate.{listed[0].name}")
    assert gate.status is Status.FAIL
    assert "inference-p95-under-50ms" in gate.evidence["reason"]


@pytest.mark.slow
def test_process_isolation_kills_a_busy_hang_and_survives_a_dying_check(ctx: VerificationContext) -> None:
    import os

    import psutil

    sink = MemorySink()
    runner = Runner(sink=sink, clock=ctx.clock, max_parallel=4)
    planned = [
        PlannedCheck(BusyLoop(), _spec("test.busy", timeout_s=1.0, isolation="process")),
        PlannedCheck(DiesHard(), _spec("test.dies", isolation="process")),
        PlannedCheck(Raises(), _spec("test.raises", isolation="process")),
        PlannedCheck(WhereAmI(), _spec("test.where", isolation="process")),
    ]
    busy, dies, raises, where = runner.run(ctx, planned)
    assert busy.status is Status.TIMEOUT and busy.evidence["killed"] is True
    pid = busy.evidence["pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert dies.status is Status.ERROR and "exit code 3" in dies.summary
    assert raises.status is Status.ERROR and "sensor bus went away" in (raises.traceback or "")
    assert where.status is Status.PASS and where.measurements["pid"] != os.getpid()
    # The child saw the same device and (frozen) fake time.
    assert where.evidence == {"root": str(ctx.paths.root), "now": ctx.clock.now().isoformat()}
    assert {e[3]["check"] for e in sink.events if e[0] == "incident"} == {
        "test.busy",
        "test.dies",
        "test.raises",
    }
