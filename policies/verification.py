"""The verification policy: which checks run, how often, and the thresholds they judge against."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from policies.base import PolicyModel, load_default, load_document

__all__ = [
    "CheckPolicy",
    "DriftPolicy",
    "ResourceReserves",
    "ScheduleDefaults",
    "TrustPolicy",
    "VerificationPolicy",
    "load_verification_policy",
]

Severity = Literal["info", "warning", "critical"]


class ScheduleDefaults(PolicyModel):
    """Schedule applied to every check unless its own entry overrides it."""

    interval_s: float = Field(default=300.0, ge=1, le=7 * 86400)
    jitter_s: float = Field(default=30.0, ge=0, le=86400)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    misfire_grace_s: float = Field(default=120.0, ge=0, le=86400)
    max_parallel: int = Field(default=2, ge=1, le=32, description="checks running at once")


class CheckPolicy(PolicyModel):
    """One check named in policy (built-in or from the ``sre_agent.checks`` entry-point group)."""

    enabled: bool = True
    interval_s: float | None = Field(default=None, ge=1, le=7 * 86400)
    jitter_s: float | None = Field(default=None, ge=0, le=86400)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)
    severity: Severity | None = None
    isolation: Literal["thread", "process"] | None = Field(
        default=None,
        description="process: run in a child process that is killed on timeout (costs a Python start-up)",
    )


class ResourceReserves(PolicyModel):
    """Headroom the device must keep (resource headroom check)."""

    min_free_disk_mb: float = Field(default=256.0, ge=0)
    min_free_disk_pct: float = Field(default=5.0, ge=0, le=100)
    min_available_memory_mb: float = Field(default=128.0, ge=0)
    max_load_per_cpu: float = Field(default=4.0, gt=0, description="1-minute load average / CPU count")
    warn_margin: float = Field(default=0.2, ge=0, le=10, description="warn within this share of a reserve")


class DriftPolicy(PolicyModel):
    """Thresholds of the drift checks."""

    min_samples: int = Field(default=200, ge=10, description="fewer samples is inconclusive")
    max_samples: int = Field(default=20_000, ge=10, description="newest samples judged, to bound cost")
    psi_max: float = Field(default=0.25, gt=0, description="population stability index, per feature")
    psi_warn: float = Field(default=0.1, gt=0)
    ks_statistic_max: float = Field(
        default=0.15, gt=0, le=1, description="KS distance to the baseline normal when no histogram ships"
    )
    max_non_finite_share: float = Field(
        default=0.01, ge=0, le=1, description="share of inputs with NaN/inf beyond which inputs fail"
    )
    output_js_max: float = Field(
        default=0.1, gt=0, le=1, description="Jensen-Shannon distance (base 2) to the fleet class shares"
    )


class TrustPolicy(PolicyModel):
    """Trust horizon and clock sanity."""

    horizon_warn_s: float = Field(default=3 * 86400.0, ge=0)
    horizon_fail_s: float = Field(default=6 * 3600.0, ge=0)
    earliest_plausible: datetime = Field(
        default=datetime(2025, 1, 1, tzinfo=UTC), description="a wall clock before this is an RTC reset"
    )
    floor_tolerance_s: float = Field(default=300.0, ge=0, description="allowed lag behind trusted time")
    max_step_s: float = Field(default=300.0, gt=0, description="wall vs monotonic disagreement between runs")

    @model_validator(mode="after")
    def _order(self) -> TrustPolicy:
        if self.horizon_fail_s > self.horizon_warn_s:
            raise ValueError("horizon_fail_s must not exceed horizon_warn_s")
        if self.earliest_plausible.tzinfo is None:
            raise ValueError("earliest_plausible must carry a timezone")
        return self


class VerificationPolicy(PolicyModel):
    """The whole document (``policies/defaults/verification.yaml``)."""

    defaults: ScheduleDefaults = Field(default_factory=ScheduleDefaults)
    checks: dict[str, CheckPolicy] = Field(
        default_factory=dict, description="checks to run, by registered name; unlisted checks do not run"
    )
    gates: CheckPolicy = Field(default_factory=CheckPolicy, description="schedule of learned gates")
    reserves: ResourceReserves = Field(default_factory=ResourceReserves)
    drift: DriftPolicy = Field(default_factory=DriftPolicy)
    trust: TrustPolicy = Field(default_factory=TrustPolicy)
    incident_repeat_s: float = Field(
        default=3600.0, ge=0, description="re-raise an incident for a still-failing check after this long"
    )

    def enabled_checks(self) -> list[str]:
        """Names of the checks the policy turns on, in document order."""
        return [name for name, cp in self.checks.items() if cp.enabled]


def load_verification_policy(path: Path | None = None) -> VerificationPolicy:
    """The policy at ``path`` (a file, or a policies directory holding ``verification.yaml``), else the
    shipped default. Raises InputError when invalid."""
    if path is None:
        return load_default(VerificationPolicy, "verification")
    path = Path(path)
    if path.is_dir():
        if not (path / "verification.yaml").is_file():
            return load_default(VerificationPolicy, "verification")
        path = path / "verification.yaml"
    return load_document(VerificationPolicy, path)
