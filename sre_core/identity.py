"""The device identity: an Ed25519 key pair (private key 0600) and a stable device id.

The id is derived from the public key (``dev-`` + 16 hex chars of its sha256) unless one is given at
provisioning, so it survives reinstalls of the agent as long as the key does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sre_core.atomic import atomic_write_bytes, atomic_write_text
from sre_core.errors import SreError
from sre_core.paths import StatePaths

__all__ = ["DeviceIdentity", "load_identity", "load_or_create_identity", "public_key_pem"]


@dataclass(frozen=True)
class DeviceIdentity:
    """The device's key pair and id."""

    device_id: str
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @property
    def public_pem(self) -> str:
        return public_key_pem(self.public_key)


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _derive_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "dev-" + hashlib.sha256(raw).hexdigest()[:16]


def load_identity(paths: StatePaths) -> DeviceIdentity:
    """Load an existing identity.

    Raises:
        SreError: there is none, or the key file is unreadable or group/world-readable.
    """
    if not paths.private_key.exists():
        raise SreError(
            f"load device identity from {paths.private_key}",
            "no key pair exists",
            f"run `sre-agent init --state {paths.root}`",
        )
    st = paths.private_key.stat()
    if st.st_mode & 0o077:
        raise SreError(
            f"load device identity from {paths.private_key}",
            f"the private key is accessible by others (mode {oct(st.st_mode & 0o777)})",
            f"chmod 600 {paths.private_key}",
        )
    key = serialization.load_pem_private_key(paths.private_key.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SreError(f"load device identity from {paths.private_key}", "not an Ed25519 private key")
    device_id = (
        paths.device_id_file.read_text().strip()
        if paths.device_id_file.exists()
        else _derive_id(key.public_key())
    )
    return DeviceIdentity(device_id, key)


def load_or_create_identity(paths: StatePaths, device_id: str | None = None) -> tuple[DeviceIdentity, bool]:
    """Load the identity, creating it once if missing. Returns (identity, created)."""
    if paths.private_key.exists():
        ident = load_identity(paths)
        if device_id and device_id != ident.device_id:
            raise SreError(
                "provision device identity",
                f"this state already belongs to device {ident.device_id}, not {device_id}",
                "use a fresh state directory or omit --device-id",
            )
        return ident, False
    paths.identity.mkdir(parents=True, exist_ok=True)
    paths.identity.chmod(0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(paths.private_key, pem, mode=0o600)
    atomic_write_text(paths.public_key, public_key_pem(key.public_key()))
    did = device_id or _derive_id(key.public_key())
    atomic_write_text(paths.device_id_file, did + "\n")
    return DeviceIdentity(did, key), True
