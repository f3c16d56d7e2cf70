"""`sre-agent chaos run` acts on the device and is journaled (DuckDB ``chaos_journals`` and the report).

How it broke: the CLI ran with a NullSink (``chaos_journals`` stayed empty, the report said "none"),
started its own fault proxy with no ``uplink`` on it, and ignored the configured serving port.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import duckdb

from sre_core.paths import StatePaths
from tests.test_preflight import safe_doc


def test_cli_run_without_a_daemon_lands_in_chaos_journals(
    run_cli: Any, state: StatePaths, tmp_path: Path
) -> None:
    doc = safe_doc()
    doc["method"] = [
        {
            "type": "action",
            "name": "noise",
            "provider": {
                "type": "python",
                "module": "chaos.actions",
                "func": "inject_input_noise",
                "arguments": {"share": 0.1, "duration_s": 2},
            },
        }
    ]
    doc["rollbacks"] = [
        {
            "type": "action",
            "name": "clear",
            "provider": {"type": "python", "module": "chaos.actions", "func": "clear_faults"},
        }
    ]
    exp = tmp_path / "noise.json"
    exp.write_text(json.dumps(doc))
    policy = tmp_path / "policy.yaml"
    import yaml

    pol = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "policies/defaults/chaos.yaml").read_text()
    )
    pol["headroom"] = {"disk_reserve_mb": 1, "max_cpu_load": 1000, "min_mem_available_mb": 0}
    policy.write_text(yaml.safe_dump(pol))
    env = {**os.environ, "SRE_AGENT_SERVING__ENABLED": "false"}
    res = run_cli(
        "sre-agent",
        "chaos",
        "run",
        str(exp),
        "--state",
        str(state.root),
        "--policy",
        str(policy),
        "--json",
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    body = json.loads(res.stdout)
    assert body["via"] == "device configuration" and body["result"]["verdict"] == "passed"
    run_id = body["result"]["run_id"]
    con = duckdb.connect(str(state.telemetry_db), read_only=True)
    try:
        bodies = [json.loads(r[0]) for r in con.execute("SELECT body FROM chaos_journals").fetchall()]
    finally:
        con.close()
    assert [(b["run_id"], b["verdict"]) for b in bodies] == [(run_id, "passed")]
    assert bodies[0]["journal"]["status"] == "completed"
    out = tmp_path / "report.html"
    rep = run_cli("sre-agent", "report", "--state", str(state.root), "--html", str(out))
    assert rep.returncode == 0, rep.stderr
    assert run_id in out.read_text()


def test_cli_run_goes_through_the_running_daemon(tmp_path: Path) -> None:
    """With a daemon, `chaos run` is judged and run by the daemon, journaled in its DuckDB."""
    import subprocess
    import sys
    import time

    import yaml

    from sre_agent.admin import admin_client
    from sre_agent.provision import provision

    paths = StatePaths(tmp_path / "dev")
    provision(paths)
    pol = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "policies/defaults/chaos.yaml").read_text()
    )
    pol["headroom"] = {"disk_reserve_mb": 1, "max_cpu_load": 1000, "min_mem_available_mb": 0}
    (paths.policies / "chaos.yaml").write_text(yaml.safe_dump(pol))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRE_AGENT_")}
    env.update({"SRE_AGENT_LLM__ENABLED": "false", "SRE_AGENT_SERVING__ENABLED": "false"})
    exe = Path(sys.executable).parent / "sre-agent"
    doc = safe_doc()
    doc["method"] = [
        {
            "type": "action",
            "name": "noise",
            "provider": {
                "type": "python",
                "module": "chaos.actions",
                "func": "inject_input_noise",
                "arguments": {"share": 0.1, "duration_s": 2},
            },
        }
    ]
    doc["rollbacks"] = [
        {
            "type": "action",
            "name": "clear",
            "provider": {"type": "python", "module": "chaos.actions", "func": "clear_faults"},
        }
    ]
    exp = tmp_path / "noise.json"
    exp.write_text(json.dumps(doc))
    with (tmp_path / "daemon.log").open("w") as log:
        proc = subprocess.Popen(
            [str(exe), "run", "--state", str(paths.root), "--heartbeat", "0.5"],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            for _ in range(200):
                if admin_client(paths) is not None:
                    break
                time.sleep(0.1)
            res = subprocess.run(
                [str(exe), "chaos", "run", str(exp), "--state", str(paths.root), "--json"],
                env=env, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert res.returncode == 0, res.stdout + res.stderr
            body = json.loads(res.stdout)
            assert body["via"] == "daemon" and body["result"]["verdict"] == "passed"
            client = admin_client(paths)
            assert client is not None
            rows: list[Any] = []
            try:
                for _ in range(100):
                    q = client.post("/telemetry/query", json={"sql": "SELECT body FROM chaos_journals"})
                    rows = q.json().get("rows", [])
                    if rows:
                        break
                    time.sleep(0.2)
            finally:
                client.close()
            bodies = [r["body"] if isinstance(r["body"], dict) else json.loads(r["body"]) for r in rows]
            assert [b["run_id"] for b in bodies] == [body["result"]["run_id"]]
        finally:
            proc.terminate()
            proc.wait(60)


def test_cli_run_guards_the_configured_serving_port(run_cli: Any, state: StatePaths, tmp_path: Path) -> None:
    """No daemon: the guardrail watches the server on the device's configured `[serving]` port."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        doc = safe_doc()
        doc["method"] = [
            {
                "type": "action",
                "name": "noise",
                "provider": {
                    "type": "python",
                    "module": "chaos.actions",
                    "func": "inject_input_noise",
                    "arguments": {"share": 0.1, "duration_s": 1},
                },
            }
        ]
        doc["rollbacks"] = [
            {
                "type": "action",
                "name": "clear",
                "provider": {"type": "python", "module": "chaos.actions", "func": "clear_faults"},
            }
        ]
        exp = tmp_path / "noise.json"
        exp.write_text(json.dumps(doc))
        import yaml

        pol = yaml.safe_load(
            (Path(__file__).resolve().parent.parent / "policies/defaults/chaos.yaml").read_text()
        )
        pol["headroom"] = {"disk_reserve_mb": 1, "max_cpu_load": 1000, "min_mem_available_mb": 0}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(pol))
        env = {**os.environ, "SRE_AGENT_SERVING__PORT": str(server.server_address[1])}
        policy = str(tmp_path / "p.yaml")
        res = run_cli(
            "sre-agent", "chaos", "run", str(exp), "--state", str(state.root), "--policy", policy, "--json",
            env=env,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        run_dir = Path(json.loads(res.stdout)["result"]["run_dir"])
        guard = json.loads((run_dir / "settings.json").read_text())["controls"]["sre-guardrail"]
        assert guard["provider"]["arguments"]["serving_url"] == f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
