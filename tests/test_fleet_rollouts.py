"""Rollouts, recalls, channels and DORA: the pure decisions, the hub service on a real repository, the
fleet API's authentication over real HTTP, recall by offline bundle, and the operator CLI."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from _trust_support import make_env

from deployment.manifest import DesiredState, ModuleManifest
from deployment.reconcile import Reconciler
from deployment.rollout import (
    RolloutDoc,
    bucket,
    device_report,
    is_member,
    resolve,
    send_report,
)
from hub.bundle import export_bundle
from hub.channels import Channels, PromotionCriteria, judge_promotion, matrix_channel
from hub.dora import compute_dora, publications
from hub.fleet_api import fleet_routes, issue_operator_token
from hub.fleetdb import FleetDB
from hub.repository import HubRepository
from hub.rollouts import TRANSITIONS, RolloutService, RolloutSpec, next_state
from sre_core.clock import FakeClock
from sre_core.errors import InputError
from sre_core.identity import load_identity
from sre_core.signing import sign_request

STATES = ["none", "running", "paused", "halted", "completed", "aborted", "reverted"]
EVENTS = sorted({e for _, e in TRANSITIONS})


# ---------------------------------------------------------------------------- membership (pure)
def test_membership_is_stable_cumulative_and_proportional() -> None:
    ids = [f"dev-{i:05d}" for i in range(5000)]
    assert [bucket(d, "r1") for d in ids[:50]] == [bucket(d, "r1") for d in ids[:50]]
    shares = {p: sum(is_member(d, "r1", p) for d in ids) / len(ids) for p in (1, 10, 50, 100)}
    assert shares[100] == 1.0
    for p in (10, 50):
        assert abs(shares[p] - p / 100) < 0.03, shares
    # Cumulative: a member of the 10 % wave is a member of the 50 % wave.
    assert all(is_member(d, "r1", 50) for d in ids if is_member(d, "r1", 10))
    # Another rollout draws another first wave (the same devices are not always first).
    first_a = {d for d in ids if is_member(d, "r1", 10)}
    first_b = {d for d in ids if is_member(d, "r2", 10)}
    assert len(first_a & first_b) < 0.3 * len(first_a)


def _desired(
    rollout: dict[str, Any] | None = None, recalls: list[dict[str, Any]] | None = None
) -> DesiredState:
    clock = FakeClock()
    return DesiredState.model_validate(
        {
            "channel": "stable", "serial": 3, "issued": clock.now(),
            "expires": clock.now() + timedelta(days=1),
            "modules": {"clf": {"version": "1.0", "target": "stable/clf-1.0"}},
            "rollout": rollout, "recalls": recalls or [],
        }
    )  # fmt: skip


def _ro(state: str, pct_wave: int = 0) -> dict[str, Any]:
    return RolloutDoc(
        id="r", module="clf", version="2.0", target="stable/clf-2.0", baseline="1.0", waves=[10, 50, 100],
        wave=pct_wave, state=state,  # type: ignore[arg-type]
    ).model_dump()  # fmt: skip


def _member_and_not(pct: int) -> tuple[str, str]:
    ids = [f"d{i}" for i in range(1000)]
    return next(d for d in ids if is_member(d, "r", pct)), next(d for d in ids if not is_member(d, "r", pct))


@pytest.mark.parametrize(
    ("state", "member", "current", "want"),
    [
        ("running", True, "1.0", "2.0"),
        ("running", False, "1.0", None),  # keeps what it runs
        ("running", False, None, "1.0"),  # nothing installed: the baseline
        ("paused", True, "1.0", None),  # nobody starts the candidate while paused
        ("paused", True, "2.0", "2.0"),  # members already on it keep it
        ("halted", True, "1.0", None),
        ("aborted", True, "2.0", "2.0"),
        ("aborted", False, "1.0", None),
        ("completed", False, "1.0", "2.0"),
        ("reverted", True, "2.0", "1.0"),
    ],
)
def test_resolve_rollout_table(state: str, member: bool, current: str | None, want: str | None) -> None:
    yes, no = _member_and_not(10)
    ds = resolve(_desired(_ro(state)), yes if member else no, {"clf": current})
    got = ds.modules.get("clf")
    assert (got.version if got else None) == want


def test_recalls_win_over_rollouts_and_current_versions() -> None:
    yes, no = _member_and_not(10)
    down = {
        "id": "c1",
        "module": "clf",
        "withdrawn": ["2.0"],
        "to_version": "1.0",
        "to_target": "stable/clf-1.0",
    }
    # A member would take 2.0, but 2.0 is withdrawn: it goes to 1.0.
    assert resolve(_desired(_ro("running"), [down]), yes, {"clf": "1.0"}).modules["clf"].version == "1.0"
    # A non-member running the withdrawn version (it would keep it) moves too.
    assert resolve(_desired(_ro("running"), [down]), no, {"clf": "2.0"}).modules["clf"].version == "1.0"
    fwd = {
        "id": "c2",
        "module": "clf",
        "withdrawn": ["1.0"],
        "to_version": "3.0",
        "to_target": "stable/clf-3.0",
    }
    assert resolve(_desired(None, [fwd]), no, {"clf": "1.0"}).modules["clf"].version == "3.0"
    # A malformed rollout document is ignored, not fatal.
    assert resolve(_desired({"id": "x"}), yes, {"clf": "1.0"}).modules["clf"].version == "1.0"


# ---------------------------------------------------------------------------- lifecycle table (pure)
def test_every_missing_transition_is_refused() -> None:
    for s in STATES:
        for e in EVENTS:
            if (s, e) in TRANSITIONS:
                assert next_state(s, e) in STATES
            else:
                with pytest.raises(InputError):
                    next_state(s, e)
    with pytest.raises(InputError, match="ack"):
        next_state("halted", "resume")


@pytest.mark.parametrize(
    "kw",
    [
        {"waves": [50, 10, 100]},
        {"waves": [10, 50]},
        {"waves": [0, 100]},
        {"gates": ["auto"]},
        {"halt_after": 0},
    ],
)
def test_bad_specs_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RolloutSpec(channel="stable", module="clf", version="2.0", **kw)


# ---------------------------------------------------------------------------- the service on a real repo
def _report(
    dev: str, version: str | None, bad: list[str] | None = None, channel: str = "stable"
) -> dict[str, Any]:
    return {
        "device_id": dev, "channel": channel, "safe_mode": False, "last_sync": None,
        "modules": {"clf": {"version": version, "phase": "idle", "bad": bad or []}}, "ledger": {},
    }  # fmt: skip


def _repo(tmp: Path, clock: FakeClock, channels: tuple[str, ...] = ("stable",)) -> HubRepository:
    repo = HubRepository.init(tmp / "repo", channels=channels, clock=clock)
    for v in ("1.0", "2.0", "3.0"):
        f = tmp / f"clf-{v}.bin"
        f.write_bytes(v.encode() * 10)
        for ch in channels[:1]:
            repo.publish(ch, f, ModuleManifest(name="clf", version=v, mode="file", filename="m.bin"))
    repo.release(channels[0], "clf", "1.0")
    return repo


def test_manual_gate_soak_min_devices_halt_ack_resume_abort(tmp_path: Path) -> None:
    clock = FakeClock()
    repo = _repo(tmp_path, clock)
    svc = RolloutService(repo, clock=clock)
    spec = RolloutSpec(channel="stable", module="clf", version="2.0", waves=[10, 50, 100],
                       gates=["manual", "auto"], soak_s=300, min_devices=2, halt_after=2)  # fmt: skip
    r = svc.start(spec)
    ds = repo.desired_state("stable")
    assert ds is not None and ds.rollout is not None and ds.rollout["state"] == "running"
    assert ds.modules["clf"].version == "1.0" and r.baseline == "1.0"
    with pytest.raises(InputError, match=r"in progress|is running"):
        svc.start(spec)
    members = [f"d{i}" for i in range(400) if is_member(f"d{i}", r.id, 10)][:3]
    clock.advance(timedelta(seconds=301))
    for d in members:
        svc.observe(_report(d, "2.0"))
    st = svc.status("stable")
    assert st.gate_ready and st.waves[0].healthy == 3
    assert svc.current("stable").wave == 0  # type: ignore[union-attr]  # the next gate is manual
    assert svc.approve("stable").wave == 1
    # Wave 2's gate is automatic but must soak again.
    wave1 = [
        f"d{i}" for i in range(2000) if not is_member(f"d{i}", r.id, 10) and is_member(f"d{i}", r.id, 50)
    ][:2]
    svc.observe(_report(wave1[0], "2.0"))
    assert svc.current("stable").wave == 1  # type: ignore[union-attr]
    # One failure does not halt (halt_after=2); a second does, and blocks the gate.
    svc.observe(_report(wave1[0], "1.0", bad=["2.0"]))
    assert svc.current("stable").state == "running"  # type: ignore[union-attr]
    svc.observe(_report(wave1[1], "1.0", bad=["2.0"]))
    assert svc.current("stable").state == "halted"  # type: ignore[union-attr]
    ds = repo.desired_state("stable")
    assert ds is not None and ds.rollout is not None and ds.rollout["state"] == "halted"
    with pytest.raises(InputError):
        svc.resume("stable")
    assert svc.ack("stable").state == "paused"
    assert svc.resume("stable").state == "running"
    clock.advance(timedelta(seconds=301))
    # Acknowledged failures no longer block: 3 healthy >= 2 and the wave soaked, so the gate opens.
    assert svc.tick("stable") == ["advance"] and svc.current("stable").wave == 2  # type: ignore[union-attr]
    r = svc.abort("stable", revert=False)
    assert r.state == "aborted"
    ds = repo.desired_state("stable")
    assert ds is not None and ds.rollout is not None and ds.rollout["state"] == "aborted"
    assert svc.abort("stable", revert=True).state == "reverted"
    with pytest.raises(InputError):
        svc.pause("stable")


def test_recall_reverts_a_rollout_of_the_withdrawn_version_and_blocks_restarting_it(tmp_path: Path) -> None:
    clock = FakeClock()
    repo = _repo(tmp_path, clock)
    svc = RolloutService(repo, clock=clock)
    svc.start(RolloutSpec(channel="stable", module="clf", version="2.0"))
    out = svc.recall("stable", "clf", ["2.0"], "3.0", reason="bad batch")
    assert out["kind"] == "forward"
    assert svc.current("stable").state == "reverted"  # type: ignore[union-attr]
    ds = repo.desired_state("stable")
    assert ds is not None and ds.modules["clf"].version == "3.0" and ds.recalls[0]["withdrawn"] == ["2.0"]
    with pytest.raises(InputError, match="recalled"):
        svc.start(RolloutSpec(channel="stable", module="clf", version="2.0"))
    with pytest.raises(InputError):
        svc.recall("stable", "clf", ["3.0"], "3.0")
    with pytest.raises(InputError, match="not published"):
        svc.recall("stable", "clf", ["9.9"], "1.0")


def test_recall_reaches_an_offline_device_by_bundle(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        repo, clock = env.repo, env.clock
        for v in ("1.0", "2.0"):
            f = tmp_path / f"clf-{v}.bin"
            f.write_bytes(v.encode() * 100)
            repo.publish("stable", f, ModuleManifest(name="clf", version=v, mode="file", filename="m.bin"))
        repo.release("stable", "clf", "2.0")
        rec = Reconciler(env.paths, env.puller().pull, clock)
        assert [o.result for o in rec.run_once().outcomes] == ["committed"]
        RolloutService(repo, clock=clock).recall("stable", "clf", ["2.0"], "1.0")
        bundle = tmp_path / "usb"
        export_bundle(repo, "stable", bundle)
        rec.source = env.puller(source=str(bundle)).pull
        (o,) = rec.run_once().outcomes
        assert (o.result, o.version, o.previous) == ("committed", "1.0", "2.0")
    finally:
        env.server.stop()


# ---------------------------------------------------------------------------- authentication over HTTP
def test_fleet_api_needs_a_device_signature_or_an_operator_token(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        repo, clock = env.repo, env.clock
        svc = RolloutService(repo, clock=clock)
        fleet = FleetDB(svc.fleet_dir, clock)
        env.server.stop()
        from hub.server import build_hub_app
        from sre_core.http_server import ServerThread

        server = ServerThread(build_hub_app(repo.dir, fleet_routes(repo.dir, svc, clock, fleet))).start()
        url = server.url
        ident = load_identity(env.paths)
        with httpx.Client(timeout=10) as c:
            report = device_report(env.paths, "stable", clock)
            # Not enrolled yet: refused.
            with pytest.raises(httpx.HTTPStatusError) as exc:
                send_report(url, env.paths, report, clock, c)
            assert exc.value.response.status_code == 401
            fleet.enroll(ident.device_id, ident.public_pem)
            assert send_report(url, env.paths, report, clock, c)["status"] == "stored"
            assert svc.reports.all()[ident.device_id]["channel"] == "stable"
            # Unsigned, or signed for another device id in the body.
            body = json.dumps(report).encode()
            assert c.post(url + "/v1/fleet/reports", content=body).status_code == 401
            other = json.dumps({**report, "device_id": "dev-someone-else"}).encode()
            hdrs = sign_request("POST", url + "/v1/fleet/reports", other, ident.private_key, ident.device_id,
                                int(clock.now().timestamp()), secrets.token_hex(8))  # fmt: skip
            assert c.post(url + "/v1/fleet/reports", content=other, headers=hdrs).status_code == 400
            malformed = json.dumps({**report, "modules": {"clf": {"bad": "not-a-list"}}}).encode()
            now_s = int(clock.now().timestamp())
            mh = sign_request("POST", url + "/v1/fleet/reports", malformed, ident.private_key,
                              ident.device_id, now_s, secrets.token_hex(8))  # fmt: skip
            answer = c.post(url + "/v1/fleet/reports", content=malformed, headers=mh)
            assert answer.status_code == 400 and "modules.clf.bad" in answer.json()["error"]
            # A replayed request is refused.
            assert c.post(url + "/v1/fleet/reports", content=other, headers=hdrs).status_code == 401
            fleet.revoke(ident.device_id)
            with pytest.raises(httpx.HTTPStatusError) as exc:
                send_report(url, env.paths, report, clock, c)
            assert exc.value.response.status_code == 403
            # Operator endpoints: no token / a wrong token -> 401; the issued token works.
            for path in ("/v1/fleet/status", "/v1/dora", "/v1/rollouts/stable"):
                assert c.get(url + path).status_code == 401
                assert c.get(url + path, headers={"Authorization": "Bearer nope"}).status_code == 401
            token = issue_operator_token(repo.dir, "alice")
            auth = {"Authorization": f"Bearer {token}"}
            assert c.get(url + "/v1/fleet/status", headers=auth).json()["summary"]["enrolled"] == 1
            assert c.post(url + "/v1/rollouts/stable/pause").status_code == 401
            f = tmp_path / "v2.bin"
            f.write_bytes(b"v2" * 50)
            repo.publish(
                "stable", f, ModuleManifest(name="clf", version="2.0", mode="file", filename="m.bin")
            )
            started = c.post(
                url + "/v1/rollouts/stable/start", headers=auth, json={"module": "clf", "version": "2.0"}
            )
            assert started.status_code == 200 and started.json()["state"] == "running"
            assert svc.current("stable").history[0]["actor"] == "alice"  # type: ignore[union-attr]
            assert c.post(url + "/v1/rollouts/stable/resume", headers=auth).status_code == 409
            assert c.get(url + "/v1/rollouts/stable", headers=auth).json()["state"] == "running"
            # Static repository reads stay open.
            assert c.get(url + "/metadata/timestamp.json").status_code == 200
        server.stop()
    finally:
        env.server.stop()


# ---------------------------------------------------------------------------- channels + DORA
def test_channel_matrix_has_one_delegated_key_per_channel_and_promotion_follows_criteria(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    repo = _repo(tmp_path, clock, channels=("staging", "pre-prod", "fleet"))
    svc = RolloutService(repo, clock=clock)
    ch = Channels(svc)
    names = ch.ensure_matrix(["Acme", "Globex"], ["orin-nx"], ["EU MDR", "us-fda"])
    assert names[0] == "acme.orin-nx.eu-mdr" and len(names) == 4
    assert matrix_channel("Acme", "orin-nx", "EU MDR") == names[0]
    targets = json.loads((repo.metadata_dir / "current" / "targets.json").read_text())["signed"][
        "delegations"
    ]
    keyids = [tuple(targets["roles"][i]["keyids"]) for i in range(len(targets["roles"]))
              if targets["roles"][i]["name"] in names]  # fmt: skip
    assert len(keyids) == 4 and len(set(keyids)) == 4
    # staging -> pre-prod: not soaked, no healthy devices -> refused with the reasons.
    crit = PromotionCriteria(soak_s=3600, min_healthy=2, max_failures=0)
    with pytest.raises(InputError, match="soaked"):
        ch.promote("clf", "1.0", "staging", "pre-prod", crit)
    clock.advance(timedelta(hours=2))
    for d in ("a", "b"):
        svc.reports.put(_report(d, "1.0", channel="staging"))
    svc.reports.put(_report("c", "0.9", bad=["1.0"], channel="staging"))
    with pytest.raises(InputError, match="failed"):
        ch.promote("clf", "1.0", "staging", "pre-prod", crit)
    out = ch.promote("clf", "1.0", "staging", "pre-prod", PromotionCriteria(3600, 2, 1))
    assert out["to"] == "pre-prod" and not out["forced"]
    ds = repo.desired_state("pre-prod")
    assert ds is not None and ds.modules["clf"].target.startswith("pre-prod/")
    v = judge_promotion({}, "clf", "1.0", None, clock.now(), crit)
    assert not v.ok and len(v.reasons) == 2


def test_dora_from_signed_publications_and_device_ledgers(tmp_path: Path) -> None:
    clock = FakeClock()
    repo = _repo(tmp_path, clock)
    svc = RolloutService(repo, clock=clock)
    issued = repo.desired_state("stable").issued  # type: ignore[union-attr]
    clock.advance(timedelta(hours=1))
    repo.release("stable", "clf", "2.0")
    t = issued.isoformat()
    at = (issued + timedelta(seconds=600)).isoformat()
    ledger_ok = {
        "clf@1.0": {"module": "clf", "version": "1.0", "seen_at": at, "committed_at": at, "link_gap_s": 500}
    }
    ledger_bad = {
        "clf@1.0": {"module": "clf", "version": "1.0", "seen_at": t, "rolled_back_at": t, "flip_ms": 3}
    }
    svc.reports.put({**_report("a", "1.0"), "ledger": ledger_ok})
    svc.reports.put({**_report("b", "0.9"), "ledger": ledger_bad})
    assert [(p.version, p.serial) for p in publications(repo)] == [("1.0", 1), ("2.0", 2)]
    d = compute_dora(repo, svc.reports)
    assert d.deployments == 2 and d.exposures == 2 and d.failures == 1 and d.change_failure_rate == 0.5
    assert d.lead_time_s["median"] == 600 and d.disconnected_s["median"] == 500
    assert d.lead_time_connected_s["median"] == 100 and d.mttr_ms["median"] == 3


def test_dora_counts_aborted_rollouts_and_recalls_as_failed_releases(tmp_path: Path) -> None:
    clock = FakeClock()
    repo = _repo(tmp_path, clock)
    svc = RolloutService(repo, clock=clock)
    svc.start(RolloutSpec(channel="stable", module="clf", version="2.0", soak_s=0))
    svc.abort("stable", revert=True)  # no device ever failed it: the hub's own record does
    assert compute_dora(repo, svc.reports).releases_with_failures == 1
    svc.recall("stable", "clf", ["1.0"], "3.0", "bad calibration")
    d = compute_dora(repo, svc.reports)
    why = {p["version"]: p["hub_failure"] for p in d.per_release}
    assert why["2.0"] == ["reverted"] and why["1.0"] == ["recalled"] and d.releases_with_failures == 2


# ---------------------------------------------------------------------------- CLI
def test_cli_rollout_recall_fleet_status_dora(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    from sre_core.clock import SystemClock

    clock = FakeClock(SystemClock().now().replace(microsecond=0))
    repo = _repo(tmp_path, clock)
    r = str(repo.dir)
    res = run_cli("sre-hub", "rollout", "start", "--repo", r, "-c", "stable", "-m", "clf", "-v", "2.0",
                  "--waves", "20,100", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["waves"][0]["percent"] == 20
    base = ["sre-hub", "rollout", "start", "--repo", r, "-c", "stable", "-m", "clf", "-v", "3.0"]
    res = run_cli(*base, "--waves", "50,10")
    assert res.returncode == 2 and "cumulative" in res.stderr
    res = run_cli(*base)
    assert res.returncode == 2 and "is running" in res.stderr
    res = run_cli("sre-hub", "rollout", "abort", "--repo", r, "-c", "stable")
    assert res.returncode == 2 and "--keep or --revert" in res.stderr + res.stdout
    res = run_cli("sre-hub", "rollout", "status", "--repo", r, "-c", "stable")
    assert res.returncode == 0 and "wave" in res.stdout and "20 %" in res.stdout
    res = run_cli(
        "sre-hub",
        "recall",
        "--repo",
        r,
        "-c",
        "stable",
        "-m",
        "clf",
        "--withdraw",
        "2.0",
        "--to",
        "1.0",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["kind"] == "down"
    res = run_cli("sre-hub", "fleet", "status", "--repo", r, "--json")
    assert (
        res.returncode == 0 and json.loads(res.stdout)["channels"]["stable"]["rollout"]["state"] == "reverted"
    )
    res = run_cli("sre-hub", "dora", "--repo", r)
    assert res.returncode == 0 and "deployment frequency" in res.stdout


def test_device_group_rollout_touches_only_the_group(tmp_path: Path) -> None:
    group = [f"d{i}" for i in range(10)]
    doc = {**_ro("completed", 2), "group": group}
    assert resolve(_desired(doc), "d3", {"clf": "1.0"}).modules["clf"].version == "2.0"
    assert "clf" not in resolve(_desired(doc), "outsider", {"clf": "1.0"}).modules  # keeps what it runs
    running = {**_ro("running", 2), "group": group}
    assert "clf" not in resolve(_desired(running), "outsider", {"clf": "1.0"}).modules

    clock = FakeClock()
    repo = _repo(tmp_path, clock)
    svc = RolloutService(repo, clock=clock)
    svc.start(RolloutSpec(channel="stable", module="clf", version="2.0", waves=[100], soak_s=0, min_devices=2,
                          group=group))  # fmt: skip
    svc.observe(_report("outsider", "1.0", bad=["2.0"]))  # not in the group: not counted, no halt
    assert svc.current("stable").state == "running"  # type: ignore[union-attr]
    svc.observe(_report("d1", "2.0"))
    svc.observe(_report("d2", "2.0"))  # gates are O(1) counters now: evaluated on every report
    assert svc.current("stable").state == "completed"  # type: ignore[union-attr]
    ds = repo.desired_state("stable")
    assert ds is not None and ds.modules["clf"].version == "1.0"  # the channel's baseline is unchanged
    assert ds.rollout is not None and ds.rollout["group"] == sorted(group)


def test_members_unreachable_since_the_start_never_hold_the_gate(tmp_path: Path) -> None:
    clock = FakeClock()
    repo = _repo(tmp_path, clock)
    svc = RolloutService(repo, clock=clock)
    rid = "stable-clf-2.0-1"  # the id the first rollout of clf 2.0 in stable gets
    members = [f"d{i}" for i in range(2000) if is_member(f"d{i}", rid, 10)][:4]
    for d in members[:3]:
        svc.observe(_report(d, "1.0"))  # heard from once, before the rollout, then silent
    clock.advance(timedelta(seconds=1))
    r = svc.start(RolloutSpec(channel="stable", module="clf", version="2.0", soak_s=60, min_devices=5))
    assert r.id == rid
    clock.advance(timedelta(seconds=61))
    svc.observe(_report(members[3], "2.0"))
    st = svc.status("stable")
    assert st.waves[0].members_known == 4 and st.waves[0].reachable == 1
    assert svc.current("stable").wave == 1  # type: ignore[union-attr]
