"""Chaos in the daemon: the fault proxy, the guard (recover on start, clear on stop) and the schedule."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sre_agent.config import AgentSettings
from sre_agent.incidents import FactValue, IncidentKind, IncidentSignal
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.paths import StatePaths
from sre_core.telemetry import TelemetrySink

__all__ = ["CHAOS_PAUSE_S", "ChaosGuard", "ChaosSchedule", "FaultProxyService"]

CHAOS_PAUSE_S = 3600.0


class FaultProxyService:
    """The embedded Toxiproxy-API fault proxy with an ``uplink`` proxy in front of the hub.

    The daemon's management traffic (pull and uplink) to a plain-HTTP hub goes through it, so uplink
    experiments act on the real link; chaos runs get its API URL.
    """

    name = "fault-proxy"

    def __init__(self, hub_url: str) -> None:
        self.hub_url = hub_url
        self.api_url: str | None = None
        self.link_url: str | None = None
        self._server: Any = None

    def start(self) -> None:
        from chaos.faultproxy import FaultProxyServer
        from chaos.toxiproxy_client import ToxiproxyClient

        parts = urlsplit(self.hub_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self._server = FaultProxyServer()
        self.api_url = self._server.start()
        with ToxiproxyClient(self.api_url, timeout_s=5.0) as client:
            proxy = client.ensure_proxy("uplink", f"{parts.hostname}:{port}")
        self.link_url = urlunsplit((parts.scheme, str(proxy["listen"]), parts.path, "", ""))

    def toxics(self) -> list[dict[str, Any]]:
        from chaos.toxiproxy_client import ToxiproxyClient

        if self.api_url is None:
            return []
        with ToxiproxyClient(self.api_url, timeout_s=5.0) as client:
            return client.toxics("uplink")

    def stop(self) -> None:
        if self._server is not None:
            from chaos.toxiproxy_client import ToxiproxyClient

            try:
                with ToxiproxyClient(str(self.api_url), timeout_s=5.0) as client:
                    client.reset()
            finally:
                self._server.stop()
                self._server = None


class ChaosGuard:
    """On start: recover a stale chaos lease (undo its faults, audit watchdog reports). On stop: undo
    every fault still in the registry, whatever left it there."""

    name = "chaos-guard"

    def __init__(self, paths: StatePaths, audit: AuditLog, toxiproxy_url: Callable[[], str | None]) -> None:
        self.paths = paths
        self.audit = audit
        self._toxiproxy_url = toxiproxy_url
        self.recovered: list[dict[str, Any]] = []

    def start(self) -> None:
        from chaos.runner import recover

        self.recovered = recover(self.paths, self.audit)

    def clear(self, why: str) -> dict[str, Any]:
        from chaos.watchdog import cleanup

        report = cleanup(self.paths.root, self._toxiproxy_url(), audit=self.audit)
        out = report.to_dict()
        if report.cleared or report.failed:
            self.audit.append("chaos.faults_cleared", why=why, report=out)
        return out

    def stop(self) -> None:
        self.clear("daemon stopping")


class ChaosSchedule:
    """The scheduled chaos job: each experiment file, pre-flight first, inside the policy's windows.

    A ``run`` verdict runs guarded; an ``escalate``/``reject`` verdict stores an escalation packet and is
    never run (the same content is not escalated again while the daemon runs). A deviated or aborted
    run raises a ``chaos_deviation`` incident. ``pause`` (a triage action) stops the running experiment
    and skips ticks until it lapses.
    """

    def __init__(
        self,
        paths: StatePaths,
        settings: AgentSettings,
        clock: Clock,
        audit: AuditLog,
        sink: TelemetrySink,
        serving_url: Callable[[], str | None],
        model: Callable[[], str | None],
        toxiproxy_url: Callable[[], str | None],
        report: Callable[[IncidentSignal], None] | None = None,
        recheck: Callable[[str], bool | None] | None = None,
        resolve: Callable[[str, str], None] | None = None,
    ) -> None:
        self.paths = paths
        self.settings = settings
        self._report = report
        self._recheck = recheck
        self._resolve = resolve
        self.clock = clock
        self.audit = audit
        self.sink = sink
        self._serving_url = serving_url
        self._model = model
        self._toxiproxy_url = toxiproxy_url
        self.stop_event = threading.Event()
        self.shutting_down = False
        self.paused_until: datetime | None = None
        self._escalated: set[str] = set()
        self._persisting: dict[str, tuple[str, list[str], dict[str, Any]]] = {}
        """experiment -> (verdict, checks to re-run, evidence) while its damage outlasts the cleanup."""
        self.last: list[dict[str, Any]] = []

    def policy(self) -> Any:
        from policies.base import load_document
        from policies.chaos import ChaosPolicy, default_chaos_policy

        installed = self.paths.policies / "chaos.yaml"
        return load_document(ChaosPolicy, installed) if installed.exists() else default_chaos_policy()

    def files(self) -> list[Path]:
        d = self.settings.chaos.experiments_dir
        if d is None or not Path(d).is_dir():
            return []
        return sorted(p for p in Path(d).iterdir() if p.suffix in (".json", ".yaml", ".yml") and p.is_file())

    def pause(self, seconds: float, why: str) -> str:
        self.paused_until = self.clock.now() + timedelta(seconds=seconds)
        self.stop_event.set()
        self.audit.append("chaos.paused", until=self.paused_until.isoformat(), why=why[:300])
        return f"chaos paused until {self.paused_until.isoformat()}"

    def shutdown(self) -> None:
        """The daemon is stopping: interrupt a running experiment (its cleanup still runs), start none."""
        self.shutting_down = True
        self.stop_event.set()

    def tick(self) -> list[dict[str, Any]]:
        from chaos.pipeline import guarded_run

        now = self.clock.now()
        if self.shutting_down or (self.paused_until is not None and now < self.paused_until):
            return []
        self.paused_until = None
        self.stop_event.clear()
        policy = self.policy()
        if not policy.in_window(now):
            self.sink.metric("chaos.outside_window", 1.0)
            return []
        done: list[dict[str, Any]] = []
        for f in self.files():
            if self.stop_event.is_set():
                break
            try:  # every file is judged, even after a hostile one (the loader bounds what it reads)
                with f.open("rb") as fh:
                    key = hashlib.sha256(fh.read(1 << 21)).hexdigest()
                if key in self._escalated:
                    continue
                out = guarded_run(
                    f,
                    self.paths,
                    policy=policy,
                    clock=self.clock,
                    serving_url=self._serving_url(),
                    model=self._model(),
                    toxiproxy_url=self._toxiproxy_url(),
                    telemetry=self.sink,
                    audit=self.audit,
                    stop=self.stop_event,
                )
            except Exception as exc:  # one file must not stop the others
                why = f"{type(exc).__name__}: {exc}"[:300]
                self.audit.append("chaos.file_failed", file=f.name, error=why)
                done.append({"file": f.name, "verdict": "error", "error": str(exc)[:300]})
                continue
            row: dict[str, Any] = {"file": f.name, "verdict": out.preflight.verdict}
            if out.run is None:
                self._escalated.add(key)
                row["packet"] = str(out.packet_path)
            else:
                verdict = str(out.run.verdict.value)
                row["run"] = verdict
                row["persisted_after_cleanup"] = self.judge_aftermath(f.name, verdict, out.run)
            done.append(row)
        self.last = done
        return done

    def run_request(
        self, content: bytes, source: str, approval: dict[str, Any] | None, budget_s: float | None
    ) -> dict[str, Any]:
        """``sre-agent chaos run`` through the admin API: the same pre-flight and guarded run as the
        schedule, on the daemon's links, serving and telemetry (journaled in ``chaos_journals``)."""
        from chaos.loader import MAX_BYTES
        from chaos.pipeline import guarded_run
        from policies.approvals import load_approval
        from sre_core.atomic import atomic_write_bytes

        if len(content) > MAX_BYTES:
            raise ValueError(f"the experiment is {len(content)} bytes; at most {MAX_BYTES} are accepted")
        suffix = Path(source).suffix if Path(source).suffix in (".json", ".yaml", ".yml") else ".yaml"
        incoming = self.paths.run / "chaos" / "incoming" / (hashlib.sha256(content).hexdigest()[:16] + suffix)
        atomic_write_bytes(incoming, content, mode=0o600)
        out = guarded_run(
            incoming,
            self.paths,
            policy=self.policy(),
            clock=self.clock,
            approval=load_approval(json.dumps(approval)) if approval is not None else None,
            budget_s=budget_s,
            serving_url=self._serving_url(),
            model=self._model(),
            toxiproxy_url=self._toxiproxy_url(),
            telemetry=self.sink,
            audit=self.audit,
            actor="cli",
            stop=self.stop_event,
        )
        return {**out.to_dict(), "source": source, "via": "daemon"}

    def judge_aftermath(self, name: str, verdict: str, run: Any) -> bool | None:
        """After every run, whatever its verdict (a run can pass its hypothesis and still leave damage
        behind): a deviated or aborted run raises an incident; any run whose damage outlasted the cleanup
        raises one with ``persisted_after_cleanup``; a clean pass resolves the experiment's incident.
        Returns whether damage persisted (None: nothing could tell)."""
        after = self._after_cleanup(run)
        persisted = after[0].get("persisted_after_cleanup")
        if verdict in ("deviated", "aborted") or persisted is True:
            self._raise(name, verdict, run, after)
        elif verdict == "passed" and self._resolve is not None:
            self._resolve(f"chaos:{name}", f"chaos experiment {name} passes again")
        return persisted if isinstance(persisted, bool) else None

    def remeasure(self) -> dict[str, bool]:
        """Re-run the checks of every experiment whose damage outlasted its cleanup (the daemon's
        ``chaos-aftermath`` job, paused or not): all pass -> its
        incident is resolved; otherwise it is reported again (the same incident: after a remedy ran,
        the responder escalates it as a failed remedy). Returns experiment -> still persists."""
        out: dict[str, bool] = {}
        for name, (verdict, checks, evidence) in list(self._persisting.items()):
            rechecked = [self._recheck(c) for c in checks] if self._recheck is not None else []
            if rechecked and all(r is True for r in rechecked):
                del self._persisting[name]
                if self._resolve is not None:
                    self._resolve(f"chaos:{name}", f"the damage chaos experiment {name} left has cleared")
                self.audit.append("chaos.damage_cleared", experiment=name, checks=checks)
                out[name] = False
                continue
            facts: dict[str, FactValue] = {
                "verdict": verdict,
                "experiment": name,
                "cleanup_ok": bool(evidence.get("cleanup", {}).get("ok")),
                "persisted_after_cleanup": True,
            }
            self._signal(
                name, verdict, facts, {**evidence, "rechecked": dict(zip(checks, rechecked, strict=False))}
            )
            out[name] = True
        return out

    def _after_cleanup(self, run: Any) -> tuple[dict[str, FactValue], dict[str, bool | None]]:
        """Did the damage outlast the cleanup? The faults that could not be cleared say so at once;
        otherwise the checks that guard what the run touched (its learned gates, and the check mapped
        to each action it ran) run again now, after its rollbacks and our cleanup ran
        (``persisted_after_cleanup`` when one still fails, ``recovered`` when all pass)."""
        from chaos.runner import CHECK_FOR_ACTION

        cleanup_ok = bool(run.cleanup.ok)
        touched = {CHECK_FOR_ACTION[a] for a in _actions_run(run.journal) if a in CHECK_FOR_ACTION}
        checks = sorted({str(g.get("check")) for g in run.gates if g.get("check")} | touched)
        rerun = self._recheck is not None and cleanup_ok  # (None: not re-run, the cleanup failed)
        rechecked = {c: self._recheck(c) if self._recheck is not None and rerun else None for c in checks}
        facts: dict[str, FactValue] = {"cleanup_ok": cleanup_ok}
        if not cleanup_ok or any(r is False for r in rechecked.values()):
            facts["persisted_after_cleanup"] = True
        elif rechecked and all(r is True for r in rechecked.values()):
            facts["persisted_after_cleanup"] = False
            facts["recovered"] = True
        return facts, rechecked

    def _raise(
        self,
        name: str,
        verdict: str,
        run: Any,
        after: tuple[dict[str, FactValue], dict[str, bool | None]] | None = None,
    ) -> None:
        """Raise the run's ``chaos_deviation`` incident with what :meth:`_after_cleanup` measured."""
        measured, rechecked = after if after is not None else self._after_cleanup(run)
        facts: dict[str, FactValue] = {"verdict": verdict, "experiment": name, **measured}
        evidence = {
            "run_id": run.run_id,
            "reasons": list(run.reasons)[:20],
            "cleanup": run.cleanup.to_dict(),
            "rechecked": rechecked,
        }
        if facts.get("persisted_after_cleanup") is True:
            self._persisting[name] = (verdict, sorted(rechecked), evidence)
        else:
            self._persisting.pop(name, None)
        self._signal(name, verdict, facts, evidence)

    def _signal(self, name: str, verdict: str, facts: dict[str, FactValue], evidence: dict[str, Any]) -> None:
        reasons = "; ".join(str(r) for r in evidence.get("reasons") or [])
        if facts.get("persisted_after_cleanup") is True:
            reasons = f"damage persists after cleanup (cleanup {evidence.get('cleanup')}); {reasons}"
        sig = IncidentSignal(
            kind=IncidentKind.CHAOS_DEVIATION,
            message=f"chaos experiment {name} {verdict}: {reasons[:300]}",
            module=self._model() or "device",
            severity="warning",
            source="chaos",
            facts=facts,
            evidence=evidence,
            resolve_key=f"chaos:{name}",
        )
        if self._report is not None:
            self._report(sig)


def _actions_run(journal: Any) -> list[str]:
    """The python functions of the actions a chaos journal says ran (empty when there is no journal)."""
    if not isinstance(journal, dict):
        return []
    out = []
    for entry in journal.get("run") or []:
        act = entry.get("activity") if isinstance(entry, dict) else None
        if isinstance(act, dict) and act.get("type") == "action":
            func = (act.get("provider") or {}).get("func")
            if isinstance(func, str):
                out.append(func)
    return out
