"""Every fact a triage rule (or the triage engine) reads is emitted by production code.

How it could break: a rule names a fact that no reporter sets (``since_flip_s``, ``recovered``,
``persisted_after_cleanup`` once were), so the rule can never fire outside tests. The test lists the
facts the shipped policy's conditions and the engine read, and finds each one's producer.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import yaml

from sre_agent.incidents import FACT_PRODUCERS

REPO = Path(__file__).resolve().parent.parent


def _rule_facts() -> set[str]:
    doc = yaml.safe_load((REPO / "policies" / "defaults" / "triage.yaml").read_text())
    names = set()
    for rule in [*doc.get("rules", []), doc.get("fallback") or {}]:
        for cond in rule.get("when") or []:
            head, _, name = str(cond["fact"]).partition(".")
            if head == "fact":
                names.add(name)
    return names


def _engine_facts() -> set[str]:
    """The primary name of each fact the engine reads (the first of each alias list)."""
    src = (REPO / "sre_agent" / "triage.py").read_text()
    names = set(re.findall(r'_flag\(\s*\w+,\s*"([a-z_]+)"', src))
    names |= set(re.findall(r'_listed\(\s*\w+,\s*\w+,\s*"([a-z_]+)"', src))
    names |= set(re.findall(r'\bf(?:acts)?\.get\("([a-z_]+)"\)', src))
    return names


def _resolve(ref: str) -> object:
    mod, _, qual = ref.partition(":")
    obj: object = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_fact_the_rules_read_has_a_production_producer() -> None:
    read = _rule_facts() | _engine_facts()
    assert {"since_flip_s", "recovered", "persisted_after_cleanup"} <= _rule_facts()
    missing = sorted(read - set(FACT_PRODUCERS))
    assert not missing, f"facts read by triage with no producer: {missing}"
    for fact in sorted(read):
        producer = _resolve(FACT_PRODUCERS[fact])
        source = inspect.getsource(producer)  # type: ignore[arg-type]
        assert f'"{fact}"' in source, f"{FACT_PRODUCERS[fact]} does not emit {fact}"
        for where in ("tests.", "sre_agent.demo", "sre_agent.triage"):
            assert not FACT_PRODUCERS[fact].startswith(where), f"{fact} is produced only by {where}"


def test_chaos_schedule_reports_damage_that_outlives_cleanup_and_recovery(tmp_path: Path) -> None:
    """The chaos job's incident carries ``persisted_after_cleanup`` (a fault could not be cleared, or the
    guarding check still fails after cleanup) or ``recovered`` (every guarding check passes again)."""
    from chaos.faults import CleanupReport
    from chaos.runner import LearnedGate, RunResult, Verdict
    from sre_agent.config import AgentSettings
    from sre_agent.incidents import IncidentSignal
    from sre_agent.provision import provision
    from sre_agent.services.chaos import ChaosSchedule
    from sre_core.audit import AuditLog
    from sre_core.clock import FakeClock
    from sre_core.paths import StatePaths
    from sre_core.telemetry import MemorySink

    paths = StatePaths(tmp_path / "dev")
    provision(paths)
    clock = FakeClock()
    got: list[IncidentSignal] = []
    verdicts = {"integrity.slots": False}
    sched = ChaosSchedule(
        paths,
        AgentSettings.model_validate({"state_dir": str(paths.root)}),
        clock,
        AuditLog(paths.audit_log, clock),
        MemorySink(),
        serving_url=lambda: None,
        model=lambda: "clf",
        toxiproxy_url=lambda: None,
        report=got.append,
        recheck=verdicts.get,
    )

    def run(cleanup: CleanupReport) -> RunResult:
        return RunResult(
            "run-1", "sha256:x", "corrupt standby", Verdict.DEVIATED, ["deviated"], "completed", True,
            "t0", "t1", 1.0, 60.0, [], 0, None, cleanup, [LearnedGate(check="integrity.slots")],
        )  # fmt: skip

    sched._raise("corrupt.yaml", "deviated", run(CleanupReport()))
    sched._raise("corrupt.yaml", "deviated", run(CleanupReport(failed={"fill_disk": "EPERM"})))
    verdicts["integrity.slots"] = True
    sched._raise("corrupt.yaml", "deviated", run(CleanupReport()))
    assert [s.facts.get("persisted_after_cleanup") for s in got] == [True, True, False]
    assert [s.facts.get("recovered") for s in got] == [None, None, True]
    assert all(s.facts["experiment"] == "corrupt.yaml" and s.module == "clf" for s in got)


def test_a_chaos_run_that_passed_but_left_damage_behind_raises_it(tmp_path: Path) -> None:
    """How it broke: only deviated or aborted runs were judged after cleanup, so a run whose hypothesis
    held while its fault could not be undone (or the checks guarding what it touched still fail after
    its rollbacks) resolved the experiment's incident instead of raising the damage."""
    from chaos.faults import CleanupReport
    from chaos.runner import RunResult, Verdict
    from sre_agent.config import AgentSettings
    from sre_agent.incidents import IncidentSignal
    from sre_agent.provision import provision
    from sre_agent.services.chaos import ChaosSchedule
    from sre_core.audit import AuditLog
    from sre_core.clock import FakeClock
    from sre_core.paths import StatePaths
    from sre_core.telemetry import MemorySink

    paths = StatePaths(tmp_path / "dev")
    provision(paths)
    clock = FakeClock()
    got: list[IncidentSignal] = []
    resolved: list[str] = []
    verdicts = {"integrity.slots": True}
    sched = ChaosSchedule(
        paths,
        AgentSettings.model_validate({"state_dir": str(paths.root)}),
        clock,
        AuditLog(paths.audit_log, clock),
        MemorySink(),
        serving_url=lambda: None,
        model=lambda: "clf",
        toxiproxy_url=lambda: None,
        report=got.append,
        recheck=verdicts.get,
        resolve=lambda key, why: resolved.append(key),
    )
    journal = {
        "status": "completed",
        "deviated": False,
        "run": [{"activity": {"type": "action", "provider": {"func": "corrupt_standby_slot"}}}],
    }

    def passed(cleanup: CleanupReport) -> RunResult:
        return RunResult(
            "run-1", "sha256:x", "corrupt standby", Verdict.PASSED, [], "completed", False,
            "t0", "t1", 1.0, 60.0, [], 0, journal, cleanup, [],
        )  # fmt: skip

    lost = CleanupReport(failed={"standby_corruption": "backup missing"})
    assert sched.judge_aftermath("corrupt.yaml", "passed", passed(lost)) is True
    verdicts["integrity.slots"] = False  # cleaned up, but the slot still fails its re-hash
    assert sched.judge_aftermath("corrupt.yaml", "passed", passed(CleanupReport())) is True
    assert [s.facts.get("persisted_after_cleanup") for s in got] == [True, True]
    assert got[1].evidence["rechecked"] == {"integrity.slots": False}
    assert resolved == []
    # followed until it clears: re-measured on every tick (paused or not), reported again while it lasts
    assert sched.remeasure() == {"corrupt.yaml": True} and len(got) == 3
    assert got[2].facts["persisted_after_cleanup"] is True and got[2].key == got[1].key
    verdicts["integrity.slots"] = True
    assert sched.remeasure() == {"corrupt.yaml": False} and resolved == ["chaos:corrupt.yaml"]
    assert sched.remeasure() == {}
    assert sched.judge_aftermath("corrupt.yaml", "passed", passed(CleanupReport())) is False
    assert len(got) == 3 and resolved == ["chaos:corrupt.yaml"] * 2
