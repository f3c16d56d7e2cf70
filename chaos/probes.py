"""Our Chaos Toolkit probes (``provider: {type: python, module: chaos.probes, func: ...}``).

Configuration keys are those of :mod:`chaos.actions` (``state_dir``, ``serving_url``, ``toxiproxy_url``,
``uplink_proxy``). Inference probes send real Open Inference Protocol (v2) requests; when no payload
is given they build a zero tensor from the model's metadata (``-1`` dimensions become 1).

The uplink backlog is read from ``<state>/run/uplink_status.json`` (``{"backlog_rows": n}``, which
the uplink should publish while the daemon holds the database) and otherwise from the ``outbox`` table
of ``<state>/telemetry.duckdb`` opened read-only.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import httpx

from chaos.actions import ChaosActionError, Configuration, _setting, _state, _toxiproxy_url
from chaos.faults import FaultRegistry
from chaos.toxiproxy_client import ToxiproxyClient

__all__ = [
    "active_faults",
    "inference_error_rate",
    "inference_p95_ms",
    "serving_ready",
    "slo_status",
    "slot_status",
    "uplink_backlog",
    "uplink_toxics",
]

MAX_SAMPLES = 1000


def _serving_url(configuration: Configuration) -> str:
    url = _setting(configuration, "serving_url")
    if not url:
        raise ChaosActionError("no serving URL: set configuration.serving_url or $SRE_CHAOS_SERVING_URL")
    return url.rstrip("/")


def _default_payload(client: httpx.Client, model: str) -> dict[str, Any]:
    meta = client.get(f"/v2/models/{model}").raise_for_status().json()
    inputs = []
    for spec in meta.get("inputs", []):
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.get("shape", [1])]
        n = math.prod(shape)
        dtype = str(spec.get("datatype", "FP32"))
        zero: float | int | bool = False if dtype == "BOOL" else (0.0 if dtype.startswith("FP") else 0)
        inputs.append({"name": spec["name"], "shape": shape, "datatype": dtype, "data": [zero] * n})
    return {"inputs": inputs}


def _sample(
    configuration: Configuration,
    model: str,
    samples: int,
    payload: dict[str, Any] | None,
    timeout_s: float,
) -> tuple[list[float], int]:
    """Send ``samples`` inference requests; returns (latencies in ms of successes, error count)."""
    n = max(1, min(int(samples), MAX_SAMPLES))
    lat: list[float] = []
    errors = 0
    with httpx.Client(base_url=_serving_url(configuration), timeout=timeout_s) as client:
        body = payload if payload is not None else _default_payload(client, model)
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                ok = client.post(f"/v2/models/{model}/infer", json=body).is_success
            except httpx.HTTPError:
                ok = False
            if ok:
                lat.append((time.perf_counter() - t0) * 1000.0)
            else:
                errors += 1
    return lat, errors


def _p95(values: list[float]) -> float:
    if not values:
        return math.inf
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]


def inference_p95_ms(
    model: str,
    samples: int = 20,
    payload: dict[str, Any] | None = None,
    timeout_s: float = 2.0,
    configuration: Configuration = None,
) -> float:
    """p95 latency in ms of ``samples`` inference requests (``inf`` when none succeeded)."""
    lat, _ = _sample(configuration, model, samples, payload, timeout_s)
    return _p95(lat)


def inference_error_rate(
    model: str,
    samples: int = 20,
    payload: dict[str, Any] | None = None,
    timeout_s: float = 2.0,
    configuration: Configuration = None,
) -> float:
    """Share (0..1) of ``samples`` inference requests that failed or timed out."""
    lat, errors = _sample(configuration, model, samples, payload, timeout_s)
    return errors / max(1, len(lat) + errors)


def serving_ready(timeout_s: float = 2.0, configuration: Configuration = None) -> bool:
    """Whether ``/v2/health/ready`` answers 2xx."""
    try:
        return httpx.get(_serving_url(configuration) + "/v2/health/ready", timeout=timeout_s).is_success
    except httpx.HTTPError:
        return False


def slo_status(
    model: str,
    max_p95_ms: float,
    max_error_rate: float,
    samples: int = 20,
    payload: dict[str, Any] | None = None,
    timeout_s: float = 2.0,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Inference SLOs now: ``{"ok", "p95_ms", "error_rate", "breaches"}``."""
    lat, errors = _sample(configuration, model, samples, payload, timeout_s)
    p95 = _p95(lat)
    rate = errors / max(1, len(lat) + errors)
    breaches = []
    if p95 > max_p95_ms:
        breaches.append(f"p95 {p95:.1f} ms > {max_p95_ms} ms")
    if rate > max_error_rate:
        breaches.append(f"error rate {rate:.3f} > {max_error_rate}")
    return {"ok": not breaches, "p95_ms": p95, "error_rate": rate, "breaches": breaches}


def slot_status(module: str, configuration: Configuration = None) -> dict[str, Any]:
    """The slot bookkeeping of ``module`` (``modules/<module>/state.json``) plus ``active_slot``."""
    path = _state(configuration) / "modules" / module / "state.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ChaosActionError(f"cannot read slot state {path}: {exc}") from exc
    active = d.get("active")
    if isinstance(active, dict):
        active = active.get("slot")
    return {**d, "active_slot": active}


def uplink_backlog(configuration: Configuration = None) -> int:
    """Rows sealed into the outbox and not yet acknowledged by the hub.

    Raises:
        ChaosActionError: the backlog cannot be known (the daemon holds the telemetry database and
            publishes no status file): a guardrail treats that as a breach.
    """
    state = _state(configuration)
    status = state / "run" / "uplink_status.json"
    if status.exists():
        d = json.loads(status.read_text(encoding="utf-8"))
        for key in ("backlog_rows", "backlog_batches", "backlog"):
            if key in d:
                return int(d[key])
    db = state / "telemetry.duckdb"
    if not db.exists():
        return 0  # nothing recorded, nothing waiting
    import duckdb

    try:
        con = duckdb.connect(str(db), read_only=True)
    except Exception as exc:
        raise ChaosActionError(
            f"uplink backlog unknown: {db} is held by another process and {status} is absent ({exc})"
        ) from exc
    try:
        row = con.execute("SELECT coalesce(sum(rows), 0) FROM outbox WHERE kind = 'batch'").fetchone()
    except Exception:
        return 0  # a database without an outbox has nothing waiting
    finally:
        con.close()
    return int(row[0]) if row else 0


def active_faults(configuration: Configuration = None) -> list[dict[str, Any]]:
    """The faults recorded in ``<state>/run/faults.json``."""
    return [f.to_dict() for f in FaultRegistry(Path(_state(configuration))).list()]


def uplink_toxics(proxy: str | None = None, configuration: Configuration = None) -> list[dict[str, Any]]:
    """The toxics on the uplink proxy now."""
    pname = proxy or _setting(configuration, "uplink_proxy", "uplink") or "uplink"
    with ToxiproxyClient(_toxiproxy_url(configuration)) as client:
        return client.toxics(pname)
