"""Live-fault acceptance: the real ``sre-agent run`` as a child process, a real hub on loopback, a client
sending inference traffic throughout, faults injected from outside the daemon's process.

Each scenario asserts the end state from outside (what the client is served, the slot state, the audit
trail, the escalations) and records its time to recovery (printed, and appended as one JSON line to
``$SRE_LIVE_FAULTS_OUT`` when set). Intervals are shortened through the daemon's own settings.

1. the active model's bytes corrupted after a canary promoted it -> the last-known-good serves, the
   corrupted version is marked bad, the incident is closed;
2/7. the active model corrupted with no valid standby -> an escalation proposes safe mode, reaches the
   hub with the uploaded telemetry, while the device keeps serving what it has; an operator approves;
   the daemon enters safe mode and holds it across reconciles until ``safe-mode exit``;
3. a new version whose health probe hangs -> rolled back, marked bad, the incident reported and closed;
4. a promoted version, then its SLO burns (the hub stops acknowledging; the sync SLO tightened through
   the settings) -> the matching rule's action or an escalation, with ``since_flip_s`` and ``versions``;
5. the disk below the policy's reserve (4 GiB of ballast under a reserve 2 GiB below free space) -> an
   alert; non-essential work stops (no chaos experiment is even pre-flighted; the status says why);
   serving, the slots and the audit chain intact;
6. a sanctioned chaos experiment (standby corruption) whose fault cannot be undone (its backup is lost
   from outside during the run) -> the run passes its hypothesis, yet the damage measured after the
   cleanup is escalated with the evidence (cleanup report, re-run checks), and reaches the hub;
8. ``kill -9`` of the daemon while it handles an incident -> after the restart the incident is handled
   exactly once (one rollback, never a flip back onto the corrupted bytes).
1b. a fault that recurs after its incident closed (corrupted and restored five times) -> every
   occurrence gets a reaction; the flapping fault goes to a human once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployment.manifest import ProbeSpec
from deployment.sample_models import linear_classifier
from hub.operators import HubEscalations
from sre_core.audit import AuditLog
from sre_core.clock import SystemClock
from tests.live_harness import EXE, PULL_S, Client, Live, live_rig  # noqa: F401 (re-exported)
from tests.live_harness import clean_stop as _clean_stop
from tests.live_harness import record as _record
from tests.live_harness import relabel as _relabel
from tests.live_harness import serving as _serving

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("live-faults")]  # one worker: one daemon at a time


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with live_rig(tmp_path) as lv:
        yield lv


def test_corrupted_active_after_promotion_serves_the_last_known_good(live: Live) -> None:
    v1 = linear_classifier(seed=1)
    live.publish("1.0", v1)
    client = _serving(live)
    try:
        live.publish("2.0", _relabel(v1, "2.0"))
        live.wait(lambda: client.first_after(0, "2.0"), "the canary of 2.0", timeout=180)
        live.wait(
            lambda: live.status().phase.value == "idle" and live.status().active.version == "2.0",
            "2.0 promoted",
        )  # type: ignore[union-attr]
        bad_sha = live.status().active.sha256  # type: ignore[union-attr]
        t0 = time.monotonic()
        live.corrupt_active()
        t1 = live.wait(lambda: client.first_after(t0, "1.0"), "the client served by the last-known-good")
        live.wait(lambda: live.status().active.version == "1.0", "slots: 1.0 active")  # type: ignore[union-attr]
        st = live.status()
        assert bad_sha in st.bad, st.bad  # the corrupted version is marked bad
        closed = live.wait(
            lambda: not [i for i in live.open_incidents() if i.get("version") == "2.0"], "the incident closed"
        )
        time.sleep(1.0)
        assert set(client.last(20)) == {"1.0"}
        events = live.events()
        acts = [e["data"] for e in events if e["event"] == "triage.action"]
        assert any(a["action"] in ("rollback", "quarantine") and a["ok"] for a in acts), acts
        assert [e["event"] for e in events].count("slot.rolled_back") == 1
        _record(
            "1 corrupt active after promotion",
            "last-known-good 1.0 serves; 2.0 marked bad; incident closed",
            t1 - t0,
            closed_after_s=round(closed - t0, 2),
            client_errors=client.error_kinds(),
            client_errors_from_first_2_0_answer=client.error_kinds(client.first_after(0, "2.0") or t0),
            client_errors_after_fault=client.error_kinds(t0),
        )
    finally:
        client.stop()
    _clean_stop(live)


def test_approved_safe_mode_holds_across_reconciles_until_exit(live: Live) -> None:
    from policies.approvals import OperatorRoster, generate_operator_key, public_key_b64, sign_approval
    from sre_agent.escalations import EscalationStatus, EscalationStore, escalations_dir

    key = generate_operator_key()
    roster = OperatorRoster(
        version=1, operators=[{"id": "alice", "public_key": public_key_b64(key.public_key())}]
    )
    (live.paths.policies / "operators.yaml").write_text(yaml.safe_dump(roster.model_dump(mode="json")))
    live.publish("1.0", linear_classifier(seed=1))
    client = _serving(live)
    try:
        # Scenario 2: the only version corrupted, nothing to roll back to -> an escalation; serving goes on.
        t0 = time.monotonic()
        live.corrupt_active()
        store = EscalationStore(escalations_dir(live.paths), AuditLog(live.paths.audit_log), SystemClock())
        t1 = live.wait(lambda: store.select(EscalationStatus.OPEN), "an escalation")
        (esc,) = store.select(EscalationStatus.OPEN)
        assert esc.proposed_action == "safe_mode"
        hub_esc = HubEscalations(live.repo.dir, SystemClock())
        t_hub = live.wait(lambda: esc.id in hub_esc.load(), "the escalation at the hub", 90)
        assert client.first_after(t1, "1.0"), "the device stopped serving while it waited for an operator"
        _record(
            "2 corrupt active, no valid standby",
            f"escalation {esc.proposed_action} for an operator, at the hub; 1.0 keeps serving",
            t1 - t0,
            at_hub_after_s=round(t_hub - t0, 2),
            client_errors=client.error_kinds(),
            client_errors_after_fault=client.error_kinds(t0),
        )
        # Scenario 7: the operator approves; the daemon enters safe mode and holds it.
        approval = sign_approval(
            key,
            operator="alice",
            escalation_id=esc.id,
            escalation_hash=esc.content_hash,
            decision="approve",
            action="safe_mode",
            now=SystemClock().now(),
            ttl=timedelta(hours=1),
        )
        store.decide(approval, roster)
        t2 = time.monotonic()
        t3 = live.wait(
            lambda: json.loads((live.paths.root / "safemode.json").read_text())["active"], "safe mode"
        )
        held = json.loads((live.paths.root / "safemode.json").read_text())
        assert held["serial_at_entry"] is not None, held
        passes = live.names().count("reconcile.completed")
        live.wait(lambda: live.names().count("reconcile.completed") >= passes + 2, "two more reconciles", 60)
        assert json.loads((live.paths.root / "safemode.json").read_text())["active"], "safe mode was left"
        out = subprocess.run(
            [str(EXE), "safe-mode", "exit", "--state", str(live.paths.root), "--reason", "fixed"],
            env=live.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert not json.loads((live.paths.root / "safemode.json").read_text())["active"]
        assert any(e["event"] == "escalation.executed" for e in live.events())
        held_for = live.names().count("reconcile.completed") - passes
        _record(
            "7 operator-approved safe mode",
            f"held across {held_for} reconciles until safe-mode exit",
            t3 - t2,
        )
    finally:
        client.stop()
    _clean_stop(live)


def test_a_version_whose_health_probe_hangs_is_rolled_back_and_marked_bad(live: Live) -> None:
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)  # accepts connections, never answers: the probe hangs until its timeout
    try:
        live.publish("1.0", linear_classifier(seed=1))
        live.publish("1.0", b"threshold=0.5\n" * 8, module="cfg", canary=False, mode="file")
        client = _serving(live)
        try:
            live.wait(lambda: live.status("cfg").active is not None, "cfg 1.0 installed")
            probe = ProbeSpec(
                kind="http", url=f"http://127.0.0.1:{hang.getsockname()[1]}/healthz", timeout_s=1, attempts=2
            )
            t0 = time.monotonic()
            live.publish(
                "2.0", b"threshold=0.9\n" * 8, module="cfg", canary=False, mode="file", probes=[probe]
            )
            t1 = live.wait(lambda: live.seen("slot.rolled_back", away_version="2.0"), "cfg 2.0 rolled back")
            st = live.status("cfg")
            assert st.active is not None and st.active.version == "1.0"
            assert any(b["version"] == "2.0" for b in st.bad.values())
            live.wait(
                lambda: live.seen("incident.opened", kind="probe_failure"), "the probe failure reported"
            )
            live.wait(
                lambda: not [i for i in live.open_incidents() if i["kind"] == "probe_failure"],
                "the incident closed",
            )
            assert set(client.last(10)) == {"1.0"}
            _record(
                "3 hanging health probe", "cfg 2.0 rolled back to 1.0, marked bad, incident closed", t1 - t0
            )
        finally:
            client.stop()
    finally:
        hang.close()
    _clean_stop(live)


def test_kill_9_while_handling_an_incident_handles_it_exactly_once(live: Live) -> None:
    v1 = linear_classifier(seed=1)
    live.publish("1.0", v1)
    client = _serving(live)
    try:
        live.publish("2.0", _relabel(v1, "2.0"))
        live.wait(lambda: client.first_after(0, "2.0"), "the canary of 2.0", timeout=180)
        live.wait(
            lambda: live.status().phase.value == "idle" and live.status().active.version == "2.0",
            "2.0 promoted",
        )  # type: ignore[union-attr]
        t0 = time.monotonic()
        live.corrupt_active()
        live.wait(lambda: "incident.opened" in live.names(), "the incident opened", 60)
        live.kill9()  # in the middle of handling it
        killed_after = live.names()[-1]
        t_restart = time.monotonic()
        live.start()
        live.wait(lambda: live.names().count("daemon.started") == 2, "the restarted daemon")
        t1 = live.wait(
            lambda: client.first_after(t_restart, "1.0") and live.status().active.version == "1.0",  # type: ignore[union-attr]
            "the restarted daemon serving 1.0",
        )
        live.wait(
            lambda: not [i for i in live.open_incidents() if i.get("version") == "2.0"], "the incident closed"
        )
        time.sleep(3)  # more re-hash runs (every 2 s) after the restart
        # Exactly one move away from 2.0 (the responder's rollback, or the slot manager's own start-up
        # fallback from a corrupt active slot when the kill came first), never a flip back onto it.
        moves = [e for e in live.events() if e["event"] in ("slot.rolled_back", "slot.corrupt")]
        away = [e for e in moves if "2.0" in (e["data"].get("away_version"), e["data"].get("version"))]
        assert len(away) == 1, moves
        assert live.names().count("slot.flipped") == live.names()[
            : live.names().index("incident.opened")
        ].count("slot.flipped")  # no flip at all after the incident
        after = [
            (e["event"], e["data"].get("version"))
            for e in live.events()[live.names().index("incident.opened") :]
        ]
        assert live.status().active.version == "1.0", after  # type: ignore[union-attr]
        assert {v for t, v in client.served if t >= t1} == {"1.0"}, (killed_after, after)
        _record(
            "8 kill -9 mid-incident",
            "rolled back exactly once after the restart; incident closed",
            t1 - t0,
            killed_after=killed_after,
        )
    finally:
        client.stop()
    _clean_stop(live)


def test_disk_below_its_reserve_raises_an_alert_and_loses_nothing_essential(live: Live) -> None:
    import shutil

    # The reserve sits 2 GiB under today's free space; 4 GiB of ballast written from outside crosses it
    # (a real shortage without filling the machine's disk). Only the headroom check runs, every 2 s.
    free_mb = shutil.disk_usage(live.paths.root).free / 2**20
    (live.paths.policies / "verification.yaml").write_text(
        yaml.safe_dump(
            {
                "defaults": {"interval_s": 300, "jitter_s": 0, "max_parallel": 1},
                "checks": {"resources.headroom": {"interval_s": 2, "jitter_s": 0, "timeout_s": 30}},
                "reserves": {
                    "min_free_disk_mb": max(free_mb - 2048, 1.0),
                    "min_free_disk_pct": 0.0,
                    "min_available_memory_mb": 0.0,
                    "max_load_per_cpu": 1000.0,
                },
            }
        )
    )
    experiments = live.tmp / "experiments"
    experiments.mkdir()
    live.env |= {
        "SRE_AGENT_CHAOS__ENABLED": "true",
        "SRE_AGENT_CHAOS__EXPERIMENTS_DIR": str(experiments),
        "SRE_AGENT_CHAOS__INTERVAL_S": "10",
    }
    live.publish("1.0", linear_classifier(seed=1))
    client = _serving(live)
    ballast = live.tmp / "ballast.bin"
    try:
        time.sleep(3)  # a few passing headroom runs first
        assert not live.seen("incident.opened", kind="verification_failure"), live.names()[-10:]
        head_before = len(live.events())
        t0 = time.monotonic()
        with ballast.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, 4 * 2**30)
        t1 = live.wait(
            lambda: [
                a
                for a in live.events()[head_before:]
                if a["event"] == "triage.action"
                and a["data"].get("action") == "alert"
                and a["data"].get("ok")
            ],
            "an alert for the disk reserve",
            60,
        )
        opened = [
            e["data"]
            for e in live.events()
            if e["event"] == "incident.opened" and e["data"]["kind"] == "verification_failure"
        ]
        assert opened and opened[-1]["facts"].get("check") == "resources.headroom", opened
        # Non-essential work stops: an experiment dropped in now is never even pre-flighted.
        (experiments / "standby-corruption.yaml").write_text(CHAOS_STANDBY)
        t_skip = live.wait(lambda: live.seen("job.skipped", job="chaos"), "the chaos job skipped", 60)
        assert live.seen("work.nonessential_stopped"), live.names()[-20:]
        assert "chaos.preflight" not in live.names() and "chaos.run.started" not in live.names()
        out = subprocess.run(
            [str(EXE), "status", "--json", "--state", str(live.paths.root)],
            env=live.env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        work = json.loads(out.stdout)["daemon"]["work"]
        assert work["stop_nonessential"] and "chaos" in work["stopped_jobs"], work
        assert "reserve" in work["reason"], work
        # Nothing essential lost: the model keeps serving, the slots are untouched, the audit chain holds.
        time.sleep(2)
        assert client.first_after(t1, "1.0"), "serving stopped on a full disk"
        assert client.error_kinds(t0) == {}, client.error_kinds(t0)
        st = live.status()
        assert st.active is not None and st.active.version == "1.0" and not st.bad
        n, broken = AuditLog(live.paths.audit_log).verify()
        assert broken is None and n >= len(live.events()) - 5, broken
        _record(
            "5 disk below its reserve",
            "resources.headroom failed -> alert; chaos and the digest stop (status shows why); "
            "serving, slots and audit chain intact",
            t1 - t0,
            chaos_skipped_after_s=round(t_skip - t0, 2),
            facts=opened[-1]["facts"],
        )
    finally:
        ballast.unlink(missing_ok=True)
        client.stop()
    _clean_stop(live)


def test_a_promoted_version_that_burns_its_slo_is_acted_on_with_the_flip_facts(live: Live) -> None:
    from sre_agent.escalations import EscalationStatus, EscalationStore, escalations_dir

    # The SLOs the device evaluates are its sync and policy-age objectives (sre_agent/slo.py); the time
    # since the hub last acknowledged telemetry is tightened to 6 s through the daemon's settings, so a
    # hub that stops acknowledging burns it fast, minutes after 2.0 was promoted. Triage must act by the
    # matching rule (a sync SLO is never a reason to roll a model back) with the flip facts present.
    live.env["SRE_AGENT_DAEMON__SLO_MAX_SINCE_ACK_S"] = "6"
    v1 = linear_classifier(seed=1)
    live.publish("1.0", v1)
    client = _serving(live)
    try:
        live.publish("2.0", _relabel(v1, "2.0"))
        live.wait(lambda: client.first_after(0, "2.0"), "the canary of 2.0", timeout=180)
        live.wait(
            lambda: live.status().phase.value == "idle" and live.status().active.version == "2.0",  # type: ignore[union-attr]
            "2.0 promoted",
        )
        t0 = time.monotonic()
        live.hub.stop()  # the hub stops acknowledging: the time since its last ack grows past the SLO
        store = EscalationStore(escalations_dir(live.paths), AuditLog(live.paths.audit_log), SystemClock())

        def burn() -> dict[str, Any] | None:
            """The open slo_burn incident, once its rule's action ran or it escalated."""
            for inc in live.open_incidents():
                if inc.get("kind") != "slo_burn" or "burn_rate" not in inc.get("facts", {}):
                    continue
                if inc.get("actions") or inc.get("escalation") or store.select(EscalationStatus.OPEN):
                    return inc
            return None

        t1 = live.wait(burn, "the SLO burn acted on (the rule's action or an escalation)", 90)
        inc = burn()
        assert inc is not None
        facts = inc["facts"]
        assert "clf=2.0" in str(facts.get("versions")), facts  # the versions present at the burn
        assert isinstance(facts.get("since_flip_s"), float | int) and facts["since_flip_s"] < 3600, facts
        decisions = [
            e["data"]
            for e in live.events()
            if e["event"] == "triage.decision" and e["data"].get("incident_id") == inc["incident_id"]
        ]
        assert decisions and decisions[-1]["rule"].startswith("slo-"), decisions
        assert not live.seen("slot.rolled_back"), "a sync SLO rolled the model back"
        time.sleep(1.0)
        assert client.first_after(t1, "2.0"), ("2.0 stopped serving", client.error_kinds(t0), client.last(5))
        _record(
            "4 promoted version burns its SLO",
            f"rule {decisions[-1]['rule']} -> {decisions[-1]['action']}"
            + (" (escalated)" if inc.get("escalation") else ""),
            max(t1 - t0, 0.0),
            decided_before_fault=t1 - t0 < 0.5,
            facts={k: facts.get(k) for k in ("slo", "burn_rate", "since_flip_s", "versions")},
        )
    finally:
        client.stop()
    _clean_stop(live)


def test_a_fault_that_recurs_after_its_incident_closed_is_acted_on_every_time(live: Live) -> None:
    """The standby slot's bytes corrupted from outside, detected, restored, and again, five times: every
    occurrence gets a reaction (an alert, an escalation, or joins the escalation an operator has);
    nothing is swallowed as a duplicate of the closed incident."""
    live.publish("1.0", linear_classifier(seed=1))
    live.publish("1.0", b"threshold=0.5\n" * 8, module="cfg", canary=False, mode="file")
    client = _serving(live)
    try:
        live.wait(lambda: live.status("cfg").active is not None, "cfg 1.0 installed")
        live.publish("2.0", b"threshold=0.7\n" * 8, module="cfg", canary=False, mode="file")
        live.wait(
            lambda: (
                live.status("cfg").phase.value == "idle"
                and live.status("cfg").active.version == "2.0"  # type: ignore[union-attr]
                and live.status("cfg").standby is not None
            ),
            "cfg 2.0 active, 1.0 standby",
            60,
        )
        standby = live.status("cfg").standby
        assert standby is not None
        original = standby.artifact_path.read_bytes()
        reactions: list[str] = []
        ttrs: list[float] = []
        for n in range(5):
            mark = len(live.events())
            t0 = time.monotonic()
            standby.artifact_path.write_bytes(b"\xff" * 16 + original[16:])  # corrupted from outside

            def reacted(mark: int = mark) -> str | None:
                """The strongest reaction so far: escalated > joined an escalation > alerted."""
                seen = set()
                for e in live.events()[mark:]:
                    d = e["data"]
                    if e["event"] == "triage.action" and d.get("action") == "alert" and d.get("ok"):
                        seen.add("alert")
                    if e["event"] == "escalation.created":
                        seen.add("escalated")
                    if e["event"] == "incident.recurred" and d.get("escalation"):
                        seen.add("joined")
                return next((r for r in ("escalated", "joined", "alert") if r in seen), None)

            ttrs.append(live.wait(reacted, f"a reaction to occurrence {n + 1}", 30) - t0)
            reactions.append(str(reacted()))
            standby.artifact_path.write_bytes(original)  # restored from outside
            live.wait(lambda: not live.open_incidents(), f"occurrence {n + 1} closed", 30)
        assert reactions[:3] == ["alert"] * 3, reactions
        assert reactions[3] == "escalated" and reactions[4] == "joined", reactions
        recurred = [e["data"] for e in live.events() if e["event"] == "incident.recurred"]
        assert [r["occurrences"] for r in recurred] == [2, 3, 4, 5], recurred
        assert set(client.last(10)) == {"1.0"}
        cfg = live.status("cfg")
        assert cfg.active is not None and cfg.active.version == "2.0" and not cfg.bad, (
            cfg,
            live.names()[-30:],
        )
        _record(
            "1b a fault recurring after its incident closed",
            f"5 occurrences, 5 reactions: {reactions}",
            max(ttrs),
            reactions=reactions,
            ttr_each_s=[round(t, 2) for t in ttrs],
        )
    finally:
        client.stop()
    _clean_stop(live)


CHAOS_STANDBY = """
title: A corrupted standby slot is detected and restored
description: corrupt_standby_slot on the file module cfg; the cleanup restores the bytes.
steady-state-hypothesis:
  title: the active slot serves
  probes:
    - {type: probe, name: serving-ready, tolerance: true,
       provider: {type: python, module: chaos.probes, func: serving_ready}}
method:
  - type: action
    name: corrupt-standby
    provider:
      type: python
      module: chaos.actions
      func: corrupt_standby_slot
      arguments: {module: cfg, nbytes: 16}
    pauses: {after: 6}
rollbacks:
  - {type: action, name: restore-standby, provider: {type: python, module: chaos.actions, func: clear_faults}}
"""


def test_chaos_damage_that_persists_after_cleanup_is_escalated_with_the_evidence(live: Live) -> None:
    from chaos.faults import chaos_dir
    from sre_agent.escalations import EscalationStatus, EscalationStore, escalations_dir

    experiments = live.tmp / "experiments"
    experiments.mkdir()
    # The shipped chaos policy, with CPU headroom for a loaded 2-core test machine.
    shipped = Path(__file__).resolve().parent.parent / "policies/defaults/chaos.yaml"
    pol = yaml.safe_load(shipped.read_text())
    pol.setdefault("headroom", {})["max_cpu_load"] = 1000.0
    (live.paths.policies / "chaos.yaml").write_text(yaml.safe_dump(pol))
    live.env |= {
        "SRE_AGENT_CHAOS__ENABLED": "true",
        "SRE_AGENT_CHAOS__EXPERIMENTS_DIR": str(experiments),
        "SRE_AGENT_CHAOS__INTERVAL_S": "10",
    }
    live.publish("1.0", linear_classifier(seed=1))
    live.publish("1.0", b"threshold=0.5\n" * 8, module="cfg", canary=False, mode="file")
    client = _serving(live)
    try:
        live.wait(lambda: live.status("cfg").active is not None, "cfg 1.0 installed")
        live.publish("2.0", b"threshold=0.7\n" * 8, module="cfg", canary=False, mode="file")
        live.wait(
            lambda: (
                live.status("cfg").phase.value == "idle"
                and live.status("cfg").active.version == "2.0"  # type: ignore[union-attr]
                and live.status("cfg").standby is not None
            ),
            "cfg 2.0 active, 1.0 standby",
            60,
        )
        (experiments / "standby-corruption.yaml").write_text(CHAOS_STANDBY)
        backups = chaos_dir(live.paths.root) / "backup"
        live.wait(lambda: any(backups.glob("cfg-*")), "the experiment corrupting the standby", 60)
        t0 = time.monotonic()
        for b in backups.glob("cfg-*"):
            b.unlink()  # from outside: the fault's undo data is lost while the experiment runs
        store = EscalationStore(escalations_dir(live.paths), AuditLog(live.paths.audit_log), SystemClock())

        def chaos_escalation() -> Any:
            return next(
                (
                    e
                    for e in store.select(EscalationStatus.OPEN)
                    if e.content["incident"].get("kind") == "chaos_deviation"
                ),
                None,
            )

        t1 = live.wait(chaos_escalation, "an escalation of the damage left after cleanup", 60)
        esc = chaos_escalation()
        inc = esc.content["incident"]
        assert inc["facts"]["persisted_after_cleanup"] is True, inc["facts"]
        assert inc["facts"]["experiment"] == "standby-corruption.yaml", inc["facts"]
        # the evidence: the cleanup's report, and the guarding check re-run after it, still failing
        logs = [line for line in inc["evidence"]["logs"] if '"rechecked"' in line]
        assert logs, inc["evidence"]
        assert '"integrity.slots": false' in logs[-1] or inc["facts"]["cleanup_ok"] is False, logs
        assert '"cleanup"' in logs[-1], logs
        st = live.status("cfg")
        assert st.active is not None and st.active.version == "2.0"  # the active slot was never touched
        runs = [e["data"] for e in live.events() if e["event"] == "chaos.run.finished"]
        hub_esc = HubEscalations(live.repo.dir, SystemClock())
        t_hub = live.wait(lambda: esc.id in hub_esc.load(), "the escalation at the hub", 90)
        assert set(client.last(10)) == {"1.0"}, "serving stopped"
        _record(
            "6 chaos damage persists after cleanup",
            f"run {runs[-1].get('verdict') if runs else '?'}; damage escalated ({esc.proposed_action}) "
            "with the cleanup report; at the hub",
            t1 - t0,
            at_hub_after_s=round(t_hub - t0, 2),
            facts={k: inc["facts"].get(k) for k in ("verdict", "persisted_after_cleanup", "cleanup_ok")},
        )
    finally:
        client.stop()
    _clean_stop(live)
