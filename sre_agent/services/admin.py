"""The admin API as a daemon service, and the routes the assembled daemon serves on it."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from sre_agent.admin import AdminServer
from sre_agent.config import AgentSettings
from sre_core.paths import StatePaths

if TYPE_CHECKING:
    from sre_agent.daemon import Daemon
    from sre_agent.services.chaos import ChaosSchedule, FaultProxyService
    from sre_agent.services.responder import ResponderService
    from sre_agent.services.serving import ServingPlane
    from sre_agent.telemetry.service import TelemetryService
    from sre_agent.workload import WorkGate

__all__ = ["MAX_QUERY_ROWS", "AdminService", "admin_routes", "plain", "read_only_sql", "table_rows"]

MAX_QUERY_ROWS = 10_000


def table_rows(tbl: Any) -> list[tuple[Any, ...]]:
    """The rows of a pyarrow table as tuples."""
    cols = [c.to_pylist() for c in tbl.columns]
    return list(zip(*cols, strict=True)) if cols else []


def read_only_sql(sql: str) -> str:
    """``sql`` when it is exactly one SELECT statement; raises ValueError otherwise."""
    import duckdb

    try:
        stmts = duckdb.connect(":memory:").extract_statements(sql)
    except duckdb.Error as exc:
        raise ValueError(str(exc).splitlines()[0]) from exc
    if len(stmts) != 1 or stmts[0].type != duckdb.StatementType.SELECT:
        raise ValueError("only one read-only SELECT statement is allowed")
    return sql


def plain(v: Any) -> Any:
    """A JSON-safe value (NaN and infinities become null: JSON has no such numbers)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, str | int | float | bool):
        return v
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return str(v)


class AdminService:
    """The admin API as a daemon service (routes are given once the other services exist)."""

    name = "admin-api"

    def __init__(self, paths: StatePaths, routes: list[BaseRoute] | None = None) -> None:
        self.paths = paths
        self.routes: list[BaseRoute] = list(routes or [])
        self._server: AdminServer | None = None

    def start(self) -> None:
        self._server = AdminServer(self.paths, routes=self.routes).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def admin_routes(
    daemon: Daemon,
    tel: TelemetryService,
    responder: ResponderService,
    schedule: ChaosSchedule,
    proxy: FaultProxyService | None,
    plane: ServingPlane | None,
    settings: AgentSettings,
    work: WorkGate | None = None,
) -> list[BaseRoute]:
    """The daemon's routes: ``/status``, ``/telemetry/query``, ``/telemetry/status``, ``/escalations``,
    ``/metrics`` (OpenMetrics, also mounted on the serving port)."""
    from starlette.concurrency import run_in_threadpool

    def status_doc() -> dict[str, Any]:
        p = plane
        doc = daemon.status()
        doc["serving"] = (
            {"url": p.url, "models": p.repository.names(), "loading": p.serving.loading()}
            if p is not None
            else None
        )
        doc["responder"] = responder.status()
        doc["chaos"] = {
            "enabled": settings.chaos.enabled,
            "paused_until": schedule.paused_until.isoformat() if schedule.paused_until else None,
            "last": schedule.last,
            "fault_proxy": proxy.api_url if proxy is not None else settings.chaos.toxiproxy_url,
            "uplink_toxics": proxy.toxics() if proxy is not None else None,
        }
        doc["llm"] = {"enabled": settings.llm.enabled}
        doc["work"] = work.status() if work is not None else None
        return doc

    async def status(_r: Request) -> JSONResponse:
        return JSONResponse(plain(await run_in_threadpool(status_doc)))

    def query_doc(sql: str) -> dict[str, Any]:
        if tel.store is None:
            raise ValueError("telemetry is not open")
        tbl = tel.store.query(read_only_sql(sql))
        rows = [dict(zip(tbl.column_names, r, strict=True)) for r in table_rows(tbl)[:MAX_QUERY_ROWS]]
        return {"columns": tbl.column_names, "rows": plain(rows), "truncated": tbl.num_rows > MAX_QUERY_ROWS}

    async def query(r: Request) -> JSONResponse:
        import duckdb

        try:
            body = json.loads(await r.body())
            sql = str(body["sql"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'send {"sql": "SELECT ..."}'}, status_code=400)
        try:
            return JSONResponse(await run_in_threadpool(query_doc, sql))
        except (ValueError, duckdb.Error) as exc:
            return JSONResponse({"error": str(exc).splitlines()[0][:500]}, status_code=400)

    def tel_status_doc() -> dict[str, Any]:
        store = tel.store
        if store is None:
            raise ValueError("telemetry is not open")
        return store.status(int(daemon.clock.now().timestamp() * 1_000_000))

    async def tel_status(_r: Request) -> JSONResponse:
        try:
            return JSONResponse(plain(await run_in_threadpool(tel_status_doc)))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)

    def escalation_rows() -> list[dict[str, Any]]:
        r = responder.responder
        return [e.row() for e in r.escalations.select()] if r is not None else []

    async def escalations(_r: Request) -> JSONResponse:
        return JSONResponse(plain(await run_in_threadpool(escalation_rows)))

    async def chaos_run(r: Request) -> JSONResponse:
        """``sre-agent chaos run`` with a daemon: pre-flight and run here (the daemon's links, serving,
        telemetry). Body: ``{"source", "content_b64", "approval"?, "budget_s"?}``."""
        import base64

        from chaos.runner import ChaosBusyError
        from sre_core.errors import InputError

        try:
            body = json.loads(await r.body())
            content = base64.b64decode(str(body["content_b64"]), validate=True)
            source = str(body.get("source", "experiment"))
            args = (content, source, body.get("approval"), body.get("budget_s"))
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'send {"source", "content_b64", "approval"?, "budget_s"?}'}, 400)
        try:
            return JSONResponse(plain(await run_in_threadpool(schedule.run_request, *args)))
        except ChaosBusyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        except (InputError, ValueError) as exc:
            return JSONResponse({"error": str(exc)[:1000]}, status_code=400)

    from sre_agent.metrics import DeviceMetricSources, device_metrics
    from sre_core.metrics import metrics_route

    def routers() -> dict[str, Any]:
        p = plane
        if p is None:
            return {}
        return {n: r for n in p.repository.names() if (r := p.repository.get(n)) is not None}

    def query_rows(sql: str) -> list[tuple[Any, ...]]:
        if tel.store is None:
            return []
        return table_rows(tel.store.query(sql))

    sources = DeviceMetricSources(
        daemon.paths,
        jobs=lambda: daemon.status()["jobs"],
        routers=routers,
        telemetry_status=tel_status_doc,
        query=query_rows,
    )
    metrics = metrics_route(lambda: device_metrics(sources))
    if plane is not None:  # Prometheus scrapes the serving port (the admin API is a unix socket)
        web: Any = getattr(plane.app, "other", plane.app)  # the starlette app behind the infer fast path
        web.router.routes.insert(0, metrics)
    return [
        metrics,
        Route("/chaos/run", chaos_run, methods=["POST"]),
        Route("/status", status),
        Route("/telemetry/query", query, methods=["POST"]),
        Route("/telemetry/status", tel_status),
        Route("/escalations", escalations),
    ]
