"""Honest results and hostile input: a fault that failed to inject is an error; nothing crashes the loader.

How one would break it: an action that raises (the proxy is missing) still yields a "completed" journal,
which the runner reported as ``passed`` (exit 0); an integer of 5,000 digits, or a megabyte of ``- - -``
(the YAML composer recurses in C), crashed ``validate``/``list``/``preflight`` and the daemon's loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chaos.faultproxy import FaultProxyServer
from chaos.loader import ExperimentError, parse_experiment
from chaos.preflight import Preflight, preflight_file
from chaos.runner import Verdict, judge, run_experiment_guarded
from chaos.toxiproxy_client import ToxiproxyClient, ToxiproxyNotFoundError
from sre_core.paths import StatePaths
from tests.test_preflight import action, safe_doc


def _journal(status: str = "completed", runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"status": status, "deviated": False, "run": runs or [], "rollbacks": []}


def test_judge_a_failed_fault_is_an_error_not_a_pass() -> None:
    failed = {
        "activity": {"type": "action", "name": "slow"},
        "status": "failed",
        "exception": ["ActivityFailed: proxy uplink not found"],
    }
    verdict, reasons = judge(_journal(runs=[failed]), budget_hit=False)
    assert verdict is Verdict.ERROR and "slow" in reasons[0] and "not found" in reasons[0]
    probe_failed = {**failed, "activity": {"type": "probe", "name": "p"}}
    assert judge(_journal(runs=[probe_failed]), budget_hit=False)[0] is Verdict.PASSED
    rollback = _journal()
    rollback["rollbacks"] = [failed]
    assert judge(rollback, budget_hit=False)[0] is Verdict.ERROR


def test_a_real_run_whose_fault_cannot_inject_is_an_error(tmp_path: Path) -> None:
    """slow_uplink against a fault proxy without an ``uplink`` proxy: chaoslib completes, the run is error."""
    state = StatePaths(tmp_path / "state")
    state.root.mkdir()
    doc = safe_doc()
    with FaultProxyServer() as server:
        result = run_experiment_guarded(doc, state=state, budget_s=60, toxiproxy_url=server.url)
    assert result.journal is not None and result.journal["status"] == "completed"
    assert result.verdict is Verdict.ERROR, result.reasons
    assert any("failed" in r for r in result.reasons)


# --- hostile input --------------------------------------------------------------------------------

_BIG = "9" * 5000


def _hostile() -> dict[str, bytes]:
    base = json.dumps(safe_doc())
    return {
        "json-5000-digit-int.json": base.replace('"latency_ms": 200', f'"latency_ms": {_BIG}').encode(),
        "json-4000-digit-int.json": base.replace(
            '"latency_ms": 200', f'"latency_ms": {_BIG[:4000]}'
        ).encode(),
        "yaml-5000-digit-int.yaml": f"title: t\nmethod:\n- type: action\n  timeout: {_BIG}\n".encode(),
        "yaml-deep-block.yaml": b"title: t\nx:\n  " + b"- " * 400_000 + b"x\n",
        "yaml-deep-flow.yaml": b"title: t\nx: " + b"[" * 200_000 + b"]" * 200_000 + b"\n",
        "json-deep.json": b"[" * 300_000 + b"]" * 300_000,
        "yaml-alias-bomb.yaml": (
            b'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
            b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
            b"e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ntitle: t\n"
        ),
        "huge.yaml": b"title: t\n# " + b"x" * (2 << 20) + b"\n",
        "binary.yaml": bytes(range(256)) * 10,
        "pause-huge.json": base.replace('"after": 5', f'"after": {_BIG[:4000]}').encode(),
        "timeout-list.json": json.dumps(
            {
                **safe_doc(),
                "method": [
                    {
                        "type": "probe",
                        "name": "h",
                        "provider": {
                            "type": "http",
                            "url": "http://127.0.0.1:1/",
                            "timeout": [10**400, 10**400],
                        },
                    }
                ],
            }
        ).encode(),
    }


@pytest.mark.parametrize("name", sorted(_hostile()))
def test_loader_and_preflight_never_crash_on_hostile_input(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(_hostile()[name])
    exp, res = preflight_file(path)
    assert res.verdict in ("run", "escalate", "reject")
    json.dumps(res.to_dict())
    if exp is not None:
        assert res.verdict != "run" or not res.findings


def test_parse_refuses_with_a_reason() -> None:
    with pytest.raises(ExperimentError, match=r"4300 digits|cannot be read"):
        parse_experiment(_hostile()["json-5000-digit-int.json"], "x.json")
    with pytest.raises(ExperimentError, match="nested deeper"):
        parse_experiment(_hostile()["yaml-deep-block.yaml"], "x.yaml")


def test_cli_exits_0_10_or_2_on_every_hostile_file(run_cli: Any, tmp_path: Path) -> None:
    """`validate`, `list` and `preflight --static` in real child processes: no traceback, no signal."""
    d = tmp_path / "exps"
    d.mkdir()
    for name, data in _hostile().items():
        (d / name).write_bytes(data)
    files = sorted(d.iterdir())
    res = run_cli("sre-agent", "chaos", "validate", *map(str, files), "--json")
    assert res.returncode in (0, 2, 10), res.stderr
    assert "Traceback" not in res.stderr
    body = json.loads(res.stdout)
    assert len(body["files"]) == len(files)
    res = run_cli("sre-agent", "chaos", "list", "--dir", str(d), "--json")
    assert res.returncode == 0, res.stderr
    assert {r["file"] for r in json.loads(res.stdout)["experiments"]} == {f.name for f in files}
    picked = ("json-5000-digit-int.json", "yaml-deep-block.yaml", "pause-huge.json", "timeout-list.json")
    for f in (d / name for name in picked):
        res = run_cli("sre-agent", "chaos", "preflight", str(f), "--static", "--state", str(tmp_path / "s"))
        assert res.returncode in (0, 2, 10), (f.name, res.returncode, res.stderr[-500:])
        assert "Traceback" not in res.stderr


# --- nothing executable or agent-targeted at run time --------------------------------------------


def test_kill_serving_worker_refuses_the_agent_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the daemon, run/serving.pid is the agent's pid: the action refuses to signal it."""
    from chaos.actions import ChaosActionError, kill_serving_worker

    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (state / "run" / "serving.pid").write_text(str(agent.pid))
        monkeypatch.setenv("SRE_CHAOS_AGENT_PID", str(agent.pid))
        with pytest.raises(ChaosActionError, match="agent"):
            kill_serving_worker(configuration={"state_dir": str(state)})
        assert agent.poll() is None
        # our own process (an ancestor of any activity) is refused too
        monkeypatch.delenv("SRE_CHAOS_AGENT_PID")
        (state / "run" / "serving.pid").write_text(str(os.getpid()))
        with pytest.raises(ChaosActionError, match="agent"):
            kill_serving_worker(configuration={"state_dir": str(state)})
    finally:
        agent.kill()
        agent.wait()


def test_fill_disk_path_stays_under_the_chaos_directory(tmp_path: Path) -> None:
    from chaos.actions import clear_faults, fill_disk

    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "elsewhere.bin"
    out = fill_disk(reserve_mb=0, max_mb=1, path=str(target), configuration={"state_dir": str(state)})
    assert not target.exists()
    assert Path(out["file"]).parent == (state / "run" / "chaos").resolve()
    clear_faults(configuration={"state_dir": str(state)})


def test_the_toxiproxy_client_sends_names_verbatim() -> None:
    """A name the server would decode (``%75plink``) never reaches the ``uplink`` proxy."""
    with FaultProxyServer() as server, ToxiproxyClient(server.url, timeout_s=5) as client:
        client.create_proxy("uplink", "127.0.0.1:9")
        for alias in ("%75plink", "./uplink"):
            with pytest.raises(ToxiproxyNotFoundError):
                client.add_toxic(alias, "timeout", {"timeout": 0}, "t", "upstream", 1.0)
        assert client.toxics("uplink") == []


def test_preflight_of_every_rule_is_pure() -> None:
    """The whole-experiment check holds no state between calls (same verdict twice)."""
    exp = parse_experiment(json.dumps({**safe_doc(), "method": [action("cut_uplink", duration_s=90)]}), "x")
    pf = Preflight()
    assert pf.check(exp).verdict == pf.check(exp).verdict == "escalate"


def _readme_example() -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("```yaml\ntitle: Uplink latency does not disturb inference") + len("```yaml\n")
    return text[start : text.index("```", start)]


def test_validate_applies_every_check_run_applies(run_cli: Any, tmp_path: Path) -> None:
    """The README's example validates; what chaoslib or pre-flight would refuse, validate refuses."""
    import yaml
    from chaoslib.experiment import ensure_experiment_is_valid

    readme = tmp_path / "readme.yaml"
    readme.write_text(_readme_example())
    ensure_experiment_is_valid(yaml.safe_load(readme.read_text()))  # chaoslib accepts it too
    no_description = tmp_path / "no-description.json"
    no_description.write_text(json.dumps({k: v for k, v in safe_doc().items() if k != "description"}))
    device_setting = tmp_path / "device-setting.json"
    device_setting.write_text(json.dumps({**safe_doc(), "configuration": {"serving_restart": '["sh"]'}}))
    res = run_cli(
        "sre-agent", "chaos", "validate", str(readme), str(no_description), str(device_setting), "--json"
    )
    assert res.returncode == 2, res.stderr
    files = json.loads(res.stdout)["files"]
    assert [f["verdict"] for f in files] == ["run", "reject", "reject"]
    assert "description" in files[1]["problems"][0] and "device-setting" in files[2]["problems"][0]


def test_a_clock_skew_fault_never_moves_trusted_time(tmp_path: Path) -> None:
    """The catalogue calls a skew self-restoring: trusted time (clock.json) must not keep the skew.

    How it broke: the daemon's clock is the skewed one, and trusted time checkpointed it into the
    high-water mark, so a +1 day skew for 60 s left the device a day ahead for good.
    """
    from datetime import timedelta

    from chaos import actions
    from chaos.faults import SkewedClock
    from deployment.trusted_time import TrustedTime
    from sre_core.clock import SystemClock

    state = tmp_path / "state"
    state.mkdir()
    base = SystemClock()
    clock = SkewedClock(base, state)
    actions.skew_agent_clock(86400, duration_s=60, configuration={"state_dir": str(state)})
    assert clock.now() - base.now() > timedelta(hours=23)  # the agent's wall time is skewed
    trusted = TrustedTime(state / "clock.json", clock)
    assert trusted.checkpoint() - base.now() < timedelta(minutes=1)
    actions.clear_faults(configuration={"state_dir": str(state)})
    again = TrustedTime(state / "clock.json", clock)
    assert again.now() - base.now() < timedelta(minutes=1)
    assert not again.clock_behind()


def test_the_daemon_chaos_loop_judges_every_file_even_after_hostile_ones(tmp_path: Path) -> None:
    """A 5,000-digit integer or C-stack-deep YAML used to raise out of the loop: later files were skipped."""
    from sre_agent.config import AgentSettings
    from sre_agent.services.chaos import ChaosSchedule
    from sre_core.audit import AuditLog
    from sre_core.clock import SystemClock
    from sre_core.telemetry import NullSink

    state = StatePaths(tmp_path / "state")
    state.create()
    exps = tmp_path / "exps"
    exps.mkdir()
    hostile = _hostile()
    (exps / "a-int.json").write_bytes(hostile["json-5000-digit-int.json"])
    (exps / "b-deep.yaml").write_bytes(hostile["yaml-deep-block.yaml"])
    (exps / "c-escalates.json").write_text(
        json.dumps({**safe_doc(), "method": [action("cut_uplink", duration_s=90)]})
    )
    settings = AgentSettings.model_validate(
        {
            "state_dir": str(state.root),
            "llm": {"enabled": False},
            "chaos": {"enabled": True, "experiments_dir": str(exps)},
        }
    )
    schedule = ChaosSchedule(
        state, settings, SystemClock(), AuditLog(state.audit_log), NullSink(),
        serving_url=lambda: None, model=lambda: None, toxiproxy_url=lambda: None,
    )  # fmt: skip
    rows = schedule.tick()
    assert [(r["file"], r["verdict"]) for r in rows] == [
        ("a-int.json", "reject"),
        ("b-deep.yaml", "reject"),
        ("c-escalates.json", "escalate"),
    ]
