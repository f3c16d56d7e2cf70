"""Root-signed batch receipts: how a device knows the root hub (not a tier in between) holds a batch.

Public API::

    receipt_message(device_id, batch_id) -> bytes     what the root signs
    sign_receipt(signer, device_id, batch_id) -> dict  {"keyid", "sig"} (the root's online timestamp key)
    verify_receipt(root_json, receipt, device_id, batch_id) -> bool
    trusted_root(paths) -> Path                       the device's newest trusted root.json

A regional hub (or anything between a device and the root) can answer an upload "stored" without ever
forwarding it (red-team U3). So a device drops a telemetry batch from its outbox only on a receipt the
root signed for that device and that batch id, with a key of the ``timestamp`` role of the device's
trusted TUF root (the hub's online key): no tier holds it. A 200 without a valid receipt (a regional
hub's ``queued``, or a lie) keeps the batch, re-sent later until a receipt comes back (a regional hub
answers a re-send of a batch it forwarded with the receipt the root gave it; batch ids stay the
idempotency key, so nothing lands twice).

The signed message is domain-separated (``sre-batch-receipt-v1`` then canonical JSON), so it can never
be mistaken for TUF metadata (whose signed bytes are a JSON object) signed by the same key, nor a
receipt for another device or batch.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Signature, Signer
from tuf.api.metadata import Metadata, Root

from sre_core.paths import StatePaths

__all__ = ["receipt_message", "sign_receipt", "trusted_root", "verify_receipt"]

_CONTEXT = b"sre-batch-receipt-v1\n"
_cache: dict[Path, tuple[float, Root]] = {}
_lock = threading.Lock()


def receipt_message(device_id: str, batch_id: str) -> bytes:
    body = json.dumps({"batch_id": batch_id, "device_id": device_id}, sort_keys=True, separators=(",", ":"))
    return _CONTEXT + body.encode()


def sign_receipt(signer: Signer, device_id: str, batch_id: str) -> dict[str, str]:
    """The receipt the root returns with a landed (or duplicate) batch."""
    sig = signer.sign(receipt_message(device_id, batch_id))
    return {"keyid": sig.keyid, "sig": sig.signature}


def trusted_root(paths: StatePaths) -> Path:
    """The newest root the device trusts: the updater's (after rotations), else the pinned anchor."""
    cached = paths.tuf / "root.json"
    return cached if cached.is_file() else paths.root_json


def _root(path: Path) -> Root | None:
    try:
        mtime = path.stat().st_mtime
        with _lock:
            hit = _cache.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        md = Metadata[Root].from_bytes(path.read_bytes())
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(md.signed, Root):
        return None
    with _lock:
        _cache[path] = (mtime, md.signed)
    return md.signed


def verify_receipt(root_json: Path, receipt: Any, device_id: str, batch_id: str) -> bool:
    """True when ``receipt`` is a signature over this device's batch id by a ``timestamp`` role key of
    the root in ``root_json``. Anything else (absent, malformed, another key, another batch) is False."""
    if not isinstance(receipt, dict):
        return False
    keyid, sig = receipt.get("keyid"), receipt.get("sig")
    if not isinstance(keyid, str) or not isinstance(sig, str):
        return False
    root = _root(root_json)
    if root is None or "timestamp" not in root.roles or keyid not in root.roles["timestamp"].keyids:
        return False
    key = root.keys.get(keyid)
    if key is None:
        return False
    try:
        key.verify_signature(Signature(keyid, sig), receipt_message(device_id, batch_id))
    except (UnverifiedSignatureError, ValueError):
        return False
    return True
