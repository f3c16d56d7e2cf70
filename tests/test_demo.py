"""The demo path runs headless to the end and the story's outcomes hold (read from its summary.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_demo_keeps_no_action_handler_of_its_own() -> None:
    """The demo's actions run through the daemon's handlers: it builds them with
    :class:`sre_agent.handlers.DaemonHandlers` and defines no handler table (no mapping keyed by an
    ``Action``, no function returning one) and imports none from anywhere else."""
    import ast

    tree = ast.parse((REPO / "sre_agent" / "demo.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = [k for k in node.keys if isinstance(k, ast.Attribute) and isinstance(k.value, ast.Name)]
            assert not any(k.value.id == "Action" for k in keys), f"a handler table at line {node.lineno}"
        if isinstance(node, ast.ImportFrom) and node.module:
            names = {a.name for a in node.names}
            if "Action" in names or any("handler" in n.lower() for n in names):
                assert (node.module, names) == ("sre_agent.handlers", {"DaemonHandlers"}), node.module
        if isinstance(node, ast.keyword) and node.arg == "handlers":
            assert "DaemonHandlers" in ast.unparse(node.value) or "_daemon_handlers" in ast.unparse(
                node.value
            )
    assert "DaemonHandlers(" in ast.unparse(tree)


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_demo_runs_headless_and_tells_the_whole_story(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "sre_agent.demo", "--keep", str(work)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**__import__("os").environ, "COLUMNS": "120"},
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    facts = json.loads((work / "summary.json").read_text())
    assert facts["ok"] is True
    assert [c["ok"] for c in facts["chapters"]] == [True] * 9
    # v1 served, v2 promoted by the canary, v3 cut off and marked bad; v2 stays active
    assert facts["v1_active"] == "1.0.0"
    assert facts["v2_active"] == "2.0.0"
    assert facts["after_v3_active"] == "2.0.0"
    assert facts["v3_bad"] is True
    assert facts["v3_reinstall"] == ["refused"]
    # the uplink: a backlog built up while cut, then drained to the hub
    assert facts["uplink_max_backlog_batches"] >= 2
    assert facts["uplink_drained"] is True and facts["uplink_drained_batches"] >= 2
    # chaos: the safe experiment ran and passed, the destructive one was escalated and never run
    chaos = facts["chaos"]
    safe = chaos["uplink-latency-demo.yaml"]
    assert safe["preflight"] == "run" and safe["ran"] is True and safe["result"] == "passed"
    risky = chaos["restart-agent-shell.yaml"]
    assert risky["preflight"] == "escalate" and risky["ran"] is False
    assert {"process-provider", "agent-target"} <= set(risky["rules"])
    assert Path(risky["packet"]).exists()
    # triage: the canary abort acted on within policy; the SLO burn escalated; approved at the hub, executed
    kinds = {t["kind"]: t for t in facts["triage"]}
    assert kinds["canary_abort"]["decision"]["verdict"] == "execute"
    assert kinds["slo_burn"]["escalation"] is not None
    assert facts["escalation"]["status"] == "executed"
    assert facts["escalation"]["action"] == "alert"
    approvals = list((work / "hub" / "escalations" / "approvals").glob("esc-*.approve.alice.json"))
    assert len(approvals) == 1
    # the hub lake holds what the device uploaded
    assert list((work / "hub" / "fleet" / "lake").glob("table=metrics/*/*.parquet"))
    # DORA-like figures and SLOs from this run
    dora = facts["dora"]
    assert dora["deployments (canaries promoted)"] == 1
    assert dora["change failure rate"] == 0.5
    assert {s["name"] for s in facts["slos"]} >= {"sync.oldest_unacked_age_s", "policy.age_s"}
    assert all(s["met"] for s in facts["slos"])
    assert facts["audit_intact"] is True
    assert facts["cli_audit_verify_rc"] == 0  # the real CLI agrees, from a child process
    assert set(facts["reports"]) == {"device", "hub"}
    for html in facts["reports"].values():
        assert Path(html).read_text().count('<svg class="plot"') >= 9
    assert "files are in" in r.stdout
