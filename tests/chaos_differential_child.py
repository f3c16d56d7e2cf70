"""Isolated executor for the differential test: runs experiments with real chaoslib and observes them.

``python tests/chaos_differential_child.py WORKDIR`` reads ``WORKDIR/experiments.jsonl`` (one
``{"id", "doc"}`` per line) and appends one observation per experiment to ``WORKDIR/observed.jsonl``,
flushed before the next one starts (if an experiment kills this process, the parent knows which).

What is observed, independently of pre-flight:
- the fault registry and proxy state of a real embedded fault proxy (Toxiproxy API) with a ``uplink``
  proxy (the management link) and a ``decoy`` proxy: at every ``time.sleep`` (chaoslib's pauses and
  our actions' holds), time is *virtual* (the sleep returns at once and advances a counter), and the
  seconds during which traffic on ``uplink`` is stopped are summed;
- the process table (busy workers spawned, in worker-seconds of their own argv; killed when seen);
- the clock-skew fault file (offset and how long it was in place);
- markers that foreign code ran (a program, a control module, an executed setting);
- whether this process (the "agent": ``run/serving.pid`` names it) survived.

The document is prepared exactly as the guarded runner prepares it (:func:`chaos.runner.run_document`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REAL_SLEEP = time.sleep
_CLOCK = [0.0]
_OBS: dict[str, Any] = {}
_CTX: dict[str, Any] = {}


def _stops(toxic: dict[str, Any]) -> bool:
    """Whether a toxic, as the proxy holds it, stops traffic (the policy envelope's definition)."""
    if float(toxic.get("toxicity", 1.0)) <= 0:
        return False
    t = toxic.get("type")
    a = toxic.get("attributes") or {}
    if t in ("timeout", "reset_peer", "limit_data"):
        return True
    if t == "latency":
        return float(a.get("latency", 0)) + abs(float(a.get("jitter", 0))) >= 5000
    if t == "bandwidth":
        return float(a.get("rate", 0)) <= 1
    if t == "slicer":
        return float(a.get("delay", 0)) >= 5_000_000
    return t != "slow_close"


def _uplink_cut() -> bool:
    client = _CTX["client"]
    try:
        proxy = client.get_proxy("uplink")
    except Exception:
        return True  # deleted: no management link
    if not proxy.get("enabled", True):
        return True
    return any(_stops(t) for t in client.toxics("uplink"))


def _observe(dt: float) -> None:
    import psutil

    if _uplink_cut():
        _OBS["cut_s"] += dt
    skew = Path(_CTX["state"]) / "run" / "chaos" / "clock_skew.json"
    if skew.exists():
        try:
            off = abs(float(json.loads(skew.read_text())["offset_s"]))
        except (OSError, ValueError, KeyError):
            off = float("inf")
        _OBS["clock_max_offset_s"] = max(_OBS["clock_max_offset_s"], off)
        _OBS["clock_s"] += dt
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "-c" in cmd and any("monotonic" in c for c in cmd) and child.pid not in _OBS["_workers"]:
            _OBS["_workers"].add(child.pid)
            try:
                _OBS["cpu_worker_s"] += float(cmd[-1])
            except ValueError:
                _OBS["cpu_worker_s"] = float("inf")
            child.kill()


def _vsleep(seconds: float) -> None:
    d = max(0.0, float(seconds))
    _observe(d)
    _CLOCK[0] += d


def _observer_class() -> Any:
    from chaoslib.run import RunEventHandler

    class Observer(RunEventHandler):  # type: ignore[misc]
        """Observe after every activity (faults that a later rollback removes are seen too)."""

        def activity_completed(self, activity: Any, run: Any) -> None:
            _observe(0.0)

    return Observer


def _fresh_obs() -> dict[str, Any]:
    return {
        "cut_s": 0.0,
        "cut_at_end": False,
        "cpu_worker_s": 0.0,
        "clock_max_offset_s": 0.0,
        "clock_s": 0.0,
        "foreign_code": [],
        "status": None,
        "error": None,
        "_workers": set(),
    }


def main(workdir: Path) -> int:
    import chaoslib.experiment as chexp
    from chaoslib.control import cleanup_global_controls

    from chaos.faultproxy import FaultProxyServer

    try:
        from chaos.runner import run_document
    except ImportError:  # a runner before run_document: what it did inline (to show the old gaps)

        def run_document(doc: Any, state: Any, url: str) -> Any:  # type: ignore[misc]
            return {**doc, "configuration": {**(doc.get("configuration") or {}), "state_dir": str(state),
                                             "toxiproxy_url": url}}  # fmt: skip

    from chaos.toxiproxy_client import ToxiproxyClient

    _CTX["observer"] = _observer_class()
    logging.disable(logging.CRITICAL)
    time.sleep = _vsleep  # chaoslib's pauses and our actions' holds: virtual time
    sys.path.insert(0, str(workdir))  # the sneaky control module lives there
    server = FaultProxyServer()
    url = server.start()
    client = ToxiproxyClient(url, timeout_s=5)
    _CTX["client"] = client
    out = (workdir / "observed.jsonl").open("a", encoding="utf-8")
    done = set()
    if (workdir / "observed.jsonl").exists():
        done = {json.loads(x)["id"] for x in (workdir / "observed.jsonl").read_text().splitlines() if x}
    for line in (workdir / "experiments.jsonl").read_text().splitlines():
        item = json.loads(line)
        if item["id"] in done:
            continue
        # a record that says "started": if this process dies, the parent learns which experiment did it
        (workdir / "current").write_text(str(item["id"]))
        state = workdir / "states" / str(item["id"])
        (state / "run").mkdir(parents=True)
        (state / "run" / "serving.pid").write_text(str(os.getpid()))  # as under the daemon: the agent
        _CTX["state"] = str(state)
        for p in ("uplink", "decoy"):
            client.delete_proxy(p, missing_ok=True)
            client.create_proxy(p, "127.0.0.1:9")
        marker_dir = workdir / "markers" / str(item["id"])
        marker_dir.mkdir(parents=True)
        os.environ["DIFF_MARKER_DIR"] = str(marker_dir)
        os.environ["SRE_CHAOS_AGENT_PID"] = str(os.getpid())
        _OBS.clear()
        _OBS.update(_fresh_obs())
        doc = run_document(item["doc"], state, url)
        try:
            chexp.ensure_experiment_is_valid(doc)
            journal = chexp.run_experiment(
                doc,
                settings={"runtime": {"rollbacks": {"strategy": "always"}}},
                event_handlers=[_CTX["observer"]()],
            )
            _OBS["status"] = journal.get("status")
        except BaseException as exc:
            _OBS["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            cleanup_global_controls()
        _OBS["cut_at_end"] = _uplink_cut()
        _observe(0.0)
        _OBS["foreign_code"] = sorted(p.name for p in marker_dir.iterdir())
        # the guarded runner's independent cleanup, so the next experiment starts clean
        from chaos.watchdog import cleanup

        cleanup(state, url)
        obs = {k: v for k, v in _OBS.items() if not k.startswith("_")}
        out.write(json.dumps({"id": item["id"], **obs}) + "\n")
        out.flush()
    out.close()
    client.close()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
