"""Crash consistency: `kill -9` a real pull + reconcile process at random moments, restart, check the device.

The harness runs a real hub (a TUF repository served over HTTP on loopback) and, before each trial,
signs a new desired state naming random versions (good ones, and ones whose probe fails so rollbacks
run too), and evicts random blobs from the device's content store so downloads keep happening. A
zygote process imports the agent once and forks one child per trial (a fork is a real, separate
process; it makes 1,000 trials affordable on two cores). Each child is the *restart* of the one killed
before it: it runs recovery, reports "ready" and stops itself; the harness then checks the disk,
independently of the agent's own code:

- every module is idle, ``current`` names the slot ``state.json`` calls active;
- the active slot's files re-hash to the digests of a published, *good* version (never the probe-failing
  ones), with no extra files, no staging directory, no stray link;
- every blob in the content store hashes to its name (nothing unverified or half-written is reachable);
- the held desired state is one the hub signed, naming only published digests; the trusted-time mark
  parses and is never beyond the wall clock;
- ``audit verify`` passes.

Then the child continues (SIGCONT) with the real pipeline: a TUF pull from the hub (metadata refresh
and writes, the trusted-time mark, resumable downloads into the store, the held record) and a
reconcile (install, flip, probe, commit or roll back), and is killed with SIGKILL after a random delay.
Every pass after a restart must also pull cleanly: a pull refused after a crash counts as a violation.
The phase stored at the moment of each kill is counted, with the pull step the child was in, to show
kills land during downloads, metadata and clock writes, installs, flips, probes and rollbacks.

Run: ``python benchmarks/crash.py [--trials 1000] [--max-delay SECONDS] [--seed 1]``. The kill delay
is uniform in [0, max-delay]; by default max-delay adapts to twice the 90th percentile of the pass
times seen so far (at least 0.2 s), so kills land inside passes on a quiet or a loaded machine alike.
Prints one JSON object:
the success rate, the phases hit, and the recovery time as a ratio to a normal reconcile pass.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODULES = ("clf", "bundle")


# ------------------------------------------------------------------------------ fixture
def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_fixture(work: Path, seed: int = 1, size: int = 512 * 1024) -> tuple[Path, Any]:
    """A hub with good and probe-failing versions published, a device provisioned against it with
    version 1 active, and a spec. Returns (spec path, hub) where hub has ``release(choice)``, ``close()``."""
    from deployment.manifest import DesiredModule, ModuleManifest
    from deployment.reconcile import Reconciler
    from hub.repository import HubRepository
    from hub.server import build_hub_app
    from policies.deployment import DeploymentPolicy
    from sre_agent.provision import provision
    from sre_core.clock import SystemClock
    from sre_core.http_server import ServerThread
    from sre_core.paths import StatePaths

    rng = random.Random(seed)
    repo = HubRepository.init(work / "repo", channels=("stable",), clock=SystemClock())
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    state = StatePaths(work / "state")
    provision(state, root=repo.metadata_dir / "1.root.json", hub=server.url, channel="stable")
    probe = work / "probes" / "model-ok"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('#!/bin/sh\n! grep -q BAD "$SRE_ARTIFACT_PATH"\n')
    probe.chmod(0o755)
    probes = [{"kind": "exec", "argv": [str(probe)], "attempts": 1, "timeout_s": 10}]

    def payload(tag: str) -> bytes:
        # lowercase hex never contains "BAD"; bad versions start with it.
        return tag.encode() + rng.randbytes(size // 2).hex().encode()

    arts: list[dict[str, Any]] = []
    staging = work / "publish"
    staging.mkdir()
    for module in MODULES:
        for i in range(1, 5):
            bad = i == 4
            ver = f"{i}.0" if not bad else "6.6.6"
            model = payload(("BAD " if bad else "") + f"{module} {ver}\n")
            if module == "clf":
                data, fmt, files = model, "file", {"model.onnx": hashlib.sha256(model).hexdigest()}
            else:
                members = {"model.onnx": model, "conf/labels.txt": f"labels {ver}\n".encode(), "README": b"r"}
                data, fmt = _tar(members), "tar"
                files = {k: hashlib.sha256(v).hexdigest() for k, v in members.items()}
            f = staging / f"{module}-{ver}"
            f.write_bytes(data)
            manifest = ModuleManifest(
                name=module,
                version=ver,
                format="file" if fmt == "file" else "tar",
                filename="model.onnx",  # for the bundle: the member the probe reads
                mode="file",
                probes=probes,  # type: ignore[arg-type]
            )
            pub = repo.publish("stable", f, manifest)
            arts.append(
                {"module": module, "version": ver, "sha256": pub.sha256, "length": len(data),
                 "target": pub.target, "good": not bad, "files": files}
            )  # fmt: skip
    policy = DeploymentPolicy.model_validate(
        {
            "probes": {"exec_allowlist": [str(probe)]},
            "flapping": {"max_rollbacks": 1000, "window_s": 1},
            # Kills here are deliberate: keep the loop guard (interrupted flips) out of the way.
            "max_resumes": 100,
        }
    )

    class Hub:
        def __init__(self) -> None:
            self.serials: set[int] = set()

        def release(self, choice: dict[str, dict[str, Any]]) -> None:
            mods = {m: DesiredModule(version=a["version"], target=a["target"]) for m, a in choice.items()}
            ds = repo.update_desired("stable", {"modules": mods})
            self.serials.add(ds.serial)

        def close(self) -> None:
            server.stop()

    hub = Hub()
    spec = {
        "state": str(state.root),
        "hub": server.url,
        "artifacts": arts,
        "policy": policy.model_dump(mode="json"),
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    # Version 1.0 of every module active before the first kill, pulled from the hub like every pass.
    hub.release({a["module"]: a for a in arts if a["version"] == "1.0"})
    rec = Reconciler(state, _source(spec), policy=policy)
    report = rec.run_once()
    if not report.ok:
        raise RuntimeError(f"fixture reconcile failed: {report.to_dict()}")
    return spec_path, hub


def _source(spec: dict[str, Any]) -> Any:
    """The production source: a real TUF pull from the hub (held state when refused or offline)."""
    from deployment.pull import Puller
    from sre_core.paths import StatePaths

    paths = StatePaths(Path(spec["state"]))
    return lambda: Puller(paths, spec["hub"], "stable").pull_or_held()


# ------------------------------------------------------------------------------ zygote and child
def _child(spec: dict[str, Any]) -> None:
    """Runs in a forked process: recover (the restart), report, stop, then reconcile until killed."""
    from deployment.reconcile import Reconciler
    from policies.deployment import DeploymentPolicy
    from sre_core.paths import StatePaths

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # probes need their exit status back
    policy = DeploymentPolicy.model_validate(spec["policy"])
    rec = Reconciler(StatePaths(Path(spec["state"])), _source(spec), policy=policy)
    t0 = time.perf_counter()
    rec.recover()
    recovery_s = time.perf_counter() - t0
    os.write(1, f"ready {os.getpid()} {recovery_s:.6f}\n".encode())  # one syscall: never torn
    os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        t0 = time.perf_counter()
        report = rec.run_once()
        refused = 1 if report.pull_refused else 0
        os.write(1, f"pass {os.getpid()} {time.perf_counter() - t0:.6f} {refused}\n".encode())


def _zygote(spec_path: Path) -> None:
    """Import once, then fork a child per 'fork' line on stdin; print its pid."""
    import deployment.pull
    import deployment.reconcile  # noqa: F401

    spec = json.loads(spec_path.read_text())
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print("zygote ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "fork":
            break
        pid = os.fork()
        if pid == 0:
            try:
                _child(spec)
            finally:
                os._exit(0)
        os.write(1, f"forked {pid}\n".encode())


# ------------------------------------------------------------------------------ checks (independent)
def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def check_device(spec: dict[str, Any]) -> list[str]:
    """Problems with what the device serves after a restart (empty list: all good)."""
    from sre_core.audit import AuditLog

    problems: list[str] = []
    state = Path(spec["state"])
    good = {(a["module"], a["sha256"]): a for a in spec["artifacts"] if a["good"]}
    for module in MODULES:
        mdir = state / "modules" / module
        st = json.loads((mdir / "state.json").read_text())
        if st["phase"] != "idle":
            problems.append(f"{module}: phase {st['phase']} after recovery")
        active = st["active"]
        try:
            link = os.readlink(mdir / "current")
        except OSError:
            link = None
        if link != active:
            problems.append(f"{module}: current -> {link}, state says {active}")
            continue
        rec = st["slots"][active]
        want = good.get((module, rec["sha256"]))
        if want is None:
            problems.append(f"{module}: active digest {rec['sha256'][:12]} is not a good published version")
            continue
        on_disk = {
            p.relative_to(mdir / active).as_posix(): _sha256(p)
            for p in (mdir / active).rglob("*")
            if p.is_file()
        }
        if on_disk != want["files"]:
            problems.append(f"{module}: served files of {rec['version']} do not match the signed content")
        for stray in (".staging", ".current.tmp"):
            if (mdir / stray).exists():
                problems.append(f"{module}: {stray} left behind")
    problems += check_trust(spec, state)
    n, broken = AuditLog(state / "audit.jsonl").verify()
    if broken is not None or n == 0:
        problems.append(f"audit chain: {broken}")
    return problems


def check_trust(spec: dict[str, Any], state: Path, serials: set[int] | None = None) -> list[str]:
    """What the pull left: a clean content store, a held state the hub signed, a sane time mark."""
    from datetime import UTC, datetime, timedelta

    problems: list[str] = []
    for blob in sorted((state / "cas" / "sha256").glob("*")) if (state / "cas" / "sha256").is_dir() else []:
        if _sha256(blob) != blob.name:
            problems.append(f"cas: {blob.name[:12]} does not hash to its name")
    published = {a["sha256"] for a in spec["artifacts"]}
    held_path = state / "trust" / "held.json"
    if held_path.exists():
        try:
            held = json.loads(held_path.read_text())
            serial = int(held["serial"])
            if serials is not None and serial not in serials:
                problems.append(f"held serial {serial} was never signed by the hub")
            for m, a in held["artifacts"].items():
                if a["sha256"] not in published:
                    problems.append(f"held {m}: digest {a['sha256'][:12]} was never published")
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"held.json unreadable: {exc}")
    clock = state / "clock.json"
    if clock.exists():
        try:
            mark = datetime.fromisoformat(json.loads(clock.read_text())["high_water"])
            if mark > datetime.now(UTC) + timedelta(minutes=1):
                problems.append(f"trusted time {mark.isoformat()} is beyond the wall clock")
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"clock.json unreadable: {exc}")
    return problems


def _pull_step_now(spec: dict[str, Any], serial: int, since: float) -> str:
    """Where in the pull a kill landed, read from the disk: a download or an atomic write in flight
    (metadata, held record, time mark or reconcile record: a temp file written since the child was
    resumed), before the held record named this trial's serial, or after (reconcile)."""
    state = Path(spec["state"])

    def fresh(d: Path, pattern: str) -> bool:
        return any(p.stat().st_mtime >= since for p in d.glob(pattern)) if d.is_dir() else False

    if fresh(state / "cas" / "partial", "*.part"):
        return "pull:download"
    if fresh(state / "tuf", ".*.tmp") or fresh(state / "tuf" / "root_history", ".*.tmp"):
        return "pull:metadata-write"
    if fresh(state, ".clock.json.*.tmp"):
        return "pull:clock-write"
    if fresh(state / "trust", ".*.tmp"):
        return "pull:held-write"
    try:
        held = int(json.loads((state / "trust" / "held.json").read_text())["serial"])
    except (OSError, ValueError, KeyError):
        held = -1
    return "reconcile" if held >= serial else "pull:refresh"


def _phases_now(spec: dict[str, Any]) -> list[str]:
    out = []
    for module in MODULES:
        try:
            st = json.loads((Path(spec["state"]) / "modules" / module / "state.json").read_text())
            out.append(st["phase"])
        except (OSError, ValueError):
            out.append("unreadable")
    return out


def _wait_stopped(pid: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            s = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            raise RuntimeError(f"child {pid} died before stopping") from None
        if s.rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.002)
    raise RuntimeError(f"child {pid} did not stop")


def _wait_dead(pid: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            s = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if s.rsplit(")", 1)[1].split()[0] in {"Z", "X"}:
            return
        time.sleep(0.002)
    raise RuntimeError(f"child {pid} survived SIGKILL")


def _adaptive_bound(passes: list[float], trial: int) -> float:
    """Twice the 90th percentile of completed passes (the slow ones pull, install and flip), at least
    0.2 s; until five passes completed, a bound that grows with the trials (a pull takes longer than a
    loaded machine's first guess)."""
    if len(passes) < 5:
        return min(4.0, 1.0 + 0.2 * trial)
    return max(0.2, 2 * statistics.quantiles(passes, n=10)[-1])


def run_trials(work: Path, trials: int, seed: int = 1, max_delay: float | None = None) -> dict[str, Any]:
    """Build a device in ``work`` and run ``trials`` kill/restart cycles. Returns the counts.

    ``max_delay``: kill within this many seconds of resuming a child; None adapts it to twice the
    90th percentile of the reconcile passes seen so far, at least 0.2 s.
    """
    spec_path, hub = build_fixture(work, seed)
    spec = json.loads(spec_path.read_text())
    rng = random.Random(seed)
    by_module: dict[str, list[dict[str, Any]]] = {}
    for a in spec["artifacts"]:
        by_module.setdefault(a["module"], []).append(a)
    cas = Path(spec["state"]) / "cas" / "sha256"

    def next_release() -> int:
        """Sign a random desired state (15 % probe-failing versions); evict random cached blobs."""
        choice = {}
        for m, arts in by_module.items():
            good = [a for a in arts if a["good"]]
            bad = [a for a in arts if not a["good"]]
            choice[m] = rng.choice(bad) if rng.random() < 0.15 else rng.choice(good)
        hub.release(choice)
        for blob in list(cas.glob("*")) if cas.is_dir() else []:
            if rng.random() < 0.5:
                blob.unlink()
        newest: int = max(hub.serials)
        return newest

    zygote = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--zygote", str(spec_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=str(REPO),
    )  # fmt: skip
    assert zygote.stdin is not None and zygote.stdout is not None
    phases: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    recovery: list[float] = []
    passes: list[float] = []
    refused = 0
    ok = 0

    def fork() -> int:
        assert zygote.stdin is not None and zygote.stdout is not None
        zygote.stdin.write("fork\n")
        zygote.stdin.flush()
        while True:
            line = zygote.stdout.readline()
            if not line:
                raise RuntimeError("zygote exited")
            parts = line.split()
            if parts[:1] == ["ready"] and len(parts) == 3:
                recovery.append(float(parts[2]))
                return int(parts[1])
            if parts[:1] == ["pass"] and len(parts) == 4:
                passes.append(float(parts[2]))
                nonlocal refused
                refused += int(parts[3])

    try:
        line = zygote.stdout.readline()
        if not line.startswith("zygote ready"):
            raise RuntimeError(f"zygote failed to start: {line!r}")
        for trial in range(trials + 1):
            pid = fork()  # the restart after the previous kill
            _wait_stopped(pid)
            if trial > 0:
                problems = check_device(spec) + check_trust(spec, Path(spec["state"]), hub.serials)
                if problems:
                    failures.append({"trial": trial, "problems": problems})
                else:
                    ok += 1
            if trial == trials:
                os.kill(pid, signal.SIGKILL)
                _wait_dead(pid)
                break
            serial = next_release()
            resumed = time.time() - 0.01
            os.kill(pid, signal.SIGCONT)
            bound = max_delay if max_delay is not None else _adaptive_bound(passes, trial)
            time.sleep(rng.uniform(0, bound))
            os.kill(pid, signal.SIGKILL)
            _wait_dead(pid)
            phases.update(_phases_now(spec))
            steps[_pull_step_now(spec, serial, resumed)] += 1
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
        hub.close()
    # Passes that completed, read after the fact (the zygote's stdout also carries the children's lines).
    events = Counter(
        r["event"]
        for r in (json.loads(x) for x in (Path(spec["state"]) / "audit.jsonl").read_text().splitlines())
    )
    return {
        "trials": trials,
        "ok": ok,
        "rate": ok / trials if trials else 1.0,
        "violations": len(failures) + refused,
        "pulls_refused_after_restart": refused,
        "failures": failures[:10],
        "phases_at_kill": dict(phases),
        "pull_step_at_kill": dict(steps),
        "recovery_median_s": statistics.median(recovery) if recovery else None,
        "pass_median_s": statistics.median(passes) if passes else None,
        "audit_events": {
            k: events[k]
            for k in (
                "slot.flipped",
                "slot.committed",
                "slot.rolled_back",
                "slot.install_discarded",
                "slot.flip_resolved",
                "pull.verified",
                "pull.refused",
                "pull.failed",
            )
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument(
        "--max-delay", type=float, default=None, help="kill within this many seconds (default: adaptive)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--zygote", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.zygote:
        _zygote(args.zygote)
        return 0
    with tempfile.TemporaryDirectory(prefix="sre-crash-") as tmp:
        t0 = time.perf_counter()
        res = run_trials(Path(tmp), args.trials, args.seed, args.max_delay)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
    rec, pas = res["recovery_median_s"], res["pass_median_s"]
    res["recovery_to_pass_ratio"] = round(rec / pas, 3) if rec and pas else None
    print(json.dumps(res, sort_keys=True))
    return 0 if res["ok"] == res["trials"] and res["violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
