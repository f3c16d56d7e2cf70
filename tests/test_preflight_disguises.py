"""Pre-flight judges what Chaos Toolkit will execute: each class of disguise, and the resolver's mirror.

How one would break it (each test below failed on the pre-flight that read the raw text):
- substitution: ``$name`` (not only ``${name}``), names from secret scopes, nested secrets, env;
- levels: controls declared on the steady-state hypothesis;
- names: a proxy name the API decodes (``%75plink``, ``./uplink``) is the management link;
- effects: a latency toxic of minutes is a cut, bandwidth 0 is a cut, cuts add up across activities,
  CPU and disk effects add up across activities;
- executable settings: ``serving_restart`` (the argv the undo executes) set by the experiment;
- the agent: ``run/serving.pid`` is the agent's own pid under the daemon, never approvable.
"""

from __future__ import annotations

import json
import string
from collections import ChainMap
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.loader import parse_experiment
from chaos.preflight import Preflight, PreflightResult
from tests.test_preflight import action, check, healthy, probe, rules, safe_doc


def cut(proxy: Any, pause: float = 0, func: str = "timeout_uplink", **args: Any) -> dict[str, Any]:
    a = action(func, proxy=proxy, **args)
    if pause:
        a["pauses"] = {"after": pause}
    return a


def doc_with(method: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    d = safe_doc()
    d["method"] = method
    d["rollbacks"] = [action("restore_uplink"), action("clear_faults")]
    d.update(top)
    return d


# --- substitution ------------------------------------------------------------------------------------


def test_dollar_name_without_braces_is_substituted() -> None:
    """chaoslib uses string.Template: ``$p`` is ``${p}``."""
    res = check(doc_with([cut("$p", pause=120)], configuration={"p": "uplink"}))
    assert "management-cut" in rules(res)


def test_partial_substitution_and_escapes() -> None:
    res = check(doc_with([cut("up${rest}", pause=120)], configuration={"rest": "link"}))
    assert "management-cut" in rules(res)
    # ``$$`` is a literal dollar: "$$p" is the text "$p", a name outside the strict alphabet
    assert check(doc_with([cut("$$p", pause=120)], configuration={"p": "uplink"})).verdict == "reject"


def test_names_from_secret_scopes_are_substituted() -> None:
    """``ChainMap(configuration, *secrets.values())``: a secret's name is a substitution variable."""
    res = check(doc_with([cut("${p}", pause=120)], secrets={"scope": {"p": "uplink"}}))
    assert "management-cut" in rules(res)


def test_whole_string_keeps_the_type_and_nested_values_resolve() -> None:
    conf = {"d": 500, "args": {"deep": ["x"]}}
    res = check(doc_with([action("cut_uplink", duration_s="${d}")], configuration=conf))
    assert "over-limit" in rules(res) or "management-cut" in rules(res)


def test_env_and_vault_at_any_depth_escalate() -> None:
    secrets = {"s": {"p": {"type": "env", "key": "PROXY"}}}
    res = check(doc_with([cut("${p}", pause=1)], secrets=secrets))
    assert res.verdict == "escalate"  # the proxy is whatever the environment says at run time
    # an env value nested inside a secret mapping, used whole as a toxic's attributes
    nested = {"s": {"attrs": {"latency": {"type": "env", "key": "LAT"}}}}
    toxic = action("add_uplink_toxic", toxic_type="latency", attributes="${attrs}")
    toxic["pauses"] = {"after": 120}
    assert "management-cut" in rules(check(doc_with([toxic], secrets=nested)))
    vault = {"s": {"nested": {"v": {"type": "vault", "path": "x"}}}}
    assert "external-secrets" in rules(check(doc_with([cut("uplink", pause=1)], secrets=vault)))
    env_conf = {"p": {"type": "env", "key": "P", "default": "decoy"}}
    res = check(doc_with([cut("${p}", pause=1)], configuration=env_conf))
    assert res.verdict == "escalate"


def test_device_settings_in_the_document_are_refused() -> None:
    """``serving_restart`` is the argv the undo of a kill executes: never from the experiment."""
    conf = {"serving_restart": json.dumps(["/bin/sh", "-c", "touch /tmp/owned"])}
    res = check(doc_with([action("inject_input_noise", share=0.1, duration_s=5)], configuration=conf))
    assert res.verdict == "reject" and rules(res) == {"device-setting"}
    res = check(doc_with([cut("${uplink_proxy}", pause=1)]))
    assert res.verdict == "escalate"  # a device setting is not known to the document


# --- levels -----------------------------------------------------------------------------------------


def test_hypothesis_level_controls_are_judged() -> None:
    d = safe_doc()
    d["steady-state-hypothesis"]["controls"] = [
        {"name": "evil", "provider": {"type": "python", "module": "some_unlisted_module"}}
    ]
    assert "unknown-control" in rules(check(d))


def test_allowed_control_with_document_arguments_escalates() -> None:
    d = safe_doc()
    d["controls"] = [
        {
            "name": "guard",
            "provider": {"type": "python", "module": "chaos.controls", "arguments": {"trip_file": "/etc/x"}},
        }
    ]
    assert "control-arguments" in rules(check(d))


# --- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["%75plink", "./uplink", "uplink/", "UPLINK%00", "up link", "../uplink"])
def test_names_the_api_would_decode_are_refused(alias: str) -> None:
    res = check(doc_with([cut(alias, pause=120)]))
    assert res.verdict == "reject" and "invalid-name" in rules(res)


def test_module_names_cannot_walk_the_state_directory() -> None:
    res = check(doc_with([action("corrupt_standby_slot", module="../../run")]))
    assert res.verdict == "reject" and "invalid-name" in rules(res)


# --- effects -----------------------------------------------------------------------------------------


def test_a_latency_toxic_that_stalls_traffic_is_a_cut() -> None:
    generic = action("add_uplink_toxic", toxic_type="latency", attributes={"latency": 600_000})
    generic["pauses"] = {"after": 120}
    assert "management-cut" in rules(check(doc_with([generic])))
    slow = action("slow_uplink", latency_ms=9000)
    slow["pauses"] = {"after": 120}
    assert "management-cut" in rules(check(doc_with([slow])))
    # the same shapes with harmless values still run
    mild = action("add_uplink_toxic", toxic_type="latency", attributes={"latency": 200})
    mild["pauses"] = {"after": 120}
    assert check(doc_with([mild])).verdict == "run"


def test_bandwidth_zero_is_a_cut() -> None:
    bw = action("degrade_uplink_bandwidth", rate_kbps=0)
    bw["pauses"] = {"after": 120}
    assert "management-cut" in rules(check(doc_with([bw])))


def test_chaostoxi_generic_toxic_judged_by_attributes() -> None:
    t = {
        "type": "action",
        "name": "stall",
        "provider": {
            "type": "python",
            "module": "chaostoxi.toxic.actions",
            "func": "create_toxic",
            "arguments": {
                "for_proxy": "uplink",
                "toxic_name": "t",
                "toxic_type": "slicer",
                "attributes": {"delay": 60_000_000},
            },
        },
        "pauses": {"after": 120},
    }
    d = doc_with([t])
    d["rollbacks"] = [
        {
            "type": "action",
            "name": "reset",
            "provider": {"type": "python", "module": "chaostoxi.proxy.actions", "func": "reset"},
        }
    ]
    assert "management-cut" in rules(check(d))


def test_cuts_add_up_across_activities() -> None:
    """Two 40 s cuts are an 80 s outage of the management link (policy: 60 s)."""
    method = [action("cut_uplink", duration_s=40), action("cut_uplink", duration_s=40)]
    assert "management-cut" in rules(check(doc_with(method)))
    assert check(doc_with([action("cut_uplink", duration_s=40)])).verdict == "run"


def test_cpu_and_disk_effects_add_up() -> None:
    stress = [action("stress_cpu", workers=4, duration_s=300) for _ in range(2)]
    assert "over-limit" in rules(check(doc_with(stress)))
    fills = [action("fill_disk", reserve_mb=1024, max_mb=3000) for _ in range(2)]
    assert "over-limit" in rules(check(doc_with(fills)))


# --- the agent --------------------------------------------------------------------------------------


def test_killing_the_serving_pid_is_an_agent_target_that_no_approval_sanctions() -> None:
    d = doc_with([action("kill_serving_worker")])
    d["rollbacks"] = [action("restart_serving_worker")]
    exp = parse_experiment(json.dumps(d), "kill.json")
    pf = Preflight()
    res = pf.check(exp, healthy())
    assert "agent-target" in rules(res)
    approved = pf.check(exp, healthy(), approved_hash=exp.hash)
    assert approved.verdict == "escalate" and "agent-target" in rules(approved)


def test_process_provider_is_never_approvable() -> None:
    d = safe_doc()
    d["method"].append({"type": "action", "name": "p", "provider": {"type": "process", "path": "/bin/true"}})
    exp = parse_experiment(json.dumps(d), "p.json")
    res = Preflight().check(exp, healthy(), approved_hash=exp.hash)
    assert res.verdict == "escalate" and "process-provider" in rules(res)


# --- the resolver mirrors chaoslib -------------------------------------------------------------------

_NAMES = ["a", "b", "p", "_x", "n1"]
_PIECES = st.sampled_from(["$", "${", "}", "$$", "a", "b", "p", "_x", "n1", " ", "-", "{", "1", "x"])
_VALUES = st.one_of(
    st.integers(-5, 10**6),
    st.text(alphabet="ab$p{} ", max_size=6),
    st.lists(st.integers(0, 3), max_size=2),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    template=st.lists(_PIECES, max_size=8).map("".join),
    conf=st.dictionaries(st.sampled_from(_NAMES), _VALUES, max_size=4),
    secret=st.dictionaries(st.sampled_from(_NAMES), _VALUES, max_size=3),
)
def test_substitution_matches_chaoslib(template: str, conf: dict[str, Any], secret: dict[str, Any]) -> None:
    """Differential: our resolution of arguments equals chaoslib's own (static documents)."""
    from chaoslib import substitute
    from chaoslib.configuration import load_configuration
    from chaoslib.secret import load_secrets

    from chaos.resolve import Unresolved, resolve_document

    doc = {"configuration": conf, "secrets": {"s": secret}}
    ours = resolve_document(doc)
    args = {"v": template, "nested": [template, {"k": template}]}
    theirs = substitute(args, load_configuration(conf), load_secrets({"s": secret}))
    mine = ours.substitute(args)
    assert mine == theirs
    assert not any(isinstance(x, Unresolved) for x in (mine["v"], *mine["nested"][:1]))


def test_template_identifier_rules_are_chaoslib_s() -> None:
    """The pattern is string.Template's (ASCII identifiers, case-insensitive), not a regex of ours."""
    from chaoslib import substitute_string

    from chaos.resolve import resolve_document

    mapping = ChainMap({"Up": "uplink", "x": 1})
    for text in ("$Up", "${Up}", "$Up.x", "${x}", "a$x", "$1", "${ x}", "$"):
        assert resolve_document({"configuration": dict(mapping)}).substitute(text) == substitute_string(
            text, mapping
        )
    assert string.Template.idpattern  # documented dependency


def test_disguised_safe_experiment_still_runs() -> None:
    """No false escalation for values known in the document."""
    d = safe_doc()
    d["configuration"] = {"lat": 200, "pause": 5}
    d["method"] = [{**action("slow_uplink", latency_ms="${lat}"), "pauses": {"after": "${pause}"}}]
    res: PreflightResult = check(d)
    assert res.verdict == "run", res.reasons
    assert probe()  # helper import kept honest


def test_catalogue_signatures_match_the_functions() -> None:
    """The policy's signatures (checked without imports) are the real ones (here we may import)."""
    import importlib
    import inspect

    from policies.chaos import default_chaos_policy

    pol = default_chaos_policy()
    assert set(pol.signatures) == set(pol.activities)
    for key, sig in pol.signatures.items():
        mod, func = key.split(":")
        params = inspect.signature(getattr(importlib.import_module(mod), func)).parameters
        names = tuple(n for n in params if n not in ("configuration", "secrets"))
        required = tuple(
            n
            for n in names
            if params[n].default is inspect.Parameter.empty and params[n].kind.name != "VAR_KEYWORD"
        )
        assert (sig.params, sig.required) == (names, required), key


def test_arguments_chaoslib_would_refuse_are_rejected() -> None:
    d = safe_doc()
    d["method"] = [action("slow_uplink", latency_ms=200, latencyms=5)]
    assert check(d).verdict == "reject"
    d["method"] = [action("slow_uplink")]
    assert check(d).verdict == "reject"
