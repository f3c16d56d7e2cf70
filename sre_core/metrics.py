"""Serving a Prometheus/OpenMetrics ``/metrics`` endpoint from a collector function (prometheus-client).

The device and the hub each describe their state as metric families at scrape time (no counters kept in
globals, nothing to keep in sync); this module turns such a function into a Starlette route.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["CONTENT_TYPE_LATEST", "labels_of", "metrics_route", "render"]

_log = logging.getLogger(__name__)

Collect = Callable[[], Iterable[Metric]]


class _FunctionCollector:
    def __init__(self, collect: Collect) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())


def render(collect: Collect) -> bytes:
    """The OpenMetrics text of what ``collect`` yields (a fresh registry per scrape)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FunctionCollector(collect))  # type: ignore[arg-type]
    return bytes(generate_latest(registry))  # type: ignore[no-untyped-call]


def metrics_route(collect: Collect, path: str = "/metrics") -> Route:
    """A ``GET /metrics`` route answering OpenMetrics text; a failing collector answers 500, logged."""

    async def endpoint(_request: Request) -> Response:
        try:
            body = await run_in_threadpool(render, collect)
        except Exception as exc:  # a scrape must never take the server down
            _log.exception("metrics collection failed")
            return Response(f"# metrics collection failed: {type(exc).__name__}\n", status_code=500)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Route(path, endpoint, methods=["GET"])


def labels_of(series: dict[str, Any]) -> dict[str, str]:
    """Label values as strings (None as empty)."""
    return {k: "" if v is None else str(v) for k, v in series.items()}
