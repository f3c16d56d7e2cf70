"""Declare, admit, sign: the device attests its own state to the hub.

The statement is in-toto Statement v1 whose subject is the device (digest = sha256 of the canonical
predicate) and whose predicate is the state: installed module digests, policy version, trust status,
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
    """Read installed modules from ``<state>/modules/*/state.json`` (digest of each state file, plus the
    active version/digest when the file names them)."""
    modules: dict[str, dict[str, Any]] = {}
    if paths.modules.is_dir():
        for st in sorted(paths.modules.glob("*/state.json")):
            raw = st.read_bytes()
            entry: dict[str, Any] = {"state_sha256": hashlib.sha256(raw).hexdigest()}
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {}
            if isinstance(doc, dict):
                for k in ("active", "active_version", "version", "digest", "active_digest"):
                    if isinstance(doc.get(k), str | int | float):
                        entry[k] = doc[k]
            modules[st.parent.name] = entry
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
