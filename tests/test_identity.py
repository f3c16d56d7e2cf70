"""Device identity: created once, 0600, reused; refuses an exposed key."""

from __future__ import annotations

import pytest

from sre_core.errors import SreError
from sre_core.identity import load_identity, load_or_create_identity
from sre_core.paths import StatePaths


def test_created_once_with_mode_0600_and_reused(state: StatePaths) -> None:
    ident, created = load_or_create_identity(state)
    assert created
    assert state.private_key.stat().st_mode & 0o777 == 0o600
    assert state.identity.stat().st_mode & 0o777 == 0o700
    pem = state.private_key.read_bytes()
    again, created2 = load_or_create_identity(state)
    assert not created2
    assert again.device_id == ident.device_id
    assert state.private_key.read_bytes() == pem
    sig = ident.sign(b"hello")
    again.public_key.verify(sig, b"hello")  # same key: verifies


def test_device_id_is_stable_and_derived(state: StatePaths) -> None:
    ident, _ = load_or_create_identity(state)
    assert ident.device_id.startswith("dev-") and len(ident.device_id) == 20
    assert load_identity(state).device_id == ident.device_id


def test_explicit_id_conflict_refused(state: StatePaths) -> None:
    load_or_create_identity(state, device_id="edge-001")
    assert load_identity(state).device_id == "edge-001"
    with pytest.raises(SreError, match="already belongs to device edge-001"):
        load_or_create_identity(state, device_id="edge-002")


def test_world_readable_key_refused(state: StatePaths) -> None:
    load_or_create_identity(state)
    state.private_key.chmod(0o644)
    with pytest.raises(SreError, match="accessible by others"):
        load_identity(state)


def test_missing_identity_says_what_to_do(state: StatePaths) -> None:
    with pytest.raises(SreError, match="sre-agent init"):
        load_identity(state)
