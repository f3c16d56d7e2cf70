"""The module manifest and the channel's desired state: the signed documents every layer reads.

A manifest travels in the ``custom`` field of the module's TUF target, so it is covered by the same
signatures as the artifact's length and hashes. The desired state is itself a TUF target
(``<channel>/desired-state.json``) signed by the channel's delegated role; it carries its own expiry,
independent of TUF metadata freshness: once it passes by trusted time the device enters safe mode.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AttestationRef",
    "CanarySpec",
    "CanaryStep",
    "Constraints",
    "DesiredModule",
    "DesiredState",
    "GoldenSpec",
    "GoldenVector",
    "ModuleManifest",
    "ProbeSpec",
    "RuntimeSpec",
    "TensorStats",
    "manifest_from_custom",
    "manifest_to_custom",
    "version_key",
]

NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,62}$"
VERSION_RE = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,62}$"


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for versions like ``1.10.2`` or ``2.0-rc1``: numeric parts compare as numbers."""
    parts = re.split(r"[.+_-]", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeSpec(_Doc):
    """A health probe run after an install or swap. See README "Probes"."""

    kind: Literal["exec", "http", "file"]
    argv: list[str] | None = Field(default=None, description="exec: absolute path + args, no shell")
    url: str | None = Field(default=None, description="http: GET must answer 2xx")
    path: str | None = Field(default=None, description="file: readiness file newer than the swap")
    timeout_s: float = Field(default=5.0, gt=0, le=600)
    attempts: int = Field(default=3, ge=1, le=100)
    interval_s: float = Field(default=1.0, ge=0, le=600)
    initial_delay_s: float = Field(default=0.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _target(self) -> ProbeSpec:
        need = {"exec": self.argv, "http": self.url, "file": self.path}[self.kind]
        if not need:
            field = {"exec": "argv", "http": "url", "file": "path"}[self.kind]
            raise ValueError(f"a {self.kind} probe needs '{field}'")
        if self.kind == "exec" and self.argv and not self.argv[0].startswith("/"):
            raise ValueError("an exec probe's argv[0] must be an absolute path")
        return self


class CanaryStep(_Doc):
    """One step of the on-device canary."""

    weight_pct: float = Field(gt=0, le=100)
    min_samples: int = Field(default=300, ge=1)
    max_duration_s: float = Field(default=600.0, gt=0)


class CanarySpec(_Doc):
    """How a managed model earns 100 %.

    Every field is optional and defaults to *unset* (None), which the device fills from its deployment
    policy's ``canary:`` section, else the controller's built-in values (``deployment.canary``): the schema
    holds no gate default of its own. A manifest travels as JSON with every field present, so only None
    survives the wire as "unset"; a value the author writes always wins, whatever it is.
    """

    steps: list[CanaryStep] | None = None
    soak_s: float | None = Field(default=None, ge=0)
    mirror_share: float | None = Field(default=None, ge=0, le=1)
    max_error_rate_increase: float | None = Field(
        default=None, ge=0, le=1, description="absolute floor of the error margin (unset: the policy's)"
    )
    max_p95_latency_ratio: float | None = Field(default=None, ge=1)
    divergence: Literal["top1", "relative_error"] | None = None
    max_divergence: float | None = Field(default=None, ge=0, le=1)


class Constraints(_Doc):
    """Conditions a plan must meet before the device installs a version."""

    maintenance_windows: list[str] = Field(
        default_factory=list, description='device-local windows like "Mon-Fri 02:00-04:00" or "* 00:00-24:00"'
    )
    depends_on: dict[str, str] = Field(default_factory=dict, description="module -> minimum version")
    min_agent_version: str | None = None
    min_free_disk_mb: int = Field(default=64, ge=0)


class TensorStats(_Doc):
    """Baseline statistics of one tensor (per feature) for drift checks."""

    mean: list[float]
    std: list[float]
    bins: list[float] | None = Field(default=None, description="histogram edges for PSI")
    fractions: list[list[float]] | None = Field(default=None, description="per-feature bin fractions")


class GoldenVector(_Doc):
    """A signed test input with its expected output."""

    inputs: dict[str, list[Any]]
    expected: dict[str, list[Any]]
    tolerance: float = Field(default=1e-4, ge=0)


class GoldenSpec(_Doc):
    """Golden vectors and baseline statistics shipped with a model (inline: they are signed with it)."""

    vectors: list[GoldenVector] = Field(default_factory=list)
    input_stats: dict[str, TensorStats] = Field(default_factory=dict)
    output_stats: dict[str, TensorStats] = Field(default_factory=dict)
    fleet_output_distribution: list[float] | None = Field(
        default=None, description="fleet baseline share of each predicted class"
    )


class RuntimeSpec(_Doc):
    """How a model runs."""

    engine: Literal["onnxruntime", "none"] = "onnxruntime"
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    task: Literal["classifier", "regressor", "other"] = "classifier"
    input_name: str | None = None
    output_name: str | None = None


class AttestationRef(_Doc):
    """A second signature or attestation published next to the artifact (as its own TUF target)."""

    kind: Literal["cosign", "dsse"]
    target: str = Field(description="TUF target path of the signature/envelope")
    predicate_type: str | None = None


class ModuleManifest(_Doc):
    """What a module version is and how to install, probe and judge it."""

    name: str = Field(pattern=NAME_RE)
    version: str = Field(pattern=VERSION_RE)
    kind: Literal["model", "config", "policy"] = "model"
    format: Literal["file", "tar"] = "file"
    filename: str = Field(default="model.onnx", description="name of the file inside the slot")
    mode: Literal["managed", "file"] = Field(
        default="managed", description="managed: our server canaries it; file: swap a file for an app"
    )
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    hardware_profiles: list[str] = Field(default_factory=lambda: ["cpu"])
    probes: list[ProbeSpec] = Field(default_factory=list)
    canary: CanarySpec | None = None
    constraints: Constraints = Field(default_factory=Constraints)
    golden: GoldenSpec | None = None
    attestations: list[AttestationRef] = Field(default_factory=list)
    description: str = ""

    @field_validator("filename")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or v in {"", ".", ".."} or "\x00" in v:
            raise ValueError("filename must be a plain file name")
        return v


class DesiredModule(_Doc):
    """One module's desired version in a channel."""

    version: str = Field(pattern=VERSION_RE)
    target: str = Field(description="TUF target path of the artifact")


class DesiredState(_Doc):
    """The channel's signed desired state: module -> version, with its own expiry."""

    channel: str = Field(pattern=NAME_RE)
    serial: int = Field(ge=1, description="monotonic; a lower serial than one seen is a replay")
    issued: datetime
    expires: datetime
    modules: dict[str, DesiredModule] = Field(default_factory=dict)
    rollout: dict[str, Any] | None = Field(default=None, description="current rollout (fleet issue)")
    recalls: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _times(self) -> DesiredState:
        if self.issued.tzinfo is None or self.expires.tzinfo is None:
            raise ValueError("issued and expires must carry a timezone")
        if self.expires <= self.issued:
            raise ValueError("expires must be after issued")
        return self

    def is_expired(self, trusted_now: datetime) -> bool:
        return trusted_now >= self.expires


def manifest_to_custom(manifest: ModuleManifest) -> dict[str, Any]:
    """The TUF target ``custom`` value that carries a manifest.

    TUF's canonical JSON has no floats, and manifests are full of them (timeouts, tolerances, golden
    vectors), so the manifest travels as one JSON string; the signature covers it all the same.
    """
    return {"manifest_json": manifest.model_dump_json()}


def manifest_from_custom(custom: Any) -> ModuleManifest | None:
    """Parse the manifest back out of a target's ``custom`` (None when the target carries none).

    Raises:
        pydantic.ValidationError: the signed manifest is malformed.
    """
    if not isinstance(custom, dict):
        return None
    if isinstance(custom.get("manifest_json"), str):
        return ModuleManifest.model_validate_json(custom["manifest_json"])
    if isinstance(custom.get("manifest"), dict):
        return ModuleManifest.model_validate(custom["manifest"])
    return None
