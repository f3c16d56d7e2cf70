"""Red team of trust, pull and rollback through the real CLIs against a real hub on loopback.

Written from docs/release-engineering.md, docs/threat-model.md and the trust policy defaults: the
variants the existing attack tests do not try. Signed times just beyond and far beyond the tolerance,
on the timestamp and on the desired state, and within the tolerance against a short expiry; a mirror
that trickles or stalls on *targets*; a release refused after download for each reason; a recall of
the last-known-good; re-pinning the trust anchor.

Device commands run through ``sre_agent.cli.main`` in process (each child process costs seconds on the
shared box); the hub is a real HTTP server on 127.0.0.1 with the real repository keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from deployment.manifest import ModuleManifest
from hub.cli import main as hub_main
from hub.repository import HubRepository
from hub.server import build_hub_app
from sre_agent.cli import main as agent_main
from sre_core.clock import FakeClock, SystemClock
from sre_core.http_server import ServerThread

pytestmark = pytest.mark.slow  # several real pulls and reconciles per test on the shared box

DAY = 86400


def cli(main: Any, *args: str, hang_s: float = 120) -> tuple[int, dict[str, Any] | None, str]:
    """Run a console script's entry point in a thread (a hang is a failure, not a stuck test run)."""
    out, err = io.StringIO(), io.StringIO()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                box["rc"] = main(list(args))
        except BaseException as exc:  # a crash is reported with the output
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(hang_s)
    assert not t.is_alive(), f"{args[:2]} still running after {hang_s} s: it hangs"
    if "exc" in box:
        raise AssertionError(f"{args} crashed: {box['exc']!r}\n{out.getvalue()}{err.getvalue()}")
    body: dict[str, Any] | None
    try:
        body = json.loads(out.getvalue())
    except ValueError:
        body = None
    return int(box["rc"]), body, out.getvalue() + err.getvalue()


@dataclass
class Hub:
    tmp: Path
    repo: HubRepository
    server: ServerThread
    state: Path

    @property
    def served(self) -> Path:
        return self.state / "modules" / "clf" / "current" / "m.bin"

    def publish(
        self, version: str, expires: timedelta = timedelta(days=14), clock: Any = None, **manifest: Any
    ) -> None:
        repo = self.repo if clock is None else HubRepository(self.repo.dir, clock=clock)
        f = self.tmp / f"clf-{version}.bin"
        f.write_bytes(version.encode() * 1000)
        man = ModuleManifest.model_validate(
            {"name": "clf", "version": version, "mode": "file", "filename": "m.bin", **manifest}
        )
        repo.publish("stable", f, man)
        repo.release("stable", "clf", version, expires_in=expires)

    def reconcile(self, *extra: str, hang_s: float = 120) -> tuple[int, dict[str, Any]]:
        rc, body, out = cli(
            agent_main, "reconcile", "--state", str(self.state), "--once", "--json", *extra, hang_s=hang_s
        )
        assert body is not None, out[-2000:]
        return rc, body

    def status(self) -> dict[str, Any]:
        rc, body, out = cli(agent_main, "status", "--state", str(self.state), "--json")
        assert rc == 0 and body is not None, out[-2000:]
        return body

    def module(self) -> dict[str, Any]:
        mod: dict[str, Any] = self.status()["modules"][0]
        return mod

    def high_water(self) -> datetime:
        return datetime.fromisoformat(json.loads((self.state / "clock.json").read_text())["high_water"])

    def audit(self) -> list[str]:
        return [json.loads(x)["event"] for x in (self.state / "audit.jsonl").read_text().splitlines()]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    repo = HubRepository.init(tmp_path / "repo", channels=("stable",), clock=SystemClock())
    server = ServerThread(build_hub_app(repo.dir, [])).start()
    state = tmp_path / "dev"
    try:
        rc, _, out = cli(
            agent_main,
            "init",
            "--state",
            str(state),
            "--root",
            str(repo.metadata_dir / "1.root.json"),
            "--hub",
            server.url,
            "--channel",
            "stable",
        )
        assert rc == 0, out
        yield Hub(tmp_path, repo, server, state)
    finally:
        server.stop()


def _trust_policy(h: Hub, text: str) -> None:
    d = h.state / "policies"
    d.mkdir(exist_ok=True)
    (d / "trust.yaml").write_text(text)


# --- bounded signed time ----------------------------------------------------------------------------
AHEAD = {"just-beyond": timedelta(seconds=DAY + 3600), "far-beyond": timedelta(days=30 * 365)}


@pytest.mark.parametrize("ahead", list(AHEAD))
def test_future_timestamp_refused_and_trusted_time_unmoved(hub: Hub, ahead: str) -> None:
    hub.publish("1.0.0")
    assert hub.reconcile()[0] == 0
    HubRepository(hub.repo.dir, clock=FakeClock(datetime.now(UTC) + AHEAD[ahead])).timestamp()
    rc, rep = hub.reconcile()
    assert rc != 0 and not rep["safe_mode"], rep
    assert hub.high_water() < datetime.now(UTC) + timedelta(seconds=DAY)
    assert "pull.future_time_refused" in hub.audit()
    st = hub.status()
    assert not st["safe_mode"]["active"] and st["last_pull_refused"]
    # the hub's clock is fixed (a present-time timestamp with a higher version): back without a hand
    hub.publish("2.0.0")
    rc, rep = hub.reconcile()
    assert rc == 0 and [(o["result"], o["version"]) for o in rep["outcomes"]] == [("committed", "2.0.0")], rep


@pytest.mark.parametrize("ahead", list(AHEAD))
def test_future_desired_state_refused_and_the_next_one_admitted(hub: Hub, ahead: str) -> None:
    """A channel key signs a desired state issued in the future; the timestamp is honest. The device
    refuses it without moving trusted time, and a later honest release (issued earlier than the
    refused one) is admitted: the refused issue time must not become a floor."""
    hub.publish("1.0.0")
    assert hub.reconcile()[0] == 0
    hub.publish("2.0.0", clock=FakeClock(datetime.now(UTC) + AHEAD[ahead]))
    hub.repo.timestamp()  # an honest, present-time timestamp over the poisoned snapshot
    rc, rep = hub.reconcile()
    assert rc != 0 and not rep["safe_mode"], rep
    assert hub.served.read_bytes() == b"1.0.0" * 1000
    assert hub.high_water() < datetime.now(UTC) + timedelta(seconds=DAY)
    assert not hub.status()["safe_mode"]["active"]
    hub.publish("3.0.0")
    rc, rep = hub.reconcile()
    assert rc == 0 and [(o["result"], o["version"]) for o in rep["outcomes"]] == [("committed", "3.0.0")], rep


def test_timestamp_within_tolerance_cannot_force_safe_mode(hub: Hub) -> None:
    """The docs: a future signing time 'cannot push devices into safe mode'. Inside the one-day
    tolerance a stolen timestamp key can still move trusted time by 20 h; a desired state that expires
    in 6 h must not expire on that say-so."""
    hub.publish("1.0.0", expires=timedelta(hours=6))
    assert hub.reconcile()[0] == 0
    HubRepository(hub.repo.dir, clock=FakeClock(datetime.now(UTC) + timedelta(hours=20))).timestamp()
    _, rep = hub.reconcile()
    assert not rep["safe_mode"], rep
    assert not hub.status()["safe_mode"]["active"]


# --- a mirror that trickles or stalls on targets ----------------------------------------------------
def _mirror(repo_dir: Path, stall: bool, stop: threading.Event) -> ServerThread:
    """Metadata served honestly; every target body trickles one byte a second (or stalls after one)."""

    async def target(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(300):  # bounded: five minutes at most
                if stop.is_set():
                    return
                if not stall or _ == 0:
                    yield b"x"
                await asyncio.sleep(1.0)

        return StreamingResponse(body(), headers={"content-length": "5000"})

    return ServerThread(build_hub_app(repo_dir, [Route("/targets/{p:path}", target)])).start()


@pytest.mark.parametrize("mode", ["trickle", "stall"])
def test_slow_target_mirror_ends_the_pass_and_keeps_serving(hub: Hub, mode: str) -> None:
    hub.publish("1.0.0")
    assert hub.reconcile()[0] == 0
    _trust_policy(
        hub, "metadata_deadline_s: 2\nread_timeout_s: 2\npull_deadline_s: 4\nmax_stalled_attempts: 1\n"
    )
    hub.publish("2.0.0")
    stop = threading.Event()
    mirror = _mirror(hub.repo.dir, mode == "stall", stop)
    try:
        # the hang guard (60 s) only catches a pass that never ends; the pull deadline is 4 s
        rc, rep = hub.reconcile("--from", mirror.url, hang_s=60)
    finally:
        stop.set()
        mirror.stop()
    assert rc != 0, rep
    assert hub.served.read_bytes() == b"1.0.0" * 1000
    assert all(o["result"] != "committed" for o in rep["outcomes"]), rep
    assert not rep["safe_mode"], rep  # the held desired state has not expired
    # the honest hub later: the download resumes and 2.0.0 commits
    rc, rep = hub.reconcile()
    assert rc == 0 and hub.served.read_bytes() == b"2.0.0" * 1000, rep


# --- refused after download: the last-known-good survives -------------------------------------------
REFUSALS: dict[str, dict[str, Any]] = {
    "constraint-disk": {"constraints": {"min_free_disk_mb": 10**12}},
    "constraint-depends": {"constraints": {"depends_on": {"no-such-module": "1.0.0"}}},
    "constraint-agent": {"constraints": {"min_agent_version": "999.0.0"}},
    "probe-attempts-budget": {
        "probes": [{"kind": "file", "path": "ready", "attempts": 100, "interval_s": 600}]
    },
    "probe-timeout-budget": {"probes": [{"kind": "file", "path": "ready", "timeout_s": 600, "attempts": 2}]},
    "probe-exec-traversal": {"probes": [{"kind": "exec", "argv": ["/usr/bin/../bin/true"]}]},
    "probe-http-off-device": {"probes": [{"kind": "http", "url": "http://10.0.0.1/ready"}]},
}


@pytest.mark.parametrize("reason", [*REFUSALS, "signature-cosign"])
def test_refused_after_download_keeps_last_known_good(hub: Hub, reason: str) -> None:
    for v in ("1.0.0", "2.0.0"):
        hub.publish(v)
        assert hub.reconcile()[0] == 0
    before = hub.module()
    assert before["active"]["version"] == "2.0.0" and before["last_known_good"]["version"] == "1.0.0"
    if reason == "signature-cosign":
        # the device's trust policy requires a cosign signature the release does not carry
        from _trust_support import p256_keypair

        _, pub = p256_keypair()
        _trust_policy(
            hub,
            "require_cosign: true\ncosign_public_keys:\n  - |\n"
            + "".join(f"    {line}\n" for line in pub.strip().splitlines()),
        )
        hub.publish("3.0.0")
    else:
        hub.publish("3.0.0", **REFUSALS[reason])
    rc, rep = hub.reconcile()
    # an unmet constraint is "blocked" (it may be met later: exit 0); a probe is refused; a failed second
    # signature refuses the whole pull (nothing is planned, `pull_refused` says why)
    kind = reason.split("-", maxsplit=1)[0]
    expected = {"constraint": "blocked", "probe": "refused", "signature": "noop"}[kind]
    assert [o["result"] for o in rep["outcomes"]] == [expected], rep
    assert (rc == 0) == reason.startswith("constraint"), rep
    assert bool(rep["pull_refused"]) == reason.startswith("signature"), rep
    assert hub.served.read_bytes() == b"2.0.0" * 1000
    after = hub.module()
    assert after["standby"]["version"] == "1.0.0" and after["last_known_good"]["version"] == "1.0.0", after
    rc, _, out = cli(agent_main, "rollback", "clf", "--state", str(hub.state))
    assert rc == 0, out
    assert hub.served.read_bytes() == b"1.0.0" * 1000


# --- recall -------------------------------------------------------------------------------------------
def _recall(hub: Hub, withdraw: str, to: str) -> None:
    rc, _, out = cli(
        hub_main,
        "recall",
        "--repo",
        str(hub.repo.dir),
        "--channel",
        "stable",
        "--module",
        "clf",
        "--withdraw",
        withdraw,
        "--to",
        to,
        "--reason",
        "red team",
    )
    assert rc == 0, out


def test_recall_of_the_last_known_good_is_never_served_by_rollback(hub: Hub) -> None:
    """The recalled version is the standby (last-known-good), not the active one."""
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        hub.publish(v)
        assert hub.reconcile()[0] == 0
    assert hub.module()["last_known_good"]["version"] == "2.0.0"
    _recall(hub, "2.0.0", "3.0.0")
    rc, rep = hub.reconcile()
    assert rc == 0, rep
    assert hub.served.read_bytes() == b"3.0.0" * 1000
    lkg = hub.module().get("last_known_good") or {}
    assert lkg.get("version") != "2.0.0", lkg
    cli(agent_main, "rollback", "clf", "--state", str(hub.state))
    assert hub.served.read_bytes() != b"2.0.0" * 1000


def test_recall_to_an_older_version_then_rollback_never_serves_the_recalled(hub: Hub) -> None:
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        hub.publish(v)
        assert hub.reconcile()[0] == 0
    _recall(hub, "3.0.0", "1.0.0")
    rc, rep = hub.reconcile()
    assert rc == 0 and hub.served.read_bytes() == b"1.0.0" * 1000, rep
    cli(agent_main, "rollback", "clf", "--state", str(hub.state))
    assert hub.served.read_bytes() != b"3.0.0" * 1000
    rc, rep = hub.reconcile()
    assert hub.served.read_bytes() == b"1.0.0" * 1000, rep


# --- trust anchor ----------------------------------------------------------------------------------------
def test_init_with_another_root_needs_force(hub: Hub, tmp_path: Path) -> None:
    other = HubRepository.init(tmp_path / "other", channels=("stable",), clock=SystemClock())
    pinned = sorted(p for p in (hub.state / "trust").rglob("*root*.json"))
    assert pinned, "no pinned root found under trust/"
    before = {p: p.read_bytes() for p in pinned}
    args = (
        "init",
        "--state",
        str(hub.state),
        "--root",
        str(other.metadata_dir / "1.root.json"),
        "--hub",
        hub.server.url,
        "--channel",
        "stable",
    )
    rc, _, out = cli(agent_main, *args)
    assert rc == 2, out
    assert {p: p.read_bytes() for p in pinned} == before
    # the same anchor again is not a re-pin
    rc, _, out = cli(
        agent_main,
        "init",
        "--state",
        str(hub.state),
        "--root",
        str(hub.repo.metadata_dir / "1.root.json"),
        "--hub",
        hub.server.url,
        "--channel",
        "stable",
    )
    assert rc == 0, out
    rc, _, out = cli(agent_main, *args, "--force")
    assert rc == 0, out
    assert any("repin" in e or "anchor" in e or "root" in e for e in hub.audit()), hub.audit()[-5:]


# --- other roads to trusted time ---------------------------------------------------------------------
def test_far_future_timestamp_through_a_bundle_is_refused(hub: Hub, tmp_path: Path) -> None:
    """Sneakernet takes the same bound as the network: a bundle carrying a far-future timestamp."""
    hub.publish("1.0.0")
    assert hub.reconcile()[0] == 0
    HubRepository(hub.repo.dir, clock=FakeClock(datetime.now(UTC) + AHEAD["far-beyond"])).timestamp()
    bundle = tmp_path / "bundle"
    rc, _, out = cli(
        hub_main, "bundle", "export", str(bundle), "--repo", str(hub.repo.dir), "--channel", "stable"
    )
    assert rc == 0, out
    rc, rep = hub.reconcile("--from", str(bundle))
    assert rc != 0 and not rep["safe_mode"], rep
    assert hub.high_water() < datetime.now(UTC) + timedelta(seconds=DAY)
    assert not hub.status()["safe_mode"]["active"]


def test_clock_skew_fault_never_moves_trusted_time(hub: Hub) -> None:
    """The chaos clock-skew action (+1 day, the catalogue's bound) while the device pulls: the desired
    state expiring in 12 h must not expire, and trusted time must not follow the skewed clock."""
    from chaos.actions import clear_faults, skew_agent_clock

    hub.publish("1.0.0", expires=timedelta(hours=12))
    assert hub.reconcile()[0] == 0
    conf = {"state_dir": str(hub.state)}
    skew_agent_clock(offset_s=86400, duration_s=300, configuration=conf)
    try:
        _, rep = hub.reconcile()
        assert not rep["safe_mode"], rep
        assert hub.high_water() < datetime.now(UTC) + timedelta(hours=1)
    finally:
        clear_faults(configuration=conf)
    assert not hub.status()["safe_mode"]["active"]
