"""Reports read live data through the running daemon (it holds the DuckDB file), with data in every
plot; screenshots of both reports rendered while the servers run (saved to $REPORT_SCREENSHOTS)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sre_agent.admin import admin_client
from sre_core.http_server import free_port
from tests.test_report import World, _chromium, _plots, world  # noqa: F401 (world is a fixture)

EXE = Path(sys.executable).parent


def _wait_for(pred: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


SERVING_PORT = free_port()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRE_AGENT_")}
    env.update(
        SRE_AGENT_LLM__ENABLED="false",
        SRE_AGENT_CHAOS__ENABLED="false",
        SRE_AGENT_SERVING__PORT=str(SERVING_PORT),
    )
    return env


@pytest.fixture(scope="module")
def live(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, str, Path]]:  # noqa: F811
    """The world's device under a running daemon, and its hub under `sre-hub serve` (returns its URL)."""
    tmp = tmp_path_factory.mktemp("live")
    log = (tmp / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [str(EXE / "sre-agent"), "run", "--state", str(world.paths.root), "--heartbeat", "0.5"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    port = free_port()
    hub = subprocess.Popen(
        [str(EXE / "sre-hub"), "serve", "--repo", str(world.hub), "--port", str(port)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        assert _wait_for(lambda: admin_client(world.paths) is not None), (tmp / "daemon.log").read_text()
        yield world, f"http://127.0.0.1:{port}", tmp / "daemon.log"
    finally:
        for p in (daemon, hub):
            p.send_signal(signal.SIGTERM)
        for p in (daemon, hub):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


def _screenshot(tmp: Path, html: Path, name: str) -> None:
    shot = tmp / name
    r = _chromium(tmp, html, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    dest = os.environ.get("REPORT_SCREENSHOTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(dest) / name)


@pytest.mark.slow
def test_device_report_reads_through_the_running_daemon(
    live: tuple[World, str, Path], tmp_path: Path
) -> None:
    w, _, _ = live
    out = tmp_path / "device.html"
    r = subprocess.run(
        [str(EXE / "sre-agent"), "report", "--state", str(w.paths.root), "--html", str(out), "--json"],
        env=_env(), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["telemetry_note"] == "" and info["metric_rows"] > 0, info
    html = out.read_text()
    assert "telemetry unavailable" not in html and "Conflicting lock" not in html
    plots = _plots(html)
    assert len(plots) == 9 and [t for t, n in plots.items() if n == 0] == [], plots
    _screenshot(tmp_path, out, "device-report.png")


@pytest.mark.slow
def test_hub_report_while_the_hub_serves(live: tuple[World, str, Path], tmp_path: Path) -> None:
    w, _, _ = live
    out = tmp_path / "hub.html"
    r = subprocess.run(
        [str(EXE / "sre-hub"), "report", "--repo", str(w.hub), "--html", str(out), "--json"],
        env=_env(), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    plots = _plots(out.read_text())
    assert len(plots) == 11 and [t for t, n in plots.items() if n == 0] == [], plots
    _screenshot(tmp_path, out, "hub-report.png")


def _families(text: str) -> dict[str, Any]:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    assert text.rstrip().endswith("# EOF"), text[-200:]
    return {f.name: f for f in text_string_to_metric_families(text)}  # type: ignore[no-untyped-call]


@pytest.mark.slow
def test_metrics_endpoints_parse_as_openmetrics(live: tuple[World, str, Path]) -> None:
    import httpx

    w, hub_url, log = live
    serving = f"http://127.0.0.1:{SERVING_PORT}"
    assert _wait_for(lambda: _ready(serving)), log.read_text()[-3000:]
    r = httpx.get(f"{serving}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/openmetrics-text")
    fams = _families(r.text)
    for name in (
        "sre_agent_job_runs", "sre_agent_job_failures",
        "sre_agent_serving_requests", "sre_agent_serving_errors",
        "sre_agent_canary_weight", "sre_agent_canary_phase", "sre_agent_verification_check",
        "sre_agent_uplink_backlog_batches", "sre_agent_uplink_unsealed_rows", "sre_agent_telemetry_rows",
    ):  # fmt: skip
        assert name in fams, (name, sorted(fams))
    # the world's models were served in-process, not installed in slots: the family is declared, empty
    assert "# TYPE sre_agent_serving_requests counter" in r.text
    phases = {s.labels["candidate"]: s.labels["phase"] for s in fams["sre_agent_canary_phase"].samples}
    assert phases.get("3.0.0") == "aborted", phases  # the world's last canary failed its error gate
    # the same families on the admin API (unix socket, token)
    client = admin_client(w.paths)
    assert client is not None
    try:
        assert "sre_agent_job_runs" in _families(client.get("/metrics").text)
    finally:
        client.close()
    hub = _families(httpx.get(f"{hub_url}/metrics", timeout=30).text)
    for name in (
        "sre_hub_rollout_info", "sre_hub_devices", "sre_hub_device_module_version",
        "sre_hub_uplink_batches_landed", "sre_hub_uplink_rows_landed",
    ):  # fmt: skip
        assert name in hub, (name, sorted(hub))
    landed = next(s.value for s in hub["sre_hub_uplink_batches_landed"].samples if s.name.endswith("_total"))
    assert landed >= 1


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
