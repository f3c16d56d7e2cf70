"""cosign sign-blob compatible signatures and DSSE in-toto attestations (real keys, real crypto)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from _trust_support import p256_keypair
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from deployment.signatures import (
    SignatureError,
    cosign_sign_file,
    cosign_verify,
    dsse_pae,
    dsse_sign,
    intoto_statement,
    verify_attestation,
)

SBOM = "https://cyclonedx.org/bom"


def test_cosign_signature_is_plain_ecdsa_p256_over_the_blob(tmp_path: Path) -> None:
    priv, pub = p256_keypair()
    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"weights" * 1000)
    sig = cosign_sign_file(priv, blob)
    # What `cosign verify-blob --key cosign.pub --signature sig blob` checks: base64 DER ECDSA-SHA256(blob).
    key = serialization.load_pem_public_key(pub.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(base64.b64decode(sig), blob.read_bytes(), ec.ECDSA(hashes.SHA256()))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert cosign_verify([pub], digest, sig, "model")
    other = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(SignatureError, match="no key pinned"):
        cosign_verify([pub], other, sig, "model")
    _, stranger = p256_keypair()
    with pytest.raises(SignatureError, match="no key pinned"):
        cosign_verify([stranger], digest, sig, "model")
    with pytest.raises(SignatureError, match="not base64"):
        cosign_verify([pub], digest, b"%%%", "model")


def test_cosign_signature_made_elsewhere_verifies(tmp_path: Path) -> None:
    """A signature produced directly with the library (as cosign does) verifies against the digest."""
    key = ec.generate_private_key(ec.SECP256R1())
    data = b"artifact bytes"
    sig = base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256())))
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cosign_verify([pub], hashlib.sha256(data).hexdigest(), sig, "a")


@pytest.mark.parametrize("kind", ["p256", "ed25519"])
def test_dsse_intoto_round_trip_and_refusals(kind: str) -> None:
    if kind == "p256":
        priv, pub = p256_keypair()
    else:
        k = ed25519.Ed25519PrivateKey.generate()
        priv = k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        pub = (
            k.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
    digest = hashlib.sha256(b"model").hexdigest()
    stmt = intoto_statement("model.onnx", digest, SBOM, {"components": []})
    env = dsse_sign(priv, "application/vnd.in-toto+json", json.dumps(stmt).encode())
    blob = json.dumps(env).encode()
    assert verify_attestation(blob, [pub], digest, [SBOM], "m")["predicateType"] == SBOM
    with pytest.raises(SignatureError, match="no subject digest"):
        verify_attestation(blob, [pub], hashlib.sha256(b"other").hexdigest(), [SBOM], "m")
    with pytest.raises(SignatureError, match="predicateType"):
        verify_attestation(blob, [pub], digest, ["https://spdx.dev/Document"], "m")
    _, stranger = p256_keypair()
    with pytest.raises(SignatureError, match="no key pinned"):
        verify_attestation(blob, [stranger], digest, [SBOM], "m")
    # the payload swapped under an intact signature
    forged = dict(
        env, payload=base64.b64encode(json.dumps(intoto_statement("x", digest, SBOM, {})).encode()).decode()
    )
    with pytest.raises(SignatureError, match="no key pinned"):
        verify_attestation(json.dumps(forged).encode(), [pub], digest, [SBOM], "m")
    with pytest.raises(SignatureError, match="not a DSSE envelope"):
        verify_attestation(b"{}", [pub], digest, [SBOM], "m")


def test_dsse_pae_matches_the_spec() -> None:
    assert dsse_pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
