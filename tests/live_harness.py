"""The live harness: the real ``sre-agent run`` as a child process, a real hub on loopback, HTTP clients.

Shared by the live acceptance tests (``tests/test_live_faults.py``, ``tests/test_canary_live.py``) and the
daemon-level canary benchmark (``benchmarks/serving.py --canary-daemon``): one place that provisions the
device against the hub, shortens the daemon's intervals through its own settings, starts and stops the
child, reads its audit trail and slots from outside, and sends inference over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import yaml

from deployment.manifest import CanarySpec, CanaryStep, ModuleManifest, ProbeSpec
from deployment.sample_models import linear_classifier
from deployment.slots import ModuleStatus, SlotManager
from hub.fleetdb import FleetDB
from hub.ingest import ingest_routes
from hub.repository import HubRepository
from hub.server import build_hub_app
from sre_agent.provision import provision
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock
from sre_core.http_server import ServerThread, free_port
from sre_core.identity import load_identity
from sre_core.paths import StatePaths

__all__ = [
    "EXE",
    "PULL_S",
    "Client",
    "Live",
    "LoadClient",
    "clean_stop",
    "infer_requests",
    "live_rig",
    "record",
    "relabel",
    "serving",
]

EXE = Path(sys.executable).parent / "sre-agent"
PULL_S = 5  # the settings' minimum


def relabel(blob: bytes, note: str) -> bytes:
    """The same weights with another doc string: a new digest, the same behaviour (the canary passes)."""
    model = onnx.load_from_string(blob)
    model.doc_string = note
    return bytes(model.SerializeToString())


def record(scenario: str, outcome: str, ttr_s: float, **extra: Any) -> None:
    row = {"scenario": scenario, "outcome": outcome, "time_to_recovery_s": round(ttr_s, 2), **extra}
    print("LIVE-FAULT " + json.dumps(row))
    out = os.environ.get("SRE_LIVE_FAULTS_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


@dataclass
class Client:
    """Sends an inference request every few milliseconds and remembers what served each one."""

    url: str
    served: list[tuple[float, str]] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Client:
        x = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32).ravel().tolist()
        body = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": x}]}

        def run() -> None:
            with httpx.Client(timeout=5.0) as c:
                while not self._stop.is_set():
                    t = time.monotonic()
                    try:
                        r = c.post(f"{self.url}/v2/models/clf/infer", json=body)
                        if r.status_code == 200:
                            self.served.append((t, str(r.json().get("model_version"))))
                        else:
                            self.errors.append((t, f"HTTP {r.status_code}"))
                    except httpx.HTTPError as exc:
                        if self.served:  # before the first answer the server is still starting
                            self.errors.append((t, type(exc).__name__))
                    self._stop.wait(0.01)

        self._thread = threading.Thread(target=run, name="client", daemon=True)
        self._thread.start()
        return self

    def first_after(self, t0: float, version: str) -> float | None:
        return next((t for t, v in list(self.served) if t >= t0 and v == version), None)

    def error_kinds(self, since: float = 0.0) -> dict[str, int]:
        """Failed requests after the first answer and after ``since``, by kind (HTTP status, exception)."""
        return dict(Counter(kind for t, kind in self.errors if t >= since))

    def last(self, n: int = 20) -> list[str]:
        return [v for _, v in self.served[-n:]]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


@dataclass
class Live:
    """A hub on loopback, a provisioned device and its daemon (a child process)."""

    tmp: Path
    repo: HubRepository
    hub: ServerThread
    paths: StatePaths
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    # -- hub side -----------------------------------------------------------------------------------
    def publish(
        self,
        version: str,
        blob: bytes,
        module: str = "clf",
        canary: bool = True,
        probes: list[ProbeSpec] | None = None,
        mode: str = "managed",
    ) -> None:
        spec = None
        if canary:
            spec = CanarySpec(
                steps=[CanaryStep(weight_pct=w, min_samples=20, max_duration_s=60) for w in (50, 100)],
                soak_s=0.0,
                mirror_share=0.5,
                max_p95_latency_ratio=10.0,  # a loaded 2-core box: only the error and divergence gates
                max_error_rate_increase=0.05,
            )
        f = self.tmp / f"{module}-{version}.bin"
        f.write_bytes(blob)
        manifest = ModuleManifest(
            name=module,
            version=version,
            mode=mode,  # type: ignore[arg-type]
            canary=spec,
            probes=probes or [],
        )
        self.repo.publish("stable", f, manifest)
        self.repo.release("stable", module, version)

    # -- device side --------------------------------------------------------------------------------
    def start(self) -> None:
        log = self.tmp / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(EXE), "run", "--state", str(self.paths.root), "--heartbeat", "1"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc = None

    def status(self, module: str = "clf") -> ModuleStatus:
        return SlotManager(self.paths, AuditLog(self.paths.audit_log)).status(module)

    def events(self) -> list[dict[str, Any]]:
        if not self.paths.audit_log.exists():
            return []
        out = []
        for line in self.paths.audit_log.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        return out

    def seen(self, event: str, **data: object) -> bool:
        """Whether the audit trail holds ``event`` with these data values."""
        return any(
            e["event"] == event and all(e["data"].get(k) == v for k, v in data.items()) for e in self.events()
        )

    def names(self) -> list[str]:
        return [e["event"] for e in self.events()]

    def open_incidents(self) -> list[dict[str, Any]]:
        from sre_agent.respond import open_incidents

        return open_incidents(self.paths)

    def wait(self, pred: Callable[[], object], what: str, timeout: float = 120.0) -> float:
        """Poll ``pred`` until truthy; returns when (monotonic). Fails with the daemon's log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"the daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}")
            try:
                if pred():
                    return time.monotonic()
            except (OSError, ValueError, KeyError, AttributeError):
                pass
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; audit: {self.names()[-15:]}\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logs[-1:])

    def corrupt_active(self, module: str = "clf") -> None:
        view = self.status(module).active
        assert view is not None
        with view.artifact_path.open("r+b") as f:  # 16 bytes overwritten in place, from outside
            f.seek(64)
            f.write(b"\xff" * 16)


@contextlib.contextmanager
def live_rig(tmp_path: Path, rehash_every_s: int = 2) -> Iterator[Live]:
    """A hub on loopback and a provisioned device whose daemon the caller starts (``Live.start``).

    The daemon's intervals are shortened through its own settings (pull every 5 s, uplink 2 s, SLOs 5 s,
    escalations 1 s); only the slot re-hash check runs, every ``rehash_every_s``. The canary policy is
    the shipped default. The daemon is killed and the hub stopped on exit.
    """
    clock = SystemClock()
    repo = HubRepository.init(tmp_path / "hub", channels=("stable",), clock=clock)
    fleet = FleetDB(repo.dir / "fleet", clock)  # the hub's ingest: what the device uploads lands here
    hub = ServerThread(
        build_hub_app(repo.dir, extra_routes=ingest_routes(repo.dir / "fleet", clock=clock, fleet=fleet))
    ).start()
    paths = StatePaths(tmp_path / "dev")
    safe = tmp_path / "clf-safe.onnx"
    safe.write_bytes(linear_classifier(seed=9))
    provision(
        paths,
        root=repo.metadata_dir / "1.root.json",
        hub=hub.url,
        channel="stable",
        clock=clock,
        safe_modules=[f"clf={safe}"],
    )
    ident = load_identity(paths)
    fleet.enroll(ident.device_id, ident.public_pem)
    # Only the slot re-hash runs, every 2 s (the shipped policy runs it hourly among many checks).
    (paths.policies / "verification.yaml").write_text(
        yaml.safe_dump(
            {
                "defaults": {"interval_s": 300, "jitter_s": 0, "max_parallel": 1},
                "checks": {"integrity.slots": {"interval_s": rehash_every_s, "jitter_s": 0, "timeout_s": 30}},
            }
        )
    )
    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRE_AGENT_")}
    env |= {
        "SRE_AGENT_LLM__ENABLED": "false",
        "SRE_AGENT_CHAOS__ENABLED": "false",
        "SRE_AGENT_SERVING__PORT": str(port),
        "SRE_AGENT_HUB__PULL_INTERVAL_S": str(PULL_S),
        "SRE_AGENT_HUB__PULL_JITTER_S": "0",
        "SRE_AGENT_DAEMON__ESCALATIONS_INTERVAL_S": "1",
        "SRE_AGENT_DAEMON__SLO_INTERVAL_S": "5",
        "SRE_AGENT_UPLINK__INTERVAL_S": "2",
        "SRE_AGENT_LOG_FORMAT": "json",
    }
    lv = Live(tmp_path, repo, hub, paths, port, env)
    try:
        yield lv
    finally:
        if lv.proc is not None:
            lv.proc.kill()
            lv.proc.wait(30)
        hub.stop()


def serving(live: Live) -> Client:
    """Start the daemon serving clf 1.0 with a client sending traffic; returns the client."""
    live.start()
    client = Client(f"http://127.0.0.1:{live.port}").start()
    live.wait(lambda: client.first_after(0, "1.0"), "the client served by clf 1.0")
    return client


def clean_stop(live: Live) -> None:
    """SIGTERM: exit 0, every log line one JSON object, no traceback."""
    assert live.stop() == 0, live.tail()
    for line in live.logs[-1].read_text().splitlines():
        assert json.loads(line), line
    assert "Traceback" not in live.logs[-1].read_text()


def infer_requests(module: str, rows: list[np.ndarray]) -> list[bytes]:
    """One raw HTTP/1.1 keep-alive request per input row, for :class:`LoadClient`."""
    out = []
    for x in rows:
        shape = [int(d) for d in x.shape]
        body = json.dumps(
            {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}]}
        ).encode()
        head = (
            f"POST /v2/models/{module}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


@dataclass
class LoadClient:
    """Closed-loop load: ``connections`` keep-alive HTTP connections sending requests back to back.

    A minimal asyncio HTTP/1.1 client (httpx costs more per request than the server under test, which
    on a 2-core machine would starve the daemon of the CPU it needs to serve): it cycles through the
    requests of :attr:`target`, which the caller may switch at any time (another model, other inputs).
    Counts answers by status and transport errors; the loop reconnects after an error.
    """

    port: int
    connections: int = 4
    target: list[bytes] = field(default_factory=list)
    answered: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> LoadClient:
        import asyncio

        async def conn(k: int) -> None:
            i = k * 7919
            while not self._stop.is_set():
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    self.answered["connect_error"] += 1
                    await asyncio.sleep(0.05)
                    continue
                try:
                    while not self._stop.is_set():
                        reqs = self.target
                        if not reqs:
                            await asyncio.sleep(0.05)
                            continue
                        writer.write(reqs[i % len(reqs)])
                        i += 1
                        await writer.drain()
                        status = await reader.readline()
                        length = 0
                        while True:
                            line = await reader.readline()
                            if line in (b"\r\n", b""):
                                break
                            name, _, value = line.partition(b":")
                            if name.strip().lower() == b"content-length":
                                length = int(value)
                        await reader.readexactly(length)
                        parts = status.split(b" ", 2)
                        self.answered[parts[1].decode() if len(parts) > 1 else "bad_status_line"] += 1
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    self.answered["transport_error"] += 1
                    await asyncio.sleep(0.05)
                finally:
                    writer.close()

        async def main() -> None:
            await asyncio.gather(*(conn(k) for k in range(self.connections)))

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), name="load", daemon=True)
        self._thread.start()
        return self

    def snapshot(self) -> dict[str, int]:
        return dict(self.answered)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
