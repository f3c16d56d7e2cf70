"""The third independent triage corpus (``benchmarks/triage_holdout3``) through the real scorer.

The corpus was written without reading the rules; these tests hold the rules to issue 15's goals on it
(accuracy >= 0.95, no unsafe decision with under-reactions counted, escalation recall 1.0) and check that
text planted in an incident neither changes the decision nor reaches the operator: for every case tagged
``injection``, the decision equals the decision on the same incident with its free text removed (title,
logs, event messages, check details, metric names emptied; ``clean:<path>=<value>`` tags give structured
fields their clean value), and what ``sre-agent triage explain`` prints (the reasons and the summary, as an
escalation shows them) carries no ``planted:<phrase>`` and no control or bidi character.

A goal the shipped rules do not meet yet is marked xfail (not strict) with the figure measured; the
figures are in ``benchmarks/triage_holdout3/results/results-*.json``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from policies.triage import ACTION_RANK, Action, default_triage_policy
from sre_agent.incidents import FACT_PRODUCERS, Incident
from sre_agent.triage import TriageDecision, TriageEngine
from sre_agent.triage_eval import CaseResult, TriageCase, evaluate, load_cases, score, summarize

CORPUS = Path(__file__).resolve().parent.parent / "benchmarks" / "triage_holdout3"
CASES = load_cases(CORPUS)
INJECTION = [c for c in CASES if "injection" in c.tags]

GOAL_ACCURACY = 0.95

# Facts a producer emits besides the FACT_PRODUCERS entries: the SLO job's value/target, the chaos
# schedule's verdict/cleanup_ok, and the measurements the built-in verification checks report.
PRODUCER_FACTS = frozenset({"value", "target", "verdict", "cleanup_ok"})
CHECK_MEASUREMENTS = frozenset(
    {
        "corrupted", "slots", "rows", "records", "max_abs_error", "ready", "not_ready", "horizon_s",
        "lag_s", "step_s", "disk_free_mb", "disk_free_pct", "memory_available_mb", "load_per_cpu",
        "max_psi", "max_ks", "max_js",
    }
)  # fmt: skip
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SHOWN_ESCAPE = re.compile(r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")

# Measured on the rules at the time of writing (results/results-*.json); a case listed here is xfail
# (not strict).
KNOWN_DECISION_CHANGES: dict[str, str] = {}
KNOWN_PLANTED_IN_OPERATOR_TEXT: dict[str, str] = {}

# Where the rules keep a decision the corpus labels otherwise, with the argument (counted as wrong in the
# figures all the same). Each is the action the rules take.
LABEL_DISAGREEMENTS: dict[str, tuple[Action, str]] = {
    "ind3-cd-deviated-recovered": (
        Action.OBSERVE,
        "a deviation that recovered after a clean cleanup, weeks after any flip, is watched (docs: a fault "
        "that recovered by itself is only watched, outside the hour after a flip); holdout2 labels the same "
        "facts observe (ind2-cd-deviated-finished-recovered-injection); this corpus accepts observe",
    ),
    "ind3-vf-clock-behind-clock-chaos": (
        Action.PAUSE_CHAOS,
        "a clock check failing under a clock-skew experiment is its effect on what trusted time protects "
        "(expiry): the experiment is paused, as ind-h-vf-clock-skew-chaos and "
        "ind2-vf-trust-clock-under-clock-skew-chaos label it; this corpus accepts the pause",
    ),
    "ind3-vf-golden-both-slots-fail": (
        Action.RERUN_VERIFICATION,
        "that both slots fail is only in the evidence text (the golden check emits no per-slot fact): on its "
        "facts it is a first golden failure weeks after a flip, re-run first (this corpus accepts it)",
    ),
    "ind3-vf-slots-active-corrupt-uncommitted-standby": (
        Action.SAFE_MODE,
        "the active module's files no longer match their signed digests and nothing sound can be rolled "
        "back to: safe mode is proposed to an operator (alert runs at once), as "
        "ind-vf-integrity-active-corrupt-uncommitted labels it; nothing runs unattended",
    ),
}


@pytest.fixture(scope="module")
def results() -> list[CaseResult]:
    return evaluate(CASES, TriageEngine(default_triage_policy()))


def _tag_values(case: TriageCase, prefix: str) -> list[str]:
    return [t[len(prefix) :] for t in case.tags if t.startswith(prefix)]


def _clean_twin(case: TriageCase) -> Incident:
    """The case's incident with its free text removed and every ``clean:`` field set to its clean value."""
    data: dict[str, Any] = case.incident.model_dump(mode="python")
    data["title"] = ""
    ev = data["evidence"]
    ev["logs"], ev["events"], ev["metrics"] = [], [], {}
    for v in ev["verification"]:
        v["detail"] = ""
    for spec in _tag_values(case, "clean:"):
        path, value = spec.split("=", 1)
        *parents, leaf = path.split(".")
        node = data
        for p in parents:
            node = node[p]
        assert leaf in node, f"{case.name}: clean tag names a missing field {path}"
        node[leaf] = value
    return Incident.model_validate(data)


def _visible_text(text: str) -> str:
    """What a reader takes in: invisible characters and their shown escapes removed, spaces collapsed."""
    text = _SHOWN_ESCAPE.sub("", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _UNSAFE or ch in "\n\t")
    return re.sub(r"\s+", " ", text).casefold()


def _unsafe_chars(text: str) -> list[str]:
    return sorted(
        {f"U+{ord(ch):04X}" for ch in text if unicodedata.category(ch) in _UNSAFE and ch not in "\n\t"}
    )


def _params(cases: list[TriageCase], known: dict[str, str]) -> Iterator[Any]:
    for c in cases:
        marks = [pytest.mark.xfail(strict=False, reason=known[c.name])] if c.name in known else []
        yield pytest.param(c, id=c.name, marks=marks)


# ------------------------------------------------------------------------------------------ the corpus


def test_corpus_is_well_formed() -> None:
    names = [c.name for c in CASES]
    assert len(CASES) >= 45 and len(set(names)) == len(names)
    assert all(n.startswith("ind3-") for n in names)
    for c in CASES:
        exp = c.expected
        if exp.action == Action.SAFE_MODE:
            assert exp.requires_approval, c.name  # safe mode is never unattended
        assert (CORPUS / f"{c.name}.yaml").read_text(encoding="utf-8").count("# why: ") == 1, c.name
    kinds = {c.incident.kind.value for c in CASES}
    assert kinds == {"verification_failure", "canary_abort", "probe_failure", "slo_burn", "chaos_deviation"}


def test_facts_use_the_vocabulary_the_daemon_produces() -> None:
    known = set(FACT_PRODUCERS) | PRODUCER_FACTS | CHECK_MEASUREMENTS
    unknown = {(c.name, k) for c in CASES for k in c.incident.facts if k not in known}
    assert not unknown


def test_every_injection_case_plants_what_its_tags_say() -> None:
    assert len(INJECTION) >= 10
    for c in INJECTION:
        raw = yaml.safe_dump(c.incident.model_dump(mode="json"), allow_unicode=True, width=10**9)
        for phrase in _tag_values(c, "planted:"):
            assert phrase.casefold() in _visible_text(raw), (c.name, phrase)
        assert _tag_values(c, "planted:") or _tag_values(c, "clean:"), c.name


def test_the_scorer_counts_an_under_reaction_as_unsafe() -> None:
    """Doing nothing where the label needs a remedy is unsafe, not merely wrong."""
    needy = [c for c in CASES if ACTION_RANK[c.expected.action] > ACTION_RANK[Action.OBSERVE]]
    needy = [c for c in needy if Action.OBSERVE not in c.expected.acceptable_set]
    assert len(needy) >= 20
    for c in needy:
        nothing = TriageDecision(
            incident_id=c.incident.id,
            fingerprint=c.incident.fingerprint,
            rule="test-observe",
            allowed=(Action.OBSERVE,),
            default=Action.OBSERVE,
            certainty=1.0,
            action=Action.OBSERVE,
            verdict="execute",
            execute_now=(Action.OBSERVE,),
            reasons=("test",),
            summary="",
        )
        r = score(c, nothing)
        assert r.unsafe and any(w.startswith("under-reaction") for w in r.why_unsafe), c.name


# ------------------------------------------------------------------------------------------ the goals


@pytest.mark.xfail(
    strict=False,
    reason="rules only at b75520b: accuracy 0.937 (59/63) against the 0.95 goal; the 4 wrong cases are "
    "LABEL_DISAGREEMENTS",
)
def test_accuracy_meets_the_goal(results: list[CaseResult]) -> None:
    s = summarize(results)
    assert s["accuracy"] >= GOAL_ACCURACY, s["wrong_cases"]


def test_the_rules_disagree_only_where_listed(results: list[CaseResult]) -> None:
    wrong = {r.name: r.decision.action for r in results if not r.correct}
    assert wrong == {name: action for name, (action, _) in LABEL_DISAGREEMENTS.items()}
    for r in results:
        if r.name in LABEL_DISAGREEMENTS:  # the disagreements are acceptable or a proposal to a person
            assert r.acceptable or r.decision.escalated, r.name
    agreed = summarize([r for r in results if r.name not in LABEL_DISAGREEMENTS])
    assert agreed["accuracy"] == 1.0 and agreed["unsafe_action_rate"] == 0.0


def test_no_unsafe_decision_with_under_reactions_counted(results: list[CaseResult]) -> None:
    unsafe = {r.name: r.why_unsafe for r in results if r.unsafe}
    assert not unsafe


def test_escalation_recall_is_one(results: list[CaseResult]) -> None:
    missed = [r.name for r in results if r.expected.requires_approval and not r.decision.escalated]
    assert summarize(results)["escalation_recall"] == 1.0, missed


# ------------------------------------------------------------------------------------------ injection


@pytest.mark.parametrize("case", list(_params(INJECTION, KNOWN_DECISION_CHANGES)))
def test_planted_text_leaves_the_decision_unchanged(case: TriageCase) -> None:
    engine = TriageEngine(default_triage_policy())
    planted = engine.decide(case.incident)
    clean = engine.decide(_clean_twin(case))
    assert (planted.action, planted.escalated, tuple(planted.execute_now)) == (
        clean.action,
        clean.escalated,
        tuple(clean.execute_now),
    )


@pytest.mark.parametrize("case", list(_params(INJECTION, KNOWN_PLANTED_IN_OPERATOR_TEXT)))
def test_operator_text_carries_no_planted_instruction(
    case: TriageCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sre_agent.cli

    d = TriageEngine(default_triage_policy()).decide(case.incident)
    stored = "\n".join([*d.reasons, d.summary])  # what an escalation file and the reports carry
    incident_file = tmp_path / "incident.yaml"
    incident_file.write_text(
        yaml.safe_dump(case.incident.model_dump(mode="json"), allow_unicode=False), encoding="utf-8"
    )
    assert sre_agent.cli.main(["triage", "explain", str(incident_file)]) == 0
    shown = capsys.readouterr().out  # what an operator reads in a terminal
    assert not _unsafe_chars(shown)
    assert not _unsafe_chars(stored), "control/bidi characters in the stored summary or reasons"
    for phrase in _tag_values(case, "planted:"):
        assert phrase.casefold() not in _visible_text(shown), phrase
        assert phrase.casefold() not in _visible_text(stored), phrase
