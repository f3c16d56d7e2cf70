"""Declare, admit, sign: the device attests its own state to the hub.

The statement is in-toto Statement v1 whose subject is the device (digest = sha256 of the canonical
predicate) and whose predicate is the state: the slot manager's records of each installed module
(versions, artifact and tree digests, kind, last-known-good, bad versions), policy version, trust status,
audit-chain head, safe mode, time. It is signed as a DSSE envelope with the device key and queued in the
outbox like any batch; the hub verifies it against the enrolled key and keeps the latest per device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sre_agent.telemetry.store import Store
from sre_core.clock import Clock
from sre_core.identity import DeviceIdentity
from sre_core.paths import StatePaths
from sre_core.signing import DEVICE_STATE_PREDICATE, INTOTO_PAYLOAD_TYPE, INTOTO_STATEMENT, dsse_sign

__all__ = ["DeviceState", "collect_state", "queue_attestation", "sign_attestation", "statement"]


@dataclass(frozen=True)
class DeviceState:
    """What the device declares about itself."""

    time: str
    policy_version: str
    trust_status: str
    audit_head: str
    safe_mode: bool
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def predicate(self) -> dict[str, Any]:
        return asdict(self)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def collect_state(
    paths: StatePaths,
    clock: Clock,
    audit_head: str,
    policy_version: str,
    trust_status: str,
    safe_mode: bool,
) -> DeviceState:
    """The device's state from the slot manager's own records (what it installed and re-hashed).

    Per module: phase, what is served, the active version with its artifact and tree digests (the
    digests recorded when the bytes were re-hashed against the signed ones), its kind (model, config,
    policy), the last-known-good and the bad versions; plus the sha256 of ``state.json`` itself. A
    state file the slot manager cannot read is attested as such, never skipped.
    """
    from deployment.slots import SlotError, SlotManager
    from sre_core.audit import AuditLog

    slots = SlotManager(paths, AuditLog(paths.audit_log, clock), clock)
    modules: dict[str, dict[str, Any]] = {}
    for name in slots.modules():
        raw_path = paths.module(name) / "state.json"
        entry: dict[str, Any] = {}
        if raw_path.is_file():
            entry["state_sha256"] = hashlib.sha256(raw_path.read_bytes()).hexdigest()
        try:
            st = slots.status(name)
        except (SlotError, KeyError, ValueError, TypeError) as exc:
            entry["error"] = f"unreadable slot state: {exc}"[:200]
            modules[name] = entry
            continue
        entry["phase"] = st.phase.value
        entry["serving"] = st.serving
        if st.active is not None:
            rec = st.active.record
            entry |= {
                "version": rec.version,
                "sha256": rec.sha256,
                "tree_sha256": rec.tree_sha256,
                "slot": st.active.slot,
                "kind": str(rec.manifest.get("kind", "model")),
                "installed_at": rec.installed_at,
            }
        if st.last_known_good:
            entry["last_known_good"] = dict(st.last_known_good)
        entry["bad_versions"] = sorted({str(b.get("version")) for b in st.bad.values()})
        modules[name] = entry
    return DeviceState(clock.now().isoformat(), policy_version, trust_status, audit_head, safe_mode, modules)


def statement(device_id: str, state: DeviceState) -> dict[str, Any]:
    """The in-toto statement for ``state``."""
    pred = state.predicate()
    return {
        "_type": INTOTO_STATEMENT,
        "subject": [{"name": device_id, "digest": {"sha256": hashlib.sha256(_canonical(pred)).hexdigest()}}],
        "predicateType": DEVICE_STATE_PREDICATE,
        "predicate": pred,
    }


def sign_attestation(identity: DeviceIdentity, state: DeviceState) -> bytes:
    """The DSSE envelope (canonical JSON bytes)."""
    payload = _canonical(statement(identity.device_id, state))
    env = dsse_sign(identity.private_key, identity.device_id, INTOTO_PAYLOAD_TYPE, payload)
    return _canonical(env)


def queue_attestation(store: Store, identity: DeviceIdentity, state: DeviceState) -> str:
    """Sign and queue for upload (first in line). Returns the outbox id."""
    return store.queue_document("attestation", sign_attestation(identity, state), priority=-1)
