"""The device <-> hub wire signatures, shared by both sides (neither may import the other).

Requests: RFC 9421 HTTP Message Signatures with Ed25519 (the ``http-message-signatures`` package), label
``sre`` and tag ``sre-uplink``, covering the method, the target URI, ``content-digest`` (so the body is
signed) and ``x-sre-device``; the signature parameters carry ``keyid`` (the device id), ``created`` and a
random ``nonce``. Replay protection is ours (the library leaves it to the caller): the verifier refuses
a ``created`` outside a window around its own clock and a nonce seen within that window.

Attestations: DSSE envelopes (``"DSSEv1" SP len(type) SP type SP len(body) SP body``) signed with Ed25519.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    InvalidSignature,
    algorithms,
)
from http_message_signatures.structures import CaseInsensitiveDict

__all__ = [
    "COVERED",
    "DEVICE_STATE_PREDICATE",
    "INTOTO_PAYLOAD_TYPE",
    "INTOTO_STATEMENT",
    "SIGNATURE_TAG",
    "NonceCache",
    "SignatureRefused",
    "VerifiedRequest",
    "dsse_pae",
    "dsse_sign",
    "dsse_verify",
    "request_key_id",
    "sign_request",
    "verify_request",
]

SIGNATURE_LABEL = "sre"
SIGNATURE_TAG = "sre-uplink"
COVERED = ("@method", "@target-uri", "content-digest", "x-sre-device")
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
INTOTO_STATEMENT = "https://in-toto.io/Statement/v1"
DEVICE_STATE_PREDICATE = "https://sre-agent.dev/attestation/device-state/v1"


class SignatureRefused(Exception):  # noqa: N818 (a verdict, not a crash)
    """A request or envelope is not acceptable. ``reason`` is one of: unsigned, malformed, unknown-device,
    revoked, forged, stale, replayed."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class _Msg:
    method: str
    url: str
    headers: Any


class _OneKey(HTTPSignatureKeyResolver):
    def __init__(
        self, key_id: str, private: Ed25519PrivateKey | None, public: Ed25519PublicKey | None
    ) -> None:
        self.key_id = key_id
        self.private = private
        self.public = public

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        if key_id != self.key_id or self.private is None:
            raise KeyError(key_id)
        return self.private

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey | None:
        return self.public if key_id == self.key_id else None


class _Verifier(HTTPMessageVerifier):
    """Time checks are done against the injected clock in :func:`verify_request`, not the system clock."""

    def validate_created_and_expires(self, sig_input: Any, max_age: Any = None) -> None:
        if "created" not in sig_input.params:
            raise InvalidSignature('Signature is missing a required "created" parameter')


def sign_request(
    method: str,
    url: str,
    body: bytes,
    key: Ed25519PrivateKey,
    key_id: str,
    created: int,
    nonce: str,
    headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """Headers to send: the given ones plus ``x-sre-device``, ``Content-Digest``, ``Signature-Input``,
    ``Signature``."""
    hdrs = CaseInsensitiveDict(dict(headers or {}))  # type: ignore[no-untyped-call]
    hdrs["x-sre-device"] = key_id
    msg = _Msg(method.upper(), url, hdrs)
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=_OneKey(key_id, key, None)
    )
    signer.sign(
        msg,
        key_id=key_id,
        created=datetime.fromtimestamp(created, tz=UTC),
        nonce=nonce,
        label=SIGNATURE_LABEL,
        tag=SIGNATURE_TAG,
        covered_component_ids=COVERED,
        body=body,
    )
    return {str(k): str(v) for k, v in hdrs.items()}


def request_key_id(headers: CaseInsensitiveDict) -> str:
    """The (unverified) ``keyid`` a request claims; raises SignatureRefused when unsigned/malformed."""
    if "signature-input" not in headers or "signature" not in headers:
        raise SignatureRefused("unsigned", "no Signature-Input/Signature headers")
    raw = str(headers["signature-input"])
    marker = 'keyid="'
    i = raw.find(marker)
    if i < 0:
        raise SignatureRefused("malformed", "no keyid in Signature-Input")
    j = raw.find('"', i + len(marker))
    return raw[i + len(marker) : j]


@dataclass(frozen=True)
class VerifiedRequest:
    """A request whose signature, freshness and nonce checked out."""

    key_id: str
    created: int
    nonce: str


class NonceCache:
    """Nonces seen within the replay window (bounded; older entries are pruned)."""

    def __init__(self, window_s: float = 300.0, max_entries: int = 1_000_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def check_and_add(self, key_id: str, nonce: str, created: int, now: float) -> bool:
        """True if new (and now remembered); False for a replay."""
        with self._lock:
            if len(self._seen) >= self.max_entries or len(self._seen) % 1024 == 0:
                horizon = now - 2 * self.window_s
                self._seen = {k: v for k, v in self._seen.items() if v >= horizon}
            if (key_id, nonce) in self._seen:
                return False
            if len(self._seen) >= self.max_entries:
                return False  # refuse rather than forget: a full cache must not open a replay hole
            self._seen[(key_id, nonce)] = created
            return True


def verify_request(
    method: str,
    url: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    resolve_key: Callable[[str], Ed25519PublicKey],
    now: float,
    nonces: NonceCache,
) -> VerifiedRequest:
    """Verify a signed request.

    Args:
        resolve_key: device id -> enrolled public key; raises SignatureRefused (unknown-device, revoked).
        now: the verifier's clock (POSIX seconds).
        nonces: the replay cache (its window is the allowed skew of ``created``).

    Raises:
        SignatureRefused: unsigned, malformed, unknown-device, revoked, forged, stale or replayed.
    """
    hdrs = CaseInsensitiveDict(list(headers))  # type: ignore[no-untyped-call]
    key_id = request_key_id(hdrs)
    public = resolve_key(key_id)
    if str(hdrs.get("x-sre-device", "")) != key_id:
        raise SignatureRefused("forged", "x-sre-device does not match the signing key id")
    verifier = _Verifier(signature_algorithm=algorithms.ED25519, key_resolver=_OneKey(key_id, None, public))
    try:
        results = verifier.verify(
            _Msg(method.upper(), url, hdrs),
            max_age=None,
            expect_tag=SIGNATURE_TAG,
            require_components=COVERED,
            body=body,
        )
    except InvalidSignature as exc:
        raise SignatureRefused("forged", str(exc)) from exc
    except Exception as exc:
        raise SignatureRefused("malformed", str(exc)) from exc
    params = results[0].parameters
    created = params.get("created")
    nonce = params.get("nonce")
    if not isinstance(created, int) or not isinstance(nonce, str) or not nonce:
        raise SignatureRefused("malformed", "created and nonce are required")
    if abs(now - created) > nonces.window_s:
        raise SignatureRefused("stale", f"created {created} is {now - created:+.0f} s from the hub clock")
    if not nonces.check_and_add(key_id, nonce, created, now):
        raise SignatureRefused("replayed", f"nonce {nonce} was already used")
    return VerifiedRequest(key_id, created, nonce)


def dsse_pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def dsse_sign(key: Ed25519PrivateKey, key_id: str, payload_type: str, payload: bytes) -> dict[str, Any]:
    """A DSSE envelope with one Ed25519 signature."""
    sig = key.sign(dsse_pae(payload_type, payload))
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id, "sig": base64.b64encode(sig).decode()}],
    }


def dsse_verify(
    envelope: bytes | dict[str, Any], resolve_key: Callable[[str], Ed25519PublicKey]
) -> tuple[str, bytes]:
    """Verify a DSSE envelope. Returns (key id, payload).

    Raises:
        SignatureRefused: malformed, unknown-device, revoked (from ``resolve_key``) or forged.
    """
    try:
        env = json.loads(envelope) if isinstance(envelope, bytes) else envelope
        payload_type = str(env["payloadType"])
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = env["signatures"]
        key_id = str(sigs[0]["keyid"])
        sig = base64.b64decode(sigs[0]["sig"], validate=True)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise SignatureRefused("malformed", f"not a DSSE envelope ({exc})") from exc
    public = resolve_key(key_id)
    try:
        public.verify(sig, dsse_pae(payload_type, payload))
    except CryptoInvalidSignature as exc:
        raise SignatureRefused("forged", "the DSSE signature does not verify") from exc
    return key_id, payload
