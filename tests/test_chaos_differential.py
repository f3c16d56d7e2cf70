"""Differential test: pre-flight's verdict against what real chaoslib does with the same document.

A generator combines dangerous effects (a long management-link cut, a stalling toxic, split cuts, CPU
beyond the policy total, a clock skew beyond bounds, killing the agent, foreign code) with disguises
(``$name``, ``${name}``, partial templates, secret scopes, nested mappings, percent/dot encodings,
splitting across activities, hiding in rollbacks, the hypothesis or controls, environment values) and
mixes in safe experiments in the same disguises. Every experiment is judged by pre-flight and executed
by real chaoslib in an isolated child (:mod:`tests.chaos_differential_child`) that observes the fault
proxy, the process table, the clock fault and markers of foreign code, in virtual time.

The test fails when any experiment judged ``run`` was observed leaving the policy envelope. It prints
the number generated and the confusion table (observed in/out of the envelope x verdict), including
false escalations of safe experiments. ``SRE_CHAOS_DIFF_N`` sets the sample size (default 120).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from chaos.loader import ExperimentError, parse_experiment
from chaos.preflight import Preflight

REPO = Path(__file__).resolve().parent.parent
CHILD = REPO / "tests" / "chaos_differential_child.py"
N = int(os.environ.get("SRE_CHAOS_DIFF_N", "120"))
MAX_CUT_S = 60.0
MAX_CPU_WORKER_S = 1200.0
MAX_CLOCK_OFFSET_S = 86400.0

SNEAKY_CONTROL = """
import os, pathlib
def _mark(name):
    d = os.environ.get("DIFF_MARKER_DIR")
    if d:
        pathlib.Path(d, name).write_text("x")
def configure_control(**kwargs):
    _mark("control")
def before_hypothesis_control(context, **kwargs):
    _mark("control")
def before_activity_control(context, **kwargs):
    _mark("control")
def before_experiment_control(context, **kwargs):
    _mark("control")
"""


def _act(func: str, name: str, **args: Any) -> dict[str, Any]:
    return {
        "type": "action",
        "name": name,
        "provider": {"type": "python", "module": "chaos.actions", "func": func, "arguments": args},
    }


def _probe() -> dict[str, Any]:
    return {
        "type": "probe",
        "name": "faults",
        "tolerance": True,
        "provider": {"type": "python", "module": "chaos.probes", "func": "uplink_backlog"},
    }


def _base(title: str) -> dict[str, Any]:
    return {
        "title": title,
        "description": "generated for the differential test",
        "steady-state-hypothesis": {
            "title": "backlog readable",
            "probes": [
                {
                    "type": "probe",
                    "name": "backlog",
                    "tolerance": {"type": "range", "range": [0, 10**9]},
                    "provider": {"type": "python", "module": "chaos.probes", "func": "uplink_backlog"},
                }
            ],
        },
        "method": [],
        "rollbacks": [_act("clear_faults", "clear")],
    }


class Disguise:
    """How a value reaches the activity: literally, or through one of chaoslib's resolution paths."""

    def __init__(self, rng: random.Random, doc: dict[str, Any]) -> None:
        self.rng = rng
        self.doc = doc
        self.n = 0
        self.used: list[str] = []

    def value(self, v: Any, kinds: tuple[str, ...] = ("literal", "brace", "dollar", "secret")) -> Any:
        kind = self.rng.choice(kinds)
        if isinstance(v, str) and kind == "literal" and self.rng.random() < 0.3:
            kind = "partial"
        self.n += 1
        name = f"v{self.n}"
        self.used.append(kind)
        conf = self.doc.setdefault("configuration", {})
        if kind == "literal":
            return v
        if kind == "brace":
            conf[name] = v
            return "${" + name + "}"
        if kind == "dollar":
            conf[name] = v
            return "$" + name  # chaoslib substitutes it too (as a string)
        if kind == "partial" and isinstance(v, str) and len(v) > 2:
            conf[name] = v[2:]
            return v[:2] + "${" + name + "}"
        if kind == "secret":
            self.doc.setdefault("secrets", {}).setdefault("scope", {})[name] = v
            return "${" + name + "}"
        if kind == "nested" and isinstance(v, dict):
            # inside a mapping argument: chaoslib substitutes at every depth of the arguments
            out = {}
            for k, inner in v.items():
                self.n += 1
                conf[f"{name}_{self.n}"] = inner
                out[k] = "${" + f"{name}_{self.n}" + "}"
            return out
        if kind == "env":
            conf[name] = {"type": "env", "key": f"DIFF_UNSET_{name.upper()}", "default": v}
            return "${" + name + "}"
        return v

    def proxy(self) -> Any:
        name = self.rng.choice(["uplink", "uplink", "%75plink", "./uplink", "up%6Cink"])
        self.used.append("encoding" if name != "uplink" else "plain-name")
        return self.value(name, ("literal", "brace", "dollar", "secret"))


def _dangerous(rng: random.Random, i: int) -> tuple[dict[str, Any], str]:
    doc = _base(f"dangerous {i}")
    d = Disguise(rng, doc)
    kind = rng.choice(
        [
            "long-cut",
            "stall-toxic",
            "split-cut",
            "cpu-total",
            "clock",
            "agent",
            "program",
            "control",
            "env-cut",
        ]
    )
    where = rng.choice(["method", "method", "rollbacks", "hypothesis"])
    acts: list[dict[str, Any]] = []
    if kind == "long-cut":
        acts = [
            {
                **_act("timeout_uplink", "cut", proxy=d.proxy()),
                "pauses": {"after": d.value(180, ("literal", "brace", "secret"))},
            }
        ]
    elif kind == "stall-toxic":
        ttype, attrs = rng.choice(
            [("latency", {"latency": 600_000}), ("bandwidth", {"rate": 0}), ("slicer", {"delay": 60_000_000})]
        )
        args: dict[str, Any] = {
            "toxic_type": d.value(ttype, ("literal", "brace", "secret")),
            "proxy": d.proxy(),
        }
        args["attributes"] = d.value(attrs, ("literal", "brace", "secret", "nested"))
        acts = [{**_act("add_uplink_toxic", "stall", **args), "pauses": {"after": 180}}]
    elif kind == "split-cut":
        acts = [_act("cut_uplink", f"cut{k}", duration_s=d.value(40), proxy=d.proxy()) for k in range(2)]
    elif kind == "cpu-total":
        acts = [_act("stress_cpu", f"burn{k}", workers=d.value(4), duration_s=d.value(300)) for k in range(2)]
    elif kind == "clock":
        acts = [_act("skew_agent_clock", "skew", offset_s=d.value(30 * 86400), duration_s=d.value(60))]
    elif kind == "agent":
        acts = [_act("kill_serving_worker", "kill")]
        doc["rollbacks"].insert(0, _act("restart_serving_worker", "restart"))
    elif kind == "program":
        code = "import os,pathlib;pathlib.Path(os.environ['DIFF_MARKER_DIR'],'program').write_text('x')"
        prov: dict[str, Any] = {"type": "process", "path": sys.executable, "arguments": ["-c", code]}
        if rng.random() < 0.5:
            doc.setdefault("configuration", {})["probe_cfg"] = {
                "type": "probe",
                "name": "cfg",
                "provider": prov,
            }
            acts = [_act("inject_input_noise", "noise", share=0.1, duration_s=5)]
            d.used.append("dynamic-configuration")
        else:
            acts = [{"type": "action", "name": "prog", "provider": prov}]
    elif kind == "control":
        ctl = [{"name": "sneaky", "provider": {"type": "python", "module": "diff_sneaky_control"}}]
        level = rng.choice(["experiment", "hypothesis", "activity"])
        d.used.append(f"control-{level}")
        acts = [_act("inject_input_noise", "noise", share=0.1, duration_s=5)]
        if level == "experiment":
            doc["controls"] = ctl
        elif level == "hypothesis":
            doc["steady-state-hypothesis"]["controls"] = ctl
        else:
            acts[0]["controls"] = ctl
        where = "method"
    elif kind == "env-cut":
        acts = [
            {**_act("timeout_uplink", "cut", proxy=d.value("uplink", ("env",))), "pauses": {"after": 180}}
        ]
    if where == "hypothesis" and kind not in ("agent", "control", "program"):
        for a in acts:
            a["type"] = "probe"
            a["tolerance"] = True
        doc["steady-state-hypothesis"]["probes"].extend(acts)
        doc["method"] = [_probe()]
        d.used.append("in-hypothesis")
    elif where == "rollbacks" and kind not in ("agent", "control"):
        doc["method"] = [_probe()]
        doc["rollbacks"] = acts + doc["rollbacks"]
        d.used.append("in-rollbacks")
    else:
        doc["method"] = acts
        if kind in ("long-cut", "stall-toxic", "env-cut"):
            doc["rollbacks"].insert(0, _act("restore_uplink", "restore"))
    return doc, f"{kind}:{'+'.join(sorted(set(d.used)))}"


def _safe(rng: random.Random, i: int) -> tuple[dict[str, Any], str]:
    doc = _base(f"safe {i}")
    d = Disguise(rng, doc)
    kind = rng.choice(["latency", "short-cut", "noise", "cpu", "clock", "decoy"])
    if kind == "latency":
        acts = [
            {
                **_act(
                    "slow_uplink",
                    "slow",
                    latency_ms=d.value(200),
                    proxy=d.value("uplink", ("literal", "brace")),
                ),
                "pauses": {"after": d.value(20, ("literal", "brace", "secret"))},
            }
        ]
        doc["rollbacks"].insert(0, _act("restore_uplink", "restore"))
    elif kind == "short-cut":
        acts = [_act("cut_uplink", "cut", duration_s=d.value(20))]
    elif kind == "noise":
        acts = [_act("inject_input_noise", "noise", share=d.value(0.2), duration_s=d.value(30))]
    elif kind == "cpu":
        acts = [_act("stress_cpu", "burn", workers=d.value(1), duration_s=d.value(5))]
    elif kind == "clock":
        acts = [_act("skew_agent_clock", "skew", offset_s=d.value(3600), duration_s=d.value(30))]
    else:
        acts = [
            {
                **_act("timeout_uplink", "decoy", proxy=d.value("decoy", ("literal", "brace"))),
                "pauses": {"after": 5},
            }
        ]
        doc["rollbacks"].insert(0, _act("restore_uplink", "restore", proxy="decoy"))
    doc["method"] = acts
    return doc, f"{kind}:{'+'.join(sorted(set(d.used)))}"


def generate(n: int, seed: int = 16) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        doc, label = _dangerous(rng, i) if i % 2 == 0 else _safe(rng, i)
        out.append({"id": i, "doc": doc, "label": label, "intent": "dangerous" if i % 2 == 0 else "safe"})
    return out


def _violations(obs: dict[str, Any]) -> list[str]:
    """What the observed run did outside the policy envelope."""
    v = []
    if obs.get("agent_killed"):
        v.append("the agent process was killed")
    if obs["cut_s"] > MAX_CUT_S:
        v.append(f"management link cut {obs['cut_s']:g}s")
    if obs["cut_at_end"]:
        v.append("management link still cut at the end")
    if obs["cpu_worker_s"] > MAX_CPU_WORKER_S:
        v.append(f"{obs['cpu_worker_s']:g} CPU worker-seconds")
    if obs["clock_max_offset_s"] > MAX_CLOCK_OFFSET_S:
        v.append(f"clock offset {obs['clock_max_offset_s']:g}s")
    if obs["foreign_code"]:
        v.append(f"foreign code ran: {obs['foreign_code']}")
    return v


def _execute(items: list[dict[str, Any]], workdir: Path) -> dict[int, dict[str, Any]]:
    """Run the items in a child; if it dies (the agent was killed), record that and go on."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "diff_sneaky_control.py").write_text(SNEAKY_CONTROL)
    (workdir / "experiments.jsonl").write_text(
        "".join(json.dumps({"id": x["id"], "doc": x["doc"]}) + "\n" for x in items)
    )
    observed: dict[int, dict[str, Any]] = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SRE_CHAOS_AGENT_PID", None)
    for _ in range(len(items) + 1):
        proc = subprocess.run(
            [sys.executable, str(CHILD), str(workdir)],
            env=env,
            cwd=str(REPO),
            check=False,
            capture_output=True,
            timeout=600,
        )
        lines = (
            (workdir / "observed.jsonl").read_text().splitlines()
            if (workdir / "observed.jsonl").exists()
            else []
        )
        observed = {o["id"]: o for o in map(json.loads, lines)}
        if proc.returncode == 0 and len(observed) == len(items):
            break
        current = int((workdir / "current").read_text())
        assert current not in observed, proc.stderr.decode()[-2000:]
        dead = {
            **dict.fromkeys(("cut_s", "cpu_worker_s", "clock_max_offset_s", "clock_s"), 0.0),
            "id": current,
            "cut_at_end": False,
            "foreign_code": [],
            "status": None,
            "error": f"child died ({proc.returncode})",
            "agent_killed": True,
        }
        with (workdir / "observed.jsonl").open("a") as fh:
            fh.write(json.dumps(dead) + "\n")
    return observed


@pytest.mark.slow
def test_preflight_run_verdicts_stay_inside_the_envelope(tmp_path: Path) -> None:
    items = generate(N)
    pf = Preflight()
    verdicts: dict[int, str] = {}
    for it in items:
        try:
            exp = parse_experiment(json.dumps(it["doc"]), f"gen-{it['id']}.json")
            verdicts[it["id"]] = pf.check(exp).verdict
        except ExperimentError:
            verdicts[it["id"]] = "reject"
    halves = [items[0::2], items[1::2]]
    procs_dirs = [tmp_path / "a", tmp_path / "b"]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_execute, halves, procs_dirs))
    observed = {**results[0], **results[1]}
    assert len(observed) == len(items)

    table: Counter[tuple[str, str]] = Counter()
    by_intent: Counter[tuple[str, str]] = Counter()
    escaped: list[str] = []
    false_escalations: list[str] = []
    for it in items:
        obs = observed[it["id"]]
        bad = _violations(obs)
        outcome = "outside" if bad else "inside"
        v = verdicts[it["id"]]
        table[(outcome, v)] += 1
        by_intent[(it["intent"], v)] += 1
        if v == "run" and bad:
            escaped.append(f"#{it['id']} {it['label']}: {bad}")
        refused = str(obs.get("error") or "").startswith(("InvalidActivity", "InvalidExperiment"))
        if it["intent"] == "safe" and not bad and v != "run" and not (v == "reject" and refused):
            false_escalations.append(f"#{it['id']} {it['label']} -> {v}")
    report = {
        "generated": len(items),
        "confusion (observed x verdict)": {f"{o}/{v}": n for (o, v), n in sorted(table.items())},
        "by intent": {f"{i}/{v}": n for (i, v), n in sorted(by_intent.items())},
        "false escalations of safe experiments": false_escalations,
        "dangerous judged run": escaped,
    }
    print("\n" + json.dumps(report, indent=1))
    assert not escaped, escaped
    # the generator must actually produce danger that chaoslib carries out (else the test proves nothing)
    assert table[("outside", "escalate")] + table[("outside", "reject")] >= len(items) // 8
