"""Red team of chaos pre-flight, written from the docs, the policy and chaoslib's own source only.

Every dangerous case is a document Chaos Toolkit would execute with an effect outside the policy
envelope (or that the docs say must never run); each is labelled with the verdict the docs promise
(`escalate` or `reject`, never `run`). Safe cases come from the docs' own examples and small
variations and must stay `run` (a false escalation is a failure too). Everything goes through the real
CLI (`sre-agent chaos preflight|validate|run|approve`, in process through typer's runner; hostile
structures in a child process so a crash there cannot take the test process down).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sre_agent.cli import main
from sre_core.paths import StatePaths

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "experiments"
MARK = "@MARK@"  # replaced by a per-run marker path: a process/command that ran leaves a file there

EXIT = {"run": 0, "escalate": 10, "reject": 2}
pytestmark = pytest.mark.slow  # ~2 min on the loaded shared 2-core box (a few hundred CLI calls)


@dataclass(frozen=True)
class Case:
    """One experiment: its document (dict, or raw text/bytes), the expected verdict and why."""

    id: str
    doc: Any
    expected: str
    why: str
    ext: str = "json"
    hostile: bool = False  # run in a child process (may exhaust the stack or memory)


# ---------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------
HYP: dict[str, Any] = {
    "title": "the server is ready",
    "probes": [
        {
            "type": "probe",
            "name": "serving-ready",
            "tolerance": True,
            "provider": {"type": "python", "module": "chaos.probes", "func": "serving_ready"},
        }
    ],
}


def act(
    func: str, args: dict[str, Any] | None = None, module: str = "chaos.actions", **extra: Any
) -> dict[str, Any]:
    prov: dict[str, Any] = {"type": "python", "module": module, "func": func}
    if args is not None:
        prov["arguments"] = args
    body: dict[str, Any] = {
        "type": "action",
        "name": extra.pop("name", f"{func}-{len(str(args))}"),
        "provider": prov,
    }
    body.update(extra)
    return body


def probe(
    func: str, args: dict[str, Any] | None = None, module: str = "chaos.probes", **extra: Any
) -> dict[str, Any]:
    body = act(func, args, module, **extra)
    body["type"] = "probe"
    return body


RESTORE = act("restore_uplink", name="restore-uplink")
CLEAR = act("clear_faults", name="clear-faults")
TOXI_RESET = act("reset", module="chaostoxi.proxy.actions", name="reset-toxics")


def exp(
    method: list[dict[str, Any]], rollbacks: list[dict[str, Any]] | None = None, **top: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": "1.0.0",
        "title": top.pop("title", "red team experiment"),
        "description": top.pop("description", "red team case"),
        "tags": ["redteam"],
        "steady-state-hypothesis": top.pop("hyp", HYP),
        "method": method,
        "rollbacks": [RESTORE, CLEAR] if rollbacks is None else rollbacks,
    }
    doc.update(top)
    return doc


def held(activity: dict[str, Any], seconds: Any) -> dict[str, Any]:
    """The activity followed by a pause: a toxic in force stays in force during it."""
    return {**activity, "pauses": {"after": seconds}}


def sh(cmd: str) -> dict[str, Any]:
    return {"type": "process", "path": "/bin/sh", "arguments": ["-c", cmd]}


TOUCH = f"touch {MARK}"


# ---------------------------------------------------------------------------------------------------
# dangerous cases (labels from docs/sre-guide.md, experiments/README.md, chaos.yaml, threat-model.md)
# ---------------------------------------------------------------------------------------------------
def dangerous() -> list[Case]:
    c: list[Case] = []

    def add(id_: str, doc: Any, expected: str, why: str, ext: str = "json", hostile: bool = False) -> None:
        c.append(Case(id_, doc, expected, why, ext, hostile))

    cut300 = {"duration_s": "$d"}
    # --- substitution: every form chaoslib's TypedTemplate resolves --------------------------------
    add(
        "subst-dollar-name",
        exp([act("cut_uplink", cut300)], configuration={"d": 300}),
        "escalate",
        "$d resolves to 300 s of cut (string.Template form without braces)",
    )
    add(
        "subst-brace-typed",
        exp([act("cut_uplink", {"duration_s": "${d}"})], configuration={"d": 300}),
        "escalate",
        "${d} whole-string keeps the int 300",
    )
    add(
        "subst-concat",
        exp([act("cut_uplink", {"duration_s": "${a}${b}"})], configuration={"a": "3", "b": "00"}),
        "escalate",
        "two substitutions concatenate to the string '300'",
    )
    add(
        "subst-from-secret",
        exp([act("cut_uplink", {"duration_s": "${d}"})], secrets={"grp": {"d": 300}}),
        "escalate",
        "secrets' second level is in the substitution mapping",
    )
    add(
        "subst-config-beats-secret",
        exp(
            [act("cut_uplink", {"duration_s": "${d}"})], configuration={"d": 300}, secrets={"grp": {"d": 30}}
        ),
        "escalate",
        "ChainMap(configuration, *secrets): configuration wins, 300 s",
    )
    add(
        "subst-env-config-default",
        exp(
            [act("cut_uplink", {"duration_s": "${d}"})],
            configuration={"d": {"type": "env", "key": "SRE_REDTEAM_D", "default": 30}},
        ),
        "escalate",
        "an env value exists only at run time (unresolved-value)",
    )
    add(
        "subst-env-secret-nested",
        exp(
            [act("cut_uplink", {"duration_s": "${d}"})],
            secrets={"grp": {"d": {"type": "env", "key": "SRE_REDTEAM_D"}}},
        ),
        "escalate",
        "an env secret at the second level (unresolved-value)",
    )
    add(
        "subst-env-secret-deeper",
        exp(
            [act("add_uplink_toxic", {"toxic_type": "latency", "attributes": "${inner}"})],
            secrets={"grp": {"inner": {"latency": {"type": "env", "key": "SRE_REDTEAM_L"}}}},
        ),
        "escalate",
        "load_secrets recurses: the attributes dict carries an env value",
    )
    add(
        "subst-vault-secret",
        exp(
            [act("cut_uplink", {"duration_s": "${d}"})],
            secrets={"grp": {"type": "vault", "path": "secret/chaos"}},
        ),
        "escalate",
        "external-secrets",
    )
    add(
        "subst-dynamic-config-process",
        exp(
            [act("cut_uplink", {"duration_s": "${d}"})],
            configuration={"d": {"type": "probe", "name": "dyn", "provider": sh(f"{TOUCH}; echo 30")}},
        ),
        "escalate",
        "load_dynamic_configuration runs a process probe before anything else",
    )
    add(
        "subst-dynamic-config-python",
        exp(
            [act("cut_uplink", {"duration_s": "${d}"})],
            configuration={
                "d": {
                    "type": "probe",
                    "name": "dyn",
                    "provider": {"type": "python", "module": "os", "func": "getpid"},
                }
            },
        ),
        "escalate",
        "a python probe from an unknown module runs as dynamic configuration",
    )
    add(
        "subst-proxy-name",
        exp([held(act("timeout_uplink", {"proxy": "up${x}"}), 120)], configuration={"x": "link"}),
        "escalate",
        "'up${x}' is the management link: 120 s cut",
    )
    add(
        "subst-proxy-name-dollar",
        exp([held(act("timeout_uplink", {"proxy": "$x"}), 120)], configuration={"x": "uplink"}),
        "escalate",
        "'$x' is the management link: 120 s cut",
    )
    add(
        "subst-attributes-dict",
        exp(
            [held(act("add_uplink_toxic", {"toxic_type": "latency", "attributes": "${attrs}"}), 120)],
            configuration={"attrs": {"latency": 100000}},
        ),
        "escalate",
        "a whole-string substitution yields a dict: 100 s latency is a cut, held 120 s",
    )
    add(
        "subst-toxic-type",
        exp([held(act("add_uplink_toxic", {"toxic_type": "$t"}), 120)], configuration={"t": "timeout"}),
        "escalate",
        "the toxic type resolves to timeout (a cut), held 120 s",
    )
    add(
        "subst-pause",
        exp([{**act("timeout_uplink", {}), "pauses": {"after": "${p}"}}], configuration={"p": 600}),
        "escalate",
        "chaoslib substitutes pauses: a 600 s cut",
    )
    add(
        "subst-config-yaml-anchor",
        "title: anchors\ndescription: anchored\n"
        "configuration:\n  long: &long {duration_s: 300}\n"
        "steady-state-hypothesis:\n  title: ready\n  probes:\n  - {type: probe, name: r, tolerance: true,"
        " provider: {type: python, module: chaos.probes, func: serving_ready}}\n"
        "method:\n- type: action\n  name: cut\n"
        "  provider: {type: python, module: chaos.actions, func: cut_uplink,"
        " arguments: {<<: *long}}\n"
        "rollbacks:\n- {type: action, name: r,"
        " provider: {type: python, module: chaos.actions, func: restore_uplink}}\n",
        "escalate",
        "a YAML merge key brings duration_s 300 in from an anchor",
        "yaml",
    )

    # --- levels: controls, hypothesis, rollbacks, refs ---------------------------------------------
    ctl_os = {"name": "c", "provider": {"type": "python", "module": "subprocess"}}
    add(
        "control-experiment-level",
        exp([act("stress_cpu", {"workers": 1, "duration_s": 5})], controls=[ctl_os]),
        "escalate",
        "unknown-control at the experiment level",
    )
    hyp_ctl = {**HYP, "controls": [ctl_os]}
    add(
        "control-hypothesis-level",
        exp([act("stress_cpu", {"workers": 1, "duration_s": 5})], hyp=hyp_ctl),
        "escalate",
        "chaoslib reads controls on the steady-state hypothesis",
    )
    add(
        "control-method-activity",
        exp([{**act("stress_cpu", {"workers": 1, "duration_s": 5}), "controls": [ctl_os]}]),
        "escalate",
        "a control on a method activity",
    )
    add(
        "control-rollback-activity",
        exp(
            [act("stress_cpu", {"workers": 1, "duration_s": 5})], rollbacks=[{**CLEAR, "controls": [ctl_os]}]
        ),
        "escalate",
        "a control on a rollback activity",
    )
    add(
        "control-probe-in-hypothesis",
        exp(
            [act("stress_cpu", {"workers": 1, "duration_s": 5})],
            hyp={"title": "t", "probes": [{**HYP["probes"][0], "controls": [ctl_os]}]},
        ),
        "escalate",
        "a control on a hypothesis probe",
    )
    add(
        "tolerance-is-process-probe",
        exp(
            [act("stress_cpu", {"workers": 1, "duration_s": 5})],
            hyp={
                "title": "t",
                "probes": [
                    {**HYP["probes"][0], "tolerance": {"type": "probe", "name": "tol", "provider": sh(TOUCH)}}
                ],
            },
        ),
        "escalate",
        "a hypothesis tolerance may itself be a probe activity (process provider)",
    )
    add(
        "tolerance-is-action",
        exp(
            [act("stress_cpu", {"workers": 1, "duration_s": 5})],
            hyp={
                "title": "t",
                "probes": [
                    {
                        **HYP["probes"][0],
                        "tolerance": {
                            "type": "probe",
                            "name": "tol",
                            "provider": {
                                "type": "python",
                                "module": "chaos.actions",
                                "func": "cut_uplink",
                                "arguments": {"duration_s": 300},
                            },
                        },
                    }
                ],
            },
        ),
        "escalate",
        "a tolerance probe that cuts the management link for 300 s",
    )
    add(
        "hypothesis-holds-action",
        exp(
            [probe("active_faults", module="chaos.probes")],
            hyp={"title": "t", "probes": [{**act("cut_uplink", {"duration_s": 45}), "tolerance": True}]},
        ),
        "escalate",
        "an action in the hypothesis runs before and after the method: 90 s cut",
    )
    add(
        "rollback-ref-reinjects",
        exp([act("cut_uplink", {"duration_s": 40}, name="cut")], rollbacks=[{"ref": "cut"}, RESTORE]),
        "escalate",
        "a rollback `ref` re-runs the cut (injects-in-rollback, 80 s)",
    )
    add(
        "method-ref-repeats",
        exp([act("cut_uplink", {"duration_s": 40}, name="cut"), {"ref": "cut"}]),
        "escalate",
        "a `ref` repeats the 40 s cut: 80 s",
    )
    add(
        "process-in-rollback",
        exp(
            [act("stress_cpu", {"workers": 1, "duration_s": 5})],
            rollbacks=[{"type": "action", "name": "p", "provider": sh(TOUCH)}],
        ),
        "escalate",
        "process provider (and shell) in rollbacks",
    )
    add(
        "background-overlap",
        exp(
            [
                {**act("cut_uplink", {"duration_s": 50}, name="c1"), "background": True},
                held(act("timeout_uplink", {}, name="c2"), 55),
            ]
        ),
        "escalate",
        "a background cut then another cut held: management link down > 60 s",
    )

    # --- names: aliases of the management link ---------------------------------------------------
    for nid, name in [
        ("pct", "%75plink"),
        ("pct-full", "%75%70%6c%69%6e%6b"),
        ("dot-slash", "./uplink"),
        ("dotdot", "x/../uplink"),
        ("fullwidth", "\uff55\uff50\uff4c\uff49\uff4e\uff4b"),
        ("zero-width", "up\u200blink"),
        ("double-pct", "%2575plink"),
        ("trailing-slash", "uplink/"),
        # "UPLINK" was tried and dropped: the fault API and Toxiproxy match names case-sensitively and the
        # action creates a separate proxy for it, so it is no alias of the management link
    ]:
        add(
            f"name-{nid}",
            exp([held(act("timeout_uplink", {"proxy": name}), 120)]),
            "escalate",
            f"proxy {name!r} reaches the management link after decoding/normalisation (or is not strict)",
        )
    add(
        "name-toxi-pct-disable",
        exp(
            [held(act("disable_proxy", {"proxy_name": "%75plink"}, module="chaostoxi.proxy.actions"), 120)],
            rollbacks=[
                act("enable_proxy", {"proxy_name": "uplink"}, module="chaostoxi.proxy.actions"),
                TOXI_RESET,
            ],
        ),
        "escalate",
        "disable_proxy on the percent-encoded management link, 120 s",
    )
    add(
        "name-toxi-dot-timeout",
        exp(
            [
                held(
                    act(
                        "create_timeout_toxic",
                        {"for_proxy": "./uplink", "toxic_name": "t", "timeout": 0},
                        module="chaostoxi.toxic.actions",
                    ),
                    120,
                )
            ],
            rollbacks=[TOXI_RESET],
        ),
        "escalate",
        "create_timeout_toxic for './uplink', 120 s",
    )

    # --- effects disguised by attributes ---------------------------------------------------------
    add(
        "effect-latency-over-cut",
        exp([held(act("slow_uplink", {"latency_ms": 6000}), 120)]),
        "escalate",
        "6 s latency >= cut_latency_ms: a cut, held 120 s",
    )
    add(
        "effect-latency-plus-jitter",
        exp([held(act("slow_uplink", {"latency_ms": 3000, "jitter_ms": 2500}), 120)]),
        "escalate",
        "latency + jitter 5.5 s >= 5 s: a cut, held 120 s",
    )
    add(
        "effect-bandwidth-zero",
        exp([held(act("degrade_uplink_bandwidth", {"rate_kbps": 0}), 120)]),
        "escalate",
        "0 kbps is a cut, held 120 s",
    )
    add(
        "effect-add-toxic-bandwidth",
        exp([held(act("add_uplink_toxic", {"toxic_type": "bandwidth", "attributes": {"rate": 0}}), 120)]),
        "escalate",
        "bandwidth toxic rate 0 via the generic action",
    )
    add(
        "effect-add-toxic-slicer",
        exp(
            [
                held(
                    act(
                        "add_uplink_toxic",
                        {
                            "toxic_type": "slicer",
                            "attributes": {"average_size": 1, "size_variation": 0, "delay": 60_000_000},
                        },
                    ),
                    120,
                )
            ]
        ),
        "escalate",
        "slicer with 60 s per byte stops traffic",
    )
    add(
        "effect-add-toxic-latency",
        exp(
            [
                held(
                    act("add_uplink_toxic", {"toxic_type": "latency", "attributes": {"latency": 3_600_000}}),
                    120,
                )
            ]
        ),
        "escalate",
        "an hour of latency through the generic action",
    )
    add(
        "effect-toxi-bandwidth",
        exp(
            [
                held(
                    act(
                        "create_bandwith_degradation_toxic",
                        {"for_proxy": "uplink", "toxic_name": "b", "rate": 0},
                        module="chaostoxi.toxic.actions",
                    ),
                    120,
                )
            ],
            rollbacks=[TOXI_RESET],
        ),
        "escalate",
        "chaostoolkit-toxiproxy bandwidth 0 on uplink",
    )
    add(
        "effect-toxi-latency-max",
        exp(
            [
                held(
                    act(
                        "create_latency_toxic",
                        {"for_proxy": "uplink", "toxic_name": "l", "latency": 10000},
                        module="chaostoxi.toxic.actions",
                    ),
                    120,
                )
            ],
            rollbacks=[TOXI_RESET],
        ),
        "escalate",
        "10 s latency (within max_size) is a cut by effect",
    )
    add(
        "effect-toxi-generic-latency",
        exp(
            [
                held(
                    act(
                        "create_toxic",
                        {
                            "for_proxy": "uplink",
                            "toxic_name": "g",
                            "toxic_type": "latency",
                            "attributes": {"latency": 600000},
                        },
                        module="chaostoxi.toxic.actions",
                    ),
                    120,
                )
            ],
            rollbacks=[TOXI_RESET],
        ),
        "escalate",
        "generic toxic latency 600 s",
    )
    add(
        "effect-toxi-slicer",
        exp(
            [
                held(
                    act(
                        "create_slicer_toxic",
                        {
                            "for_proxy": "uplink",
                            "toxic_name": "s",
                            "average_size": 1,
                            "size_variation": 0,
                            "delay": 60_000_000,
                        },
                        module="chaostoxi.toxic.actions",
                    ),
                    120,
                )
            ],
            rollbacks=[TOXI_RESET],
        ),
        "escalate",
        "slicer 60 s per byte",
    )

    # --- accumulation: safe-looking faults that add up -------------------------------------------
    add(
        "sum-two-cuts",
        exp(
            [act("cut_uplink", {"duration_s": 40}, name="a"), act("cut_uplink", {"duration_s": 40}, name="b")]
        ),
        "escalate",
        "40 s + 40 s of cut",
    )
    add(
        "sum-cut-method-and-rollback",
        exp(
            [act("cut_uplink", {"duration_s": 40}, name="a")],
            rollbacks=[act("cut_uplink", {"duration_s": 40}, name="b"), RESTORE],
        ),
        "escalate",
        "a cut split across method and rollbacks",
    )
    add(
        "sum-cut-then-held-timeout",
        exp([act("cut_uplink", {"duration_s": 30}, name="a"), held(act("timeout_uplink", {}, name="b"), 40)]),
        "escalate",
        "30 s cut + 40 s timeout toxic held until the rollback",
    )
    add(
        "sum-latency-cut-then-cut",
        exp(
            [
                held(act("slow_uplink", {"latency_ms": 6000}, name="a"), 30),
                act("cut_uplink", {"duration_s": 40}, name="b"),
            ]
        ),
        "escalate",
        "a latency cut held 30 s (still in force) then a 40 s cut",
    )
    add(
        "sum-cpu",
        exp(
            [
                act("stress_cpu", {"workers": 4, "duration_s": 300}, name="a"),
                act("stress_cpu", {"workers": 4, "duration_s": 300}, name="b"),
            ]
        ),
        "escalate",
        "2400 worker-seconds > max_total.cpu 1200",
    )
    add(
        "sum-disk",
        exp(
            [
                act("fill_disk", {"reserve_mb": 1024, "max_mb": 4096}, name="a"),
                act("fill_disk", {"reserve_mb": 1024, "max_mb": 4096}, name="b"),
            ]
        ),
        "escalate",
        "8192 MB > max_total.disk 4096",
    )
    add(
        "sum-clock",
        exp(
            [
                act("skew_agent_clock", {"offset_s": 86400, "duration_s": 300}, name="a"),
                act("skew_agent_clock", {"offset_s": 86400, "duration_s": 300}, name="b"),
            ]
        ),
        "escalate",
        "172800 s of skew > max_total.clock 86400",
    )
    add(
        "sum-input",
        exp([act("inject_input_noise", {"share": 0.5, "duration_s": 300}, name=f"n{i}") for i in range(3)]),
        "escalate",
        "450 share-seconds > max_total.input 300",
    )
    add(
        "sum-slots",
        exp([act("rollback_drill", {"module": "classifier", "hold_s": 0}, name=f"d{i}") for i in range(3)]),
        "escalate",
        "3 drills = 6 flips > max_total.slots 4",
    )

    # --- providers outside the allowlist ---------------------------------------------------------
    add(
        "process-provider",
        exp(
            [
                {
                    "type": "action",
                    "name": "p",
                    "provider": {"type": "process", "path": "/usr/bin/touch", "arguments": [MARK]},
                }
            ]
        ),
        "escalate",
        "process-provider (never approvable)",
    )
    add(
        "process-shell-string",
        exp(
            [
                {
                    "type": "action",
                    "name": "p",
                    "provider": {"type": "process", "path": "/bin/sh", "arguments": f"-c '{TOUCH}'"},
                }
            ]
        ),
        "escalate",
        "shell-string (never approvable)",
    )
    add(
        "python-os-system",
        exp([act("system", {"command": TOUCH}, module="os")]),
        "escalate",
        "unknown-activity os:system",
    )
    add(
        "python-subprocess",
        exp([act("run", {"args": ["touch", MARK]}, module="subprocess")]),
        "escalate",
        "unknown-activity subprocess:run",
    )
    add(
        "python-uncatalogued-in-ours",
        exp([act("SkewedClock", {}, module="chaos.faults")]),
        "escalate",
        "a function of our package that is not in the catalogue",
    )
    add(
        "probe-kind-mismatch",
        exp([probe("cut_uplink", {"duration_s": 300}, module="chaos.actions")]),
        "escalate",
        "an action used as a probe still cuts for 300 s",
    )
    add(
        "http-post-loopback",
        exp(
            [
                {
                    "type": "action",
                    "name": "h",
                    "provider": {
                        "type": "http",
                        "url": "http://127.0.0.1:9/admin/shutdown",
                        "method": "post",
                    },
                }
            ]
        ),
        "escalate",
        "http-action (lowercase method)",
    )
    add(
        "http-userinfo-host",
        exp(
            [
                {
                    "type": "probe",
                    "name": "h",
                    "provider": {"type": "http", "url": "http://127.0.0.1@10.0.0.1/health"},
                }
            ]
        ),
        "escalate",
        "the host is 10.0.0.1 (userinfo trick)",
    )
    add(
        "http-substituted-host",
        exp(
            [{"type": "probe", "name": "h", "provider": {"type": "http", "url": "http://${h}/health"}}],
            configuration={"h": "10.0.0.1"},
        ),
        "escalate",
        "the substituted host is off the device",
    )

    # --- the agent and settings taken from the document ------------------------------------------
    add(
        "agent-kill",
        exp([act("kill_serving_worker", {"sig": 9})], rollbacks=[act("restart_serving_worker", {}), CLEAR]),
        "escalate",
        "agent-target: in the daemon run/serving.pid is the agent",
    )
    add(
        "agent-kill-substituted",
        exp(
            [act("kill_serving_worker", {"sig": "${s}"})],
            rollbacks=[act("restart_serving_worker", {}), CLEAR],
            configuration={"s": 9},
        ),
        "escalate",
        "agent-target with a substituted signal",
    )
    add(
        "setting-serving-restart",
        exp(
            [act("stress_cpu", {"workers": 1, "duration_s": 5})],
            configuration={"serving_restart": ["/bin/sh", "-c", TOUCH]},
        ),
        "escalate",
        "device-setting: the restart argv would come from the document",
    )
    add(
        "setting-state-dir",
        exp([act("fill_disk", {"reserve_mb": 1024, "max_mb": 64})], configuration={"state_dir": "/"}),
        "escalate",
        "device-setting: state_dir from the document",
    )
    add(
        "setting-toxiproxy-url",
        exp(
            [act("slow_uplink", {"latency_ms": 100})], configuration={"toxiproxy_url": "http://10.0.0.1:8474"}
        ),
        "escalate",
        "device-setting: the fault API off the device",
    )
    add(
        "setting-uplink-upstream",
        exp([act("slow_uplink", {"latency_ms": 100})], configuration={"uplink_upstream": "10.0.0.9:443"}),
        "escalate",
        "device-setting: the uplink proxy re-pointed elsewhere",
    )
    add(
        "setting-serving-url",
        exp(
            [act("stress_cpu", {"workers": 1, "duration_s": 5})],
            configuration={"serving_url": "http://10.0.0.1:8080"},
        ),
        "escalate",
        "device-setting: the probes' server off the device",
    )
    add(
        "setting-path-via-secret",
        exp(
            [act("fill_disk", {"reserve_mb": 1024, "max_mb": 64, "path": "${p}"})],
            secrets={"grp": {"p": "/"}},
        ),
        "escalate",
        "fill_disk's path (escalate-argument) arriving through a secret",
    )
    add(
        "slot-module-traversal",
        exp([act("corrupt_standby_slot", {"module": "../classifier", "nbytes": 64})]),
        "escalate",
        "a module name that walks out of the slot tree",
    )

    # --- hostile numbers --------------------------------------------------------------------------
    big = "9" * 5000
    add(
        "num-json-5000-digits",
        '{"title": "t", "description": "d", "method": [{"type": "action", "name": "c",'
        ' "provider": {"type": "python", "module": "chaos.actions", "func": "cut_uplink", "arguments":'
        ' {"duration_s": ' + big + "}}}]}",
        "reject",
        "a 5000-digit integer (Python's int limit)",
    )
    add(
        "num-yaml-5000-digits",
        "title: t\ndescription: d\nmethod:\n- type: action\n  name: c\n  provider: {type: python,"
        " module: chaos.actions, func: cut_uplink, arguments: {duration_s: " + big + "}}\n",
        "reject",
        "a 5000-digit YAML integer",
        "yaml",
    )
    yhead = (
        "title: t\ndescription: d\nsteady-state-hypothesis:\n  title: r\n  probes:\n"
        "  - {type: probe, name: r,"
        " tolerance: true, provider: {type: python, module: chaos.probes, func: serving_ready}}\n"
    )
    yroll = (
        "rollbacks:\n- {type: action, name: r,"
        " provider: {type: python, module: chaos.actions, func: restore_uplink}}\n"
    )
    add(
        "num-yaml-nan",
        yhead + "method:\n- {type: action, name: c, provider: {type: python, module: chaos.actions,"
        " func: cut_uplink, arguments: {duration_s: .nan}}}\n" + yroll,
        "escalate",
        "NaN compares false with every bound",
        "yaml",
    )
    add(
        "num-yaml-inf",
        yhead + "method:\n- {type: action, name: c, provider: {type: python, module: chaos.actions,"
        " func: cut_uplink, arguments: {duration_s: .inf}}}\n" + yroll,
        "escalate",
        "an infinite cut",
        "yaml",
    )
    add(
        "num-json-nan-pause",
        json.dumps(exp([held(act("timeout_uplink", {}), float("nan"))])),
        "escalate",
        "a NaN pause while the link is cut",
    )
    add(
        "num-json-huge-float-pause",
        json.dumps(exp([held(act("timeout_uplink", {}), 1)])).replace('"after": 1', '"after": 1e999'),
        "escalate",
        "1e999 is inf in Python's json",
    )
    add(
        "num-string-duration",
        exp([act("cut_uplink", {"duration_s": "300"})]),
        "escalate",
        "a numeric string the action may coerce",
    )
    add(
        "num-fullwidth-digits",
        exp([act("cut_uplink", {"duration_s": "\uff13\uff10\uff10"})]),
        "escalate",
        "int() of fullwidth digits is 300",
    )
    add(
        "num-negative-skew",
        exp([act("skew_agent_clock", {"offset_s": -(10**30), "duration_s": 30})]),
        "escalate",
        "|offset| far over the bound",
    )
    add(
        "num-float-duration",
        exp([act("stress_cpu", {"workers": 4, "duration_s": 1e3})]),
        "escalate",
        "a float duration 1000 s over the 300 s bound",
    )

    # --- hostile structures -----------------------------------------------------------------------
    deep = (
        '{"title": "t", "description": "d", "method": [{"type": "action", "name": "c",'
        ' "provider": {"type": "python",'
        ' "module": "chaos.actions", "func": "stress_cpu", "arguments": {"workers": '
        + "[" * 200000
        + "]" * 200000
        + "}}}]}"
    )
    add("deep-json", deep, "reject", "200k nested lists", hostile=True)
    add(
        "deep-yaml",
        "title: t\ndescription: d\nmethod: " + "[" * 200000 + "]" * 200000 + "\n",
        "reject",
        "200k nested YAML flow sequences",
        "yaml",
        hostile=True,
    )
    laughs = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8)
    )
    add(
        "billion-laughs",
        laughs + "title: t\ndescription: d\nmethod: []\n",
        "reject",
        "YAML alias expansion (10^9 nodes)",
        "yaml",
        hostile=True,
    )
    add(
        "huge-file",
        b'{"title": "t", "description": "' + b"A" * (48 * 1024 * 1024) + b'", "method": []}',
        "reject",
        "a 48 MiB document",
        hostile=True,
    )
    add("non-utf8", b'{"title": "t\xff\xfe", "description": "d", "method": []}', "reject", "invalid UTF-8")
    add(
        "yaml-python-tag",
        "title: !!python/object/apply:os.system ['" + TOUCH + "']\ndescription: d\nmethod: []\n",
        "reject",
        "a Python tag",
        "yaml",
    )
    add(
        "json-duplicate-key",
        json.dumps(exp([act("cut_uplink", {"duration_s": 30})])).replace(
            '"duration_s": 30', '"duration_s": 30, "duration_s": 300'
        ),
        "escalate",
        "duplicate keys: json keeps the last (300)",
    )
    add(
        "yaml-duplicate-key",
        yhead + "method:\n- {type: action, name: c, provider: {type: python, module: chaos.actions,"
        " func: cut_uplink, arguments: {duration_s: 30, duration_s: 300}}}\n" + yroll,
        "escalate",
        "duplicate YAML keys: the last (300) wins in PyYAML",
        "yaml",
    )
    add(
        "declared-low-risk",
        exp(
            [act("cut_uplink", {"duration_s": 300})],
            extensions=[{"name": "sre-agent", "risk": "low", "max_duration_s": 10}],
        ),
        "escalate",
        "a declaration never removes a finding",
    )
    c.extend(targeted())
    return c


def targeted() -> list[Case]:
    """Written after reading chaos/preflight.py and chaos/resolve.py: where the model of chaoslib or of
    the receiving APIs differs from what they do."""
    toxi = "chaostoxi.proxy.actions"
    return [
        Case(
            "ref-duplicate-name",
            exp(
                [
                    probe("active_faults", name="x"),
                    act("cut_uplink", {"duration_s": 40}, name="x"),
                    {"ref": "x"},
                ]
            ),
            "escalate",
            "chaoslib's activity cache keeps the LAST activity of a name (method, then hypothesis): the ref "
            "repeats the 40 s cut (80 s), not the probe",
        ),
        Case(
            "ref-duplicate-name-rollback",
            exp(
                [probe("active_faults", name="x"), act("cut_uplink", {"duration_s": 40}, name="x")],
                rollbacks=[{"ref": "x"}, RESTORE],
            ),
            "escalate",
            "the rollback ref resolves to the cut (injects-in-rollback, 80 s)",
        ),
        Case(
            "decoy-restore",
            exp(
                [held(act("timeout_uplink", {}), 20)],
                rollbacks=[
                    act("restore_uplink", {"proxy": "decoy"}, name="decoy"),
                    held(probe("active_faults", name="wait"), 300),
                    CLEAR,
                ],
            ),
            "escalate",
            "restore_uplink of another proxy does not restore the uplink: cut for ~320 s",
        ),
        Case(
            "decoy-delete-toxic",
            exp(
                [
                    held(
                        act(
                            "create_timeout_toxic",
                            {"for_proxy": "uplink", "toxic_name": "t", "timeout": 0},
                            module="chaostoxi.toxic.actions",
                        ),
                        20,
                    )
                ],
                rollbacks=[
                    act(
                        "delete_toxic",
                        {"for_proxy": "uplink", "toxic_name": "other"},
                        module="chaostoxi.toxic.actions",
                    ),
                    held(
                        probe("proxy_exist", {"proxy_name": "uplink"}, module="chaostoxi.proxy.probes"), 300
                    ),
                    TOXI_RESET,
                ],
            ),
            "escalate",
            "delete_toxic of another toxic leaves the timeout toxic for ~320 s",
        ),
        Case(
            "http-backslash-host",
            exp(
                [
                    {
                        "type": "probe",
                        "name": "h",
                        "provider": {"type": "http", "url": "http://10.0.0.1\\@127.0.0.1/health"},
                    }
                ]
            ),
            "escalate",
            "urlsplit says 127.0.0.1, requests/urllib3 connect to 10.0.0.1",
        ),
        Case(
            "delete-management-proxy",
            exp([act("delete_proxy", {"proxy_name": "uplink"}, module=toxi)], rollbacks=[TOXI_RESET]),
            "escalate",
            "deleting the uplink proxy cuts the management link and no rollback recreates it",
        ),
        Case(
            "recreate-management-proxy",
            exp(
                [
                    act(
                        "create_proxy",
                        {
                            "proxy_name": "uplink",
                            "upstream_host": "127.0.0.1",
                            "upstream_port": 9,
                            "listen_host": "127.0.0.1",
                            "listen_port": 0,
                        },
                        module=toxi,
                    )
                ],
                rollbacks=[act("delete_proxy", {"proxy_name": "uplink"}, module=toxi)],
            ),
            "escalate",
            "a proxy named like the management link (re-pointed to discard), deleted by the rollback",
        ),
        Case(
            "probe-timeout-underestimated",
            exp(
                [
                    held(act("timeout_uplink", {}), 20),
                    {**probe("serving_ready", {"timeout_s": 3600}, name="slow"), "timeout": 1},
                ]
            ),
            "escalate",
            "chaoslib never enforces `timeout`; serving_ready may wait 3600 s while the link is cut",
        ),
        Case(
            "restore-after-long-pause",
            exp(
                [held(act("timeout_uplink", {}), 20)],
                rollbacks=[{**RESTORE, "pauses": {"before": 300}}, CLEAR],
            ),
            "escalate",
            "the restoring rollback waits 300 s first: the link stays cut ~320 s",
        ),
    ]


# ---------------------------------------------------------------------------------------------------
# safe cases: the docs' own examples and variations; must be `run`
# ---------------------------------------------------------------------------------------------------
README_EXAMPLE = """\
title: Uplink latency does not disturb inference
description: 300 ms on the management link for 20 s; inference keeps its p95 budget
steady-state-hypothesis:
  title: inference meets its SLOs
  probes:
    - type: probe
      name: p95-within-budget
      tolerance: {type: range, range: [0, 250]}
      provider:
        type: python
        module: chaos.probes
        func: inference_p95_ms
        arguments: {model: classifier, samples: 20}
method:
  - type: action
    name: slow-the-uplink
    provider: {type: python, module: chaos.actions, func: slow_uplink, arguments: {latency_ms: 300}}
    pauses: {after: 20}
rollbacks:
  - type: action
    name: restore-the-uplink
    provider: {type: python, module: chaos.actions, func: restore_uplink}
"""


def safe() -> list[Case]:
    c: list[Case] = []
    for name in [
        "uplink-latency.yaml",
        "input-noise.json",
        "cpu-stress.yaml",
        "standby-corruption.yaml",
        "rollback-drill.yaml",
        "toxiproxy-service-latency.json",
        "clock-skew.yaml",
    ]:
        c.append(
            Case(
                f"example-{name}",
                (EXAMPLES / name).read_text(),
                "run",
                "expect-run example",
                name.rsplit(".", 1)[1],
            )
        )
    c.append(Case("readme-example", README_EXAMPLE, "run", "README's own example", "yaml"))
    c.append(
        Case(
            "safe-latency-dollar",
            exp([held(act("slow_uplink", {"latency_ms": "$lat"}), 20)], configuration={"lat": 300}),
            "run",
            "$lat from a literal entry",
        )
    )
    c.append(
        Case(
            "safe-latency-brace",
            exp(
                [held(act("slow_uplink", {"latency_ms": "${lat}", "proxy": "uplink"}), 20)],
                configuration={"lat": 300},
            ),
            "run",
            "${lat} from a literal entry",
        )
    )
    c.append(Case("safe-short-cut", exp([act("cut_uplink", {"duration_s": 30})]), "run", "30 s cut <= 60 s"))
    c.append(
        Case(
            "safe-cpu-two",
            exp([act("stress_cpu", {"workers": 2, "duration_s": 60})]),
            "run",
            "120 worker-seconds",
        )
    )
    c.append(
        Case(
            "safe-bandwidth",
            exp([held(act("degrade_uplink_bandwidth", {"rate_kbps": 100}), 20)]),
            "run",
            "100 kbps is a degradation, not a cut",
        )
    )
    c.append(
        Case(
            "safe-toxi-subst",
            exp(
                [
                    held(
                        act(
                            "create_latency_toxic",
                            {"for_proxy": "uplink", "toxic_name": "l", "latency": "${lat}"},
                            module="chaostoxi.toxic.actions",
                        ),
                        10,
                    )
                ],
                rollbacks=[
                    act(
                        "delete_toxic",
                        {"for_proxy": "uplink", "toxic_name": "l"},
                        module="chaostoxi.toxic.actions",
                    )
                ],
                configuration={"lat": 100},
            ),
            "run",
            "toxiproxy latency from config",
        )
    )
    c.append(
        Case(
            "safe-noise-subst",
            exp(
                [act("inject_input_noise", {"share": "${share}", "duration_s": 30})],
                configuration={"share": 0.2},
            ),
            "run",
            "share from a literal entry",
        )
    )
    c.append(
        Case(
            "safe-two-latencies",
            exp(
                [
                    held(act("slow_uplink", {"latency_ms": 300}, name="a"), 10),
                    held(act("slow_uplink", {"latency_ms": 200}, name="b"), 10),
                ]
            ),
            "run",
            "two degradations, no cut",
        )
    )
    c.append(
        Case(
            "safe-disk",
            exp([act("fill_disk", {"reserve_mb": 1024, "max_mb": 256})]),
            "run",
            "256 MB ballast above the reserve",
        )
    )
    c.append(
        Case(
            "safe-dollar-text",
            exp(
                [act("stress_cpu", {"workers": 1, "duration_s": 10})],
                description="costs $$5, see ${not_a_key} and $HOME",
            ),
            "run",
            "dollar signs in free text",
        )
    )
    return c


DANGEROUS = dangerous()
SAFE = safe()
ALL = DANGEROUS + SAFE

# Filled in after the first run against the current code: case id -> what breaks.
XFAIL: dict[str, str] = {
    # all seven found on the first run (slot-flip totals, decoy restores of another proxy or toxic, a
    # backslash URL host, deleting or re-creating the management proxy, probe waits) are fixed
}


def _params(cases: list[Case]) -> list[Any]:
    out = []
    for case in cases:
        marks = (
            [pytest.mark.xfail(strict=False, reason=f"red team: {XFAIL[case.id]}")]
            if case.id in XFAIL
            else []
        )
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


# ---------------------------------------------------------------------------------------------------
# fixtures and CLI plumbing
# ---------------------------------------------------------------------------------------------------
@dataclass
class World:
    root: Path
    state: StatePaths
    policy: Path
    files: dict[str, Path]
    marker: Path


def _relaxed_policy(dest: Path) -> Path:
    doc = yaml.safe_load((REPO / "policies" / "defaults" / "chaos.yaml").read_text())
    doc["headroom"] = {"disk_reserve_mb": 1, "max_cpu_load": 1000, "min_mem_available_mb": 0}
    dest.write_text(yaml.safe_dump(doc))
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("redteam")
    state = StatePaths(root / "state")
    state.create()
    marker = root / "EXECUTED"
    files: dict[str, Path] = {}
    (root / "cases").mkdir()
    for case in ALL:
        path = root / "cases" / f"{case.id}.{case.ext}"
        doc = case.doc
        if isinstance(doc, dict):
            data: bytes = json.dumps(doc).replace(MARK, str(marker)).encode()
        elif isinstance(doc, str):
            data = doc.replace(MARK, str(marker)).encode()
        else:
            data = doc
        path.write_bytes(data)
        files[case.id] = path
    yield World(root, state, _relaxed_policy(root / "chaos-policy.yaml"), files, marker)
    shutil.rmtree(root, ignore_errors=True)


def cli(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    """Invoke the console script's entry point `sre-agent ARGS` in process: exit code, --json body, output."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    except Exception as exc:  # a crash is a finding, not a verdict
        return -1, None, f"{out.getvalue()}\nEXCEPTION {type(exc).__name__}: {str(exc)[:300]}"
    body: dict[str, Any] | None
    try:
        body = json.loads(out.getvalue())
    except ValueError:
        body = None
    return rc, body, out.getvalue() + err.getvalue()


CHILD = r"""
import contextlib, io, json, sys
from sre_agent.cli import main
res = {}
policy, files = sys.argv[1], sys.argv[2:]
for f in files:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            rc = main(["chaos", "preflight", f, "--static", "--policy", policy, "--json"])
        exc = None
    except BaseException as e:
        rc, exc = -1, type(e).__name__
    try:
        v = json.loads(out.getvalue()).get("verdict")
    except Exception:
        v = None
    res[f] = {"rc": rc, "verdict": v, "exc": exc}
sys.__stdout__.write(json.dumps(res) + "\n")
"""


@pytest.fixture(scope="module")
def hostile_results(world: World) -> dict[str, dict[str, Any]]:
    """Static pre-flight of the hostile structures in one child process (a crash cannot hit pytest)."""
    files = [str(world.files[c.id]) for c in ALL if c.hostile]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(world.policy), *files],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        return {f: {"rc": proc.returncode, "verdict": None, "exc": proc.stderr[-300:]} for f in files}
    res: dict[str, dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


@pytest.fixture(scope="module")
def validate_results(world: World) -> dict[str, str]:
    """`chaos validate --json` over every non-hostile case at once: file -> verdict."""
    files = [str(world.files[c.id]) for c in ALL if not c.hostile]
    _, body, out = cli("chaos", "validate", *files, "--policy", str(world.policy), "--json")
    assert body is not None, out[-2000:]
    return {f["file"]: f["verdict"] for f in body["files"]}


def static_verdict(
    world: World, case: Case, hostile: dict[str, dict[str, Any]] | None = None
) -> tuple[int, str | None, str]:
    if case.hostile:
        assert hostile is not None
        r = hostile[str(world.files[case.id])]
        return r["rc"], r["verdict"], str(r["exc"])
    rc, body, out = cli(
        "chaos", "preflight", str(world.files[case.id]), "--static", "--policy", str(world.policy), "--json"
    )
    return rc, (body or {}).get("verdict"), out


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _params(DANGEROUS))
def test_dangerous_never_runs_static(
    world: World, hostile_results: dict[str, dict[str, Any]], case: Case
) -> None:
    """Static pre-flight: escalate or reject, with the documented exit code; never a crash."""
    rc, verdict, out = static_verdict(world, case, hostile_results)
    assert verdict in ("escalate", "reject"), f"{case.why}: got {verdict!r} rc={rc}\n{out[-1500:]}"
    assert rc == EXIT[verdict], out[-1500:]


@pytest.mark.parametrize("case", _params([c for c in DANGEROUS if not c.hostile]))
def test_dangerous_validate_agrees(world: World, validate_results: dict[str, str], case: Case) -> None:
    """`chaos validate` applies every check `chaos run` applies: never `run` for these."""
    assert validate_results[str(world.files[case.id])] in ("escalate", "reject"), case.why


# one or two of each class on the device path (each call takes a device snapshot: keep the file fast)
ON_DEVICE = [
    "subst-dollar-name",
    "subst-dynamic-config-process",
    "subst-proxy-name",
    "control-hypothesis-level",
    "tolerance-is-process-probe",
    "rollback-ref-reinjects",
    "name-pct",
    "effect-bandwidth-zero",
    "sum-two-cuts",
    "sum-cpu",
    "process-shell-string",
    "agent-kill",
    "setting-serving-restart",
    "num-json-5000-digits",
    "num-yaml-nan",
    "json-duplicate-key",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", _params([c for c in DANGEROUS if c.id in ON_DEVICE]))
def test_dangerous_refused_on_device(world: World, case: Case) -> None:
    """Device pre-flight and `chaos run` refuse; nothing executes (no run directory, no marker)."""
    path = str(world.files[case.id])
    common = ("--state", str(world.state.root), "--policy", str(world.policy), "--json")
    rc, body, out = cli("chaos", "preflight", path, *common)
    verdict = (body or {}).get("verdict")
    assert verdict in ("escalate", "reject"), f"{case.why}: got {verdict!r} rc={rc}\n{out[-1500:]}"
    assert rc == EXIT[verdict]
    runs = world.state.root / "run" / "chaos" / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    rc, body, out = cli("chaos", "run", path, "--budget", "5", *common)
    assert rc in (10, 2), f"chaos run did not refuse: rc={rc}\n{out[-1500:]}"
    assert (set(runs.iterdir()) if runs.is_dir() else set()) == before
    assert not world.marker.exists()


@pytest.mark.parametrize("case", _params(SAFE))
def test_safe_runs(world: World, validate_results: dict[str, str], case: Case) -> None:
    """No false escalation: the docs' examples and simple variations are `run` (static and validate)."""
    rc, verdict, out = static_verdict(world, case)
    assert verdict == "run" and rc == 0, f"{case.why}: got {verdict!r} rc={rc}\n{out[-1500:]}"
    assert validate_results[str(world.files[case.id])] == "run"


# --- approvals ---------------------------------------------------------------------------------------
NEVER = [
    "process-provider",
    "process-shell-string",
    "agent-kill",
    "setting-serving-restart",
    "subst-dynamic-config-process",
    "tolerance-is-process-probe",
]


@pytest.fixture(scope="module")
def operator(world: World) -> Path:
    from policies.approvals import generate_operator_key, private_key_pem, public_key_b64

    key = generate_operator_key()
    key_file = world.root / "alice.pem"
    key_file.write_bytes(private_key_pem(key))
    key_file.chmod(0o600)
    bob, mallory = generate_operator_key(), generate_operator_key()
    for name, k in (("bob", bob), ("mallory", mallory)):
        f = world.root / f"{name}.pem"
        f.write_bytes(private_key_pem(k))
        f.chmod(0o600)
    roster = {
        "version": 1,
        "operators": [
            {"id": "alice", "public_key": public_key_b64(key.public_key())},
            # bob may only approve rollbacks (threat model: `may_approve` bounds an operator's remit)
            {"id": "bob", "public_key": public_key_b64(bob.public_key()), "may_approve": ["rollback"]},
        ],
    }
    (world.state.root / "policies").mkdir(exist_ok=True)
    (world.state.root / "policies" / "operators.yaml").write_text(yaml.safe_dump(roster))
    return key_file


def _approve(world: World, key: Path, case_id: str, operator_id: str = "alice") -> Path:
    out = world.root / f"approval-{case_id}-{key.stem}-{operator_id}.json"
    rc, _, text = cli(
        "chaos",
        "approve",
        str(world.files[case_id]),
        "--key",
        str(key),
        "--operator",
        operator_id,
        "--out",
        str(out),
        "--ttl",
        "600",
        "--reason",
        "red team",
    )
    assert rc == 0 and out.exists(), text
    return out


def test_approval_sanctions_an_approvable_finding(world: World, operator: Path) -> None:
    """Control: a signed approval does unblock a plain management-cut (so the negatives mean something)."""
    approval = _approve(world, operator, "sum-two-cuts")
    common = ("--state", str(world.state.root), "--policy", str(world.policy), "--json")
    rc, body, out = cli(
        "chaos", "preflight", str(world.files["sum-two-cuts"]), *common, "--approve", str(approval)
    )
    assert rc == 0 and body is not None and body["verdict"] == "run", out[-1500:]


@pytest.mark.parametrize(
    "case_id",
    [
        pytest.param(
            i,
            marks=[pytest.mark.xfail(strict=False, reason=f"red team: {XFAIL['approve:' + i]}")]
            if "approve:" + i in XFAIL
            else [],
        )
        for i in NEVER
    ],
)
def test_approval_never_unblocks_never_approvable(world: World, operator: Path, case_id: str) -> None:
    approval = _approve(world, operator, case_id)
    common = ("--state", str(world.state.root), "--policy", str(world.policy), "--json")
    rc, body, out = cli("chaos", "preflight", str(world.files[case_id]), *common, "--approve", str(approval))
    assert body is not None and body["verdict"] in ("escalate", "reject") and rc == EXIT[body["verdict"]], (
        out[-1500:]
    )
    rc, body, out = cli(
        "chaos", "run", str(world.files[case_id]), "--budget", "5", *common, "--approve", str(approval)
    )
    assert rc in (10, 2), out[-1500:]
    assert not world.marker.exists()


def test_approval_for_other_content_does_not_transfer(world: World, operator: Path) -> None:
    """An approval of the 40+40 s cuts does not sanction the 300 s `$d` cut."""
    approval = _approve(world, operator, "sum-two-cuts")
    common = ("--state", str(world.state.root), "--policy", str(world.policy), "--json")
    rc, body, out = cli(
        "chaos", "preflight", str(world.files["subst-dollar-name"]), *common, "--approve", str(approval)
    )
    assert rc == 10 and body is not None and body["verdict"] == "escalate", out[-1500:]


def test_bare_hash_is_not_an_approval(world: World) -> None:
    """The docs show `--approve sha256:...`; the help says a signed file. A bare hash sanctions nothing."""
    common = ("--state", str(world.state.root), "--policy", str(world.policy), "--json")
    rc, body, _ = cli("chaos", "preflight", str(world.files["sum-two-cuts"]), *common)
    assert body is not None
    h = body["experiment_hash"]
    rc, body, out = cli("chaos", "preflight", str(world.files["sum-two-cuts"]), *common, "--approve", h)
    assert rc in (2, 10) and (body is None or body.get("verdict") != "run"), out[-1500:]


@pytest.mark.parametrize("signer", ["bob-beyond-remit", "mallory-as-alice"])
def test_approval_from_the_wrong_operator_sanctions_nothing(
    world: World, operator: Path, signer: str
) -> None:
    """bob may approve only rollbacks; mallory's key is not in the roster but she signs as alice."""
    key, op = {
        "bob-beyond-remit": (world.root / "bob.pem", "bob"),
        "mallory-as-alice": (world.root / "mallory.pem", "alice"),
    }[signer]
    approval = _approve(world, key, "sum-two-cuts", op)
    common = ("--state", str(world.state.root), "--policy", str(world.policy), "--json")
    rc, body, out = cli(
        "chaos", "preflight", str(world.files["sum-two-cuts"]), *common, "--approve", str(approval)
    )
    assert rc == 10 and body is not None and body["verdict"] == "escalate", out[-1500:]
