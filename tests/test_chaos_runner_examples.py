"""The example experiments that pre-flight lets run, run for real on a loopback device:

- under the plain Chaos Toolkit ``chaos run`` command (our extension found through configuration and
  ``SRE_CHAOS_*`` variables, the Toxiproxy API served by our fault proxy), and
- through the guarded runner,

against real slots (two versions of a classifier), a real v2 inference server and a real uplink proxy.
Pauses are skipped (``--dry pause`` / ``skip_pauses``); everything else executes. Afterwards no fault is
left: registry empty, no toxics, slots verify.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from chaos.faultproxy import FaultProxyServer
from chaos.faults import FaultRegistry
from chaos.runner import Verdict, run_experiment_guarded
from chaos.toxiproxy_client import ToxiproxyClient
from deployment.sample_models import linear_classifier
from deployment.slots import SlotManager
from sre_core.audit import AuditLog
from sre_core.paths import StatePaths
from tests.deploy_helpers import make_artifact

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chaos_examples")]

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())


def _runnable() -> list[Path]:
    return sorted(
        p
        for p in EXPERIMENTS.iterdir()
        if p.suffix in (".json", ".yaml", ".yml") and "expect-run" in (_load(p).get("tags") or [])
    )


@dataclass
class Device:
    state: StatePaths
    serving_url: str
    toxiproxy_url: str
    toxiproxy_port: int


class _Sink:
    """The hub end of the uplink: accepts and drains."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            c.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(2)


@pytest.fixture
def device(state: StatePaths) -> Iterator[Device]:
    from deployment.oip import create_app
    from deployment.serving import ModelRepository
    from deployment.sessions import load_session
    from sre_core.http_server import ServerThread

    mgr = SlotManager(state, AuditLog(state.audit_log))
    for version, seed in (("1", 1), ("2", 2)):
        model = linear_classifier(seed=seed)
        mgr.install(make_artifact(state.cas, "classifier", version, model, filename="model.onnx"))
        mgr.flip("classifier")
        mgr.commit("classifier")
    repo = ModelRepository()
    repo.add(load_session(linear_classifier(seed=2), name="classifier", version="2"))
    sink = _Sink()
    with ServerThread(create_app(repo)) as server, FaultProxyServer() as fp:
        with ToxiproxyClient(fp.url) as api:
            api.create_proxy("uplink", sink.addr)
        yield Device(state, server.url, fp.url, fp.port)
    sink.close()


def _assert_clean(dev: Device) -> None:
    assert FaultRegistry(dev.state.root).list() == []
    assert not (dev.state.root / "run" / "chaos" / "fill.bin").exists()
    with ToxiproxyClient(dev.toxiproxy_url) as api:
        assert api.toxics("uplink") == []
    mgr = SlotManager(dev.state, AuditLog(dev.state.audit_log))
    st = mgr.status("classifier")
    assert st.active is not None and st.active.version == "2" and st.bad == {}
    for slot in ("a", "b"):
        assert mgr.verify_slot("classifier", slot).ok


def test_there_are_runnable_examples() -> None:
    names = {p.name for p in _runnable()}
    assert len(names) >= 5, names


@pytest.mark.parametrize("path", _runnable(), ids=lambda p: p.name)
def test_example_runs_under_plain_chaos_cli(path: Path, device: Device, tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.json"
    env = {
        **os.environ,
        "SRE_CHAOS_STATE_DIR": str(device.state.root),
        "SRE_CHAOS_SERVING_URL": device.serving_url,
        "SRE_CHAOS_TOXIPROXY_URL": device.toxiproxy_url,
    }
    chaos = Path(sys.executable).parent / "chaos"
    proc = subprocess.run(
        [
            str(chaos), "--no-version-check", "--log-file", str(tmp_path / "chaos.log"), "run",
            "--dry", "pause", "--rollback-strategy", "always",
            "--var", f"toxiproxy_port:int={device.toxiproxy_port}",
            "--journal-path", str(journal_path), str(path),
        ],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert journal_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    journal = json.loads(journal_path.read_text())
    assert journal["status"] == "completed", proc.stdout[-3000:]
    failed = [
        r["activity"]["name"] for r in journal["run"] + journal["rollbacks"] if r["status"] != "succeeded"
    ]
    assert failed == [], (failed, proc.stdout[-3000:])
    _assert_clean(device)


def test_examples_through_guarded_runner(device: Device) -> None:
    by_name = {p.name: p for p in _runnable()}
    for name in ("uplink-latency.yaml", "standby-corruption.yaml", "toxiproxy-service-latency.json"):
        res = run_experiment_guarded(
            by_name[name],
            state=device.state,
            budget_s=120,
            serving_url=device.serving_url,
            model="classifier",
            toxiproxy_url=device.toxiproxy_url,
            skip_pauses=True,
        )
        assert res.verdict is Verdict.PASSED, (name, res.reasons)
        _assert_clean(device)


def test_the_readme_example_runs(device: Device, tmp_path: Path) -> None:
    """The experiment shown in README.md passes pre-flight and runs guarded on a serving device."""
    from chaos.preflight import preflight_file

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("```yaml\ntitle: Uplink latency does not disturb inference") + len("```yaml\n")
    readme = tmp_path / "readme-example.yaml"
    readme.write_text(text[start : text.index("```", start)])
    _, pre = preflight_file(readme)
    assert pre.verdict == "run", pre.reasons
    res = run_experiment_guarded(
        readme,
        state=device.state,
        budget_s=120,
        serving_url=device.serving_url,
        model="classifier",
        toxiproxy_url=device.toxiproxy_url,
        skip_pauses=True,
    )
    assert res.verdict is Verdict.PASSED, res.reasons
    _assert_clean(device)
