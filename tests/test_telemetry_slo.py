"""Drift SLOs and the device-state attestation (pure parts)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from telemetry_support import device

from sre_agent.attestation import collect_state, sign_attestation, statement
from sre_agent.slo import evaluate_slos, js_distance, report_slos
from sre_core.clock import FakeClock
from sre_core.signing import SignatureRefused, dsse_verify
from sre_core.telemetry import MemorySink


def test_js_distance_bounds() -> None:
    assert js_distance({"a": 0.5, "b": 0.5}, {"a": 1, "b": 1}) == pytest.approx(0.0)
    assert js_distance({"a": 1.0}, {"b": 1.0}) == pytest.approx(1.0)
    mid = js_distance({"a": 0.7, "b": 0.3}, {"a": 0.5, "b": 0.5})
    assert 0 < mid < 0.2


def test_slos_flag_a_device_that_has_drifted() -> None:
    now = datetime(2026, 3, 1, tzinfo=UTC)
    minute, day = timedelta(minutes=1), timedelta(days=1)
    fresh = evaluate_slos(
        now, now - 5 * minute, now - minute, now - 2 * day, {"a": 50, "b": 50}, {"a": 1, "b": 1}
    )
    assert all(r.met for r in fresh)
    stale = {r.name: r for r in evaluate_slos(now, now - timedelta(days=9), None, now - timedelta(days=90),
                                               {"a": 95, "b": 5}, {"a": 0.5, "b": 0.5})}  # fmt: skip
    assert not stale["sync.oldest_unacked_age_s"].met
    assert stale["sync.since_last_ack_s"].value is None and not stale["sync.since_last_ack_s"].met
    assert not stale["policy.age_s"].met and not stale["model.divergence_js"].met
    sink = MemorySink()
    report_slos(sink, list(stale.values()), now)
    names = {m[0] for m in sink.metrics}
    assert "slo.sync.oldest_unacked_age_s" in names and "slo.model.divergence_js.met" in names


def test_attestation_statement_and_envelope(tmp_path: Path) -> None:
    from deploy_helpers import StaticSource, make_artifact

    from deployment.reconcile import Reconciler

    paths, ident = device(tmp_path / "dev")
    clock = FakeClock()  # a real install: the attestation reads the slot manager's own records
    Reconciler(
        paths, StaticSource(clock, [make_artifact(tmp_path / "cas", "clf", "2.0", b"two")]), clock
    ).run_once()
    st = collect_state(paths, clock, "ab" * 32, "telemetry@1", "verified", safe_mode=True)
    assert st.modules["clf"]["version"] == "2.0" and st.safe_mode
    stmt = statement(ident.device_id, st)
    assert stmt["subject"][0]["name"] == ident.device_id
    env = sign_attestation(ident, st)
    key_id, payload = dsse_verify(env, lambda k: ident.public_key)
    assert key_id == ident.device_id and json.loads(payload)["predicate"]["audit_head"] == "ab" * 32
    doc = json.loads(env)
    doc["payload"] = base64.b64encode(payload.replace(b'"safe_mode":true', b'"safe_mode":false')).decode()
    with pytest.raises(SignatureRefused) as err:
        dsse_verify(json.dumps(doc).encode(), lambda k: ident.public_key)
    assert err.value.reason == "forged"
