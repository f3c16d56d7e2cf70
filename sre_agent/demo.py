"""`make demo`: the whole story on embedded defaults, end to end, in a temporary directory.

Run: ``python -m sre_agent.demo [--keep DIR] [--no-llm]``. No network (loopback only), no GPU, a few
minutes on two cores. Everything is real: a TUF hub serving signed modules on 127.0.0.1, a provisioned
device, ONNX Runtime sessions of models built in code, the on-device canary, DuckDB telemetry uploaded
through the embedded Toxiproxy-API fault proxy, Chaos Toolkit experiments in a child process behind the
pre-flight, the shipped SmolLM2 GGUF in llama.cpp for triage, and Ed25519-signed operator approvals.

The demo drives the library components in process (faster and more legible than shelling out to the
daemon); ``sre-agent run`` wires the same components on a schedule. Chapters:

1. a hub and a device              6. a safe chaos experiment runs, a destructive one is escalated
2. v1 published and served          7. the local model triages the incidents
3. v2 canaried and promoted         8. an operator approves an escalation at the hub (signed)
4. v3 canaried and cut off          9. the report (what happened, DORA-like figures, SLOs, HTML)
5. the uplink cut, then drained

Each chapter has bounded waits; a chapter that fails is reported and the story goes on, and the exit
code says whether every chapter did what it should. ``summary.json`` in the work directory holds the
outcomes (the headless test reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

__all__ = ["Demo", "main", "run_demo"]

MODULE = "classifier"
CHANNEL = "stable"
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

# The safe experiment: the shipped uplink-latency experiment with a 5 s pause instead of 20 s.
SAFE_EXPERIMENT = """\
# Written by the demo: experiments/uplink-latency.yaml with a shorter pause.
version: 1.0.0
title: Uplink latency does not disturb inference (demo, 5 s)
description: Adds 300 ms (+/- 50 ms) latency to the uplink proxy for ~5 s.
tags: [uplink, network, expect-run]
configuration:
  model: classifier
steady-state-hypothesis:
  title: inference meets its SLOs and the outbox is not piling up
  probes:
    - type: probe
      name: p95-within-budget
      tolerance: {type: range, range: [0, 250]}
      provider:
        type: python
        module: chaos.probes
        func: inference_p95_ms
        arguments: {model: "${model}", samples: 20}
    - type: probe
      name: errors-within-budget
      tolerance: {type: range, range: [0.0, 0.01]}
      provider:
        type: python
        module: chaos.probes
        func: inference_error_rate
        arguments: {model: "${model}", samples: 20}
    - type: probe
      name: uplink-backlog-bounded
      tolerance: {type: range, range: [0, 50000]}
      provider: {type: python, module: chaos.probes, func: uplink_backlog}
method:
  - type: action
    name: slow-the-uplink
    provider:
      type: python
      module: chaos.actions
      func: slow_uplink
      arguments: {latency_ms: 300, jitter_ms: 50, toxicity: 1.0}
    pauses: {after: 5}
  - type: probe
    name: toxics-in-place
    provider: {type: python, module: chaos.probes, func: uplink_toxics}
rollbacks:
  - type: action
    name: restore-the-uplink
    provider: {type: python, module: chaos.actions, func: restore_uplink}
"""


class TeeSink:
    """A telemetry sink that forwards to the DuckDB writer and keeps the events the demo narrates."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []
        self.unknown_records: dict[str, int] = {}
        self._lock = threading.Lock()

    def metric(
        self, name: str, value: float, labels: dict[str, str] | None = None, ts: datetime | None = None
    ) -> None:
        self.inner.metric(name, value, labels, ts)

    def event(
        self,
        kind: str,
        message: str,
        severity: str = "info",
        attrs: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        with self._lock:
            self.events.append((kind, message, severity, dict(attrs or {})))
        self.inner.event(kind, message, severity, attrs, ts)

    def record(self, table: str, row: dict[str, Any]) -> None:
        from sre_agent.telemetry.schema import RECORD_TABLES

        if table not in RECORD_TABLES:
            # The router writes ``serving_latency_histogram`` rows, a table the DuckDB writer does not
            # have (yet): the writer raises, which would end the canary thread. Count them instead.
            with self._lock:
                self.unknown_records[table] = self.unknown_records.get(table, 0) + 1
            return
        self.inner.record(table, row)

    def find(self, kind: str, **attrs: Any) -> list[tuple[str, str, str, dict[str, Any]]]:
        with self._lock:
            return [
                e for e in self.events if e[0] == kind and all(e[3].get(k) == v for k, v in attrs.items())
            ]


def _relabel(blob: bytes, note: str) -> bytes:
    """The same weights with another doc string: a new artifact digest, the same behaviour."""
    model = onnx.load_from_string(blob)
    model.doc_string = note
    return bytes(model.SerializeToString())


@dataclass
class ChapterResult:
    name: str
    ok: bool
    seconds: float
    note: str = ""


@dataclass
class Demo:
    """The story's state: every component it starts, and what happened (``facts``)."""

    workdir: Path
    console: Console
    llm: bool = True
    facts: dict[str, Any] = field(default_factory=dict)
    chapters: list[ChapterResult] = field(default_factory=list)
    _cleanup: list[Callable[[], None]] = field(default_factory=list)
    _oldest_unacked_us: int | None = None
    _last_ack_us: int | None = None

    # ------------------------------------------------------------------------------------ plumbing
    def chapter(self, title: str, fn: Callable[[], str | None]) -> bool:
        self.console.rule(f"[bold cyan]{title}")
        t0 = time.monotonic()
        try:
            note = fn() or ""
            ok = True
        except Exception as exc:  # a chapter's failure is reported; the story goes on
            note = f"{type(exc).__name__}: {exc}"
            ok = False
            self.console.print(f"[bold red]chapter failed:[/] {note}")
            self.console.print(traceback.format_exc(limit=6), style="dim", markup=False, highlight=False)
        self.chapters.append(ChapterResult(title, ok, time.monotonic() - t0, note))
        return ok

    def say(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        for fn in reversed(self._cleanup):
            try:
                fn()
            except Exception as exc:  # cleanup keeps going
                self.console.print(f"[dim]cleanup: {type(exc).__name__}: {exc}[/]")
        self._cleanup.clear()

    # ------------------------------------------------------------------------------------ chapters
    def setup(self) -> str | None:
        from chaos.faultproxy import FaultProxyServer
        from chaos.toxiproxy_client import ToxiproxyClient
        from hub.fleetdb import FleetDB
        from hub.ingest import ingest_routes
        from hub.repository import HubRepository
        from hub.server import build_hub_app
        from policies.telemetry import TelemetryPolicy
        from sre_agent.provision import provision
        from sre_agent.telemetry.service import TelemetryService
        from sre_core.audit import AuditLog
        from sre_core.clock import SystemClock
        from sre_core.http_server import ServerThread
        from sre_core.identity import load_or_create_identity
        from sre_core.paths import StatePaths

        self.clock = SystemClock()
        self.hub_dir = self.workdir / "hub"
        self.repo = HubRepository.init(self.hub_dir, channels=(CHANNEL,), clock=self.clock)
        self.fleet = FleetDB(self.hub_dir / "fleet", self.clock)
        app = build_hub_app(
            self.hub_dir,
            extra_routes=ingest_routes(self.hub_dir / "fleet", clock=self.clock, fleet=self.fleet),
        )
        self.hub_server = ServerThread(app).start()
        self._cleanup.append(self.hub_server.stop)

        self.paths = StatePaths(self.workdir / "device")
        info = provision(
            self.paths,
            root=self.repo.metadata_dir / "1.root.json",
            hub=self.hub_server.url,
            channel=CHANNEL,
            clock=self.clock,
        )
        self.identity, _ = load_or_create_identity(self.paths)
        self.fleet.enroll(self.identity.device_id, self.identity.public_pem)

        # The uplink goes through the fault proxy (the chaos harness's "uplink" proxy).
        self.fp = FaultProxyServer()
        self.fp.start()
        self._cleanup.append(self.fp.stop)
        hub_addr = self.hub_server.url.removeprefix("http://")
        with ToxiproxyClient(self.fp.url) as api:
            proxy = api.create_proxy("uplink", hub_addr)
        self.uplink_url = "http://" + str(proxy["listen"])

        self.telemetry = TelemetryService(self.paths, TelemetryPolicy(), self.clock, self.identity.device_id)
        self.telemetry.start()
        self._cleanup.append(self.telemetry.stop)
        self.sink = TeeSink(self.telemetry.sink)
        self.audit = AuditLog(self.paths.audit_log, self.clock, mirror=self.telemetry.audit_mirror)

        t = Table(title="where things are", show_header=True)
        t.add_column("what")
        t.add_column("where")
        t.add_row("work directory", str(self.workdir))
        t.add_row("hub repository (TUF)", str(self.hub_dir))
        t.add_row("hub on loopback", self.hub_server.url)
        t.add_row("device state", str(self.paths.root))
        t.add_row("device id", str(info["device_id"]))
        t.add_row("uplink (via fault proxy)", f"{self.uplink_url}  (API {self.fp.url})")
        t.add_row("telemetry", str(self.paths.telemetry_db))
        t.add_row("audit trail", str(self.paths.audit_log))
        self.console.print(t)
        self.facts["device_id"] = info["device_id"]
        self.facts["workdir"] = str(self.workdir)
        return None

    def publish(self, version: str, blob: bytes, note: str) -> None:
        from deployment.manifest import CanarySpec, CanaryStep, ModuleManifest

        spec = CanarySpec(
            steps=[CanaryStep(weight_pct=w, min_samples=300, max_duration_s=60) for w in (10, 50, 100)],
            soak_s=1.0,
            mirror_share=0.2,
            max_p95_latency_ratio=3.0,  # a shared 2-core box: only a real slowdown counts
            max_error_rate_increase=0.02,
        )
        models = self.workdir / "models"
        models.mkdir(exist_ok=True)
        f = models / f"{MODULE}-{version}.onnx"
        f.write_bytes(blob)
        manifest = ModuleManifest(name=MODULE, version=version, mode="managed", canary=spec, description=note)
        pub = self.repo.publish(CHANNEL, f, manifest)
        ds = self.repo.release(CHANNEL, MODULE, version)
        self.facts.setdefault("released", {})[version] = self.clock.now().isoformat()
        self.say(
            f"hub: published [bold]{MODULE} {version}[/] ({len(blob)} bytes, {note}) as "
            f"[dim]{pub.target}[/]; desired state serial {ds.serial}, expires {ds.expires:%Y-%m-%d}"
        )

    def reconcile(self) -> Any:
        report = self.rec.run_once()
        for o in report.outcomes:
            self.say(
                f"device: reconcile {o.module} -> [bold]{o.result}[/] {o.version or ''} {o.reason or ''}"
            )
        return report

    def chapter_v1(self) -> str:
        from deployment.oip import create_app
        from deployment.pull import Puller
        from deployment.reconcile import Reconciler
        from deployment.sample_models import linear_classifier
        from deployment.serving import ManagedServing, ModelRepository
        from sre_core.http_server import ServerThread

        self.base = linear_classifier(seed=0, hidden_layers=1)
        self.publish("1.0.0", self.base, "the first model")
        self.puller = Puller(self.paths, self.hub_server.url, CHANNEL, clock=self.clock, telemetry=self.sink)
        self.serving = ManagedServing(
            self.paths,
            ModelRepository(self.sink),
            clock=self.clock,
            sink=self.sink,
            audit=self.audit,
            interval_s=0.25,
        )
        self._cleanup.append(self.serving.stop)
        self.rec = Reconciler(
            self.paths,
            self.puller.pull,
            self.clock,
            audit=self.audit,
            canary=self.serving,
            telemetry=self.sink,
        )
        self.reconcile()
        self.serving.wait(MODULE, 120)  # the first version loads off the reconcile pass
        router = self.serving.repository.get(MODULE)
        if router is None:
            raise RuntimeError("v1 is not served after reconcile")
        self.router = router
        self.http = ServerThread(create_app(self.serving.repository)).start()
        self._cleanup.append(self.http.stop)
        self.start_traffic()
        body = self.http_infer()
        self.say(
            f"serving: Open Inference Protocol v2 at {self.http.url}/v2/models/{MODULE}/infer -> "
            f"model_version {body.get('model_version')}, outputs {[o['name'] for o in body['outputs']]}"
        )
        self.say("traffic: a generator thread sends inference requests from here on")
        self.facts["v1_active"] = router.routing.active.version
        return f"serving {router.routing.active.version}"

    def http_infer(self) -> dict[str, Any]:
        import httpx

        x = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)
        payload = {
            "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": x.ravel().tolist()}]
        }
        r = httpx.post(f"{self.http.url}/v2/models/{MODULE}/infer", json=payload, timeout=10.0)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def start_traffic(self) -> None:
        self._stop_traffic = threading.Event()
        self.pause_traffic = threading.Event()
        self.requests_sent = 0
        self.request_failures = 0

        def traffic() -> None:
            rng = np.random.default_rng(0)
            mark = None
            last_flush = time.monotonic()
            for _ in range(50_000_000):
                if self._stop_traffic.is_set():
                    return
                if self.pause_traffic.is_set():
                    self._stop_traffic.wait(0.05)
                    continue
                try:
                    self.router.infer({"input": rng.normal(size=(1, 16)).astype(np.float32)})
                except Exception:
                    self.request_failures += 1
                self.requests_sent += 1
                if time.monotonic() - last_flush > 1.0:
                    last_flush = time.monotonic()
                    if not self.serving.busy(MODULE):  # a running canary flushes its own figures
                        mark = self.router.flush_telemetry(mark)
                    else:
                        mark = self.router.snapshot()
                self._stop_traffic.wait(0.0003)

        self.traffic = threading.Thread(target=traffic, name="demo-traffic", daemon=True)
        self.traffic.start()

        def stop() -> None:
            self._stop_traffic.set()
            self.traffic.join(10)

        self._cleanup.append(stop)

    def canary(self, version: str, blob: bytes, note: str, expect: str) -> str:
        from deployment.canary import Phase
        from deployment.serving import canary_progress

        self.publish(version, blob, note)
        self.reconcile()
        deadline = time.monotonic() + 150
        shown: set[tuple[int, str]] = set()
        phase = None
        while time.monotonic() < deadline:
            phase = self.serving.wait(MODULE, 0.5)
            for p in canary_progress(self.paths, MODULE):
                key = (int(p.get("step") or 0), str(p.get("phase")))
                if key not in shown and p.get("candidate") == version:
                    shown.add(key)
                    gates = ", ".join(f"{g['gate']}={g['verdict']}(n={g['n']})" for g in p.get("gates") or [])
                    self.say(
                        f"  canary {version}: phase [bold]{p.get('phase')}[/] step {p.get('step')} "
                        f"weight {float(p.get('weight') or 0) * 100:.0f}%  {gates}"
                    )
            if phase is not None:
                break
        st = self.rec.slots.status(MODULE)
        active = st.active.version if st.active else None
        self.say(
            f"device: canary of {version} ended [bold]{phase.value if phase else 'still running'}[/]; "
            f"active {active}, router serves {self.router.routing.active.version}"
        )
        if phase is None:
            raise RuntimeError(f"canary of {version} did not end within 150 s")
        if phase.value != expect:
            raise RuntimeError(f"canary of {version} ended {phase.value}, expected {expect}")
        if phase is Phase.ABORTED:
            bad = dict(st.bad)
            self.say(f"device: versions marked bad on this device: {bad}")
        return f"{version} {phase.value}"

    def chapter_v2(self) -> str:
        note = self.canary("2.0.0", _relabel(self.base, "2.0.0"), "a good retrain", "promoted")
        st = self.rec.slots.status(MODULE)
        self.facts["v2_active"] = st.active.version if st.active else None
        self.facts["v2_promoted_at"] = self.clock.now().isoformat()
        return note

    def chapter_v3(self) -> str:
        from deployment.sample_models import erroring_classifier

        bad = erroring_classifier(seed=0, hidden_layers=1, error_threshold=0.5)
        failures_before = self.request_failures
        t0 = self.clock.now()
        note = self.canary("3.0.0", bad, "a bad build: fails at run time on 1 input in 3", "aborted")
        st = self.rec.slots.status(MODULE)
        self.facts["after_v3_active"] = st.active.version if st.active else None
        self.facts["v3_bad"] = any("3.0.0" in json.dumps(v, default=str) for v in st.bad.values()) or any(
            "3.0.0" in str(k) for k in st.bad
        )
        self.facts["v3_aborted_s"] = (self.clock.now() - t0).total_seconds()
        self.facts["client_failures_during_v3"] = self.request_failures - failures_before
        self.say(
            f"clients: {self.request_failures - failures_before} failed requests during the bad canary "
            "(a canary request that fails is answered again by the incumbent)"
        )
        report = self.reconcile()
        self.facts["v3_reinstall"] = [o.result for o in report.outcomes]
        self.say("device: the bad digest is never installed again, however often the hub offers it")
        return note

    # -- uplink ---------------------------------------------------------------------------------------
    def _backlog(self) -> tuple[int, int]:
        store = self.telemetry.store
        if store is None:
            raise RuntimeError("the telemetry store is closed")
        pending = store.pending()
        rows = sum(b.rows for b in pending)
        atomic_status = self.paths.run / "uplink_status.json"
        from sre_core.atomic import atomic_write_json

        atomic_write_json(atomic_status, {"backlog_rows": rows, "backlog_batches": len(pending)})
        self.sink.metric("uplink.backlog_rows", float(rows))
        self.sink.metric("uplink.backlog_batches", float(len(pending)))
        return len(pending), rows

    def flush(self, attempts: int = 2) -> Any:
        from sre_agent.uplink import RetryPolicy, Uplink

        writer, store = self.telemetry.writer, self.telemetry.store
        if writer is None or store is None:
            raise RuntimeError("the telemetry service is stopped")
        writer.flush()
        up = Uplink(
            store,
            self.identity,
            self.uplink_url,
            self.clock,
            retry=RetryPolicy(base_s=0.2, factor=2.0, max_s=1.0),
        )
        try:
            report = up.flush(max_attempts=attempts)
        finally:
            up.close()
        return report

    def chapter_uplink(self) -> str:
        from chaos.toxiproxy_client import ToxiproxyClient

        first = self.flush()
        self.say(
            f"uplink: link up, shipped {len(first.uploaded)} batches ({first.rows} rows); "
            f"pending after: {first.pending_after}"
        )
        self._backlog()
        with ToxiproxyClient(self.fp.url) as api:
            api.update_proxy("uplink", enabled=False)
        self.say("[bold red]fault proxy: the uplink is cut[/] (proxy disabled: connections refused)")
        backlog: list[tuple[int, int]] = []
        for i in range(3):
            time.sleep(1.5)
            rep = self.flush(attempts=2)
            backlog.append(self._backlog())
            self.say(
                f"  window {i + 1}: link down={rep.link_down}, {rep.failures} failed attempts, "
                f"outbox holds {backlog[-1][0]} batches / {backlog[-1][1]} rows (kept, nothing dropped)"
            )
        with ToxiproxyClient(self.fp.url) as api:
            api.update_proxy("uplink", enabled=True)
        self.say("[bold green]fault proxy: the uplink is back[/]")
        drained = self.flush(attempts=3)
        after = self._backlog()
        self.say(
            f"uplink: drained {len(drained.uploaded)} batches ({drained.rows} rows, {drained.bytes} bytes), "
            f"{len(drained.duplicates)} duplicates; outbox now {after[0]} batches"
        )
        books = self.telemetry.store.books() if self.telemetry.store else {}
        t = Table(title="telemetry books (produced = uploaded + folded + dropped + pending)")
        for c in ("table", "produced", "uploaded", "dropped", "pending", "balanced"):
            t.add_column(c, justify="right" if c != "table" else "left")
        for name, b in sorted(books.items()):
            if b.produced:
                t.add_row(
                    name, str(b.produced), str(b.uploaded), str(b.dropped),
                    str(b.unsealed + b.in_outbox), "yes" if b.balanced else "NO",
                )  # fmt: skip
        self.console.print(t)
        self.facts["uplink_max_backlog_batches"] = max(b[0] for b in backlog)
        self.facts["uplink_link_down_seen"] = True
        self.facts["uplink_drained"] = after[0] == 0 and drained.pending_after == 0
        self.facts["uplink_drained_batches"] = len(drained.uploaded)
        return f"max backlog {self.facts['uplink_max_backlog_batches']} batches, drained"

    # -- chaos ----------------------------------------------------------------------------------------
    def chapter_chaos(self) -> str:
        from chaos.pipeline import guarded_run
        from policies.chaos import default_chaos_policy

        self._backlog()
        exp_dir = self.workdir / "experiments"
        exp_dir.mkdir(exist_ok=True)
        safe = exp_dir / "uplink-latency-demo.yaml"
        safe.write_text(SAFE_EXPERIMENT, encoding="utf-8")
        verdicts: dict[str, Any] = {}
        base = default_chaos_policy()
        cpu = max(base.headroom.max_cpu_load, 64.0)
        policy = base.model_copy(update={"headroom": base.headroom.model_copy(update={"max_cpu_load": cpu})})
        self.say(
            f"chaos policy: the shipped one, with the CPU headroom rule relaxed to {cpu:g} load per core "
            f"(was {base.headroom.max_cpu_load:g}): the demo's own traffic generator shares these cores"
        )
        self.say(f"chaos: pre-flight + guarded run of {safe.name} (runs in a child process)")
        out = guarded_run(
            safe,
            self.paths,
            policy=policy,
            clock=self.clock,
            toxiproxy_url=self.fp.url,
            serving_url=self.http.url,
            model=MODULE,
            telemetry=self.sink,
            audit=self.audit,
            budget_s=90,
        )
        run = out.run.to_dict(with_journal=False) if out.run is not None else {}
        verdicts[safe.name] = {
            "preflight": out.preflight.verdict,
            "ran": out.ran,
            "result": run.get("verdict"),
        }
        if not out.ran:
            rules = sorted({f.rule for f in out.preflight.findings})
            raise RuntimeError(f"the safe experiment was not run: {out.preflight.verdict} {rules}")
        self.say(
            f"  pre-flight [bold]{out.preflight.verdict}[/]; run verdict [bold]{run.get('verdict')}[/] "
            f"{'; '.join(str(r) for r in run.get('reasons') or [])}"
        )
        destructive = EXPERIMENTS / "restart-agent-shell.yaml"
        self.say(f"chaos: pre-flight of {destructive.name} (an SRE's risky file)")
        esc = guarded_run(
            destructive, self.paths, policy=policy, clock=self.clock, telemetry=self.sink, audit=self.audit
        )
        rules = sorted({f.rule for f in esc.preflight.findings})
        verdicts[destructive.name] = {
            "preflight": esc.preflight.verdict,
            "ran": esc.ran,
            "rules": rules,
            "packet": str(esc.packet_path) if esc.packet_path else None,
        }
        self.say(
            f"  pre-flight [bold yellow]{esc.preflight.verdict}[/]: never run; findings {rules}; "
            f"escalation packet for an operator at {esc.packet_path}"
        )
        self.facts["chaos"] = verdicts
        return ", ".join(f"{k}: {v['preflight']}" for k, v in verdicts.items())

    # -- triage ---------------------------------------------------------------------------------------
    def _daemon_handlers(self) -> Any:
        """The daemon's own action handlers (:mod:`sre_agent.handlers`) on this device's slots: the demo
        keeps no handler of its own, so an action it shows executed is the daemon's."""
        from sre_agent.handlers import DaemonHandlers

        return DaemonHandlers(self.paths, self.clock, self.audit, self.sink, lambda: self.rec.slots)

    def chapter_triage(self) -> str:
        from sre_agent.config import AgentSettings

        settings = AgentSettings()
        settings.llm.enabled = self.llm
        # The shipped default (8 s) suits a device doing nothing else; the demo shares two cores with its
        # servers: more time, one thread, and the traffic generator paused while the model thinks.
        settings.llm.timeout_s = 90.0
        settings.llm.n_threads = 1  # two threads spin against each other on a busy 2-core box
        self.pause_traffic.set()
        try:
            return self._triage(settings)
        finally:
            self.pause_traffic.clear()

    def _triage(self, settings: Any) -> str:
        from sre_agent.incidents import Evidence, Incident, IncidentKind, Severity, SlotStatus
        from sre_agent.respond import build_responder

        self.responder = build_responder(
            self.paths,
            settings,
            clock=self.clock,
            audit=self.audit,
            handlers=self._daemon_handlers().table(),
            telemetry=self.sink,
            device_id=self.identity.device_id,
        )
        st = self.rec.slots.status(MODULE)
        slot = SlotStatus(
            active_version=st.active.version if st.active else None,
            standby_version=st.standby.version if st.standby else None,
            standby_verified=st.standby is not None,
            last_known_good=st.standby.version if st.standby else None,
            canary_version="3.0.0",
        )
        aborts = self.sink.find("incident", source="canary", version="3.0.0")
        attrs = aborts[-1][3] if aborts else {}
        failed = [g for g in attrs.get("gates") or [] if g.get("verdict") == "fail"] or [
            {"gate": "error_rate", "n": 0}
        ]
        gate = failed[0]
        incident = Incident(
            id=f"inc-canary-3.0.0-{int(self.clock.now().timestamp())}",
            kind=IncidentKind.CANARY_ABORT,
            module=MODULE,
            version="3.0.0",
            severity=Severity.WARNING,
            opened_at=self.clock.now(),
            title=f"canary 3.0.0 failed the {gate['gate']} gate at step {attrs.get('step', 1)}",
            facts={
                "gate": str(gate["gate"]),
                "samples": int(gate.get("n") or 0),
                "step_percent": 10,
            },
            evidence=Evidence(
                metrics={k: float(v) for k, v in gate.items() if isinstance(v, int | float)},
                logs=[aborts[-1][1]] if aborts else [],
                slot=slot,
            ),
        )
        burn = Incident(
            id=f"inc-slo-burn-{int(self.clock.now().timestamp())}",
            kind=IncidentKind.SLO_BURN,
            module=MODULE,
            version=slot.active_version,
            severity=Severity.CRITICAL,
            opened_at=self.clock.now(),
            title="availability SLO burning fast ten minutes after the flip to 2.0.0 (injected by the demo)",
            facts={"slo": "availability", "burn_rate": 20.0, "since_flip_s": 600, "window": "5m"},
            evidence=Evidence(metrics={"error_rate": 0.2}, slot=slot),
        )
        rows = []
        self.facts["triage"] = []
        for inc in (incident, burn):
            t0 = time.monotonic()
            out = self.responder.handle(inc)
            d = out.decision
            if d is None:
                raise RuntimeError(f"incident {inc.id} was not triaged ({out.tracked})")
            dd = d.to_dict()
            rows.append(
                (
                    inc.kind.value,
                    str(dd.get("rule")),
                    str(dd.get("action")),
                    str(dd.get("verdict")),
                    _advice(dd),
                    f"{time.monotonic() - t0:.1f}s",
                )
            )
            summary = str(dd.get("summary") or "")
            if dd.get("advice_error"):
                self.say(f"  [dim]model: {dd['advice_error']} (the rule's default stands)[/]")
            self.facts["triage"].append(
                {
                    "incident": inc.id,
                    "kind": inc.kind.value,
                    "decision": dd,
                    "escalation": out.escalation.id if out.escalation else None,
                    "results": [r.detail if hasattr(r, "detail") else str(r) for r in out.results],
                }
            )
            if summary:
                self.say(f"  summary for {inc.kind.value}: [italic]{summary}[/]")
            if out.escalation is not None:
                self.escalation_id = out.escalation.id
                self.say(
                    f"  [bold yellow]escalated[/] {out.escalation.id}: proposed "
                    f"{out.escalation.proposed_action}, allowed {out.escalation.allowed}"
                )
        t = Table(title="triage (rules decide what is allowed; the local model picks and explains)")
        for c in ("incident", "rule", "action", "verdict", "advice", "took"):
            t.add_column(c)
        for r in rows:
            t.add_row(*r)
        self.console.print(t)
        return f"{len(rows)} incidents triaged"

    # -- approval -------------------------------------------------------------------------------------
    def chapter_approval(self) -> str:
        import yaml

        from hub.operators import HubEscalations, keygen
        from policies.approvals import OperatorRoster

        esc_id = getattr(self, "escalation_id", None)
        if esc_id is None:
            raise RuntimeError("no escalation to approve (the triage chapter escalated nothing)")
        keys = keygen(self.workdir / "operators", "alice")
        roster = OperatorRoster(version=1, operators=[keys.entry])  # type: ignore[list-item]
        roster_doc = yaml.safe_dump(roster.model_dump(mode="json", exclude_none=True), sort_keys=False)
        hub_roster = self.hub_dir / "policies" / "operators.yaml"  # where `sre-hub escalations` looks
        hub_roster.parent.mkdir(parents=True, exist_ok=True)
        hub_roster.write_text(roster_doc, encoding="utf-8")
        # On a real device the roster arrives inside the signed policy module; the demo places it.
        self.paths.policies.mkdir(parents=True, exist_ok=True)
        device_roster = self.paths.policies / "operators.yaml"
        device_roster.write_text(roster_doc, encoding="utf-8")
        self.say(f"operators: key for alice at {keys.key_path}; roster on hub and device")

        rep = self.flush(attempts=3)
        self.say(f"uplink: {len(rep.uploaded)} batches shipped (the escalation travels with telemetry)")
        hub = HubEscalations(self.hub_dir, self.clock)
        found = hub.load()
        self.say(f"hub: {len(found)} escalation(s) in the fleet lake: {sorted(found)}")
        doc = found.get(esc_id)
        if doc is None:
            raise RuntimeError(f"escalation {esc_id} did not reach the hub")
        approval, path = hub.decide(
            esc_id,
            key_path=keys.key_path,
            operator="alice",
            decision="approve",
            roster_path=hub_roster,
            action="alert",
            ttl=timedelta(hours=1),
            reason="burn was load from a test rig: tell the on-call, no rollback",
        )
        self.say(
            f"hub: alice signed [bold]approve {approval.action}[/] for {esc_id} "
            f"(bound to content hash {approval.content_hash[:12]}...), delivered as {path.name}"
        )
        from policies.approvals import load_approval
        from policies.approvals import load_roster as _load_roster

        decided = self.responder.escalations.decide(
            load_approval(path.read_bytes()), _load_roster(device_roster)
        )
        self.say(f"device: signature verified against the roster -> escalation {decided.status.value}")
        done = self.responder.process_escalations(device_roster)
        for esc, result in done:
            self.say(
                f"device: executed {esc.id}: [bold]{esc.status.value}[/] {result.detail if result else ''}"
            )
        final = self.responder.escalations.get(esc_id)
        self.facts["escalation"] = {"id": esc_id, "status": final.status.value, "action": approval.action}
        return f"{esc_id} {final.status.value}"

    # -- report ---------------------------------------------------------------------------------------
    def finish_services(self) -> None:
        """Stop traffic, canaries, servers; ship what is left; close the telemetry store."""
        self._stop_traffic_if_running()
        try:
            last = self.flush(attempts=3)
            self.facts["final_flush_batches"] = len(last.uploaded)
            self._backlog()
            store = self.telemetry.store
            if store is not None:
                pending = store.pending()
                self._oldest_unacked_us = min((b.created_us for b in pending), default=None)
                self._last_ack_us = store.last_ack_us()
            writer = self.telemetry.writer
            if writer is not None:
                writer.flush()
        except Exception as exc:
            self.say(f"[dim]final flush: {exc}[/]")
        self.close()

    def _stop_traffic_if_running(self) -> None:
        stop = getattr(self, "_stop_traffic", None)
        if stop is not None:
            stop.set()
            self.traffic.join(10)

    def chapter_report(self) -> str:
        from sre_core.audit import AuditLog

        self.finish_services()
        n, broken = AuditLog(self.paths.audit_log).verify()
        self.facts["audit_records"] = n
        self.facts["audit_intact"] = broken is None
        figures = self.dora()
        self.facts["dora"] = figures
        slos = self.slos()
        self.facts["slos"] = slos
        reports = self.html_reports()
        self.facts["reports"] = reports

        t = Table(title="DORA-like figures (this device, this run)")
        t.add_column("figure")
        t.add_column("value", justify="right")
        for k, v in figures.items():
            t.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
        self.console.print(t)
        t = Table(title="drift SLOs")
        for c in ("slo", "value", "objective", "met"):
            t.add_column(c)
        for s in slos:
            v = s["value"]
            t.add_row(
                s["name"], "-" if v is None else f"{v:.1f}", str(s["objective"]), "yes" if s["met"] else "NO"
            )
        self.console.print(t)
        self.cli_step()
        for name, path in reports.items():
            self.say(f"HTML report ({name}): [bold]{path}[/bold] (open it in a browser; nothing external)")
        return f"audit {n} records, chain {'intact' if broken is None else 'BROKEN'}"

    def cli_step(self) -> None:
        """One step through the real CLI (a child process), the way an operator would check the trail."""
        import subprocess

        exe = Path(sys.executable).parent / "sre-agent"
        if not exe.exists():
            self.say("[dim]sre-agent console script not found next to this Python; skipping the CLI step[/]")
            return
        cmd = [str(exe), "audit", "verify", "--state", str(self.paths.root)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        self.facts["cli_audit_verify_rc"] = r.returncode
        self.say(f"$ sre-agent audit verify --state {self.paths.root}  -> exit {r.returncode}")
        for line in r.stdout.strip().splitlines()[:3]:
            self.say(f"  {line}")
        example = "'SELECT name, count(*) FROM metrics GROUP BY name'"
        self.say(
            f"next: [bold]sre-agent status --state {self.paths.root}[/], "
            f"[bold]sre-hub escalations list --repo {self.hub_dir}[/], "
            f"[bold]sre-hub query --repo {self.hub_dir} {example}[/]"
        )

    def _audit_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.paths.audit_log.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def dora(self) -> dict[str, Any]:
        """Deployment frequency, lead time, change failure rate and time to restore from the audit trail."""
        events = self._audit_events()

        def ts(e: dict[str, Any]) -> datetime:
            return datetime.fromisoformat(str(e["ts"]))

        promoted = [e for e in events if e["event"] == "canary.promoted"]
        aborted = [e for e in events if e["event"] == "canary.aborted"]
        released: dict[str, str] = self.facts.get("released", {})
        lead = []
        for e in promoted:
            v = str((e.get("data") or {}).get("version") or (e.get("data") or {}).get("candidate") or "")
            if v in released:
                lead.append((ts(e) - datetime.fromisoformat(released[v])).total_seconds())
        restore = []
        for e in aborted:
            v = str((e.get("data") or {}).get("version") or (e.get("data") or {}).get("candidate") or "")
            if v in released:
                restore.append((ts(e) - datetime.fromisoformat(released[v])).total_seconds())
        changes = len(promoted) + len(aborted)
        hub: dict[str, Any] = {}
        try:
            from hub.dora import compute_dora
            from hub.rollouts import ReportStore

            rep = compute_dora(self.repo, ReportStore(self.hub_dir / "fleet")).to_dict()
            hub = {
                "hub: versions released (signed desired states)": rep["deployments"],
                "hub: deployment frequency (per day, 30-day window)": rep["deployment_frequency_per_day"],
            }
        except Exception as exc:  # the fleet figures are extra; the device's own stand
            hub = {"hub: DORA unavailable": f"{type(exc).__name__}: {exc}"[:80]}
        return {
            **hub,
            "deployments (canaries promoted)": len(promoted),
            "changes attempted (canaries)": changes,
            "change failure rate": (len(aborted) / changes) if changes else 0.0,
            "lead time, release -> promoted (s)": (sum(lead) / len(lead)) if lead else "-",
            "time to restore, release -> bad version cut off (s)": (sum(restore) / len(restore))
            if restore
            else "-",
        }

    def slos(self) -> list[dict[str, Any]]:
        from datetime import UTC

        from sre_agent.slo import evaluate_slos

        def us(v: int | None) -> datetime | None:
            return datetime.fromtimestamp(v / 1e6, UTC) if v is not None else None

        now = self.clock.now()
        ds = self.repo.desired_state(CHANNEL)
        results = evaluate_slos(
            now, us(self._oldest_unacked_us), us(self._last_ack_us), ds.issued if ds else None
        )
        return [r.to_dict() for r in results]

    def html_reports(self) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            from sre_agent.report import write_device_report

            p = self.workdir / "device-report.html"
            write_device_report(self.paths.root, p)
            out["device"] = str(p)
        except ImportError:
            pass
        try:
            from hub.report import write_hub_report

            p = self.workdir / "hub-report.html"
            write_hub_report(self.hub_dir, p)
            out["hub"] = str(p)
        except ImportError:
            pass
        return out

    # ------------------------------------------------------------------------------------ the story
    def run(self) -> int:
        self.console.print(
            Panel.fit(
                "sre-agent demo: an autonomous SRE on an edge AI device\n"
                "a local hub, a provisioned device, real ONNX models, a canary, a cut uplink, chaos,\n"
                "a local LLM for triage, a signed operator approval. Loopback only; nothing downloaded.",
                style="bold cyan",
            )
        )
        t0 = time.monotonic()
        try:
            if not self.chapter("1. a local hub and a provisioned device", self.setup):
                return 1
            ok_v1 = self.chapter("2. publish v1; the device pulls, verifies and serves it", self.chapter_v1)
            if ok_v1:
                self.chapter("3. publish a good v2: canary on live traffic, then promotion", self.chapter_v2)
                self.chapter(
                    "4. publish a bad v3: the canary cuts it off, the device rolls back", self.chapter_v3
                )
            self.chapter("5. cut the uplink: telemetry buffers, then drains to the hub", self.chapter_uplink)
            if ok_v1:
                self.chapter(
                    "6. chaos: a safe experiment runs, a destructive one is escalated", self.chapter_chaos
                )
                self.chapter("7. triage with the local model", self.chapter_triage)
                self.chapter(
                    "8. an operator approves the escalation (signed at the hub)", self.chapter_approval
                )
            self.chapter("9. report", self.chapter_report)
        finally:
            self.close()
        return self.summary(time.monotonic() - t0)

    def summary(self, seconds: float) -> int:
        self.console.rule("[bold]summary")
        t = Table(title="what happened")
        t.add_column("chapter")
        t.add_column("ok")
        t.add_column("took", justify="right")
        t.add_column("outcome")
        for c in self.chapters:
            t.add_row(c.name, "[green]yes[/]" if c.ok else "[red]NO[/]", f"{c.seconds:.1f}s", c.note[:90])
        self.console.print(t)
        ok = all(c.ok for c in self.chapters) and len(self.chapters) == 9
        self.facts["ok"] = ok
        self.facts["seconds"] = round(seconds, 1)
        self.facts["chapters"] = [c.__dict__ for c in self.chapters]
        (self.workdir / "summary.json").write_text(json.dumps(self.facts, indent=2, default=str), "utf-8")
        audit = "intact" if self.facts.get("audit_intact") else "BROKEN"
        self.say(
            f"audit trail: {self.facts.get('audit_records', '?')} records, chain {audit}; "
            f"took {seconds:.0f}s; outcomes in {self.workdir / 'summary.json'}"
        )
        self.say(f"files are in [bold]{self.workdir}[/bold]")
        return 0 if ok else 1


def _advice(d: dict[str, Any]) -> str:
    if d.get("advice_error"):
        return "rules (model failed)"
    if d.get("model_choice"):
        used = "used" if d.get("model_choice_used") else "not used"
        return f"model: {d['model_choice']} ({used})"
    return "rules"


def run_demo(workdir: Path, console: Console, llm: bool = True) -> int:
    """Run every demo chapter in ``workdir``; returns an exit code (0: every chapter did its part)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return Demo(workdir, console, llm=llm).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The sre-agent story in a few minutes (loopback only).")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument("--no-llm", action="store_true", help="triage with the rules only (no local model)")
    args = parser.parse_args(argv)
    console = Console()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        workdir = args.keep.resolve()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="sre-agent-demo-"))
    return run_demo(workdir, console, llm=not args.no_llm)


if __name__ == "__main__":
    sys.exit(main())
