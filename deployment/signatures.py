"""Second signatures on artifacts: cosign ``sign-blob --key`` (ECDSA P-256) and DSSE in-toto statements.

Public API::

    cosign_sign_file(private_pem, path) -> bytes          base64 DER signature, as cosign writes it
    cosign_verify(public_pems, sha256_hex, signature, what) -> str (key id)   raises SignatureError
    intoto_statement(name, sha256_hex, predicate_type, predicate) -> dict
    dsse_sign(private_pem, payload_type, payload) -> dict  the DSSE envelope
    verify_attestation(envelope_bytes, public_pems, sha256_hex, predicate_types, what) -> dict (statement)
    keyid(public_pem) -> str
    SignatureError(SreError)

Hand-written on ``cryptography`` because the formats are tiny and fixed and the device must verify
offline with no transparency log and no cosign binary: cosign's ``sign-blob --key`` signature is
base64 of a DER ECDSA P-256 signature over SHA-256 of the blob; DSSE signs
``"DSSEv1" SP len(type) SP type SP len(body) SP body``. Verification takes the artifact's SHA-256
(already computed by the TUF check) instead of reading the file again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from sre_core.errors import SreError
from sre_core.signing import dsse_pae

__all__ = [
    "INTOTO_PAYLOAD_TYPE",
    "STATEMENT_TYPE",
    "SignatureError",
    "cosign_sign_file",
    "cosign_verify",
    "dsse_pae",
    "dsse_sign",
    "intoto_statement",
    "keyid",
    "verify_attestation",
]

INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_MAX_ENVELOPE = 4 * 1024 * 1024


class SignatureError(SreError):
    """A second signature or attestation is missing, malformed, or not made by a pinned key."""


def _load_public(pem: bytes | str) -> ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    key = serialization.load_pem_public_key(data)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise SignatureError("load pinned key", f"curve {key.curve.name} is not P-256", "pin a P-256 key")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise SignatureError("load pinned key", f"unsupported key type {type(key).__name__}", "pin a P-256 key")


def keyid(public_pem: bytes | str) -> str:
    """sha256 of the DER SubjectPublicKeyInfo (hex): a stable id for a pinned key."""
    key = _load_public(public_pem)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _load_private(pem: bytes) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise SignatureError("load signing key", "not an ECDSA P-256 or Ed25519 private key", "use a P-256 key")


def cosign_sign_file(private_pem: bytes, path: Path) -> bytes:
    """Sign a file like ``cosign sign-blob --key``: base64(DER ECDSA-P256-SHA256(blob))."""
    key = _load_private(private_pem)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError("cosign sign", "cosign blob signatures need an ECDSA P-256 key")
    with Path(path).open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").digest()
    sig = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    return base64.b64encode(sig)


def cosign_verify(public_pems: list[str] | list[bytes], sha256_hex: str, signature: bytes, what: str) -> str:
    """Check a cosign blob signature against pinned keys. Returns the key id that verified.

    Raises:
        SignatureError: not base64, or no pinned key verifies it.
    """
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"verify cosign signature of {what}", "signature is not base64") from exc
    digest = bytes.fromhex(sha256_hex)
    for pem in public_pems:
        key = _load_public(pem)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            continue
        try:
            key.verify(raw, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature:
            continue
        return keyid(pem)
    raise SignatureError(
        f"verify cosign signature of {what}",
        "no key pinned in the trust policy verifies the signature (unknown signer or tampered artifact)",
        "pin the signer's public key in policies trust.yaml (cosign_public_keys) or republish",
    )


def dsse_sign(private_pem: bytes, payload_type: str, payload: bytes) -> dict[str, Any]:
    """A DSSE envelope with one signature (ECDSA P-256 SHA-256 DER, or Ed25519)."""
    key = _load_private(private_pem)
    pae = dsse_pae(payload_type, payload)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(pae, ec.ECDSA(hashes.SHA256()))
    else:
        sig = key.sign(pae)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": keyid(pub), "sig": base64.b64encode(sig).decode()}],
    }


def intoto_statement(name: str, sha256_hex: str, predicate_type: str, predicate: Any) -> dict[str, Any]:
    """An in-toto Statement v1 about one artifact."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": sha256_hex}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }


def _verify_dsse_sig(pem: bytes | str, pae: bytes, sig: bytes) -> bool:
    key = _load_public(pem)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, pae, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(sig, pae)
    except InvalidSignature:
        return False
    return True


def verify_attestation(
    envelope: bytes,
    public_pems: list[str] | list[bytes],
    sha256_hex: str,
    predicate_types: list[str],
    what: str,
) -> dict[str, Any]:
    """Verify a DSSE in-toto envelope: signed by a pinned key, a subject with the artifact's digest,
    an allowed predicate type. Returns the statement.

    Raises:
        SignatureError: any check failed.
    """
    w = f"verify attestation of {what}"
    if len(envelope) > _MAX_ENVELOPE:
        raise SignatureError(w, f"envelope is larger than {_MAX_ENVELOPE} bytes")
    try:
        env = json.loads(envelope)
        ptype = env["payloadType"]
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = [base64.b64decode(s["sig"], validate=True) for s in env["signatures"]]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError(w, f"not a DSSE envelope ({exc})", "republish the attestation") from exc
    if ptype != INTOTO_PAYLOAD_TYPE:
        raise SignatureError(w, f"payloadType {ptype!r} is not {INTOTO_PAYLOAD_TYPE}")
    pae = dsse_pae(ptype, payload)
    if not any(_verify_dsse_sig(pem, pae, sig) for pem in public_pems for sig in sigs):
        raise SignatureError(
            w,
            "no key pinned in the trust policy signed the envelope",
            "pin the attester's public key in trust.yaml (attestation_public_keys) or republish",
        )
    try:
        stmt = json.loads(payload)
        subjects = stmt["subject"]
        digests = {s["digest"].get("sha256") for s in subjects}
        stype = stmt["_type"]
        pred = stmt["predicateType"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(w, f"not an in-toto statement ({exc})") from exc
    if stype != STATEMENT_TYPE:
        raise SignatureError(w, f"statement _type {stype!r} is not {STATEMENT_TYPE}")
    if sha256_hex not in digests:
        raise SignatureError(
            w,
            "no subject digest matches the artifact's sha256 (the statement is about another artifact)",
            "republish the attestation for this artifact",
        )
    if predicate_types and pred not in predicate_types:
        raise SignatureError(w, f"predicateType {pred!r} is not one of {predicate_types}")
    result: dict[str, Any] = stmt
    return result
