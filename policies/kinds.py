"""The seven policy documents by kind: their model, their shipped default, where a device installs them.

``sre-agent policy check FILE`` and ``sre-agent policy show KIND`` work from this table; loading any of
these models through :func:`policies.base.load_document` overlays the file on the shipped default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

__all__ = ["KINDS", "PolicyKind", "kind_for_file", "kind_named", "kind_of_model"]


@dataclass(frozen=True)
class PolicyKind:
    """One policy document: ``<state>/policies/<name>.yaml``, default ``policies/defaults/<name>.yaml``."""

    name: str
    model: type[BaseModel]
    summary: str

    def installed(self, state: Path) -> Path:
        return Path(state) / "policies" / f"{self.name}.yaml"


def _kinds() -> tuple[PolicyKind, ...]:
    from policies.approvals import OperatorRoster
    from policies.chaos import ChaosPolicy
    from policies.deployment import DeploymentPolicy
    from policies.telemetry import TelemetryPolicy
    from policies.triage import TriagePolicy
    from policies.trust import TrustPolicy
    from policies.verification import VerificationPolicy

    return (
        PolicyKind("chaos", ChaosPolicy, "activity catalogue, guardrails, windows, headroom"),
        PolicyKind("deployment", DeploymentPolicy, "canary steps and gates, probes, flapping, extraction"),
        PolicyKind("operators", OperatorRoster, "operator keys whose signed approvals the device accepts"),
        PolicyKind("telemetry", TelemetryPolicy, "storage budgets per signal class, writer, outbox"),
        PolicyKind("triage", TriagePolicy, "incident rules, allowed actions, certainty thresholds"),
        PolicyKind("trust", TrustPolicy, "signature requirements, size caps, download timeouts"),
        PolicyKind("verification", VerificationPolicy, "check schedule, reserves, drift, trust checks"),
    )


KINDS: tuple[PolicyKind, ...] = _kinds()


def kind_named(name: str) -> PolicyKind | None:
    """The kind called ``name`` (case-insensitive), or None."""
    return next((k for k in KINDS if k.name == name.lower()), None)


def kind_for_file(path: Path) -> PolicyKind | None:
    """The kind a file is named for (``chaos.yaml`` -> chaos), or None."""
    return kind_named(Path(path).stem)


def kind_of_model(model: type[BaseModel]) -> PolicyKind | None:
    """The kind whose document ``model`` parses, or None (e.g. a sub-model)."""
    return next((k for k in KINDS if k.model is model), None)
