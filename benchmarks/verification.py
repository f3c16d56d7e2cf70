"""CPU cost of the verification harness.

Builds a real device state (two versions of an ONNX classifier installed into A/B slots, a DuckDB
telemetry file, the audit trail, recorded input/output samples), then measures:

- the process CPU seconds of one full harness run (every check of the default policy), cold (first run:
  imports, session creation) and warm (steady state, as the scheduler runs it);
- each check's warm CPU seconds, and from them the share of one core the default schedule costs:
  sum(cpu_i / interval_i). Goal: under 2 % of one core. The same share with a new ONNX Runtime session
  built on every run (no session cache) is reported beside it.

Prints one JSON object; ``ratio_to_goal`` = measured share / 2 % (below 1 meets the goal).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

# This file is named like the package it measures: keep its own directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import duckdb  # noqa: E402
import numpy as np  # noqa: E402

from policies.verification import load_verification_policy  # noqa: E402
from sre_core.clock import SystemClock  # noqa: E402
from sre_core.paths import StatePaths  # noqa: E402
from sre_core.telemetry import MemorySink  # noqa: E402
from verification import Harness, SessionCache  # noqa: E402
from verification.adapters import build_context  # noqa: E402
from verification.samples import install_sample_module  # noqa: E402

GOAL_PCT = 2.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-mb", type=float, default=8.0, help="approximate size of each model version")
    ap.add_argument("--telemetry-rows", type=int, default=200_000, help="rows in the DuckDB file")
    ap.add_argument("--samples", type=int, default=2000, help="recorded input/output samples")
    ap.add_argument("--repeats", type=int, default=5, help="warm runs averaged")
    args = ap.parse_args()

    clock = SystemClock()
    policy = load_verification_policy()
    with tempfile.TemporaryDirectory() as tmp:
        paths = StatePaths(Path(tmp) / "state")
        paths.create()
        # Two hidden layers of width h hold about h*h float32 weights: size the model by --model-mb.
        hidden = max(16, int(math.sqrt(args.model_mb * 2**20 / 4)))
        install_sample_module(paths, clock, n_features=16, n_classes=4, hidden_layers=2, hidden_size=hidden)
        con = duckdb.connect(str(paths.telemetry_db))
        con.execute(
            "CREATE TABLE metrics AS SELECT range AS ts, 'm' || (range % 100)::VARCHAR AS name, "
            "random() AS value FROM range(?)",
            [int(args.telemetry_rows)],
        )
        con.close()
        model_bytes = sum(f.stat().st_size for f in paths.modules.rglob("model.onnx"))
        rng = np.random.default_rng(0)
        sessions = SessionCache()
        inputs = rng.normal(0, 1, (args.samples, 16)).astype(np.float32)
        # Outputs as serving would record them: the active model on the recorded inputs.
        slot_state = json.loads((paths.module("classifier") / "state.json").read_text())
        active = paths.module("classifier") / slot_state["active"] / "model.onnx"
        outputs = sessions.get(active).run(None, {"input": inputs})[0]
        modules = sorted(p.name for p in paths.modules.iterdir() if p.is_dir())

        def ctx(fresh_sessions: bool = False):  # type: ignore[no-untyped-def]
            return build_context(
                paths,
                policy,
                clock=clock,
                desired_expires=clock.now() + timedelta(days=14),
                sessions=SessionCache() if fresh_sessions else sessions,
                input_samples={m: {"input": inputs} for m in modules},
                output_samples=dict.fromkeys(modules, outputs),
            )

        harness = Harness(policy, sink=MemorySink(), gates_dir=paths.root / "gates")
        c0 = time.process_time()
        first = harness.run_once(ctx())
        cold = time.process_time() - c0
        warm_runs = []
        for _ in range(args.repeats):
            c0 = time.process_time()
            harness.run_once(ctx())
            warm_runs.append(time.process_time() - c0)
        planned, _ = harness.plan()
        per_check: dict[str, float] = {}
        share = share_fresh = 0.0
        for item in planned:
            costs, fresh = [], []
            for _ in range(args.repeats):
                for out, fresh_sessions in ((costs, False), (fresh, True)):
                    c = ctx(fresh_sessions)
                    c0 = time.process_time()
                    harness.runner.run_one(c, item)
                    out.append(time.process_time() - c0)
            cpu = float(np.median(costs))
            per_check[item.spec.name] = round(cpu, 6)
            share += cpu / item.spec.interval_s
            share_fresh += float(np.median(fresh)) / item.spec.interval_s
        share_pct = 100.0 * share
    print(
        json.dumps(
            {
                "benchmark": "verification",
                "checks": len(planned),
                "statuses": {r.check: r.status.value for r in first},
                "model_bytes_total": model_bytes,
                "telemetry_rows": args.telemetry_rows,
                "full_run_cpu_s_cold": round(cold, 4),
                "full_run_cpu_s_warm": round(float(np.median(warm_runs)), 4),
                "per_check_cpu_s": per_check,
                "core_share_pct_default_schedule": round(share_pct, 4),
                "core_share_pct_without_session_cache": round(100.0 * share_fresh, 4),
                "goal_pct": GOAL_PCT,
                "ratio_to_goal": round(share_pct / GOAL_PCT, 4),
                "meets_goal": share_pct < GOAL_PCT,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
