"""Health probes that judge a freshly activated module version, as its manifest declares them.

- ``exec``: ``argv[0]`` must be an absolute path on the policy allowlist (checked for every probe
  *before* any probe runs); the argv list runs without a shell, in its own session (process group),
  with a minimal environment carrying the active artifact's path (``SRE_ARTIFACT_PATH``); on timeout
  the whole group gets SIGKILL. Exit 0 passes.
- ``http``: a GET (no redirects followed) to an allowed host must answer 2xx within the timeout.
- ``file``: a readiness file the application writes after the swap; it must exist and be at least as
  new as the ``current`` link (filesystem time against filesystem time, so no clock is mixed in).

Each probe waits its initial delay, then tries up to ``attempts`` times, ``interval_s`` apart. The
worst case of every probe (delay + attempts x timeout + the intervals between them, :func:`worst_case_s`)
counts against the policy's ``max_total_s``, and at most ``max_probes`` probes run: a manifest over
either cap is refused by :meth:`ProbeRunner.check_allowed` before anything is installed. Delays
go through the injected clock (a fake clock makes a month pass in a second); the per-attempt timeouts
of exec and http are real time, since they bound real processes and sockets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from deployment.manifest import ProbeSpec
from policies.deployment import ProbePolicy
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError

__all__ = [
    "ProbeContext",
    "ProbeRefusedError",
    "ProbeReport",
    "ProbeResult",
    "ProbeRunner",
    "worst_case_s",
]

Outcome = Literal["passed", "failed", "timeout", "error"]
_KILL_GRACE_S = 5.0


class ProbeRefusedError(InputError):
    """A probe is not allowed by policy; nothing was run."""


@dataclass(frozen=True)
class ProbeContext:
    """What the probes judge: the module version now active and when it became active."""

    module: str
    version: str
    artifact_path: Path
    slot_dir: Path
    swapped_ns: int = 0


@dataclass(frozen=True)
class ProbeResult:
    """The verdict of one probe after all its attempts."""

    kind: str
    target: str
    ok: bool
    outcome: Outcome
    attempts: int
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "target": self.target,
            "ok": self.ok,
            "outcome": self.outcome,
            "attempts": self.attempts,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ProbeReport:
    """All probes of one activation. ``ok`` only when every probe passed (no probes: ok)."""

    ok: bool
    results: list[ProbeResult] = field(default_factory=list)

    def failed(self) -> ProbeResult | None:
        return next((r for r in self.results if not r.ok), None)


def worst_case_s(spec: ProbeSpec) -> float:
    """The longest one probe can hold an unjudged version: delay, every attempt timing out, intervals."""
    return spec.initial_delay_s + spec.attempts * spec.timeout_s + (spec.attempts - 1) * spec.interval_s


def _target(spec: ProbeSpec) -> str:
    if spec.kind == "exec":
        return " ".join(spec.argv or [])
    if spec.kind == "http":
        return spec.url or ""
    return spec.path or ""


class ProbeRunner:
    """Runs probes under a :class:`policies.deployment.ProbePolicy`.

    Args:
        policy: allowlist, allowed http hosts, output cap, total time cap.
        clock: used for initial delays and intervals.
    """

    def __init__(self, policy: ProbePolicy, clock: Clock | None = None) -> None:
        self.policy = policy
        self.clock = clock or SystemClock()

    def check_allowed(self, specs: list[ProbeSpec]) -> None:
        """Raise :class:`ProbeRefusedError` when the probes exceed the caps of the policy (count, total
        worst-case time) or for the first probe policy does not allow. Pure: nothing runs."""
        if len(specs) > self.policy.max_probes:
            raise ProbeRefusedError(
                f"accept {len(specs)} probes",
                f"the deployment policy allows at most {self.policy.max_probes} probes per module",
                "declare fewer probes, or raise probes.max_probes in the deployment policy",
            )
        total = sum(worst_case_s(spec) for spec in specs)
        if total > self.policy.max_total_s:
            raise ProbeRefusedError(
                f"accept probes taking up to {total:g} s",
                f"delays, attempts x timeouts and intervals add up to more than probes.max_total_s "
                f"({self.policy.max_total_s:g} s): an unjudged version would serve that long",
                "shorten the probes' delays, intervals or attempts, or raise probes.max_total_s",
            )
        for spec in specs:
            if spec.kind == "exec":
                exe = (spec.argv or [""])[0]
                if not self.policy.allows(exe):
                    raise ProbeRefusedError(
                        f"run exec probe {exe}",
                        "the executable is not on the probe allowlist of the deployment policy",
                        "add its absolute path to probes.exec_allowlist, or change the manifest",
                    )
            elif spec.kind == "http":
                parts = urlsplit(spec.url or "")
                if (
                    parts.scheme not in {"http", "https"}
                    or parts.hostname not in self.policy.http_allow_hosts
                ):
                    raise ProbeRefusedError(
                        f"run http probe {spec.url}",
                        f"scheme {parts.scheme!r} or host {parts.hostname!r} is not allowed",
                        "probe a local application (probes.http_allow_hosts in the deployment policy)",
                    )

    def run_all(self, specs: list[ProbeSpec], ctx: ProbeContext) -> ProbeReport:
        """Check every probe against policy, then run them in order; stop at the first failure.

        Raises:
            ProbeRefusedError: a probe is not allowed (raised before any probe runs).
        """
        self.check_allowed(specs)
        deadline = self.clock.monotonic() + self.policy.max_total_s
        results: list[ProbeResult] = []
        for spec in specs:
            res = self.run(spec, ctx, deadline)
            results.append(res)
            if not res.ok:
                return ProbeReport(False, results)
        return ProbeReport(True, results)

    def run(self, spec: ProbeSpec, ctx: ProbeContext, deadline: float | None = None) -> ProbeResult:
        """One probe with its initial delay, attempts and interval (policy is checked first)."""
        self.check_allowed([spec])
        if spec.initial_delay_s:
            self.clock.sleep(spec.initial_delay_s)
        outcome: Outcome = "failed"
        detail = ""
        n = 0
        for n in range(1, spec.attempts + 1):
            if deadline is not None and self.clock.monotonic() > deadline:
                return ProbeResult(
                    spec.kind, _target(spec), False, "timeout", n - 1, "probe time cap reached"
                )
            if spec.kind == "exec":
                outcome, detail = self._exec(spec, ctx)
            elif spec.kind == "http":
                outcome, detail = self._http(spec)
            else:
                outcome, detail = self._file(spec, ctx)
            if outcome == "passed":
                return ProbeResult(spec.kind, _target(spec), True, outcome, n, detail)
            if n < spec.attempts and spec.interval_s:
                self.clock.sleep(spec.interval_s)
        return ProbeResult(spec.kind, _target(spec), False, outcome, n, detail)

    # ------------------------------------------------------------------ kinds
    def _exec(self, spec: ProbeSpec, ctx: ProbeContext) -> tuple[Outcome, str]:
        argv = list(spec.argv or [])
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "SRE_ARTIFACT_PATH": str(ctx.artifact_path),
            "SRE_SLOT_DIR": str(ctx.slot_dir),
            "SRE_MODULE": ctx.module,
            "SRE_VERSION": ctx.version,
        }
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd="/",
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                return "error", f"could not start {argv[0]}: {exc.strerror or exc}"
            timed_out = False
            try:
                rc = proc.wait(timeout=spec.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = -9
            # Kill the whole group: on timeout, and also any children a passing probe left behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_KILL_GRACE_S)
            out.seek(0)
            text = out.read(self.policy.max_output_bytes).decode("utf-8", "replace").strip()
        if timed_out:
            return "timeout", f"no exit within {spec.timeout_s:g} s; process group killed"
        if rc == 0:
            return "passed", text
        return "failed", f"exit status {rc}: {text}"

    def _http(self, spec: ProbeSpec) -> tuple[Outcome, str]:
        import httpx

        box: dict[str, tuple[Outcome, str]] = {}
        url = spec.url or ""

        def attempt() -> None:
            try:
                with (
                    httpx.Client(timeout=httpx.Timeout(spec.timeout_s), follow_redirects=False) as c,
                    c.stream("GET", url) as resp,
                ):
                    ok = 200 <= resp.status_code < 300
                    box["r"] = ("passed" if ok else "failed", f"HTTP {resp.status_code}")
            except httpx.TimeoutException as exc:
                box["r"] = ("timeout", f"no answer within {spec.timeout_s:g} s ({type(exc).__name__})")
            except httpx.HTTPError as exc:
                box["r"] = ("failed", f"{type(exc).__name__}: {exc}")

        # httpx bounds each read, not the whole exchange: a dribbling server is cut off here.
        t = threading.Thread(target=attempt, name="http-probe", daemon=True)
        t.start()
        t.join(spec.timeout_s + 1.0)
        if t.is_alive() or "r" not in box:
            return "timeout", f"no complete answer within {spec.timeout_s:g} s"
        return box["r"]

    def _file(self, spec: ProbeSpec, ctx: ProbeContext) -> tuple[Outcome, str]:
        p = Path(spec.path or "")
        if not p.is_absolute():
            p = ctx.slot_dir.parent / p
        try:
            st = p.stat()
        except FileNotFoundError:
            return "failed", f"readiness file {p} does not exist"
        except OSError as exc:
            return "error", f"cannot stat {p}: {exc.strerror}"
        if st.st_mtime_ns < ctx.swapped_ns:
            return "failed", f"readiness file {p} is older than the swap (stale)"
        return "passed", f"{p} is ready"
