"""Trust policy: which second signatures an artifact needs and which keys may make them.

Public API: ``TrustPolicy``, ``load_trust_policy(policies_dir)``. The device reads
``<state>/policies/trust.yaml`` when present, else the shipped default (no second signatures required;
TUF signatures are always required).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from policies.base import PolicyModel, load_default, load_document

__all__ = ["TrustPolicy", "load_trust_policy"]


class TrustPolicy(PolicyModel):
    """Bounds and optional second signatures for pulled artifacts."""

    require_cosign: bool = Field(default=False, description="every artifact needs a cosign blob signature")
    require_attestation: bool = Field(
        default=False, description="every artifact needs a DSSE in-toto statement"
    )
    cosign_public_keys: list[str] = Field(default_factory=list, description="pinned PEM P-256 public keys")
    attestation_public_keys: list[str] = Field(default_factory=list, description="pinned PEM public keys")
    attestation_predicate_types: list[str] = Field(
        default_factory=lambda: [
            "https://cyclonedx.org/bom",
            "https://spdx.dev/Document",
            "https://slsa.dev/provenance/v1",
        ]
    )
    max_artifact_bytes: int = Field(default=4 * 1024**3, ge=1, description="refuse bigger targets")
    max_desired_state_bytes: int = Field(default=1024 * 1024, ge=1024)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    read_timeout_s: float = Field(default=20.0, gt=0, le=600)
    max_stalled_attempts: int = Field(
        default=5, ge=1, le=100, description="consecutive download attempts without progress before giving up"
    )
    metadata_deadline_s: float = Field(
        default=60.0, gt=0, le=3600, description="wall-clock limit on one metadata read, however it trickles"
    )
    min_rate_bytes_s: float = Field(
        default=8192.0, gt=0, description="an artifact read may take 30 s + its length at this rate"
    )
    pull_deadline_s: float = Field(
        default=3600.0,
        gt=0,
        le=86400,
        description="wall-clock limit on one whole pull; past it the pull counts as offline (it resumes)",
    )
    max_signed_time_ahead_s: float = Field(
        default=86400.0,
        ge=60,
        le=30 * 86400,
        description="a signed time (timestamp, desired state) further ahead of the device clock is refused",
    )


def load_trust_policy(policies_dir: Path | None = None) -> TrustPolicy:
    """``<policies_dir>/trust.yaml`` if it exists, else the default. Raises InputError when invalid."""
    if policies_dir is not None and (Path(policies_dir) / "trust.yaml").is_file():
        return load_document(TrustPolicy, Path(policies_dir) / "trust.yaml")
    return load_default(TrustPolicy, "trust")
