"""`sre-agent chaos ...` end to end in real child processes; an escalated experiment executes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from chaos.faultproxy import FaultProxyServer
from chaos.faults import FaultRegistry
from chaos.toxiproxy_client import ToxiproxyClient
from sre_core.paths import StatePaths

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "experiments"


def _relaxed_policy(tmp_path: Path) -> Path:
    """The default policy with headroom limits this shared test machine always meets."""
    doc = yaml.safe_load((REPO / "policies" / "defaults" / "chaos.yaml").read_text())
    doc["headroom"] = {"disk_reserve_mb": 1, "max_cpu_load": 1000, "min_mem_available_mb": 0}
    path = tmp_path / "chaos-policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_preflight_exit_codes_and_json(run_cli, state: StatePaths, tmp_path: Path) -> None:
    policy = _relaxed_policy(tmp_path)
    st = str(state.root)
    ok = run_cli(
        "sre-agent",
        "chaos",
        "preflight",
        str(EXAMPLES / "input-noise.json"),
        "--state",
        st,
        "--policy",
        str(policy),
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    body = json.loads(ok.stdout)
    assert body["verdict"] == "run" and body["reasons"] and body["experiment_hash"].startswith("sha256:")

    packet = tmp_path / "packet.json"
    esc = run_cli(
        "sre-agent",
        "chaos",
        "preflight",
        str(EXAMPLES / "uplink-blackout-5min.yaml"),
        "--state",
        st,
        "--policy",
        str(policy),
        "--json",
        "--packet",
        str(packet),
    )
    assert esc.returncode == 10, esc.stderr
    body = json.loads(esc.stdout)
    assert body["verdict"] == "escalate"
    assert any("management-cut" in r for r in body["reasons"])
    pkt = json.loads(packet.read_text())
    assert pkt["experiment_hash"] == body["experiment_hash"] and pkt["plan"] and pkt["device"]

    bad = run_cli(
        "sre-agent", "chaos", "preflight", str(EXAMPLES / "typo-provider.yaml"), "--state", st, "--json"
    )
    assert bad.returncode == 2
    body = json.loads(bad.stdout)
    assert body["verdict"] == "reject"
    assert any("method[0].provder" in r for r in body["reasons"])

    audit = [json.loads(line) for line in state.audit_log.read_text().splitlines()]
    seen = [(r["event"], r["data"]["verdict"]) for r in audit if r["event"] == "chaos.preflight"]
    assert seen == [
        ("chaos.preflight", "run"),
        ("chaos.preflight", "escalate"),
        ("chaos.preflight", "reject"),
    ]


def test_list_and_validate(run_cli, tmp_path: Path) -> None:
    listed = run_cli("sre-agent", "chaos", "list", "--dir", str(EXAMPLES), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["file"]: r for r in json.loads(listed.stdout)["experiments"]}
    assert rows["uplink-latency.yaml"]["verdict"] == "run"
    assert rows["restart-agent-shell.yaml"]["verdict"] == "escalate"
    assert rows["typo-provider.yaml"]["verdict"] == "reject"
    val = run_cli(
        "sre-agent",
        "chaos",
        "validate",
        str(EXAMPLES / "cpu-stress.yaml"),
        str(EXAMPLES / "typo-provider.yaml"),
        "--json",
    )
    assert val.returncode == 2
    files = json.loads(val.stdout)["files"]
    assert files[0]["valid"] and files[0]["hash"] == rows["cpu-stress.yaml"]["hash"]
    assert not files[1]["valid"] and "method[0].provder" in files[1]["problems"][0]


def test_escalated_experiment_executes_nothing(run_cli, state: StatePaths, tmp_path: Path) -> None:
    """`sre-agent chaos run` refuses it: no toxic on the proxy, no marker, no fault recorded.

    The positive control runs the very same file under the plain `chaos run`, where both appear.
    """
    marker = tmp_path / "marker"
    config_marker = tmp_path / "config-marker"
    with FaultProxyServer() as server, ToxiproxyClient(server.url, timeout_s=5) as client:
        client.create_proxy("uplink", "127.0.0.1:9")
        doc = {
            "title": "latency plus a program",
            "description": "escalated: a process provider and no rollback",
            "configuration": {
                "stamp": {
                    "type": "probe",
                    "name": "stamp",
                    "provider": {"type": "process", "path": "touch", "arguments": [str(config_marker)]},
                },
            },
            "steady-state-hypothesis": {
                "title": "no faults recorded before",
                "probes": [
                    {
                        "type": "probe",
                        "name": "backlog",
                        "tolerance": {"type": "range", "range": [0, 1000]},
                        "provider": {"type": "python", "module": "chaos.probes", "func": "uplink_backlog"},
                    }
                ],
            },
            "method": [
                {
                    "type": "action",
                    "name": "slow",
                    "provider": {
                        "type": "python",
                        "module": "chaos.actions",
                        "func": "slow_uplink",
                        "arguments": {"latency_ms": 50},
                    },
                },
                {
                    "type": "action",
                    "name": "touch",
                    "provider": {"type": "process", "path": "touch", "arguments": [str(marker)]},
                },
            ],
        }
        path = tmp_path / "exp.json"
        path.write_text(json.dumps(doc))

        res = run_cli("sre-agent", "chaos", "run", str(path), "--state", str(state.root), "--json")
        assert res.returncode == 10, res.stderr
        body = json.loads(res.stdout)
        assert body["verdict"] == "escalate" and body["ran"] is False
        assert {"process-provider", "no-rollback"} <= {f["rule"] for f in body["findings"]}
        assert not marker.exists() and not config_marker.exists()
        assert client.toxics("uplink") == []
        assert FaultRegistry(state.root).list() == []
        pkt = json.loads(Path(body["packet"]).read_text())
        assert pkt["experiment_hash"] == body["experiment_hash"] and pkt["experiment"] == doc

        # the same document made invalid (a toxicity Chaos Toolkit would pass on) is rejected: nothing runs
        doc["method"][0]["provider"]["arguments"]["toxicity"] = 3
        invalid = tmp_path / "invalid.json"
        invalid.write_text(json.dumps(doc))
        res = run_cli("sre-agent", "chaos", "run", str(invalid), "--state", str(state.root), "--json")
        assert res.returncode == 2, res.stderr
        assert json.loads(res.stdout)["verdict"] == "reject"
        assert not marker.exists() and not config_marker.exists()
        assert client.toxics("uplink") == [] and FaultRegistry(state.root).list() == []

        # positive control: the same file under plain Chaos Toolkit does inject and run the program
        chaos = Path(sys.executable).parent / "chaos"
        plain = subprocess.run(
            [str(chaos), "--no-log-file", "run", "--journal-path", str(tmp_path / "j.json"), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,
            env={**os.environ, "SRE_CHAOS_STATE_DIR": str(state.root), "SRE_CHAOS_TOXIPROXY_URL": server.url},
        )
        assert marker.exists(), plain.stdout + plain.stderr
        assert config_marker.exists()  # chaoslib runs dynamic configuration probes while loading
        assert [t["type"] for t in client.toxics("uplink")] == ["latency"]


def test_run_verdict_runs_guarded_and_leaves_no_fault(run_cli, state: StatePaths, tmp_path: Path) -> None:
    doc = {
        "title": "noise run",
        "description": "safe: input noise for 5 s, cleared by the rollback",
        "steady-state-hypothesis": {
            "title": "backlog",
            "probes": [
                {
                    "type": "probe",
                    "name": "backlog",
                    "tolerance": {"type": "range", "range": [0, 1000]},
                    "provider": {"type": "python", "module": "chaos.probes", "func": "uplink_backlog"},
                }
            ],
        },
        "method": [
            {
                "type": "action",
                "name": "noise",
                "provider": {
                    "type": "python",
                    "module": "chaos.actions",
                    "func": "inject_input_noise",
                    "arguments": {"share": 0.1, "duration_s": 5},
                },
            },
            {
                "type": "probe",
                "name": "faults",
                "provider": {"type": "python", "module": "chaos.probes", "func": "active_faults"},
            },
        ],
        "rollbacks": [
            {
                "type": "action",
                "name": "clear",
                "provider": {"type": "python", "module": "chaos.actions", "func": "clear_faults"},
            }
        ],
    }
    path = tmp_path / "noise.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = run_cli(
        "sre-agent",
        "chaos",
        "run",
        str(path),
        "--state",
        str(state.root),
        "--policy",
        str(_relaxed_policy(tmp_path)),
        "--json",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    body = json.loads(res.stdout)
    assert body["verdict"] == "run" and body["ran"] is True
    assert body["result"]["verdict"] == "passed"
    assert body["result"]["experiment_hash"] == body["experiment_hash"]
    # the method saw its fault recorded; afterwards nothing is left
    run_dir = Path(body["result"]["run_dir"])
    assert run_dir.is_dir()
    assert FaultRegistry(state.root).list() == []
    assert not (state.root / "run" / "chaos" / "input_noise.json").exists()


def test_preflight_with_a_signed_operator_approval(run_cli, state: StatePaths, tmp_path: Path) -> None:
    """`chaos approve` signs with a key of the escalations' roster; a bare hash is no approval."""
    from policies.approvals import generate_operator_key, private_key_pem, public_key_b64

    key = generate_operator_key()
    key_file = tmp_path / "alice.pem"
    key_file.write_bytes(private_key_pem(key))
    key_file.chmod(0o600)
    roster = {"version": 1, "operators": [{"id": "alice", "public_key": public_key_b64(key.public_key())}]}
    (state.root / "policies").mkdir(exist_ok=True)
    (state.root / "policies" / "operators.yaml").write_text(yaml.safe_dump(roster))
    policy = str(_relaxed_policy(tmp_path))
    exp = EXAMPLES / "uplink-blackout-5min.yaml"
    base = ("sre-agent", "chaos", "preflight", str(exp), "--state", str(state.root), "--policy", policy)
    first = run_cli(*base, "--json")
    assert first.returncode == 10
    approval = tmp_path / "approval.json"
    signed = run_cli(
        "sre-agent", "chaos", "approve", str(exp), "--key", str(key_file), "--operator", "alice",
        "--out", str(approval), "--ttl", "600", "--json",
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    ok = run_cli(*base, "--approve", str(approval), "--json")
    assert ok.returncode == 0, ok.stdout
    body = json.loads(ok.stdout)
    assert [f["rule"] for f in body["sanctioned"]] == ["management-cut"]
    # a forged approval (the content hash edited after signing) does not count
    forged = json.loads(approval.read_text())
    forged["reason"] = "edited"
    bad = tmp_path / "forged.json"
    bad.write_text(json.dumps(forged))
    stale = run_cli(*base, "--approve", str(bad), "--json")
    assert stale.returncode == 10
    assert "approval-invalid" in {f["rule"] for f in json.loads(stale.stdout)["findings"]}
    # the bare hash on the command line is not an approval any more
    bare = run_cli(*base, "--approve", json.loads(first.stdout)["experiment_hash"], "--json")
    assert bare.returncode == 2
