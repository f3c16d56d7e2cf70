"""Hub ingest on a real loopback server: enrolment, signatures, replay protection, idempotency, the lake."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from telemetry_support import device, metric_columns, running_hub, small_policy

from hub.fleetdb import FleetDB
from sre_agent.attestation import DeviceState, sign_attestation
from sre_agent.telemetry import Store, TelemetryWriter
from sre_agent.uplink import ATTEST_PATH, BATCH_PATH, Uplink
from sre_core.clock import SystemClock
from sre_core.identity import DeviceIdentity
from sre_core.signing import sign_request


def _sealed_batch(tmp_path: Path, ident: DeviceIdentity) -> tuple[str, bytes]:
    store = Store(tmp_path / f"{ident.device_id}.duckdb", small_policy(), SystemClock(), ident.device_id)
    w = TelemetryWriter(store, enforce=False)
    w.write_table("metrics", metric_columns(int(time.time() * 1e6), 10, 5))
    w.flush()
    (b,) = store.seal()
    payload = store.payload(b.batch_id)
    store.close()
    return b.batch_id, payload


def _post(
    url: str, body: bytes, key: Ed25519PrivateKey | None, key_id: str, created: int | None = None
) -> httpx.Response:
    headers = {"content-type": "application/octet-stream"}
    if key is not None:
        headers = sign_request(
            "POST", url, body, key, key_id, created or int(time.time()), secrets.token_hex(16), headers
        )
    return httpx.post(url, content=body, headers=headers, timeout=10)


def _state(ident: DeviceIdentity) -> DeviceState:
    return DeviceState(
        time="2026-11-23T10:00:00+00:00",
        policy_version="telemetry@1",
        trust_status="verified",
        audit_head="ab" * 32,
        safe_mode=False,
        modules={"clf": {"version": "2.0", "digest": "sha256:" + "cd" * 32}},
    )


def test_enrolled_device_lands_batches_idempotently_in_a_hive_lake(tmp_path: Path) -> None:
    _, ident = device(tmp_path / "dev")
    bid, payload = _sealed_batch(tmp_path, ident)
    with running_hub(tmp_path / "fleet") as hub:
        hub.fleet.enroll(ident.device_id, ident.public_pem)
        url = f"{hub.url}{BATCH_PATH}{bid}"
        first = _post(url, payload, ident.private_key, ident.device_id)
        again = _post(url, payload, ident.private_key, ident.device_id)
        assert first.status_code == 200 and first.json()["status"] == "stored"
        assert again.status_code == 200 and again.json()["status"] == "duplicate"
        files = list((tmp_path / "fleet" / "lake").glob("table=metrics/date=*/*.parquet"))
        assert [f.name for f in files] == [f"{bid}.parquet"]
        rows = hub.fleet.query("SELECT count(*) AS n, min(device_id) AS d, min(date) AS day FROM metrics")
        got = rows.to_pylist()[0]
        assert got["n"] == 50 and got["d"] == ident.device_id
        assert hub.fleet.state(ident.device_id)["rows"] == {"metrics": 50}


@pytest.mark.parametrize("kind", ["batch", "attestation"])
def test_hub_refuses_unsigned_forged_replayed_stale_unknown_and_revoked(tmp_path: Path, kind: str) -> None:
    _, ident = device(tmp_path / "dev")
    _, stranger = device(tmp_path / "stranger")
    if kind == "batch":
        bid, body = _sealed_batch(tmp_path, ident)
        path = f"{BATCH_PATH}{bid}"
    else:
        body = sign_attestation(ident, _state(ident))
        path = f"{ATTEST_PATH}att1"
    with running_hub(tmp_path / "fleet") as hub:
        hub.fleet.enroll(ident.device_id, ident.public_pem)
        url = hub.url + path
        post: Callable[..., httpx.Response] = _post
        # unsigned
        r = post(url, body, None, ident.device_id)
        assert (r.status_code, r.json()["refused"]) == (401, "unsigned")
        # forged: signed with another key under the enrolled id
        r = post(url, body, stranger.private_key, ident.device_id)
        assert (r.status_code, r.json()["refused"]) == (401, "forged")
        # tampered body under a valid signature of the original body
        headers = sign_request("POST", url, body, ident.private_key, ident.device_id, int(time.time()), "n-t")
        r = httpx.post(url, content=body[:-1] + bytes([body[-1] ^ 1]), headers=headers, timeout=10)
        assert (r.status_code, r.json()["refused"]) == (401, "forged")
        # stale: created an hour ago
        r = post(url, body, ident.private_key, ident.device_id, created=int(time.time()) - 3600)
        assert (r.status_code, r.json()["refused"]) == (401, "stale")
        # unknown device
        r = post(url, body, stranger.private_key, stranger.device_id)
        assert (r.status_code, r.json()["refused"]) == (401, "unknown-device")
        # a good request is accepted once; the same bytes again are a replay
        headers = sign_request("POST", url, body, ident.private_key, ident.device_id, int(time.time()), "n-1")
        ok = httpx.post(url, content=body, headers=headers, timeout=10)
        assert ok.status_code == 200, ok.text
        r = httpx.post(url, content=body, headers=headers, timeout=10)
        assert (r.status_code, r.json()["refused"]) == (401, "replayed")
        # revoked: refused from then on, even with a fresh, valid signature
        hub.fleet.revoke(ident.device_id)
        r = post(url, body, ident.private_key, ident.device_id)
        assert (r.status_code, r.json()["refused"]) == (403, "revoked")
    # Nothing but the one good request landed.
    fleet = FleetDB(tmp_path / "fleet")
    if kind == "batch":
        assert len(fleet.receipts()) == 1
    else:
        assert fleet.state(ident.device_id)["attested"]["policy_version"] == "telemetry@1"


def test_attestation_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    _, ident = device(tmp_path / "dev")
    _, other = device(tmp_path / "other", device_id=ident.device_id)
    forged = sign_attestation(
        other, _state(ident)
    )  # right device id, wrong key, inside a valid HTTP signature
    with running_hub(tmp_path / "fleet") as hub:
        hub.fleet.enroll(ident.device_id, ident.public_pem)
        r = _post(f"{hub.url}{ATTEST_PATH}x", forged, ident.private_key, ident.device_id)
        assert (r.status_code, r.json()["refused"]) == (401, "forged")
        assert "attested" not in hub.fleet.state(ident.device_id)


def test_uplink_ships_attestation_first_and_feedback_lands_in_review_queue(tmp_path: Path) -> None:
    paths, ident = device(tmp_path / "dev")
    store = Store(paths.telemetry_db, small_policy(), SystemClock(), ident.device_id)
    w = TelemetryWriter(store, enforce=False)
    w.write_table("metrics", metric_columns(int(time.time() * 1e6), 5, 4))
    w.record("triage_decisions", {"what": "chaos refused", "why": "targets the active slot"})
    w.record("feedback", {"suggested_gate": "latency_p99 < 50ms", "from": "chaos run 7"})
    w.flush()
    from sre_agent.attestation import queue_attestation

    queue_attestation(store, ident, _state(ident))
    with running_hub(tmp_path / "fleet") as hub:
        hub.fleet.enroll(ident.device_id, ident.public_pem)
        up = Uplink(store, ident, hub.url, SystemClock())
        report = up.flush()
        up.close()
        assert report.refused is None and report.pending_after == 0
        kinds = [r["table"] for r in hub.fleet.receipts()]
        assert sorted(kinds) == ["feedback", "metrics", "triage_decisions"]
        st = hub.fleet.state(ident.device_id)
        assert st["attested"]["modules"]["clf"]["version"] == "2.0"
        queue = hub.fleet.review_queue()
        assert len(queue) == 1 and queue[0]["status"] == "pending"
        assert queue[0]["items"][0]["suggested_gate"] == "latency_p99 < 50ms"
    # Upload order: the attestation, then escalations, before bulk metrics.
    assert report.uploaded[0] != "" and len(report.uploaded) == 4
    store.close()


def test_hub_cli_enroll_list_revoke_query(tmp_path: Path, run_cli: Callable[..., object]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _, ident = device(tmp_path / "dev")
    pub = tmp_path / "dev" / "identity" / "device_ed25519.pub.pem"
    r = run_cli(
        "sre-hub", "devices", "enroll", "--repo", str(repo), "--id", ident.device_id, "--key", str(pub)
    )
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]
    bad = run_cli("sre-hub", "devices", "enroll", "--repo", str(repo), "--id", "x1", "--key", "nonsense")
    assert bad.returncode == 2  # type: ignore[attr-defined]
    bid, payload = _sealed_batch(tmp_path, ident)
    FleetDB(repo / "fleet").land_batch(ident.device_id, bid, payload)
    q = run_cli("sre-hub", "query", "--repo", str(repo), "--json", "SELECT count(*) AS n FROM metrics")
    assert json.loads(q.stdout)["rows"] == [{"n": 50}]  # type: ignore[attr-defined]
    bad_q = run_cli("sre-hub", "query", "--repo", str(repo), "SELECT * FROM nope")
    assert bad_q.returncode == 2 and "nope" in bad_q.stderr  # type: ignore[attr-defined]
    fb = run_cli("sre-hub", "devices", "feedback", "--repo", str(repo), "--json")
    assert json.loads(fb.stdout) == {"feedback": []}  # type: ignore[attr-defined]
    run_cli("sre-hub", "devices", "revoke", "--repo", str(repo), ident.device_id)
    lst = run_cli("sre-hub", "devices", "list", "--repo", str(repo), "--json")
    devs = json.loads(lst.stdout)["devices"]  # type: ignore[attr-defined]
    assert [(d["device_id"], d["status"]) for d in devs] == [(ident.device_id, "revoked")]
