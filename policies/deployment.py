"""The deployment policy: what probes may run, when rollbacks count as flapping, disk headroom,
extraction limits and the default canary steps.

Loaded from ``<state>/policies/deployment.yaml`` when present, else the shipped default
(``policies/defaults/deployment.yaml``). Unknown keys are errors: a typo must not silently widen a guard.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from policies.base import PolicyModel, load_default, load_document

__all__ = [
    "CanaryPolicy",
    "DeploymentPolicy",
    "ExtractLimits",
    "FlappingRule",
    "ProbePolicy",
    "load_deployment_policy",
]


class ProbePolicy(PolicyModel):
    """Which health probes may run."""

    exec_allowlist: list[str] = Field(
        default_factory=list,
        description="absolute executable paths allowed as argv[0]; an entry ending in '/' allows a directory",
    )
    http_allow_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "::1"],
        description="hosts an http probe may GET (probes judge local applications)",
    )
    max_output_bytes: int = Field(default=4096, ge=0, le=1 << 20)
    max_total_s: float = Field(
        default=900.0,
        gt=0,
        description="cap on one module's probe run, all probes, counting initial delays, every attempt's "
        "timeout and the intervals between attempts (a manifest over it is refused before install)",
    )
    max_probes: int = Field(default=16, ge=0, le=256, description="probes one manifest may declare")

    @field_validator("exec_allowlist")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        for entry in v:
            if not entry.startswith("/") or "/../" in entry or entry.endswith("/.."):
                raise ValueError(f"allowlist entry {entry!r} must be an absolute path without '..'")
        return v

    def allows(self, executable: str) -> bool:
        """True when ``executable`` (argv[0]) is on the allowlist (exact path or under an allowed dir)."""
        if not executable.startswith("/") or "/../" in executable or "/./" in executable:
            return False
        for entry in self.exec_allowlist:
            if entry.endswith("/"):
                if executable.startswith(entry) and "/" not in executable[len(entry) :]:
                    return True
            elif executable == entry:
                return True
        return False


class FlappingRule(PolicyModel):
    """``max_rollbacks`` automatic rollbacks within ``window_s`` put the device in safe mode."""

    max_rollbacks: int = Field(default=3, ge=1, le=1000)
    window_s: float = Field(default=3600.0, gt=0)


class ExtractLimits(PolicyModel):
    """Bounds on unpacking a tar bundle (size bombs)."""

    max_members: int = Field(default=10_000, ge=1)
    max_file_bytes: int = Field(default=4 << 30, ge=1)
    max_total_bytes: int = Field(default=8 << 30, ge=1)
    max_ratio: float = Field(default=200.0, gt=1, description="extracted bytes / archive bytes")


class CanaryPolicy(PolicyModel):
    """Gate defaults and attempt bounds for on-device canaries (a manifest's explicit values win)."""

    max_error_rate_increase: float = Field(
        default=0.002, ge=0, le=1, description="absolute floor of the error margin (0.002 = 0.2 points)"
    )
    error_rate_relative: float = Field(
        default=0.5, ge=0, le=10, description="the canary may err (1 + this) x the incumbent's rate + floor"
    )
    max_p95_latency_ratio: float = Field(
        default=1.5, ge=1, description="limit on the median paired per-request latency ratio"
    )
    allow_pin_to_canary: bool = Field(
        default=False, description="requests may pin the canary version (answered, never evidence)"
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="inconclusive canaries of one version before it is reported"
    )
    retry_backoff_s: float = Field(
        default=300.0, ge=0, description="wait before retrying an inconclusive canary (doubles per try)"
    )
    memory_budget_mb: int = Field(
        default=0, ge=0, description="resident size allowed for all loaded model sessions (0: no check)"
    )
    unload_standby: bool = Field(
        default=False, description="free the last-known-good session after a flip; reload it on rollback"
    )


class DeploymentPolicy(PolicyModel):
    """Bounds for installing, probing and rolling back modules."""

    probes: ProbePolicy = Field(default_factory=ProbePolicy)
    flapping: FlappingRule = Field(default_factory=FlappingRule)
    extract: ExtractLimits = Field(default_factory=ExtractLimits)
    min_free_disk_mb: int = Field(default=64, ge=0, description="headroom kept free after an install")
    canary_steps: list[float] = Field(default_factory=lambda: [1.0, 5.0, 25.0, 50.0, 100.0])
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)
    max_resumes: int = Field(
        default=3, ge=1, le=100, description="interrupted attempts at one version before it is marked bad"
    )

    @field_validator("canary_steps")
    @classmethod
    def _steps(cls, v: list[float]) -> list[float]:
        if not v or any(s <= 0 or s > 100 for s in v) or v != sorted(v) or v[-1] != 100:
            raise ValueError("canary steps must be increasing percentages in (0, 100] ending at 100")
        return v


def load_deployment_policy(path: Path | None = None) -> DeploymentPolicy:
    """The policy at ``path`` when given and present, else the shipped default.

    Raises:
        InputError: the document is not valid YAML or does not match :class:`DeploymentPolicy`.
    """
    if path is not None and Path(path).exists():
        return load_document(DeploymentPolicy, Path(path))
    return load_default(DeploymentPolicy, "deployment")
