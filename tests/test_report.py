"""HTML reports (device and hub) from real data: a real canary on ONNX Runtime, a real DuckDB store, a real
hub repository and lake, a real escalation and chaos pre-flight; rendered by headless Chromium.

Chromium (Debian's ``chromium`` package) must be installed: CI installs it (``apt-get install chromium``).
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from chaos.pipeline import guarded_run
from deployment.canary import Phase
from deployment.manifest import CanarySpec, CanaryStep, ModuleManifest
from deployment.sample_models import erroring_classifier, linear_classifier
from deployment.serving import ManagedServing, ModelRepository
from hub.fleetdb import FleetDB
from hub.report import collect_hub, write_hub_report
from hub.repository import HubRepository
from policies.telemetry import TelemetryPolicy
from policies.triage import default_triage_policy
from sre_agent.escalations import EscalationStore, escalations_dir
from sre_agent.report import collect_device, write_device_report
from sre_agent.telemetry import Store, TelemetryWriter
from sre_agent.telemetry.schema import RECORD_TABLES
from sre_agent.triage import TriageEngine
from sre_agent.triage_eval import load_cases
from sre_core.audit import AuditLog
from sre_core.audit_plots import error_rates
from sre_core.clock import SystemClock
from sre_core.identity import load_or_create_identity
from sre_core.paths import StatePaths
from sre_core.svg import bar_chart, line_chart, nice_ticks

pytestmark = pytest.mark.xdist_group("report")

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SPEC = CanarySpec(
    steps=[CanaryStep(weight_pct=w, min_samples=40, max_duration_s=60) for w in (20, 100)],
    soak_s=0.2,
    mirror_share=0.2,
    max_p95_latency_ratio=5.0,
    max_error_rate_increase=0.05,
)


class _Sink:
    """The DuckDB writer, minus record tables it does not know.

    The router writes ``serving_latency_histogram`` records, which ``TelemetryWriter.record`` refuses
    with KeyError (that would end the canary thread); reported to the lead. Everything else passes.
    """

    def __init__(self, writer: TelemetryWriter) -> None:
        self.writer = writer

    def metric(self, *a: Any, **k: Any) -> None:
        self.writer.metric(*a, **k)

    def event(self, *a: Any, **k: Any) -> None:
        self.writer.event(*a, **k)

    def record(self, table: str, row: dict[str, Any]) -> None:
        if table in RECORD_TABLES:
            self.writer.record(table, row)


@dataclass
class World:
    paths: StatePaths
    device_id: str
    hub: Path
    phases: list[Phase]


def _write(tmp: Path, name: str, blob: bytes) -> Path:
    p = tmp / name
    p.write_bytes(blob)
    return p


def _relabel(blob: bytes, note: str) -> bytes:
    m = onnx.load_from_string(blob)
    m.doc_string = note
    return bytes(m.SerializeToString())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("report")
    clock = SystemClock()
    paths = StatePaths(tmp / "device")
    paths.create()
    ident, _ = load_or_create_identity(paths)
    store = Store(paths.telemetry_db, TelemetryPolicy(), clock, ident.device_id)
    writer = TelemetryWriter(store)
    sink = _Sink(writer)
    audit = AuditLog(paths.audit_log, clock, mirror=writer.audit_mirror)
    serving = ManagedServing(
        paths, ModelRepository(sink), clock=clock, sink=sink, audit=audit, interval_s=0.05
    )
    base = linear_classifier(seed=0)
    v1 = ModuleManifest(name="clf", version="1.0.0", mode="managed", canary=SPEC)
    router = serving.serve("clf", _write(tmp, "v1.onnx", base), v1)
    stop = threading.Event()

    def traffic() -> None:
        rng = np.random.default_rng(0)
        for _ in range(10_000_000):
            if stop.is_set():
                return
            try:
                router.infer({"input": rng.normal(size=(1, 16)).astype(np.float32)})
            except Exception:  # the failing canary's requests are answered by the incumbent
                stop.wait(0)
            stop.wait(0.0005)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    phases = []
    try:
        for version, blob in (
            ("2.0.0", _relabel(base, "2")),
            ("3.0.0", erroring_classifier(seed=0, error_threshold=0.3)),
        ):
            m = ModuleManifest(name="clf", version=version, mode="managed", canary=SPEC)
            phases.append(serving.run_canary("clf", _write(tmp, f"{version}.onnx", blob), m))
    finally:
        stop.set()
        t.join(10)
        serving.stop()
    for i in range(4):  # the backlog the uplink reports (the daemon's uplink job writes these)
        writer.metric("uplink.backlog_rows", float(10 * i))
    # a chaos pre-flight that escalates (never runs), and a triage escalation
    guarded_run(ROOT / "experiments" / "restart-agent-shell.yaml", paths, audit=audit, telemetry=writer)
    case = next(c for c in load_cases(ROOT / "tests" / "triage_cases") if c.name == "pf-active-nolkg")
    decision = TriageEngine(default_triage_policy()).decide(case.incident)
    EscalationStore(escalations_dir(paths), audit, clock, device_id=ident.device_id, telemetry=writer).create(
        case.incident, decision
    )
    writer.flush()
    # the hub: two releases, this device enrolled, its sealed telemetry landed in the lake
    repo = HubRepository.init(tmp / "hub", channels=("stable",), clock=clock)
    for version, blob in (("1.0.0", base), ("2.0.0", _relabel(base, "2"))):
        repo.publish(
            "stable", _write(tmp, f"pub-{version}.onnx", blob), ModuleManifest(name="clf", version=version)
        )
        repo.release("stable", "clf", version)
    fleet = FleetDB(tmp / "hub" / "fleet", clock)
    fleet.enroll(ident.device_id, ident.public_pem)
    store.seal()
    for b in store.pending():
        fleet.land_batch(ident.device_id, b.batch_id, store.payload(b.batch_id))
        store.ack(b.batch_id)
    store.close()
    return World(paths, ident.device_id, tmp / "hub", phases)


def _plots(html: str) -> dict[str, int]:
    """Plot title -> number of data marks in it."""
    out = {}
    for chunk in html.split('<svg class="plot"')[1:]:
        body = chunk.split("</svg>", 1)[0]
        title = re.search(r"<title>([^<]*)</title>", body)
        out[title.group(1) if title else "?"] = body.count('class="mark"')
    return out


def _png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into rows of raw pixels."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = bpp = 0
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += data
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def _chromium(tmp: Path, html: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM.exists(), "install Debian's chromium package (apt-get install -y chromium)"
    return subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={tmp / 'chromium-profile'}", *extra, html.as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _render_in_chromium(tmp: Path, html: Path) -> tuple[str, int]:
    """The DOM after Chromium rendered the page, and the number of distinct colours in a screenshot."""
    dom = _chromium(tmp, html, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp / "shot.png"
    r = _chromium(tmp, html, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    _, _, rows = _png_pixels(shot.read_bytes())
    colours = {row[i : i + 3] for row in rows[::7] for i in range(0, len(row), 3 * 11)}
    return dom.stdout, len(colours)


@pytest.mark.slow
def test_the_story_data_is_real(world: World) -> None:
    assert world.phases == [Phase.PROMOTED, Phase.ABORTED]


@pytest.mark.slow
def test_device_report_has_every_plot_with_data(world: World, tmp_path: Path) -> None:
    data = collect_device(world.paths.root)
    assert data.device_id == world.device_id and data.audit_intact is True and not data.telemetry_note
    out = write_device_report(world.paths.root, tmp_path / "device.html")
    html = out.read_text()
    plots = _plots(html)
    assert len(plots) == 9, plots
    empty = [t for t, marks in plots.items() if marks == 0]
    assert empty == [], plots
    # the canary weights went 20 % -> 100 % for 2.0.0 and 20 % -> 0 for 3.0.0
    assert "2.0.0 weight %" in html and "3.0.0 weight %" in html
    # the bad canary's failed requests show as a non-zero error rate for 3.0.0
    errors_svg = next(
        c for c in html.split('<svg class="plot"') if "error rate per slot" in c.split("</title>")[0]
    )
    rates = [float(v) for v in re.findall(r"3\.0\.0: ([0-9.e+-]+) at", errors_svg)]
    assert rates and max(rates) > 10, rates
    assert "error_rate gate failed" in html and "escalate" in html and "esc-" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing external
    dom, colours = _render_in_chromium(tmp_path, out)
    assert _plots(dom) == plots  # Chromium parsed every plot and every mark
    assert colours > 8  # not a blank page: axes, text and coloured series


@pytest.mark.slow
def test_hub_report_has_every_plot_with_data(world: World, tmp_path: Path) -> None:
    data = collect_hub(world.hub)
    assert data.notes == [] and len(data.publications) == 2 and len(data.escalations) == 1
    out = write_hub_report(world.hub, tmp_path / "hub.html")
    plots = _plots(out.read_text())
    assert len(plots) == 11, plots
    assert [t for t, marks in plots.items() if marks == 0] == [], plots
    dom, colours = _render_in_chromium(tmp_path, out)
    assert _plots(dom) == plots and colours > 8


@pytest.mark.slow
def test_report_clis(
    world: World, tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    r = run_cli("sre-agent", "report", "--state", str(world.paths.root), "--html", str(tmp_path / "d.html"))
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((tmp_path / "d.html").read_bytes()).hexdigest()
    r = run_cli("sre-hub", "report", "--repo", str(world.hub), "--html", str(tmp_path / "h.html"), "--json")
    assert r.returncode == 0 and '"devices": 1' in r.stdout, r.stderr
    r = run_cli("sre-hub", "report", "--repo", str(tmp_path), "--html", str(tmp_path / "x.html"))
    assert r.returncode == 2 and "not a hub repository" in r.stderr
    assert not (tmp_path / "x.html").exists()


def test_error_rates_pair_each_errors_sample_with_its_requests_sample() -> None:
    samples = [
        (1.0, "a", "requests", 100.0),
        (1.001, "b", "requests", 10.0),
        (1.002, "a", "errors", 5.0),
        (1.003, "b", "errors", 0.0),
        (2.0, "a", "errors", 9.0),  # no unpaired requests sample: ignored
        (3.0, "a", "requests", 0.0),
        (3.001, "a", "errors", 0.0),  # no requests: no rate
    ]
    assert error_rates(samples) == {"a": [(1.0, 5.0)], "b": [(1.001, 0.0)]}


def test_svg_helpers_scale_and_escape() -> None:
    assert nice_ticks(0, 97) == [0, 20, 40, 60, 80, 100]
    svg = line_chart({"a<b": [(0, 1), (1, 2), (2, float("nan"))]}, "t & t")
    assert svg.count('class="mark"') == 3 and "a&lt;b" in svg and "t &amp; t" in svg
    assert "no data" in line_chart({}, "empty") and 'class="mark"' not in line_chart({}, "empty")
    bars = bar_chart([("x", 3.0, None), ("y", 0.0, "#000")], "b")
    assert bars.count('class="mark"') == 2
