"""A trusted time poisoned before signed times were bounded recovers on its own, safely.

How to break it: before the bound, a timestamp signed with the hub's real online key decades ahead
was admitted and persisted (``clock.json`` high-water, the cached ``timestamp.json``). The bounded code
then treats the device clock as "known wrong" (behind the mark) and keeps the mark: every desired state
looks expired, and after the hub rotates the key and releases again the device still refuses ("Final
root.json is expired") until someone deletes ``clock.json`` by hand. And the obvious fix (drop any mark
far ahead of the device clock) would revive an expired desired state when the clock is wound back.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from _trust_support import make_env

from deployment.artifacts import PullResult
from deployment.manifest import ModuleManifest
from deployment.reconcile import Reconciler
from deployment.trusted_time import TrustedTime, unbacked_mark
from hub.repository import HubRepository
from hub.server import build_hub_app
from sre_agent.cli import main as agent_main
from sre_core.clock import FakeClock, SystemClock
from sre_core.http_server import ServerThread

DAY = timedelta(days=1)
TOL = timedelta(days=1)
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _record(high: datetime, written: datetime, source: str = "timestamp") -> dict[str, object]:
    return {"high_water": high.isoformat(), "source": source, "system_clock_at_update": written.isoformat()}


def test_only_a_mark_ahead_when_written_and_backed_by_nothing_is_unbacked() -> None:
    future = NOW + 30 * 365 * DAY
    held = (NOW - 2 * DAY, NOW + 12 * DAY)
    assert unbacked_mark(_record(future, NOW - DAY), NOW, TOL, *held)  # poisoned: discarded
    assert unbacked_mark(_record(future, NOW - DAY), NOW, TOL, None, None)  # nothing held at all
    # Rollback: a good mark (it agreed with the device clock when written), the clock wound back.
    assert unbacked_mark(_record(NOW, NOW, "system-clock"), NOW - 60 * DAY, TOL, *held) is None
    assert unbacked_mark(_record(NOW, NOW - DAY / 2), NOW - 60 * DAY, TOL, *held) is None
    # An RTC reset: the mark came from signed time while the clock read 1970, and a held verified
    # desired state says the clock is still behind: the mark is what keeps expiry honest.
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert unbacked_mark(_record(NOW, epoch), epoch, TOL, *held) is None
    # A held desired state still valid at the mark: nothing held expires early, keep it.
    assert unbacked_mark(_record(NOW + 5 * DAY, NOW - DAY), NOW, TOL, *held) is None
    # Inside the tolerance, or without evidence of how it was written: kept.
    assert unbacked_mark(_record(NOW + TOL / 2, NOW - 30 * DAY), NOW, TOL, *held) is None
    assert unbacked_mark({"high_water": future.isoformat()}, NOW, TOL, *held) is None


def test_a_mark_poisoned_by_old_code_is_discarded_at_start_and_the_device_recovers(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        env.artifact("1.0.0", mode="file")
        rec = Reconciler(env.paths, lambda: env.puller().pull(), env.clock)
        first = rec.run_once()
        assert first.trust == "fresh" and [o.result for o in first.outcomes] == ["committed"]

        # What the old code did with a timestamp the hub's real online key signed 30 years ahead:
        # persisted it in the metadata cache and raised the high-water mark to its signing time.
        ahead = env.clock.now() + 30 * 365 * DAY
        HubRepository(env.repo.dir, clock=FakeClock(ahead)).timestamp()
        shutil.copy(env.repo.metadata_dir / "timestamp.json", env.paths.tuf / "timestamp.json")
        env.paths.clock_file.write_text(json.dumps(_record(ahead, env.clock.now())))
        poisoned = TrustedTime(env.paths.clock_file, env.clock)
        assert poisoned.now() == ahead  # every held desired state now looks expired

        # The hub rotates the stolen key and signs again with a correct clock; no hand on the device.
        env.clock.advance(DAY / 4)
        env.repo.rotate_key("timestamp")
        env.repo.timestamp()
        restarted = Reconciler(env.paths, lambda: env.puller().pull(), env.clock)
        report = restarted.run_once()
        assert report.pull_refused is None and report.trust == "fresh", report
        assert not report.safe_mode and report.ok
        high = datetime.fromisoformat(json.loads(env.paths.clock_file.read_text())["high_water"])
        assert high <= env.clock.now()
        records = [json.loads(x) for x in env.paths.audit_log.read_text().splitlines()]
        (dropped,) = [r for r in records if r["event"] == "trusted_time.discarded"]
        assert dropped["data"]["discarded"] == ahead.isoformat()
        # Once recovered, nothing is discarded again, and the mark only moves forward.
        assert Reconciler(env.paths, lambda: env.puller().pull(), env.clock).run_once().trust == "fresh"
        assert sum(r["event"] == "trusted_time.discarded" for r in _audit(env.paths.audit_log)) == 1
    finally:
        env.server.stop()


def test_the_clock_rollback_protection_still_holds_through_a_restart(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        env.artifact("1.0.0", mode="file")
        env.repo.release("stable", "clf", "1.0.0", expires_in=timedelta(days=3))
        rec = Reconciler(env.paths, lambda: env.puller().pull(), env.clock)
        assert rec.run_once().trust == "fresh"
        env.clock.advance(timedelta(days=5))  # the desired state expired (trusted time ratchets)
        offline = Reconciler(env.paths, _offline, env.clock)
        assert offline.run_once().safe_mode
        # The RTC is wound back to when the desired state was valid; the agent restarts.
        env.clock.set(env.clock.now() - timedelta(days=4))
        again = Reconciler(env.paths, _offline, env.clock).run_once()
        assert again.safe_mode and again.trust == "expired"
        assert "trusted_time.discarded" not in [r["event"] for r in _audit(env.paths.audit_log)]
    finally:
        env.server.stop()


def _agent(*args: str) -> tuple[int, dict[str, object]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = agent_main(list(args))
    body: dict[str, object] = json.loads(out.getvalue())
    return rc, body


@pytest.mark.parametrize("first", ["pull", "reconcile"])
def test_every_command_that_pulls_recovers_a_poisoned_mark(tmp_path: Path, first: str) -> None:
    """`sre-agent pull` alone (no reconcile, no daemon) runs the same recovery as reconcile, through
    the real CLI against a real hub on loopback with its real keys (the device's own system clock)."""
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=SystemClock())
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    state = tmp_path / "dev"
    try:
        root = str(repo.metadata_dir / "1.root.json")
        assert agent_main(["init", "--state", str(state), "--root", root, "--hub", server.url]) == 0
        f = tmp_path / "clf.bin"
        f.write_bytes(b"1.0.0" * 100)
        repo.publish("stable", f, ModuleManifest(name="clf", version="1.0.0", mode="file", filename="m.bin"))
        repo.release("stable", "clf", "1.0.0")
        once = ["--once"] if first == "reconcile" else []
        rc, body = _agent(first, "--state", str(state), "--json", *once)
        assert rc == 0 and body["trust"] == "fresh", body

        # The old code's work: a timestamp signed 30 years ahead with the real online key, persisted in
        # the metadata cache, and the mark raised to its signing time.
        ahead = datetime.now(UTC) + 30 * 365 * DAY
        HubRepository(repo.dir, clock=FakeClock(ahead)).timestamp()
        shutil.copy(repo.metadata_dir / "timestamp.json", state / "tuf" / "timestamp.json")
        (state / "clock.json").write_text(json.dumps(_record(ahead, datetime.now(UTC))))

        # The hub rotates the stolen key and re-signs with a correct clock; only `pull` runs.
        repo.rotate_key("timestamp")
        repo.timestamp()
        rc, body = _agent("pull", "--state", str(state), "--json")
        assert rc == 0 and body["trust"] == "fresh", body
        high = datetime.fromisoformat(json.loads((state / "clock.json").read_text())["high_water"])
        assert high <= datetime.now(UTC)
        events = [r for r in _audit(state / "audit.jsonl") if r["event"] == "trusted_time.discarded"]
        assert [r["data"]["discarded"] for r in events] == [ahead.isoformat()]  # type: ignore[index]
        # Recovered once: the next pull and reconcile keep the mark.
        assert _agent("pull", "--state", str(state), "--json")[0] == 0
        assert _agent("reconcile", "--state", str(state), "--once", "--json")[0] == 0
        assert sum(r["event"] == "trusted_time.discarded" for r in _audit(state / "audit.jsonl")) == 1
    finally:
        server.stop()


def _offline() -> PullResult:
    raise ConnectionError("no link")


def _audit(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_mark_admitted_under_a_wound_back_clock_is_never_discarded(tmp_path: Path) -> None:
    """How to break the recovery: wind the clock back beyond the tolerance after the held desired
    state expired, let one honest pull admit the hub's (present) signing time while the clock is known
    wrong (that mark is far ahead of the device clock when written, like a poisoned one), restart: the
    expired desired state must stay expired."""
    env = make_env(tmp_path)
    try:
        env.artifact("1.0.0", mode="file")
        env.repo.release("stable", "clf", "1.0.0", expires_in=timedelta(days=3))
        t0 = env.clock.now()
        assert Reconciler(env.paths, lambda: env.puller().pull(), env.clock).run_once().trust == "fresh"
        env.clock.advance(timedelta(days=5))
        dead = "http://127.0.0.1:9"  # offline: the real puller keeps what is held and ratchets the mark
        offline = Reconciler(env.paths, lambda: env.puller(dead).pull_or_held(), env.clock).run_once()
        assert offline.safe_mode and offline.trust == "expired", offline
        env.clock.set(t0 + DAY)  # the RTC is wound back four days; the hub's clock is right
        HubRepository(env.repo.dir, clock=FakeClock(t0 + timedelta(days=5, hours=1))).timestamp()
        online = Reconciler(env.paths, lambda: env.puller().pull_or_held(), env.clock).run_once()
        assert online.safe_mode and online.trust == "expired", online
        again = Reconciler(env.paths, lambda: env.puller(dead).pull_or_held(), env.clock).run_once()
        assert again.safe_mode and again.trust == "expired", again
        assert "trusted_time.discarded" not in [r["event"] for r in _audit(env.paths.audit_log)]
    finally:
        env.server.stop()


def test_a_future_desired_state_held_by_old_code_needs_the_operator(tmp_path: Path) -> None:
    """Not recovered on its own (docs/operator-guide.md says so and gives the steps tested here): old
    code admitted a desired state issued 20 days ahead (a channel key with a wrong clock) and raised the
    mark to it. That held, verified document vouches for the mark exactly as after an RTC reset, so the
    recovery keeps it; every pull is then judged at the mark and refused. The operator's steps: the hub
    releases again with a right clock; on the device, with the clock checked, delete clock.json and pull."""
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=SystemClock())
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    state = tmp_path / "dev"
    try:
        root = str(repo.metadata_dir / "1.root.json")
        assert agent_main(["init", "--state", str(state), "--root", root, "--hub", server.url]) == 0
        f = tmp_path / "clf.bin"
        f.write_bytes(b"1.0.0" * 100)
        repo.publish("stable", f, ModuleManifest(name="clf", version="1.0.0", mode="file", filename="m.bin"))
        ahead = datetime.now(UTC) + 20 * DAY
        HubRepository(repo.dir, clock=FakeClock(ahead)).release("stable", "clf", "1.0.0")
        repo.timestamp()
        # What old code did: admitted it (here a 30-day tolerance lets the bounded code hold it too) and
        # raised the mark to its issue time.
        (state / "policies").mkdir(exist_ok=True)
        (state / "policies" / "trust.yaml").write_text(f"max_signed_time_ahead_s: {30 * 86400}\n")
        rc, body = _agent("pull", "--state", str(state), "--json")
        assert rc == 0 and body["trust"] == "fresh", body
        (state / "policies" / "trust.yaml").unlink()
        (state / "clock.json").write_text(json.dumps(_record(ahead, datetime.now(UTC), "desired-state")))

        repo.release("stable", "clf", "1.0.0")  # the hub releases again with a right clock
        rc, body = _agent("pull", "--state", str(state), "--json")
        assert rc == 1, body
        assert "trusted_time.discarded" not in [r["event"] for r in _audit(state / "audit.jsonl")]

        (state / "clock.json").unlink()  # the operator, after checking the device clock
        rc, body = _agent("pull", "--state", str(state), "--json")
        assert rc == 0 and body["trust"] == "fresh", body
        desired = body["desired"]
        assert isinstance(desired, dict) and datetime.fromisoformat(desired["issued"]) <= datetime.now(UTC)
        assert _agent("reconcile", "--state", str(state), "--once", "--json")[0] == 0
    finally:
        server.stop()
