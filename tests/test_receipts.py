"""Root-signed batch receipts (sre_core.receipts): only the root's timestamp key makes one."""

from __future__ import annotations

from pathlib import Path

from hub.repository import HubRepository
from sre_core.receipts import sign_receipt, verify_receipt


def test_a_receipt_verifies_only_for_its_device_and_batch_and_only_from_the_timestamp_key(
    tmp_path: Path,
) -> None:
    repo = HubRepository.init(tmp_path / "hub")
    root = repo.metadata_dir / "root.json"
    signer = repo.receipt_signer()
    assert signer is not None
    good = sign_receipt(signer, "dev-1", "a" * 40)
    assert verify_receipt(root, good, "dev-1", "a" * 40)
    assert not verify_receipt(root, good, "dev-2", "a" * 40)  # another device
    assert not verify_receipt(root, good, "dev-1", "b" * 40)  # another batch
    assert not verify_receipt(root, {**good, "sig": "00" * 64}, "dev-1", "a" * 40)
    assert not verify_receipt(root, None, "dev-1", "a" * 40)
    assert not verify_receipt(root, {"keyid": 1}, "dev-1", "a" * 40)
    # a key of another role of the same root (the snapshot key is online too) is no receipt key
    (other,) = repo._signers_for("snapshot")
    assert not verify_receipt(root, sign_receipt(other, "dev-1", "a" * 40), "dev-1", "a" * 40)
    # another hub's timestamp key
    stranger = HubRepository.init(tmp_path / "other").receipt_signer()
    assert stranger is not None
    assert not verify_receipt(root, sign_receipt(stranger, "dev-1", "a" * 40), "dev-1", "a" * 40)
    assert not verify_receipt(tmp_path / "missing.json", good, "dev-1", "a" * 40)
