"""Pre-flight verdicts: every example gets its expected verdict; each rule fires where it should."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaos.escalation import EscalationPacket, build_escalation
from chaos.loader import ExperimentError, load_experiment, parse_experiment
from chaos.preflight import DeviceState, Preflight, PreflightResult, SlotState, preflight_file
from policies.chaos import ChaosPolicy, Window, default_chaos_policy

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (REPO / "experiments").iterdir() if p.suffix in (".json", ".yaml", ".yml"))
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # a Monday


def healthy(**changes: Any) -> DeviceState:
    base: dict[str, Any] = {
        "now": NOW,
        "modules": {"classifier": SlotState(active_version="2", standby_version="1", standby_verified=True)},
        "disk_free_mb": 20_000.0,
        "cpu_load": 0.2,
        "mem_available_mb": 4096.0,
        "device_id": "dev-1",
    }
    base.update(changes)
    return DeviceState(**base)


def expected_verdict(path: Path) -> str:
    """The verdict an example declares in its tags (``expect-run|escalate|reject``)."""
    text = path.read_text()
    for v in ("run", "escalate", "reject"):
        if f"expect-{v}" in text:
            return v
    raise AssertionError(f"{path.name} declares no expected verdict")


def check(
    doc: dict[str, Any], device: DeviceState | None = None, policy: ChaosPolicy | None = None
) -> PreflightResult:
    exp = parse_experiment(json.dumps(doc), "test.json")
    return Preflight(policy).check(exp, device if device is not None else healthy())


def rules(res: PreflightResult) -> set[str]:
    return {f.rule for f in res.findings}


def probe(name: str = "backlog", func: str = "uplink_backlog", **extra: Any) -> dict[str, Any]:
    return {
        "type": "probe",
        "name": name,
        "tolerance": {"type": "range", "range": [0, 10]},
        "provider": {"type": "python", "module": "chaos.probes", "func": func},
        **extra,
    }


def action(func: str, name: str | None = None, mod: str = "chaos.actions", **args: Any) -> dict[str, Any]:
    return {
        "type": "action",
        "name": name or func,
        "provider": {"type": "python", "module": mod, "func": func, "arguments": args},
    }


def safe_doc() -> dict[str, Any]:
    return {
        "title": "safe latency",
        "description": "200 ms on the uplink for 5 s, restored",
        "steady-state-hypothesis": {"title": "ok", "probes": [probe()]},
        "method": [{**action("slow_uplink", latency_ms=200), "pauses": {"after": 5}}],
        "rollbacks": [action("restore_uplink")],
    }


# --- the examples ---------------------------------------------------------------------------------


def test_there_are_enough_examples_of_each_kind() -> None:
    verdicts = [expected_verdict(p) for p in EXAMPLES]
    assert len(EXAMPLES) >= 8
    assert verdicts.count("run") >= 4 and verdicts.count("escalate") >= 4 and verdicts.count("reject") >= 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_gets_its_expected_verdict(path: Path) -> None:
    _, res = preflight_file(path, device=healthy())
    assert res.verdict == expected_verdict(path), res.reasons
    assert res.reasons
    if res.verdict == "run":
        assert not res.findings
    else:
        assert res.findings and all(f.rule for f in res.findings)


def test_example_rules_are_the_documented_ones() -> None:
    by_name = {p.name: rules(preflight_file(p, device=healthy())[1]) for p in EXAMPLES}
    assert by_name["uplink-blackout-5min.yaml"] == {"management-cut"}
    assert by_name["disk-fill-below-reserve.yaml"] == {"disk-below-reserve"}
    assert {"process-provider", "shell-string", "agent-target"} <= by_name["restart-agent-shell.yaml"]
    assert {"no-steady-state", "no-rollback"} <= by_name["kill-serving-no-hypothesis.json"]
    assert by_name["remote-health-probe.yaml"] == {"http-non-loopback"}
    assert by_name["typo-provider.yaml"] == {"invalid"}
    assert by_name["noise-half-declared-high-risk.yaml"] == {"declared-risk"}


def test_rollback_drill_needs_a_verified_standby() -> None:
    path = REPO / "experiments" / "rollback-drill.yaml"
    unverified = healthy(modules={"classifier": SlotState(active_version="2", standby_version="1")})
    _, res = preflight_file(path, device=unverified)
    assert res.verdict == "escalate"
    assert rules(res) == {"active-without-standby"}
    _, res = preflight_file(path, device=healthy(modules={}))
    assert res.verdict == "escalate"


def test_static_only_check_has_no_device_findings() -> None:
    exp = load_experiment(REPO / "experiments" / "rollback-drill.yaml")
    res = Preflight().check(exp, None)
    assert res.verdict == "run"
    assert "static check only" in res.reasons[0]
    assert res.report is not None and res.report.standby_modules == ("classifier",)


# --- static rules -----------------------------------------------------------------------------------


def test_safe_document_runs_and_estimates_its_duration() -> None:
    res = check(safe_doc())
    assert res.verdict == "run", res.reasons
    assert res.report is not None
    # hypothesis twice (2 x 10 s allowance) + action (10 s + 5 s pause) + rollback (10 s)
    assert res.report.estimated_duration_s == 45.0
    assert res.report.targets == ("uplink",)


def test_process_provider_and_shell_string() -> None:
    doc = safe_doc()
    doc["method"].append(
        {"type": "action", "name": "ls", "provider": {"type": "process", "path": "ls", "arguments": ["-l"]}}
    )
    assert rules(check(doc)) == {"process-provider"}
    doc["method"][-1]["provider"]["arguments"] = "-l | rm -rf /"
    assert rules(check(doc)) == {"process-provider", "shell-string"}


def test_http_providers_only_to_loopback_and_only_reads() -> None:
    doc = safe_doc()
    http = {
        "type": "probe",
        "name": "h",
        "tolerance": 200,
        "provider": {"type": "http", "url": "http://127.0.0.1:8000/v2/health/ready"},
    }
    doc["steady-state-hypothesis"]["probes"].append(http)
    assert check(doc).verdict == "run"
    http["provider"]["url"] = "http://[::1]:8000/x"
    assert check(doc).verdict == "run"
    http["provider"]["url"] = "http://10.0.0.1:8000/x"
    assert rules(check(doc)) == {"http-non-loopback"}
    http["provider"]["url"] = "http://${host}/x"
    assert rules(check(doc)) == {"http-non-loopback"}
    doc["configuration"] = {"host": "localhost:9"}
    assert check(doc).verdict == "run"
    doc["method"].append(
        {
            "type": "action",
            "name": "post",
            "provider": {"type": "http", "url": "http://127.0.0.1/admin", "method": "POST"},
        }
    )
    assert rules(check(doc)) == {"http-action"}


def test_unknown_activity_anywhere_escalates() -> None:
    unknown = {"type": "python", "module": "mylib.chaos", "func": "break_things"}
    # in the method
    doc = safe_doc()
    doc["method"].append({"type": "action", "name": "x", "provider": unknown})
    assert "unknown-activity" in rules(check(doc))
    # as a dynamic configuration probe (chaoslib would run it while loading configuration)
    doc = safe_doc()
    doc["configuration"] = {"token": {"type": "probe", "name": "tok", "provider": unknown}}
    res = check(doc)
    assert "unknown-activity" in rules(res)
    assert any(f.path == "configuration.token" for f in res.findings)
    # as a tolerance probe of a hypothesis probe
    doc = safe_doc()
    doc["steady-state-hypothesis"]["probes"][0]["tolerance"] = {
        "type": "probe",
        "name": "t",
        "provider": unknown,
    }
    res = check(doc)
    assert any(f.rule == "unknown-activity" and f.path.endswith(".tolerance") for f in res.findings)
    # in the rollbacks
    doc = safe_doc()
    doc["rollbacks"].append({"type": "action", "name": "x", "provider": unknown})
    assert "unknown-activity" in rules(check(doc))


def test_refs_are_followed_to_what_they_name() -> None:
    doc = safe_doc()
    doc["rollbacks"].append(
        {"type": "action", "name": "evil", "provider": {"type": "process", "path": "/bin/rm"}}
    )
    doc["method"].append({"ref": "evil"})
    res = check(doc)
    paths = {f.path for f in res.findings if f.rule == "process-provider"}
    assert "method[1] -> ref 'evil'" in paths and "rollbacks[1]" in paths


def test_controls_must_be_allowed_by_policy() -> None:
    doc = safe_doc()
    doc["controls"] = [{"name": "g", "provider": {"type": "python", "module": "chaos.controls"}}]
    assert check(doc).verdict == "run"
    doc["controls"].append(
        {"name": "x", "provider": {"type": "python", "module": "chaosaddons.controls.bypass"}}
    )
    assert rules(check(doc)) == {"unknown-control"}
    doc = safe_doc()
    doc["method"][0]["controls"] = [{"name": "x", "provider": {"type": "python", "module": "evil"}}]
    res = check(doc)
    assert [f.path for f in res.findings] == ["method[0].controls[0]"]


def test_agent_itself_escalates() -> None:
    doc = safe_doc()
    doc["method"].append(action("shutdown", mod="sre_agent.daemon"))
    assert "agent-target" in rules(check(doc))


def test_state_change_needs_a_rollback_that_undoes_it() -> None:
    doc = safe_doc()
    doc["rollbacks"] = [action("restart_serving_worker")]  # does not undo uplink latency
    res = check(doc)
    assert rules(res) == {"no-rollback"}
    assert "chaos.actions:restore_uplink" in res.findings[0].message
    doc["rollbacks"] = [action("clear_faults")]
    assert check(doc).verdict == "run"


def test_fault_injected_during_rollback_escalates() -> None:
    doc = safe_doc()
    doc["rollbacks"].append(action("stress_cpu", workers=1, duration_s=5))
    assert "injects-in-rollback" in rules(check(doc))


def test_action_disguised_as_a_probe_escalates() -> None:
    doc = safe_doc()
    doc["steady-state-hypothesis"]["probes"].append(
        probe("sneaky", func="x")
        | {
            "provider": {
                "type": "python",
                "module": "chaos.actions",
                "func": "fill_disk",
                "arguments": {"reserve_mb": 1000},
            }
        }
    )
    assert "kind-mismatch" in rules(check(doc))


def test_no_steady_state_hypothesis_escalates() -> None:
    doc = safe_doc()
    del doc["steady-state-hypothesis"]
    assert rules(check(doc)) == {"no-steady-state"}


def test_management_link_cut_is_bounded_by_policy() -> None:
    doc = safe_doc()
    doc["method"] = [action("cut_uplink", duration_s=20)]
    assert check(doc).verdict == "run"
    doc["method"] = [action("cut_uplink", duration_s=90)]
    assert rules(check(doc)) == {"management-cut"}
    # a cut that lasts until the rollback: the time of the rest of the method counts
    doc["method"] = [action("timeout_uplink"), {**probe(), "pauses": {"after": 15}}]
    assert check(doc).verdict == "run"
    doc["method"][1]["pauses"]["after"] = 120
    res = check(doc)
    assert rules(res) == {"management-cut"}
    # ... but not on a proxy that is not the management link
    doc["method"][0]["provider"]["arguments"] = {"proxy": "inference"}
    assert check(doc).verdict == "run"
    # latency degrades, it does not cut
    doc["method"][0] = action("slow_uplink", latency_ms=100)
    assert check(doc).verdict == "run"
    # a generic toxic cuts when its type does
    doc["method"][0] = action("add_uplink_toxic", toxic_type="timeout")
    assert rules(check(doc)) == {"management-cut"}
    doc["method"][0] = action("add_uplink_toxic", toxic_type="latency")
    assert check(doc).verdict == "run"


def test_unbounded_and_over_limit_quantities() -> None:
    doc = safe_doc()
    doc["method"] = [action("inject_input_noise", share=0.1, duration_s=30)]
    doc["rollbacks"] = [action("clear_faults")]
    assert check(doc).verdict == "run"
    doc["method"] = [action("inject_input_noise", share=0.9, duration_s=30)]
    assert rules(check(doc)) == {"over-limit"}
    doc["method"] = [action("inject_input_noise", share=0.1, duration_s=3000)]
    assert rules(check(doc)) == {"over-limit"}
    doc["method"] = [action("inject_input_noise", share=0.1, duration_s="${d}")]
    doc["configuration"] = {"d": {"type": "env", "key": "NOISE_S"}}
    assert "unbounded-duration" in rules(check(doc))
    doc["configuration"] = {"d": 20}
    assert check(doc).verdict == "run"
    doc["method"] = [action("inject_input_noise", share=0.1, duration_s=None)]  # None: never expires
    assert "unbounded-duration" in rules(check(doc))
    doc["method"] = [{**action("inject_input_noise", share=0.1), "pauses": {"after": "${wait}"}}]
    doc["configuration"] = {"wait": {"type": "env", "key": "WAIT"}}
    assert "unbounded-duration" in rules(check(doc))
    doc["method"] = [action("inject_input_noise", share=1.5)]
    res = check(doc)
    assert res.verdict == "reject" and "invalid-value" in rules(res)


def test_over_budget_experiment_escalates() -> None:
    doc = safe_doc()
    doc["method"].append({**probe(), "pauses": {"before": 600, "after": 600}})
    assert "over-budget" in rules(check(doc))


def test_disk_fill_reserve_and_foreign_path() -> None:
    doc = safe_doc()
    doc["method"] = [action("fill_disk", reserve_mb=1024)]
    doc["rollbacks"] = [action("clear_faults")]
    assert check(doc).verdict == "run"
    doc["method"] = [action("fill_disk", reserve_mb=100)]
    assert rules(check(doc)) == {"disk-below-reserve"}
    doc["method"] = [action("fill_disk", reserve_mb=1024, path="/")]
    assert rules(check(doc)) == {"escalate-argument"}


def test_non_loopback_listen_address_escalates() -> None:
    doc = safe_doc()
    create = action(
        "create_proxy",
        mod="chaostoxi.proxy.actions",
        proxy_name="p",
        upstream_host="127.0.0.1",
        upstream_port=9,
    )
    doc["method"].append(create)
    doc["rollbacks"].append(action("delete_proxy", mod="chaostoxi.proxy.actions", proxy_name="p"))
    assert rules(check(doc)) == {"non-loopback-argument"}  # chaostoxi defaults to 0.0.0.0
    create["provider"]["arguments"]["listen_host"] = "127.0.0.1"
    assert check(doc).verdict == "run"


def test_standby_broken_while_acting_on_active_escalates() -> None:
    doc = safe_doc()
    doc["method"] = [
        action("corrupt_standby_slot", module="classifier"),
        action("rollback_drill", module="classifier"),
    ]
    doc["rollbacks"] = [action("clear_faults")]
    res = check(doc)
    assert rules(res) == {"active-without-standby"}
    assert res.findings[0].path == "method[0]"


# --- author declarations: raise, never lower -----------------------------------------------------


def test_declarations_cannot_lower_risk() -> None:
    doc = copy.deepcopy(safe_doc())
    del doc["steady-state-hypothesis"]
    doc["extensions"] = [{"name": "sre-agent", "risk": "low", "targets": []}]
    assert rules(check(doc)) == {"no-steady-state"}


def test_declarations_raise_risk() -> None:
    doc = safe_doc()
    doc["extensions"] = [{"name": "sre-agent", "risk": "high"}]
    assert rules(check(doc)) == {"declared-risk"}
    doc["extensions"] = [{"name": "sre-agent", "requires_approval": True}]
    assert rules(check(doc)) == {"declared-risk"}
    doc["extensions"] = [{"name": "sre-agent", "targets": ["agent"]}]
    assert rules(check(doc)) == {"agent-target"}
    doc["extensions"] = [{"name": "sre-agent", "targets": ["active"], "modules": ["classifier"]}]
    res = check(doc)
    assert res.verdict == "run" and res.report is not None and res.report.standby_modules == ("classifier",)
    res = check(doc, healthy(modules={"classifier": SlotState()}))
    assert rules(res) == {"active-without-standby"}
    doc["extensions"] = [{"name": "sre-agent", "max_duration_s": 5000}]
    assert rules(check(doc)) == {"over-budget"}
    doc["extensions"] = [{"name": "other-tool", "risk": "whatever"}]
    assert check(doc).verdict == "run"


def test_malformed_declaration_is_rejected() -> None:
    doc = safe_doc()
    doc["extensions"] = [{"name": "sre-agent", "rsik": "high"}]
    res = check(doc)
    assert res.verdict == "reject" and rules(res) == {"invalid-declaration"}
    doc["extensions"] = [{"name": "sre-agent", "risk": "none"}]
    assert check(doc).verdict == "reject"


# --- dynamic rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"safe_mode": True}, "safe-mode"),
        (
            {"modules": {"classifier": SlotState(standby_verified=True, canary_in_progress=True)}},
            "canary-in-progress",
        ),
        (
            {"modules": {"classifier": SlotState(standby_verified=True, phase="installing")}},
            "deployment-in-progress",
        ),
        ({"disk_free_mb": 100.0}, "headroom-disk"),
        ({"disk_free_mb": None}, "headroom-disk"),
        ({"cpu_load": 0.95}, "headroom-cpu"),
        ({"mem_available_mb": 10.0}, "headroom-memory"),
    ],
)
def test_device_state_can_stop_a_safe_experiment(changes: dict[str, Any], rule: str) -> None:
    res = check(safe_doc(), healthy(**changes))
    assert res.verdict == "escalate"
    assert rules(res) == {rule}


def test_allowed_windows() -> None:
    policy = default_chaos_policy().model_copy(
        update={
            "windows": (
                Window(
                    days=("mon", "tue"),
                    start=datetime(2026, 1, 1, 9).time(),
                    end=datetime(2026, 1, 1, 17).time(),
                ),
            )
        }
    )
    assert check(safe_doc(), healthy(), policy).verdict == "run"
    evening = healthy(now=datetime(2026, 1, 5, 20, tzinfo=UTC))
    assert rules(check(safe_doc(), evening, policy)) == {"outside-window"}
    night = Window(days=("mon",), start=datetime(2026, 1, 1, 22).time(), end=datetime(2026, 1, 1, 2).time())
    assert night.contains(datetime(2026, 1, 5, 23, tzinfo=UTC))
    assert night.contains(datetime(2026, 1, 6, 1, tzinfo=UTC))  # Tuesday 01:00, opened Monday
    assert not night.contains(datetime(2026, 1, 7, 1, tzinfo=UTC))


# --- escalation packet ---------------------------------------------------------------------------


def test_escalation_packet_has_everything_to_decide() -> None:
    path = REPO / "experiments" / "uplink-blackout-5min.yaml"
    device = healthy()
    exp, res = preflight_file(path, device=device)
    assert exp is not None
    pkt = build_escalation(res, exp, default_chaos_policy(), NOW, device)
    d = pkt.to_dict()
    json.dumps(d)  # serialisable as is
    assert d["experiment_hash"] == exp.hash and d["experiment"] == exp.raw
    assert d["findings"][0]["rule"] == "management-cut" and d["findings"][0]["path"] == "method[0]"
    assert d["targets"] == ["uplink"]
    assert d["device"]["device_id"] == "dev-1" and d["device"]["modules"]["classifier"]["standby_verified"]
    row = next(r for r in d["plan"] if r["path"] == "method[0]")
    assert row["changes_state"] and row["fault_s"] == 300 and "severed" in row["breaks"]
    assert row["restored_by"] == "rollback chaos.actions:restore_uplink"
    assert any("error rate" in s for s in d["stop_conditions"])
    assert any("backlog" in s for s in d["stop_conditions"])  # the hypothesis probe is a stop condition
    assert d["estimated_duration_s"] == res.report.estimated_duration_s  # type: ignore[union-attr]
    assert exp.hash in d["approve_with"]
    assert EscalationPacket.model_validate(d) == pkt


def test_escalation_packet_for_an_invalid_document() -> None:
    pf = Preflight()
    try:
        parse_experiment("title: x\ndescription: d\nmethod: 3\n", "bad.yaml")
    except ExperimentError as exc:
        res = pf.reject(exc)
    assert res.verdict == "reject" and res.exit_code == 2
    pkt = build_escalation(res, None, pf.policy, NOW)
    assert pkt.verdict == "reject" and pkt.findings[0].path == "method"


def test_run_verdict_is_not_escalated() -> None:
    exp, res = preflight_file(EXAMPLES[0], device=healthy())
    if res.verdict == "run":
        with pytest.raises(ValueError):
            build_escalation(res, exp, default_chaos_policy(), NOW)


# --- approvals bind to the content hash ----------------------------------------------------------


def test_approval_sanctions_static_findings_of_that_exact_content_only() -> None:
    exp = load_experiment(REPO / "experiments" / "uplink-blackout-5min.yaml")
    pf = Preflight()
    res = pf.check(exp, healthy(), approved_hash=exp.hash)
    assert res.verdict == "run"
    assert [f.rule for f in res.sanctioned] == ["management-cut"]
    assert "operator approval" in res.reasons[0]
    # the device still decides
    res = pf.check(exp, healthy(safe_mode=True), approved_hash=exp.hash)
    assert res.verdict == "escalate" and rules(res) == {"safe-mode"}
    # an edited experiment is not covered by the old approval
    edited = parse_experiment(
        json.dumps({**exp.raw, "description": exp.raw["description"] + " (edited)"}), "edited.json"
    )
    res = pf.check(edited, healthy(), approved_hash=exp.hash)
    assert res.verdict == "escalate" and "approval-mismatch" in rules(res) and "management-cut" in rules(res)
    # nothing sanctions a reject
    doc = safe_doc()
    doc["method"] = [action("inject_input_noise", share=2.0)]
    bad = parse_experiment(json.dumps(doc), "bad.json")
    assert pf.check(bad, healthy(), approved_hash=bad.hash).verdict == "reject"


# --- properties ------------------------------------------------------------------------------------


SEVERITY = {"run": 0, "escalate": 1, "reject": 2}
VALID_EXAMPLES = [p for p in EXAMPLES if expected_verdict(p) != "reject"]

declarations = st.fixed_dictionaries(
    {"name": st.just("sre-agent")},
    optional={
        "risk": st.sampled_from(["low", "medium", "high", "critical"]),
        "targets": st.lists(
            st.sampled_from(
                ["uplink", "input", "standby", "canary", "active", "agent", "disk", "cpu", "clock"]
            ),
            max_size=3,
        ),
        "requires_approval": st.booleans(),
        "max_duration_s": st.floats(min_value=1, max_value=5000),
        "modules": st.lists(st.sampled_from(["classifier", "other"]), max_size=2),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_EXAMPLES), declarations)
def test_declarations_never_lower_the_verdict(path: Path, decl: dict[str, Any]) -> None:
    exp = load_experiment(path)
    before = Preflight().check(exp, healthy())
    doc = copy.deepcopy(exp.raw)
    doc["extensions"] = [*doc.get("extensions", []), decl]
    after = Preflight().check(parse_experiment(json.dumps(doc), "declared.json"), healthy())
    assert SEVERITY[after.verdict] >= SEVERITY[before.verdict]
    assert {f.rule for f in before.findings} <= {f.rule for f in after.findings}


_FUNCS = [*sorted({k.split(":")[1] for k in default_chaos_policy().activities}), "rm_rf", "_flip_to"]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10_000),
    st.floats(-1, 5000, allow_nan=False),
    st.sampled_from(["${x}", "${env_only}", "uplink", "0.0.0.0", "timeout", "latency", "classifier"]),
)
_args = st.dictionaries(
    st.sampled_from(
        [
            "duration_s",
            "share",
            "latency_ms",
            "proxy",
            "reserve_mb",
            "module",
            "toxic_type",
            "toxicity",
            "nbytes",
            "workers",
            "hold_s",
            "path",
            "listen_host",
            "offset_s",
        ]
    ),
    _scalars,
    max_size=4,
)
_provider = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("python"),
            "module": st.sampled_from(["chaos.actions", "chaos.probes", "chaostoxi.toxic.actions", "x"]),
            "func": st.sampled_from(_FUNCS),
            "arguments": _args,
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("process"),
            "path": st.sampled_from(["sh", "/usr/bin/touch"]),
            "arguments": st.one_of(st.text(max_size=10), st.lists(st.text(max_size=5), max_size=2)),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("http"),
            "url": st.sampled_from(["http://127.0.0.1/x", "http://example.com", "${x}"]),
            "method": st.sampled_from(["GET", "POST"]),
        }
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["python", "shell"])}),
)
_activity = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["action", "probe", "probe", "other"]),
        "name": st.sampled_from(["a", "b", "c"]),
        "provider": _provider,
    },
    optional={
        "pauses": st.fixed_dictionaries({}, optional={"after": _scalars, "before": _scalars}),
        "timeout": _scalars,
        "background": st.booleans(),
        "tolerance": st.one_of(st.just(True), st.just({"type": "range", "range": [0, 1]})),
    },
)
_refs = st.fixed_dictionaries({"ref": st.sampled_from(["a", "b", "zz"])})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(_activity, _refs), min_size=0, max_size=5),
    st.lists(st.one_of(_activity, _refs), max_size=3),
    st.lists(_activity, max_size=2),
    st.dictionaries(
        st.sampled_from(["x", "env_only"]),
        st.one_of(_scalars, st.just({"type": "env", "key": "E"})),
        max_size=2,
    ),
)
def test_preflight_is_total_and_consistent(
    method: list[Any], rollbacks: list[Any], probes: list[Any], config: dict[str, Any]
) -> None:
    doc: dict[str, Any] = {"title": "fuzz", "method": method, "rollbacks": rollbacks, "configuration": config}
    if probes:
        doc["steady-state-hypothesis"] = {"title": "h", "probes": probes}
    try:
        exp = parse_experiment(json.dumps(doc), "fuzz.json")
    except ExperimentError as exc:
        assert exc.problems or exc.why
        return
    res = Preflight().check(exp, healthy())
    assert res.verdict in SEVERITY and res.reasons
    assert (res.verdict == "run") == (not res.findings)
    if any(
        isinstance(a, dict) and a.get("provider", {}).get("type") == "process" for a in method + rollbacks
    ):
        assert res.verdict != "run"
    if res.verdict != "reject":
        pkt = build_escalation(res, exp, default_chaos_policy(), NOW) if res.verdict == "escalate" else None
        assert pkt is None or pkt.experiment_hash == exp.hash


@pytest.mark.parametrize("path", [p for p in EXAMPLES if expected_verdict(p) == "run"], ids=lambda p: p.name)
def test_runnable_examples_are_valid_for_chaos_toolkit(path: Path) -> None:
    """chaoslib's own validation (it imports the providers and checks arguments against signatures)."""
    from chaoslib.experiment import ensure_experiment_is_valid

    ensure_experiment_is_valid(load_experiment(path).raw)


def test_windows_from_yaml_accept_unquoted_times() -> None:
    from policies.base import parse_document

    text = (REPO / "policies" / "defaults" / "chaos.yaml").read_text()
    text = text.replace("windows: []", "windows: [{days: [mon], start: 09:00, end: 17:30}]")
    policy = parse_document(ChaosPolicy, text, "chaos.yaml")
    assert policy.windows[0].end.hour == 17 and policy.windows[0].end.minute == 30
    assert check(safe_doc(), healthy(now=datetime(2026, 1, 5, 17, 0, tzinfo=UTC)), policy).verdict == "run"
    late = healthy(now=datetime(2026, 1, 5, 17, 45, tzinfo=UTC))
    assert rules(check(safe_doc(), late, policy)) == {"outside-window"}


def test_configuration_and_secrets_that_reach_off_the_device() -> None:
    doc = safe_doc()
    doc["configuration"] = {"metrics_url": "http://127.0.0.1:8474", "host": "localhost"}
    assert check(doc).verdict == "run"
    doc["configuration"] = {"metrics_url": "http://toxiproxy.corp:8474"}
    res = check(doc)
    assert rules(res) == {"http-non-loopback"} and res.findings[0].path == "configuration.metrics_url"
    doc["configuration"] = {"hub_host": "10.1.2.3"}
    assert rules(check(doc)) == {"http-non-loopback"}
    # where faults go is the device's setting, never the experiment's
    doc["configuration"] = {"toxiproxy_url": "http://127.0.0.1:8474", "toxiproxy_host": "localhost"}
    assert check(doc).verdict == "run"  # allowed for the plain `chaos run`; the runner replaces them
    doc["configuration"] = {"uplink_proxy": "hub-link"}
    res = check(doc)
    assert rules(res) == {"device-setting"} and res.verdict == "reject"
    doc = safe_doc()
    doc["secrets"] = {"hub": {"token": {"type": "env", "key": "HUB_TOKEN"}, "plain": "x"}}
    assert check(doc).verdict == "run"  # declared, never used by an activity
    doc["secrets"]["hub"]["vaulted"] = {"type": "vault", "path": "secret/hub"}
    res = check(doc)
    assert rules(res) == {"external-secrets"} and res.findings[0].path == "secrets.hub.vaulted"


def test_preflight_imports_nothing_the_document_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider module with a side effect at import time is judged without being imported."""
    import sys

    marker = tmp_path / "imported"
    (tmp_path / "sneaky_chaos_ext.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\ndef boom(): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = safe_doc()
    doc["method"].append(action("boom", mod="sneaky_chaos_ext"))
    doc["controls"] = [{"name": "c", "provider": {"type": "python", "module": "sneaky_chaos_ext"}}]
    res = check(doc)
    assert rules(res) == {"unknown-activity", "unknown-control"}
    assert not marker.exists() and "sneaky_chaos_ext" not in sys.modules
