"""Red team of the regional tier: trust must stay end to end through a compromised regional hub.

Written before any regional implementation existed (issue 19), from the device and root-hub code only.
The threat: whatever sits between the root hub and a device (a regional hub at a site, a mirror, the
site's network) is under the attacker's control. It holds no signing key of the root (root, targets,
channel roles, online snapshot/timestamp keys), no device key and no operator key; it may hold every
byte that ever passed through it, edit its own disk, answer devices and the root however it likes, and
hold, drop, duplicate and reorder traffic. It may also be an *enrolled* party at the root (a regional
identity, or a stolen device key of its own site), so its own signature must never stand in for a
device's or an operator's.

Outcomes, from outside only (slots, the device's audit trail and held record, the root's lake rows,
receipts, reported/attested state, rollout counters and ``fleet status``):

- REFUSED-DEVICE: the device refuses (``pull.refused`` or ``escalation.*_refused`` audited), installs
  nothing, keeps serving what it served, and its held record is unchanged.
- REFUSED-ROOT: the root answers 4xx and nothing lands (no receipt, no lake row, no state change).
- DETECTABLE: the attack cannot be prevented by signatures alone (withholding), but it is bounded and
  visible at the root: the device's signed report shows it behind (drift), its sync age grows, or the
  freeze ends at the signed expiry of what the tier replays.

Down the tier (the signed repository, desired state, recalls, approvals)

====  ===========================================================  ===================================
id    attack                                                        expected
====  ===========================================================  ===================================
D1    timestamp.json altered (version/expiry/hashes edited, the     REFUSED-DEVICE (signature)
      signature kept)
D2    snapshot altered (a role's version bumped, signature kept)    REFUSED-DEVICE
D3    channel targets role altered: a target's hash and length      REFUSED-DEVICE
      swapped for the tier's own artifact
D4    desired-state.json swapped for another signed version's       REFUSED-DEVICE (hash mismatch)
      bytes (the baseline instead of the release) or edited
D5    far future: x-sre-issued edited to a time years ahead so a    REFUSED-DEVICE; trusted time
      later replay looks fresh                                      (clock.json) does not move
D6    rollback: the whole older, validly signed repository served   REFUSED-DEVICE (version went back)
      to a device that saw the newer one
D7    freeze: an old complete repository copy served (304 to every  DETECTABLE: the device's report
      poll, or old bytes) so a new release / a recall never         shows drift at the root; at the
      arrives                                                       replayed timestamp's expiry the
                                                                    device refuses it (expired)
D7b   the same freeze by answering 304 Not Modified to every         DETECTABLE (drift); the held copy's
      timestamp poll                                                expiry ends it (refused)
D8    swapped roles: the beta channel's signed role served as the   REFUSED-DEVICE
      stable role (valid signature, wrong role)
D9    target bytes altered, truncated, or swapped for another       REFUSED-DEVICE; CAS clean, no
      signed version's bytes                                        partial, slots unchanged
D10   recalled version: after a recall, the tier replays the        REFUSED-DEVICE for a device that saw
      pre-recall repository (names the withdrawn version)           the recall; a fresh device only until
                                                                    the replayed timestamp expires;
                                                                    root shows the drift
D11   on-disk edits of a regional mirror (metadata, targets,        same as D1-D9: nothing is re-signed,
      partial files) served to devices                              so every edit is caught
D12   a whole repository re-signed with the tier's own keys         REFUSED-DEVICE (no chain to the
      (D12, D13 and F1 were added after the first commit)           pinned root)
D13   a next root version (2.root.json) the tier signed itself,     REFUSED-DEVICE; the trusted root stays
      answered to the device's rotation probe                       version 1
F1    a device listing several hubs meets a tier that alters a      REFUSED for that source (audited with
      target                                                        its URL); the next source delivers
F2    a frozen first hub (D7) in front of a device that also lists  the release arrives from the root once
      the root                                                      the replayed timestamp expired
A1    approval altered on the way down: the action changed to a     REFUSED-DEVICE (signature);
      more severe one                                               escalation stays open, nothing runs
A2    a valid approval for another device's escalation delivered    REFUSED-DEVICE (bound to the other
      to this device (renamed to this escalation's id)              escalation's id and content hash)
A3    an old approval replayed after it was executed                REFUSED-DEVICE (audit trail), the
                                                                    action ran exactly once
A4    an approval held back until it expired, then delivered        REFUSED-DEVICE (expired)
A5    an approval forged with the tier's own key (not in the        REFUSED-DEVICE (unknown operator /
      signed operator roster)                                       signature)
====  ===========================================================  ===================================

Up the tier (device batches, reports, attestations, escalations)

====  ===========================================================  ===================================
U1    batch body altered (rows edited), device headers kept         REFUSED-ROOT (forged digest)
U2    batch re-signed by the tier's own enrolled key (rows of       REFUSED-ROOT (rows not of the
      another device)                                               signer); nothing lands
U3    batch acknowledged to the device ("stored") but never         the device keeps it until the root's
      forwarded                                                     signed receipt for it comes back
                                                                    (none without the root's key); the
                                                                    re-send lands it, exactly once
U4    batch duplicated (sent twice, and replayed later)             lands exactly once (duplicate /
                                                                    replayed)
U5    batches reordered                                             every batch lands exactly once
U6    report altered (failed -> healthy on the candidate, or a      REFUSED-ROOT; rollout counters and
      withdrawn version hidden)                                     the stored report unchanged
U7    reports reordered: an older, validly signed report (healthy)  the root keeps the newest report by
      delivered after the newer one (rolled back) to hide a         the device's signed time: the
      failure from the halt rule                                    failure still counts
U8    attestation altered, or an older attestation replayed after   REFUSED-ROOT / ignored: the attested
      a newer one                                                   state stays the newest genuine one
U9    another device's attestation wrapped in the tier's own        REFUSED-ROOT
      signed request
S1    the tier lies about site sync (claims in sync while it        DETECTABLE: the root's view is built
      serves a frozen repository)                                   from device-signed reports (drift,
                                                                    serial) and the root's own records
                                                                    of the site, never the tier's claim
====  ===========================================================  ===================================

Added after reading the regional hub (hub/regional, hub/sites.py, hub/approvals_api.py), against what it adds

====  ===========================================================  ===================================
R1    mirrored metadata edited on the regional disk                 REFUSED-DEVICE; the next down-sync
                                                                    republishes the verified bytes
R2    a served target edited at rest, same length                   REFUSED-DEVICE; the next down-sync
                                                                    heals it (re-hashed, re-fetched)
R3    spooled batch/report bodies and the device header edited      REFUSED-ROOT, recorded as refused at
      in the regional spool                                         the site; nothing lands
R4    spool items duplicated, reordered and replayed 20 days        lands once; the newest report wins
      later (a site token relays 30-day-old requests, no nonce)     (relayed requests are idempotent)
R5    the ``sre-hub regional`` process itself: a served target and  REFUSED-DEVICE; after a restart the
      a spooled batch edited on its disk while it runs              root refuses the batch (nothing lands)
U7b   U7's consequence on a rollout: the older report delivered     the halt rule still fires (a failure
      after a rolled-back device's failure report                   once seen is kept)
R6    approvals cached at the site (answered while the root is      REFUSED-DEVICE; the genuine decision
      down) edited or planted on its disk                           applies once the root is back
R7    a channel role tampered between the root and the site         REFUSED at the site; it keeps serving a
      (a tier upstream of the regional hub)                         consistent set and says so (nothing
                                                                    new is published; the sync says why)
B1    sneakernet bundles: a target altered, another root's bundle,  nothing unverified is served or
      an older bundle after a newer one                             installed; the genuine bundle works
U10   a relayed request re-pointed at another route, or a status    REFUSED-ROOT (forged / 403)
      reported with another site's token
U11   uploads of a device revoked at the root, accepted by a site   REFUSED-ROOT (403), nothing lands
      whose roster is stale
O1    an operator's root token presented to the regional hub        refused at the site (401): the site
      (its documented fleet-status view), or what the site sees     view has its own view token, which
      there replayed at the root                                    every root operator verb refuses
A6    the operator approves, then rejects before the device         the device does not act (a verified
      fetched; the tier serves both (or its cached older one)       rejection wins)
====  ===========================================================  ===================================

Gaps (xfail strict, each names the mechanism): none. Closed since first written: U7, R2, R7, A6, O1, S1, U3.

The hostile tier of the first part needs no regional implementation: :class:`HostileTier`
(tests/regional_attack_support.py) is a loopback HTTP relay in front of a real root hub (TUF repository,
fleet API, ingest) that applies each tampering; devices are real (Puller, Reconciler, file-mode slots,
telemetry Store + Uplink, send_report, EscalationStore).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from regional_attack_support import MODULE, Device, Site, Up

from deployment.rollout import device_report, send_report
from hub.operators import HubEscalations, keygen
from policies.approvals import (
    Approval,
    ApprovalError,
    OperatorRoster,
    generate_operator_key,
    key_id,
    load_approval,
    sign_approval,
)
from policies.triage import Action, default_triage_policy
from sre_agent.actions import ActionExecutor
from sre_agent.approvals_sync import ApprovalSync, sync_approvals
from sre_agent.escalations import Escalation, EscalationStatus
from sre_agent.triage import TriageEngine
from sre_agent.triage_eval import load_cases
from sre_core.errors import InputError
from sre_core.identity import load_or_create_identity
from sre_core.paths import StatePaths
from sre_core.signing import sign_request

CASES = Path(__file__).parent / "triage_cases"
BOTH = pytest.mark.parametrize(
    "site", ["relay", pytest.param("regional", marks=pytest.mark.slow)], indirect=True
)
"""Attacks run twice: the tier in front of the root, and in front of a real regional hub (relay included)."""


@pytest.fixture
def site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    """The root with clf 1.0 released, two devices on it through the (still honest) tier; with
    ``regional`` the tier relays a real regional hub (RegionalHub + its app) instead of the root."""
    s = Site(tmp_path, n=2, regional=getattr(request, "param", "relay") == "regional")
    try:
        s.publish("1.0")
        for d in s.devices:
            s.sync(d)
            assert d.version() == "1.0"
        yield s
    finally:
        s.close()


def _json_edit(fn: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit(body: bytes) -> bytes:
        doc = json.loads(body)
        fn(doc)
        return json.dumps(doc).encode()

    return edit


def _refused_nothing_applied(site: Site, d: Device, version: str, held: bytes | None, n_audit: int) -> None:
    """REFUSED-DEVICE: audited refusal, the same version served, the held record unchanged."""
    site.sync(d)
    new = d.audit_events()[n_audit:]
    assert "pull.refused" in new or "pull.future_time_refused" in new, new
    assert "slot.committed" not in new, new
    assert d.version() == version
    assert d.held() == held, "a refused pull changed the held record"
    cas = d.paths.cas / "sha256"
    from _trust_support import sha256

    assert all(sha256(p) == p.name for p in cas.glob("*")), "an unverified blob reached the CAS"


# ---------------------------------------------------------------------------- down: metadata (D1-D8)
def _timestamp_edit(doc: dict[str, Any]) -> None:
    doc["signed"]["meta"]["snapshot.json"]["version"] += 7


def _snapshot_edit(doc: dict[str, Any]) -> None:
    doc["signed"]["meta"]["stable.json"]["version"] += 1


def _far_future(doc: dict[str, Any]) -> None:
    doc["signed"]["x-sre-issued"] = "2036-01-01T00:00:00+00:00"
    doc["signed"]["expires"] = "2036-01-02T00:00:00Z"


EVIL = b"evil model\n" * 64


def _role_edit(doc: dict[str, Any]) -> None:
    import hashlib

    for name, tf in doc["signed"]["targets"].items():
        if name.endswith("model.bin"):
            tf["hashes"] = {"sha256": hashlib.sha256(EVIL).hexdigest()}
            tf["length"] = len(EVIL)


@BOTH
def test_d1_d5_d8_metadata_altered_or_swapped_by_the_tier_is_refused(site: Site) -> None:
    """Each case: the root releases the next version, the tier alters what it relays, the device refuses
    (audited, nothing installed, held record unchanged); then the tier relays honestly and the same
    device takes that release (nothing was poisoned)."""
    d = site.devices[0]
    site.publish("9.0", channel="beta")
    beta = max(site.repo.metadata_dir.glob("*.beta.json"), key=lambda p: int(p.name.split(".")[0]))
    beta_bytes = beta.read_bytes()
    old_ds = next(site.repo.targets_dir.glob("stable/*.desired-state.json")).read_bytes()
    cases: list[tuple[str, str, Callable[[bytes], bytes]]] = [
        ("D1 timestamp", r"/metadata/timestamp\.json$", _json_edit(_timestamp_edit)),
        ("D2 snapshot", r"/metadata/\d+\.snapshot\.json$", _json_edit(_snapshot_edit)),
        ("D3 channel role", r"/metadata/\d+\.stable\.json$", _json_edit(_role_edit)),
        ("D4 desired state", r"/targets/stable/[0-9a-f]+\.desired-state\.json$", lambda _b: old_ds),
        ("D5 far future", r"/metadata/timestamp\.json$", _json_edit(_far_future)),
        ("D8 beta role as stable", r"/metadata/\d+\.stable\.json$", lambda _b: beta_bytes),
    ]
    for i, (case, pattern, edit) in enumerate(cases, start=1):
        version, held, n = d.version() or "", d.held(), len(d.audit_events())
        site.publish(f"1.{i}")
        site.tier.down = [(pattern, edit)]
        _refused_nothing_applied(site, d, version, held, n)
        assert "2036" not in d.paths.clock_file.read_text(), (
            f"{case}: an edited signed time moved trusted time"
        )
        site.tier.down = []
        site.sync(d)
        assert d.version() == f"1.{i}", case


@BOTH
def test_d6_rollback_to_an_older_signed_repository_is_refused(site: Site, tmp_path: Path) -> None:
    old = tmp_path / "old"
    site.tier.freeze(site.served_dir, old)
    site.tier.frozen = None
    site.publish("1.1")
    d = site.devices[0]
    site.sync(d)
    assert d.version() == "1.1"
    site.publish("1.2")
    site.repo.timestamp()
    held, n = d.held(), len(d.audit_events())
    site.tier.frozen = old  # the tier's copy from before 1.1, still validly signed and unexpired
    _refused_nothing_applied(site, d, "1.1", held, n)
    assert any("BadVersionNumber" in json.dumps(r) for r in _audit(d)[n:]), _audit(d)[n:]


def _audit(d: Device) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in d.paths.audit_log.read_text().splitlines()]


@BOTH
def test_d7_s1_freeze_is_visible_at_the_root_and_ends_at_the_replayed_expiry(
    site: Site, tmp_path: Path
) -> None:
    """A tier that stops following the root (and may say it is in sync) cannot hide it: the devices'
    own signed reports show drift, and the replayed timestamp's signed expiry ends the freeze."""
    d = site.devices[0]
    site.tier.freeze(site.served_dir, tmp_path / "frozen")
    site.publish("1.1")
    site.sync(d)
    assert d.version() == "1.0"  # withheld: signatures cannot force a tier to relay
    st = site.device_status(d)
    assert st["drift"] == [MODULE], st  # 1.0 is no longer what the channel names: visible at the root
    assert site.status()["summary"]["drifting"] >= 1
    held, n = d.held(), len(d.audit_events())
    site.clock.advance(timedelta(days=1, minutes=5))  # past the replayed timestamp's expiry
    site.repo.timestamp()  # the root re-signs freshness; the tier keeps serving its copy
    _refused_nothing_applied(site, d, "1.0", held, n)
    assert any("ExpiredMetadata" in json.dumps(r) for r in _audit(d)[n:])
    assert site.device_status(d)["trust"] != "fresh"


def test_d7b_a_tier_answering_not_modified_to_every_poll_freezes_only_until_the_held_expiry(
    site: Site,
) -> None:
    """The conditional-poll variant of D7: ``304`` to every ``timestamp.json`` poll makes the device
    re-verify the timestamp it holds; that copy's own expiry ends the freeze (refused, nothing applied)."""
    d = site.devices[0]
    site.tier.not_modified = {"/metadata/timestamp.json"}
    site.publish("1.1")
    site.sync(d)
    assert ("GET", "/metadata/timestamp.json", 304) in site.tier.seen
    assert d.version() == "1.0" and site.device_status(d)["drift"] == [MODULE]
    held, n = d.held(), len(d.audit_events())
    site.clock.advance(timedelta(days=1, minutes=5))
    site.repo.timestamp()
    site.sync(d)
    new = d.audit_events()[n:]
    assert "slot.committed" not in new and d.version() == "1.0" and d.held() == held, new
    assert any("Expired" in json.dumps(r) for r in _audit(d)[n:]), _audit(d)[n:]
    assert site.device_status(d)["trust"] != "fresh"
    site.tier.not_modified = set()
    site.sync(d)
    assert d.version() == "1.1"


# ---------------------------------------------------------------------------- down: targets (D9)
@BOTH
def test_d9_target_bytes_tampered_by_the_tier_are_never_installed(site: Site) -> None:
    d = site.devices[0]
    v10 = site.target_file(f"stable/{MODULE}-1.0-model.bin").read_bytes()
    edits: dict[str, Callable[[bytes], bytes]] = {
        "altered": lambda b: b[:10] + bytes([b[10] ^ 1]) + b[11:],
        "truncated": lambda b: b[: len(b) // 2],
        "extended": lambda b: b + b"x" * 4096,
        "swapped": lambda _b: v10,
    }
    from _trust_support import sha256

    for i, (how, edit) in enumerate(edits.items(), start=1):
        site.publish(f"1.{i}")
        site.tier.down = [(rf"/targets/stable/[0-9a-f]+\.clf-1\.{i}-model\.bin$", edit)]
        version, held, n = d.version(), d.held(), len(d.audit_events())
        site.sync(d)
        new = d.audit_events()[n:]
        assert {"pull.refused", "pull.failed"} & set(new), (how, new)
        assert "slot.committed" not in new and d.version() == version and d.held() == held, how
        assert all(sha256(p) == p.name for p in (d.paths.cas / "sha256").glob("*")), how
        site.tier.down = []
        site.sync(d)
        assert d.version() == f"1.{i}", how


# ---------------------------------------------------------------------------- down: recall (D10)
@BOTH
def test_d10_a_replayed_pre_recall_repository_does_not_revive_the_withdrawn_version(
    site: Site, tmp_path: Path
) -> None:
    a, b = site.devices
    site.publish("1.1")
    for d in (a, b):
        site.sync(d)
        assert d.version() == "1.1"
    pre = site.tier.freeze(site.served_dir, tmp_path / "pre-recall")
    site.tier.frozen = None
    site.service.recall(site.channel, MODULE, ["1.1"], "1.0", "bad release", "alice")
    site.sync(a)
    assert a.version() == "1.0"
    held, n = a.held(), len(a.audit_events())
    site.tier.frozen = pre
    _refused_nothing_applied(site, a, "1.0", held, n)  # a saw the recall: the older copy is a rollback
    site.sync(b)  # b never saw it: frozen on the withdrawn version, but the root sees it
    assert b.version() == "1.1"
    assert site.device_status(b)["drift"] == [MODULE]
    assert site.device_status(a)["drift"] == []


# ---------------------------------------------------------------------------- up: batches (U1-U5)
def _write_metrics(d: Device, n: int, name: str = "m") -> None:
    for i in range(n):
        d.writer.metric(name, float(i))
    d.writer.flush()
    d.store.seal()


def _delivered(site: Site, d: Device) -> int:
    """Upload, forward (through a regional hub), and re-send after ``recheck_s`` for the root's receipt
    (which the regional hub hands back): the device's outbox entries left afterwards."""
    d.uplink.flush()
    site.forward()
    site.clock.advance(timedelta(seconds=d.uplink.recheck_s + 1))
    return d.uplink.flush().pending_after


def _batches(site: Site) -> list[Up]:
    return [u for u in site.tier.captured if u.path.startswith("/v1/telemetry/batches/")]


def _tier_identity(site: Site) -> Any:
    """The tier's own key, enrolled at the root (a regional identity, or a stolen key of its site)."""
    ident, _ = load_or_create_identity(StatePaths(site.tmp / "tier-key"), "regional-1")
    site.fleet.enroll(ident.device_id, ident.public_pem)
    site.roster()
    return ident


def _refused_at_the_regional(site: Site) -> set[int]:
    """HTTP statuses of what the root refused when the regional hub forwarded it."""
    if site.regional is None:
        return set()
    return {int(r["status"]) for r in site.regional.relay.refused_items()}


def _resigned(site: Site, ident: Any) -> Callable[[Up], Up]:
    def resign(up: Up) -> Up:
        host = up.header("host") or ""
        headers = sign_request(
            "POST", f"http://{host}{up.path}", up.body, ident.private_key, ident.device_id,
            int(site.clock.now().timestamp()), f"tier-{len(site.tier.captured)}",
            {"content-type": up.header("content-type") or "application/octet-stream",
             "content-length": str(len(up.body))},
        )  # fmt: skip
        return Up(up.method, up.path, [("host", host), *headers.items()], up.body)

    return resign


@BOTH
def test_u1_batch_altered_on_the_way_up_never_lands_and_stays_with_the_device(site: Site) -> None:
    d = site.devices[0]
    _write_metrics(d, 20)

    def flip(up: Up) -> Up:
        body = bytearray(up.body)
        body[len(body) // 2] ^= 0xFF
        return up.with_body(bytes(body))

    site.tier.up = flip
    rep = d.uplink.flush(max_attempts=1)
    assert rep.refused is not None and rep.refused.startswith("401"), rep.to_dict()
    assert site.lake_rows() == {} and site.fleet.receipts() == []
    assert rep.pending_after >= 1  # the device keeps it
    site.tier.up = None
    assert _delivered(site, d) == 0
    assert site.lake_rows() == {d.id: 20}


@BOTH
def test_u2_batch_and_report_re_signed_with_the_tiers_own_key_are_refused(site: Site) -> None:
    d = site.devices[0]
    _write_metrics(d, 20)
    site.tier.up = _resigned(site, _tier_identity(site))
    rep = d.uplink.flush(max_attempts=1)
    site.forward()
    # 400 (rows of another device than the signer), at the first hop that reads the rows
    assert rep.rejected or _refused_at_the_regional(site) == {400}, rep.to_dict()
    assert site.lake_rows() == {} and site.fleet.receipts() == []
    before = site.service.reports.get(d.id)
    report = device_report(d.paths, site.channel, site.clock)
    report["modules"][MODULE]["version"] = "6.6.6"
    with pytest.raises(httpx.HTTPStatusError) as info:
        send_report(site.tier.url, d.paths, report, site.clock)
    assert info.value.response.status_code == 400
    assert site.service.reports.get(d.id) == before


@BOTH
def test_u3_a_tier_that_acknowledges_without_forwarding_does_not_make_data_disappear_silently(
    site: Site,
) -> None:
    """The device lets go of a batch only on the root's signed receipt (sre_core.receipts): a tier's
    "stored" (or a regional hub's "queued") keeps it, and the re-send after ``recheck_s`` lands it."""
    d = site.devices[0]
    _write_metrics(d, 20)
    site.tier.fake_ack = True
    lied = d.uplink.flush()
    assert lied.handed and not lied.uploaded  # taken without a receipt: kept, not trusted
    assert d.store.pending() and site.lake_rows() == {}
    # a receipt forged by the tier (its own key, or another batch's genuine receipt) is no receipt
    forged = {"keyid": "0" * 64, "sig": "00" * 64}
    assert not d.uplink._receipted(d.store.pending()[0], {"receipt": forged})
    site.tier.fake_ack = False
    assert d.uplink.flush().handed == []  # not re-sent before recheck_s
    site.clock.advance(timedelta(seconds=d.uplink.recheck_s + 1))
    for _ in range(2):  # through a regional hub: queued (no receipt yet), forwarded, re-sent
        d.uplink.flush()
        site.forward()
        site.clock.advance(timedelta(seconds=d.uplink.recheck_s + 1))
    assert site.lake_rows() == {d.id: 20}, "the batch never reached the root"
    assert d.store.pending() == [], "the device keeps a batch the root holds"
    assert len(site.fleet.receipts()) == 1  # landed once


@BOTH
def test_u4_u5_duplicated_replayed_and_reordered_batches_land_exactly_once(site: Site) -> None:
    d = site.devices[0]
    for i in range(3):
        _write_metrics(d, 10 + i, name=f"m{i}")
    site.tier.hold = True
    assert d.uplink.flush(max_attempts=1).pending_after == 3
    held = list(site.tier.held)
    assert len(held) == 1  # the flush stops at the first busy answer; take the rest from the outbox
    site.tier.hold = False
    # reordered: the tier forwards the newest first, then the held one, each twice
    site.tier.fake_ack = True
    d.uplink.flush()  # the device hands everything to the tier (acked, not forwarded)
    site.tier.fake_ack = False
    caught = {u.path: u for u in _batches(site)}
    assert len(caught) == 3
    order = sorted(caught.values(), key=lambda u: u.path, reverse=True)
    answers = [site.tier.forward(u).status_code for u in order]
    answers += [site.tier.forward(u).status_code for u in order]  # the same signed requests again
    assert answers[:3] == [200, 200, 200], answers
    assert set(answers[3:]) <= {200, 401}, answers  # duplicate (200) or replayed nonce (401)
    site.forward()
    site.forward()
    assert site.lake_rows() == {d.id: 33}
    assert len(site.fleet.receipts()) == 3


@BOTH
# ---------------------------------------------------------------------------- up: reports, attestations
def test_u6_report_altered_on_the_way_up_is_refused(site: Site) -> None:
    d = site.devices[0]
    before = site.service.reports.get(d.id)

    def lie(up: Up) -> Up:
        if up.path != "/v1/fleet/reports":
            return up
        doc = json.loads(up.body)
        doc["modules"][MODULE]["bad"] = []
        doc["modules"][MODULE]["version"] = "9.9"
        return up.with_body(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())

    site.tier.up = lie
    with pytest.raises(httpx.HTTPStatusError) as info:
        send_report(site.tier.url, d.paths, device_report(d.paths, site.channel, site.clock), site.clock)
    assert info.value.response.status_code == 401
    assert site.service.reports.get(d.id) == before


@pytest.mark.parametrize(
    "site",
    [
        pytest.param("relay"),
        pytest.param("regional", marks=pytest.mark.slow),
    ],
    indirect=True,
)
def test_u7_an_older_report_delivered_after_a_newer_one_does_not_replace_it(site: Site) -> None:
    """The tier holds two signed reports and delivers them newest first (both inside the signature
    window): the root must keep the device's newest state, not the last one to arrive."""
    d = site.devices[0]
    site.tier.hold = True
    older = device_report(d.paths, site.channel, site.clock)
    for body in (older,):
        with pytest.raises(httpx.HTTPStatusError):
            send_report(site.tier.url, d.paths, body, site.clock)
    site.clock.advance(timedelta(seconds=30))
    site.publish("1.1")
    site.tier.hold = False
    site.sync(d)  # now on 1.1, and the report saying so is delivered
    assert d.version() == "1.1"
    assert site.device_status(d)["versions"] == {MODULE: "1.1"}
    (held,) = [u for u in site.tier.held if u.path == "/v1/fleet/reports"]
    assert site.tier.forward(held).status_code == 200  # the older report, still inside the window
    site.forward()
    assert site.device_status(d)["versions"] == {MODULE: "1.1"}, "the root now believes the older state"


def test_u7b_a_reordered_report_does_not_hide_a_failure_from_the_halt_rule(site: Site) -> None:
    """U7's worst consequence does not happen: the rollout records a device's failure once seen
    (``failed``), so an older report delivered after it does not save the candidate from the halt."""
    from hub.rollouts import RolloutSpec

    a, b = site.devices
    site.tier.hold = True
    with pytest.raises(httpx.HTTPStatusError):  # a's report before the rollout, held by the tier
        send_report(site.tier.url, a.paths, device_report(a.paths, site.channel, site.clock), site.clock)
    site.tier.hold = False
    site.publish("1.1", release=False, bad=True)
    spec = RolloutSpec(channel=site.channel, module=MODULE, version="1.1", waves=[100], min_devices=1,
                       halt_after=2)  # fmt: skip
    site.service.start(spec, "alice")
    site.sync(a)  # installs 1.1, its probe fails, rolls back; its report says so
    assert a.version() == "1.0" and "1.1" in a.reports[-1]["modules"][MODULE]["bad"]
    (old,) = [u for u in site.tier.held if u.path == "/v1/fleet/reports"]
    assert site.tier.forward(old).status_code == 200  # the tier delivers the older one last
    site.sync(b)
    assert b.version() == "1.0" and "1.1" in b.reports[-1]["modules"][MODULE]["bad"]
    site.service.tick(site.channel)
    r = site.service.current(site.channel)
    assert r is not None and r.state == "halted", (r.state if r else None, r.failed if r else None)


@BOTH
def test_u8_u9_attestations_altered_replayed_older_or_rewrapped_are_refused(site: Site) -> None:
    from sre_agent.attestation import DeviceState, queue_attestation

    d, other = site.devices

    def state(t: str, version: str) -> DeviceState:
        return DeviceState(time=t, policy_version="1", trust_status="fresh", audit_head="0" * 64,
                           safe_mode=False, modules={MODULE: {"version": version}})  # fmt: skip

    site.tier.hold = True
    queue_attestation(d.store, d.ident, state("2026-01-01T00:00:00+00:00", "1.0"))
    d.uplink.flush(max_attempts=1, seal=False)
    site.tier.hold = False
    (old,) = [u for u in site.tier.held if "/attestations/" in u.path]
    queue_attestation(d.store, d.ident, state("2026-01-02T00:00:00+00:00", "1.0"))
    d.uplink.flush(seal=False)
    site.forward()
    assert site.fleet.state(d.id)["attested"]["time"].startswith("2026-01-02")
    # U8: the older one, held back and delivered last (its request is still fresh)
    assert site.tier.forward(old).status_code == 200
    site.forward()
    assert site.fleet.state(d.id)["attested"]["time"].startswith("2026-01-02")
    # U8: altered in flight (the device's request signature kept)
    queue_attestation(d.store, d.ident, state("2026-01-03T00:00:00+00:00", "6.6"))

    def flip(up: Up) -> Up:
        env = json.loads(up.body)
        stmt = json.loads(base64.b64decode(env["payload"]))
        stmt["predicate"]["modules"][MODULE]["version"] = "1.0"  # hide what the device runs
        env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
        return up.with_body(json.dumps(env).encode())

    site.tier.up = flip
    d.uplink.flush(max_attempts=1, seal=False)
    site.forward()
    assert site.tier.seen[-1][2] == 401
    assert site.fleet.state(d.id)["attested"]["time"].startswith("2026-01-02")
    # U9: the other device's genuine envelope, wrapped in the tier's own signed request
    site.tier.up = _resigned(site, _tier_identity(site))
    queue_attestation(other.store, other.ident, state("2026-01-04T00:00:00+00:00", "6.6"))
    other.uplink.flush(max_attempts=1, seal=False)
    site.forward()
    assert site.tier.seen[-1][2] in (400, 401) or _refused_at_the_regional(site) == {401}, site.tier.seen[-1]
    assert "attested" not in site.fleet.state(other.id)
    assert "attested" not in site.fleet.state("regional-1")


# ---------------------------------------------------------------------------- down: approvals (A1-A5)
class Ops:
    """An operator at the root (key + roster), one device escalation that reached the root's lake."""

    def __init__(self, site: Site, d: Device) -> None:
        self.site = site
        files = keygen(site.tmp / "ops", "alice")
        self.key_path = files.key_path
        self.roster = OperatorRoster.model_validate({"version": 1, "max_ttl_s": 7200,
                                                     "operators": [files.entry]})  # fmt: skip
        self.roster_path = site.tmp / "ops" / "operators.yaml"
        self.roster_path.write_text(yaml.safe_dump(self.roster.model_dump(mode="json", exclude_none=True)))
        self.hub = HubEscalations(site.repo.dir, site.clock)
        self.ran: list[str] = []
        self.executor = ActionExecutor({a: self._handler(a) for a in Action}, audit=None)
        self.device = d
        self.esc = self.escalate(d)

    def _handler(self, action: Action) -> Callable[[Any], str]:
        def run(_incident: Any) -> str:
            self.ran.append(action.value)
            return "done"

        return run

    def escalate(self, d: Device, case: str = "pf-active-nolkg") -> Escalation:
        incident = {c.name: c for c in load_cases(CASES)}[case].incident
        esc = d.escalations.create(incident, TriageEngine(default_triage_policy()).decide(incident))
        d.writer.flush()
        assert _delivered(self.site, d) == 0  # up through the tier, into the root's lake
        return esc

    def approve(self, esc: Escalation, action: str = "alert") -> bytes:
        """Sign at the root; the copy to deliver (what the tier carries down)."""
        _, path = self.hub.decide(esc.id, key_path=self.key_path, operator="alice", decision="approve",
                                  roster_path=self.roster_path, action=action)  # fmt: skip
        return path.read_bytes()

    def deliver(self, d: Device, data: bytes) -> Escalation:
        """What ``sre-agent escalations apply`` does with a file the tier handed over."""
        return d.escalations.decide(load_approval(data), self.roster)

    def fetch(self, d: Device) -> ApprovalSync:
        """The device's escalations job: fetch the decisions on its open escalations through the tier."""
        return sync_approvals([self.site.tier.url], d.paths, d.escalations, self.roster_path, self.site.clock)


def _edited(data: bytes, **changes: Any) -> bytes:
    doc = json.loads(data)
    doc.update(changes)
    return json.dumps(doc).encode()


def test_a1_a5_approvals_altered_or_forged_by_the_tier_are_refused(site: Site) -> None:
    ops = Ops(site, site.devices[0])
    d, esc = ops.device, ops.esc
    genuine = ops.approve(esc, "alert")
    n = len(d.audit_events())
    # A1: the approved action swapped for a more severe one
    with pytest.raises(ApprovalError):
        ops.deliver(d, _edited(genuine, action="safe_mode"))
    # A5: forged with the tier's own key, claiming to be alice
    tier_key = generate_operator_key()
    forged = sign_approval(tier_key, operator="alice", escalation_id=esc.id, escalation_hash=esc.content_hash,
                           decision="approve", action="safe_mode", now=site.clock.now(),
                           ttl=timedelta(minutes=30))  # fmt: skip
    with pytest.raises(ApprovalError):
        ops.deliver(d, forged.model_dump_json().encode())
    assert forged.key_id == key_id(tier_key.public_key())
    refused = [e for e in d.audit_events()[n:] if e == "escalation.approval_refused"]
    assert len(refused) == 2
    assert d.escalations.get(esc.id).status is EscalationStatus.OPEN
    assert ops.ran == []


def test_a2_an_approval_for_another_devices_escalation_is_refused(site: Site) -> None:
    a, b = site.devices
    ops = Ops(site, a)
    esc_b = ops.escalate(b)
    assert esc_b.id != ops.esc.id  # the content names the device
    for_b = ops.approve(esc_b, "safe_mode")
    with pytest.raises(InputError):  # unknown here
        ops.deliver(a, for_b)
    with pytest.raises(ApprovalError):  # renamed to a's escalation: bound to b's id and hash
        ops.deliver(a, _edited(for_b, escalation_id=ops.esc.id))
    assert a.escalations.get(ops.esc.id).status is EscalationStatus.OPEN


def test_a3_a4_replayed_and_held_back_approvals_are_refused(site: Site) -> None:
    a, b = site.devices
    ops = Ops(site, a)
    genuine = ops.approve(ops.esc, "alert")
    assert ops.deliver(a, genuine).status is EscalationStatus.APPROVED
    a.escalations.execute_approved(ops.executor, ops.roster)
    assert ops.ran == ["alert"]
    with pytest.raises(InputError):  # A3: the same file again
        ops.deliver(a, genuine)
    a.escalations.execute_approved(ops.executor, ops.roster)
    assert ops.ran == ["alert"], "an approval replayed by the tier ran the action twice"
    # A4: the tier holds an approval until it lapsed, then delivers it
    esc_b = ops.escalate(b)
    late = ops.approve(esc_b, "alert")
    site.clock.advance(timedelta(hours=2))
    with pytest.raises((ApprovalError, InputError)):
        ops.deliver(b, late)
    assert b.escalations.get(esc_b.id).status in (EscalationStatus.OPEN, EscalationStatus.EXPIRED)
    assert Approval.model_validate_json(late).expires_at < site.clock.now()


# ---------------------------------------------------------------------------- the real regional hub only
# Written after reading hub/regional and hub/sites.py (the design: a site token, a spool, a mirrored
# roster with operator token hashes (since replaced by a site view token), site status reports): O1, S1
# and R1-R4 attack what it adds.
@pytest.fixture
def region(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path, n=2, regional=True)
    try:
        s.publish("1.0")
        for d in s.devices:
            s.sync(d)
            assert d.version() == "1.0"
        yield s
    finally:
        s.close()


def _role_file(site: Site, role: str = "stable") -> Path:
    md = site.served_dir / "metadata"
    return max(md.glob(f"*.{role}.json"), key=lambda p: int(p.name.split(".")[0]))


@pytest.mark.slow
def test_r1_mirrored_metadata_edited_on_the_regional_disk_is_refused_then_healed(region: Site) -> None:
    d = region.devices[0]
    region.publish("1.1")
    assert region.regional is not None and region.regional.sync_down().published
    for f in (_role_file(region), region.served_dir / "metadata" / "timestamp.json"):
        f.chmod(0o644)
    f = _role_file(region)
    f.write_bytes(_json_edit(_role_edit)(f.read_bytes()))
    held, n = d.held(), len(d.audit_events())
    d.rec.run_once()  # the regional hub serves what its disk holds now
    new = d.audit_events()[n:]
    assert "pull.refused" in new and "slot.committed" not in new, new
    assert d.version() == "1.0" and d.held() == held
    assert region.regional.sync_down().error is None  # republishes the verified bytes it holds
    d.rec.run_once()
    assert d.version() == "1.1"


def _served_target(site: Site, version: str) -> Path:
    (f,) = (site.served_dir / "targets" / "stable").glob(f"*.{MODULE}-{version}-model.bin")
    return f


@pytest.mark.slow
def test_r2_a_target_edited_on_the_regional_disk_is_never_installed(region: Site) -> None:
    d = region.devices[0]
    region.publish("1.1")
    assert region.regional is not None and region.regional.sync_down().published
    f = _served_target(region, "1.1")
    f.chmod(0o644)
    f.write_bytes(EVIL[: f.stat().st_size].ljust(f.stat().st_size, b"!"))  # same length, other bytes
    held, n = d.held(), len(d.audit_events())
    d.rec.run_once()
    new = d.audit_events()[n:]
    assert "pull.refused" in new and "slot.committed" not in new, new
    assert d.version() == "1.0" and d.held() == held


@pytest.mark.slow
def test_r2b_the_regional_hub_heals_a_target_altered_at_rest_on_its_next_sync(region: Site) -> None:
    d = region.devices[0]
    region.publish("1.1")
    assert region.regional is not None and region.regional.sync_down().published
    f = _served_target(region, "1.1")
    f.chmod(0o644)
    f.write_bytes(b"\0" * f.stat().st_size)
    d.rec.run_once()
    assert d.version() == "1.0"
    region.regional.sync_down()
    d.rec.run_once()
    assert d.version() == "1.1", "the site still serves the altered bytes"


def _spool(site: Site) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from hub.regional._relay import spool

    assert site.regional is not None
    with site.regional.relay.engine.begin() as conn:
        return [dict(r._mapping) for r in conn.execute(select(spool).order_by(spool.c.seq))]


def _spool_update(site: Site, key: str, **values: Any) -> None:
    from sqlalchemy import update

    from hub.regional._relay import spool

    assert site.regional is not None
    with site.regional.relay.engine.begin() as conn:
        conn.execute(update(spool).where(spool.c.key == key).values(**values))


@pytest.mark.slow
def test_r3_uploads_edited_in_the_regional_spool_never_land(region: Site) -> None:
    """The spool on the regional disk: a batch body, a report body, the device header, all edited."""
    a, b = region.devices
    _write_metrics(a, 20)
    assert a.uplink.flush().handed  # queued at the site (the device keeps it until the root's receipt)
    send_report(region.tier.url, a.paths, device_report(a.paths, region.channel, region.clock), region.clock)
    _write_metrics(b, 5)
    assert b.uplink.flush().handed
    items = {(i["kind"], i["device_id"]): i for i in _spool(region)}
    batch_a, report_a, batch_b = items["batch", a.id], items["report", a.id], items["batch", b.id]
    body = bytearray(batch_a["body"])
    body[len(body) // 2] ^= 0xFF
    _spool_update(region, batch_a["key"], body=bytes(body))
    rep = json.loads(report_a["body"])
    rep["modules"][MODULE]["version"] = "6.6"
    _spool_update(
        region, report_a["key"], body=json.dumps(rep, sort_keys=True, separators=(",", ":")).encode()
    )
    headers = json.loads(batch_b["headers"])
    headers = {k: (a.id if k.lower() == "x-sre-device" else v) for k, v in headers.items()}
    _spool_update(region, batch_b["key"], headers=json.dumps(headers), device_id=a.id)
    before = region.service.reports.get(a.id)
    region.forward()
    assert region.lake_rows() == {} and region.fleet.receipts() == []
    assert region.service.reports.get(a.id) == before
    assert _refused_at_the_regional(region) <= {400, 401} and len(region.regional.relay.refused_items()) == 3  # type: ignore[union-attr]


@pytest.mark.slow
def test_r4_spool_duplicated_reordered_and_replayed_by_the_site_lands_once_newest_wins(region: Site) -> None:
    """The site token lets a relayed request be 30 days old with no nonce memory: replays must be no-ops."""
    from sqlalchemy import insert

    from hub.regional._relay import spool

    a = region.devices[0]
    _write_metrics(a, 7)
    assert a.uplink.flush().handed  # queued at the site
    older = device_report(a.paths, region.channel, region.clock)
    send_report(region.tier.url, a.paths, older, region.clock)
    region.clock.advance(timedelta(seconds=30))
    region.publish("1.1")
    region.sync(a)  # its newer report (on 1.1) is queued and forwarded now
    assert a.version() == "1.1"
    items = _spool(region)
    assert items == [], items
    # the site kept copies of everything it relayed: it puts them back, in another order, twice
    region.clock.advance(timedelta(days=20))
    assert region.regional is not None
    captured = [u for u in region.tier.captured if u.path.startswith(("/v1/telemetry/", "/v1/fleet/reports"))]
    for n, up in enumerate(reversed(captured * 2)):
        from hub.regional._relay import FORWARDED_HEADERS

        with region.regional.relay.engine.begin() as conn:
            conn.execute(
                insert(spool).values(
                    key=f"replay-{n}", kind="report" if "reports" in up.path else "batch",
                    device_id=a.id, path=up.path, uri=f"http://{up.header('host')}{up.path}",
                    headers=json.dumps({k: v for k, v in up.headers if k.lower() in FORWARDED_HEADERS}),
                    body=up.body, received_at=region.clock.now().isoformat(), attempts=0, next_at=0.0,
                )
            )  # fmt: skip
    region.forward()
    assert region.lake_rows() == {a.id: 7} and len(region.fleet.receipts()) == 1
    assert region.device_status(a)["versions"] == {MODULE: "1.1"}


@pytest.mark.slow
def test_o1_no_root_credential_is_ever_shown_to_a_regional_hub(region: Site) -> None:
    """The site's fleet-status view has its own view token: a root operator token is refused there (so
    no operator is led to hand one to a site), and the view token a compromised site (or its network)
    captures is refused by every operator verb of the root."""
    from hub.fleet_api import issue_operator_token

    region.publish("1.1")
    token = issue_operator_token(region.repo.dir, "alice")
    region.roster()
    status = f"{region.tier.url}/v1/fleet/status"
    rooted = httpx.get(status, headers={"authorization": f"Bearer {token}"})
    assert rooted.status_code == 401, rooted.text  # a root token is no credential at a site
    r = httpx.get(status, headers={"authorization": f"Bearer {region.view_token}"})
    assert r.status_code == 200 and r.json()["source"] == "regional", r.text  # the documented site view
    seen = [u.header("authorization") for u in region.tier.requests if u.path == "/v1/fleet/status"]
    assert f"Bearer {region.view_token}" in seen
    root = region.root.url
    verbs = [
        ("GET", "/v1/fleet/status", None), ("GET", "/v1/dora", None),
        ("GET", f"/v1/rollouts/{region.channel}", None),
        ("POST", f"/v1/rollouts/{region.channel}/start", {"module": MODULE, "version": "1.1"}),
        *(("POST", f"/v1/rollouts/{region.channel}/{a}", {})
          for a in ("approve", "pause", "resume", "ack", "abort-keep", "abort-revert")),
        ("POST", f"/v1/recalls/{region.channel}",
         {"module": MODULE, "withdrawn": ["1.1"], "to_version": "1.0", "reason": "site"}),
    ]  # fmt: skip
    for method, path, body in verbs:
        stolen = httpx.request(
            method, root + path, json=body, headers={"authorization": f"Bearer {region.view_token}"}
        )
        assert stolen.status_code in (401, 403), (method, path, stolen.text)
    # and the site holds nothing derived from a root token (no hash to check one against)
    assert region.regional is not None
    assert "operator_token" not in (region.tmp / "regional" / "roster.json").read_text()
    ds = region.repo.desired_state(region.channel)
    assert ds is not None and ds.recalls == []


@pytest.mark.slow
def test_s1_a_site_claiming_sync_while_its_devices_hold_an_old_serial_is_not_shown_in_sync(
    region: Site,
) -> None:
    from hub.sites import SYNC_SKEW_S, current_desired, current_timestamp

    d, e = region.devices
    region.tier.freeze(region.served_dir, region.tmp / "frozen")
    region.publish("1.1")
    region.clock.advance(timedelta(seconds=SYNC_SKEW_S + 60))  # the devices sync well after the release
    region.sync(d)
    assert d.version() == "1.0"
    assert region.device_status(d)["drift"] == [MODULE]  # detectable per device
    current = current_timestamp(region.repo.dir)
    assert region.regional is not None
    claim = {"timestamp_version": current, "last_sync": region.clock.now().isoformat(), "backlog": 0}
    assert region.regional.relay.report_status(claim)
    (row,) = region.sites.rows(current, desired=current_desired(region.repo))
    assert not row["in_sync"] and row["claimed_in_sync"] and row["devices_behind"] == [d.id], row
    (shown,) = region.status()["sites"]  # fleet status (sre-hub fleet status, GET /v1/fleet/status)
    assert not shown["in_sync"] and shown["devices_behind"] == [d.id], shown
    assert region.status()["summary"]["sites_out_of_sync"] == 1
    # once the site serves the release again, the next signed reports clear it
    region.tier.frozen = None
    for x in (d, e):
        region.sync(x)
        assert x.version() == "1.1"
    assert region.regional.relay.report_status(claim)
    (row,) = region.sites.rows(current_timestamp(region.repo.dir), desired=current_desired(region.repo))
    assert row["devices_behind"] == [] and row["in_sync"], row


APPROVALS = r"/v1/devices/[^/]+/approvals"


def _answer_edit(fn: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> Callable[[bytes], bytes]:
    return _json_edit(lambda doc: doc.update(approvals=fn(doc["approvals"])))


@BOTH
def test_a1_a2_a5_approvals_fetched_through_a_tier_that_alters_them_are_refused(site: Site) -> None:
    """The escalations job's own fetch (GET .../approvals, relayed by the tier): every alteration the
    tier makes to the answer is refused by the device, audited, and the escalation stays open."""
    a, b = site.devices
    ops = Ops(site, a)
    esc_b = ops.escalate(b)
    ops.approve(ops.esc, "alert")
    for_b = json.loads(ops.approve(esc_b, "safe_mode"))
    forged = sign_approval(generate_operator_key(), operator="alice", escalation_id=ops.esc.id,
                           escalation_hash=ops.esc.content_hash, decision="approve", action="safe_mode",
                           now=site.clock.now(), ttl=timedelta(minutes=30))  # fmt: skip
    attacks: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
        "A1 more severe action": lambda ap: [{**x, "action": "safe_mode"} for x in ap],
        "A2 another device's approval": lambda _ap: [{**for_b, "escalation_id": ops.esc.id}],
        "A5 forged by the tier": lambda _ap: [json.loads(forged.model_dump_json())],
    }
    for case, edit in attacks.items():
        n = len(a.audit_events())
        site.tier.down = [(APPROVALS, _answer_edit(edit))]
        out = ops.fetch(a)
        assert out.hub == site.tier.url and not out.applied and ops.esc.id in out.refused, (case, out)
        assert "escalation.approval_refused" in a.audit_events()[n:], case
        assert a.escalations.get(ops.esc.id).status is EscalationStatus.OPEN, case
    site.tier.down = []
    assert ops.fetch(a).applied == [ops.esc.id]  # the genuine decision still works
    a.escalations.execute_approved(ops.executor, ops.roster)
    assert ops.ran == ["alert"]


@BOTH
def test_a6_a_rejection_that_supersedes_an_approval_is_not_bypassed(site: Site) -> None:
    """The operator approves, then changes their mind and rejects before the device fetched: the tier
    serves both signed decisions (or only the older one, from its cache): the device must not act."""
    a = site.devices[0]
    ops = Ops(site, a)
    ops.approve(ops.esc, "safe_mode")
    site.clock.advance(timedelta(minutes=5))
    try:
        ops.hub.decide(ops.esc.id, key_path=ops.key_path, operator="alice", decision="reject",
                       roster_path=ops.roster_path, reason="changed my mind")  # fmt: skip
    except InputError:
        return  # the hub refuses a second, conflicting decision: the operator is told at once
    ops.fetch(a)
    a.escalations.execute_approved(ops.executor, ops.roster)
    assert ops.ran == [], "the device executed an approval its operator had since rejected"


def test_d12_a_repository_re_signed_with_the_tiers_own_keys_is_refused(site: Site) -> None:
    """The tier builds its own repository (its own root, targets and channel keys) naming its own 1.1:
    every signature is valid, none chains to the device's pinned root."""
    from hub.repository import HubRepository

    evil = HubRepository.init(site.tmp / "evil", channels=("stable",), clock=site.clock)
    f = site.tmp / "evil.bin"
    f.write_bytes(EVIL)
    from deployment.manifest import ModuleManifest

    evil.publish("stable", f, ModuleManifest(name=MODULE, version="1.1", mode="file", filename="model.bin"))
    evil.release("stable", MODULE, "1.1")
    d = site.devices[0]
    held, n = d.held(), len(d.audit_events())
    site.tier.frozen = evil.dir
    _refused_nothing_applied(site, d, "1.0", held, n)
    assert any("UnsignedMetadata" in json.dumps(r) or "root" in json.dumps(r) for r in _audit(d)[n:])


def test_d13_a_root_rotation_signed_by_the_tiers_keys_is_refused(site: Site) -> None:
    """The tier answers the device's probe for the next root version (``2.root.json``) with a rotation it
    signed itself: the device's trusted root stays version 1 and nothing else moves."""
    from hub.repository import HubRepository

    evil = HubRepository.init(site.tmp / "evil-root", channels=("stable",), clock=site.clock)
    evil.rotate_key("timestamp")  # a properly chained 2.root.json, in the tier's own key tree
    d = site.devices[0]
    site.publish("1.1")
    held, n = d.held(), len(d.audit_events())
    site.tier.inject = {"/metadata/2.root.json": (evil.metadata_dir / "2.root.json").read_bytes()}
    _refused_nothing_applied(site, d, "1.0", held, n)
    assert json.loads((d.paths.tuf / "root.json").read_bytes())["signed"]["version"] == 1
    site.tier.inject = {}
    site.sync(d)
    assert d.version() == "1.1"


def test_f1_a_device_falls_back_past_a_tampering_tier_to_the_genuine_release(site: Site) -> None:
    """Devices list several hubs (the site's first, the root last): bytes the first one altered are
    refused and audited with its URL, and the next source delivers the release."""
    from deployment.pull import Puller
    from deployment.reconcile import Reconciler
    from policies.trust import TrustPolicy

    d = site.devices[0]
    site.publish("1.1")
    site.tier.down = [(r"/targets/stable/[0-9a-f]+\.clf-1\.1-model\.bin$", lambda b: b[::-1])]
    puller = Puller(d.paths, site.tier.url, site.channel, clock=site.clock, fallbacks=[site.root.url],
                    policy=TrustPolicy(max_stalled_attempts=1))  # fmt: skip
    rec = Reconciler(d.paths, puller.pull, site.clock, disk_free=lambda _p: 1 << 40)
    n = len(d.audit_events())
    rec.run_once()
    assert d.version() == "1.1"
    refusals = [r for r in _audit(d)[n:] if r["event"] == "pull.refused"]
    assert refusals and all(r["data"].get("source") == site.tier.url for r in refusals), refusals
    from _trust_support import sha256

    assert all(sha256(p) == p.name for p in (d.paths.cas / "sha256").glob("*"))


def test_f2_a_frozen_first_hub_delays_a_release_only_until_its_replayed_timestamp_expires(
    site: Site, tmp_path: Path
) -> None:
    """Freeze (D7) with fallback: the device keeps trusting the first hub while its copy is valid, then
    refuses the expired copy, falls back to the root and installs the release."""
    from deployment.pull import Puller
    from deployment.reconcile import Reconciler
    from policies.trust import TrustPolicy

    d = site.devices[0]
    site.tier.freeze(site.served_dir, tmp_path / "frozen")
    site.publish("1.1")
    puller = Puller(d.paths, site.tier.url, site.channel, clock=site.clock, fallbacks=[site.root.url],
                    policy=TrustPolicy(max_stalled_attempts=1), sticky_s=0)  # fmt: skip
    rec = Reconciler(d.paths, puller.pull, site.clock, disk_free=lambda _p: 1 << 40)
    rec.run_once()
    assert d.version() == "1.0"  # the frozen copy is still validly signed: withheld, not refused
    site.clock.advance(timedelta(days=1, minutes=5))
    site.repo.timestamp()
    n = len(d.audit_events())
    rec.run_once()
    assert d.version() == "1.1"
    refused = [r for r in _audit(d)[n:] if r["event"] == "pull.refused"]
    assert refused and all(r["data"].get("source") == site.tier.url for r in refused), refused


@pytest.mark.slow
def test_s2_u10_a_site_token_reports_only_its_own_site_and_relays_only_the_signed_path(region: Site) -> None:
    """A site token is no wildcard: another site's status is refused, and a relayed device request
    whose signed URI names another path (a report signed for the reports route, sent to ingest) is
    refused as forged."""
    other_token = region.sites.add("site-b")
    r = httpx.post(f"{region.root.url}/v1/sites/site-a/status", json={"timestamp_version": 1},
                   headers={"authorization": f"Bearer {other_token}"})  # fmt: skip
    assert r.status_code == 403
    d = region.devices[0]
    region.tier.hold = True
    with pytest.raises(httpx.HTTPStatusError):
        send_report(
            region.tier.url, d.paths, device_report(d.paths, region.channel, region.clock), region.clock
        )
    (up,) = [u for u in region.tier.held if u.path == "/v1/fleet/reports"]
    from hub.sites import RELAY_URI_HEADER

    headers = {k: v for k, v in up.headers if k.lower() not in {"host", "content-length"}}
    headers.update(
        {"authorization": f"Bearer {other_token}", RELAY_URI_HEADER: f"http://{up.header('host')}{up.path}"}
    )
    moved = httpx.post(f"{region.root.url}/v1/telemetry/attestations/x", content=up.body, headers=headers)
    assert moved.status_code == 401 and moved.json()["refused"] == "forged", moved.text
    assert "attested" not in region.fleet.state(d.id)


def _start_regional(site: Site, state: Path, token: str, port: int) -> subprocess.Popen[str]:
    """``sre-hub regional`` as a child process (one sync at start, then hourly)."""
    (state.parent / "site.token").write_text(token)
    hub = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main(sys.argv[1:]))"]
    args = ["regional", "--upstream", site.root.url, "--root", str(site.repo.metadata_dir / "1.root.json"),
            "--state", str(state), "--site", "site-p", "--site-token-file", str(state.parent / "site.token"),
            "--port", str(port), "--interval", "3600"]  # fmt: skip
    proc = subprocess.Popen([*hub, *args], text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from hub.sites import current_timestamp

    want = current_timestamp(site.repo.dir)
    for _ in range(600):  # bounded: 2 minutes
        try:
            st = httpx.get(f"http://127.0.0.1:{port}/v1/regional/status", timeout=5).json()
            if (st.get("served_timestamp") or {}).get("version") == want and st.get("roster"):
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(
                f"sre-hub regional exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        time.sleep(0.2)
    proc.terminate()
    raise AssertionError("sre-hub regional did not publish the root's timestamp in time")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_r5_the_sre_hub_regional_process_with_its_disk_tampered(tmp_path: Path) -> None:
    """The real ``sre-hub regional`` process: a served target and a spooled batch edited on its disk while
    it runs; the device refuses the target, and after a restart (which forwards the spool) the root
    refuses the batch: nothing installed, nothing landed."""
    import sqlite3

    from sre_core.http_server import free_port

    with Site(tmp_path, n=1) as site:
        site.publish("1.0")
        token = site.sites.add("site-p")
        state, port = tmp_path / "regional-proc", free_port()
        proc = _start_regional(site, state, token, port)
        try:
            site.tier.upstream = f"http://127.0.0.1:{port}"  # the device's hub is now the process
            (f,) = (state / "repo" / "targets" / "stable").glob(f"*.{MODULE}-1.0-model.bin")
            f.chmod(0o644)
            f.write_bytes(b"\0" * f.stat().st_size)
            d = site.devices[0]
            n = len(d.audit_events())
            site.sync(d)
            new = d.audit_events()[n:]
            assert "pull.refused" in new and d.version() is None and d.held() is None, new
            _write_metrics(d, 9)
            assert d.uplink.flush().handed  # queued (durably) at the site
            db = sqlite3.connect(state / "relay.db")
            try:
                ((key, body),) = db.execute(
                    "SELECT key, body FROM relay_spool WHERE kind = 'batch'"
                ).fetchall()
                db.execute("UPDATE relay_spool SET body = ? WHERE key = ?", (bytes(body)[:-1] + b"\0", key))
                db.commit()
            finally:
                db.close()
        finally:
            _stop(proc)
        proc = _start_regional(site, state, token, port)  # its start-up sync forwards the spool
        try:
            for _ in range(300):  # bounded: a minute
                db = sqlite3.connect(state / "relay.db")
                try:
                    left = db.execute("SELECT count(*) FROM relay_spool").fetchone()[0]
                    refused = db.execute("SELECT status FROM relay_refused").fetchall()
                finally:
                    db.close()
                if left == 0:
                    break
                time.sleep(0.2)
            assert left == 0 and refused == [(401,)], (left, refused)
            assert site.lake_rows() == {} and site.fleet.receipts() == []
        finally:
            _stop(proc)


@pytest.mark.slow
def test_u11_a_device_revoked_at_the_root_lands_nothing_through_a_site_with_a_stale_roster(
    region: Site,
) -> None:
    """The site still holds the old roster (or ignores revocations): the root checks again."""
    d = region.devices[0]
    region.fleet.revoke(d.id)  # the site is not told (no roster refresh)
    _write_metrics(d, 5)
    assert d.uplink.flush().handed  # accepted at the site (kept by the device: no receipt)
    send_report(region.tier.url, d.paths, device_report(d.paths, region.channel, region.clock), region.clock)
    before = region.service.reports.get(d.id)
    region.forward()
    assert region.lake_rows() == {} and region.fleet.receipts() == []
    assert region.service.reports.get(d.id) == before
    assert _refused_at_the_regional(region) == {403}


@pytest.mark.slow
def test_r6_approvals_edited_in_the_regional_cache_are_refused_while_the_root_is_down(region: Site) -> None:
    """The site answers approvals from its cache while the root is unreachable: cached decisions edited
    (or planted) on its disk are refused by the device; the genuine one applies once the root is back."""
    from sqlalchemy import insert

    from hub.regional._relay import approvals_cache

    a = region.devices[0]
    ops = Ops(region, a)
    genuine = json.loads(ops.approve(ops.esc, "alert"))
    forged = sign_approval(generate_operator_key(), operator="alice", escalation_id=ops.esc.id,
                           escalation_hash=ops.esc.content_hash, decision="approve", action="safe_mode",
                           now=region.clock.now(), ttl=timedelta(minutes=30))  # fmt: skip
    planted = [{**genuine, "action": "safe_mode"}, json.loads(forged.model_dump_json())]
    assert region.regional is not None
    relay = region.regional.relay
    upstream, relay.upstream = relay.upstream, "http://127.0.0.1:9"  # the site's uplink is down
    with relay.engine.begin() as conn:
        for i, doc in enumerate(planted):
            conn.execute(insert(approvals_cache).values(
                device_id=a.id, escalation_id=ops.esc.id, digest=f"{i:064x}", body=json.dumps(doc),
                fetched_at=region.clock.now().isoformat()))  # fmt: skip
    n = len(a.audit_events())
    out = ops.fetch(a)
    assert out.hub == region.tier.url and not out.applied and ops.esc.id in out.refused, out
    assert a.audit_events()[n:].count("escalation.approval_refused") == 2
    assert a.escalations.get(ops.esc.id).status is EscalationStatus.OPEN
    relay.upstream = upstream
    assert ops.fetch(a).applied == [ops.esc.id]
    a.escalations.execute_approved(ops.executor, ops.roster)
    assert ops.ran == ["alert"]


@pytest.mark.slow
def test_r7_a_channel_role_tampered_on_the_way_to_the_site_does_not_break_what_the_site_served(
    region: Site,
) -> None:
    from regional_attack_support import HostileTier

    d = region.devices[0]
    assert region.regional is not None
    with HostileTier(region.root.url) as uplink:  # the link between the root and the site
        region.regional.mirror.upstream = uplink.url
        uplink.down = [(r"/metadata/\d+\.stable\.json$", _json_edit(_role_edit))]
        region.publish("1.1")
        down = region.regional.sync_down()
        n = len(d.audit_events())
        d.rec.run_once()
        new = d.audit_events()[n:]
        assert "slot.committed" not in new and d.version() == "1.0"  # trust holds: nothing installed
        assert down.error is not None or not down.published, down.to_dict()  # the site says so
        assert "pull.offline" not in new, new  # the site still serves a consistent set for the channel


@pytest.mark.slow
def test_b1_bundles_tampered_old_or_from_another_root_never_seed_what_devices_install(
    tmp_path: Path,
) -> None:
    """Sneakernet: a site whose uplink never worked is seeded from bundles on a USB stick. A bundle with
    an altered target, one signed by another root, and an older one after a newer one never get a device
    to install anything unverified; the genuine bundle then works."""
    from hub.bundle import export_bundle, seed_regional
    from hub.repository import HubRepository
    from sre_core.errors import SreError

    with Site(tmp_path, n=1, regional=True) as site:
        assert site.regional is not None
        site.regional.mirror.upstream = "http://127.0.0.1:9"  # the site never reached the root
        d = site.devices[0]
        site.publish("1.0")
        b10 = tmp_path / "b10"
        export_bundle(site.repo, "stable", b10)
        site.publish("1.1")
        b11 = tmp_path / "b11"
        export_bundle(site.repo, "stable", b11)
        altered = tmp_path / "altered"
        shutil.copytree(b11, altered)
        (t,) = (altered / "targets" / "stable").glob(f"*.{MODULE}-1.1-model.bin")
        t.write_bytes(b"\0" * t.stat().st_size)
        evil_repo = HubRepository.init(tmp_path / "evil", channels=("stable",), clock=site.clock)
        f = tmp_path / "evil.bin"
        f.write_bytes(EVIL)
        from deployment.manifest import ModuleManifest

        evil_repo.publish(
            "stable", f, ModuleManifest(name=MODULE, version="6.6", mode="file", filename="m.bin")
        )
        evil_repo.release("stable", MODULE, "6.6")
        evil = tmp_path / "evil-bundle"
        export_bundle(evil_repo, "stable", evil)
        from _trust_support import sha256

        def served_targets_ok() -> bool:
            tdir = site.served_dir / "targets"
            return all(sha256(p) == p.name.split(".", 1)[0] for p in tdir.rglob("*") if p.is_file())

        with pytest.raises(SreError):
            seed_regional(site.regional, evil)
        d.rec.run_once()
        assert d.version() is None and served_targets_ok()
        try:
            seed_regional(site.regional, altered)
        except SreError:
            pass
        d.rec.run_once()
        assert d.version() is None and served_targets_ok()  # the altered target is not served
        seed_regional(site.regional, b11)
        d.rec.run_once()
        assert d.version() == "1.1"
        with pytest.raises(SreError):
            seed_regional(site.regional, b10)  # older than what the site serves
        d.rec.run_once()
        assert d.version() == "1.1" and served_targets_ok()
