"""The built-in checks (see each module's docstring)."""

from __future__ import annotations

from verification.base import Check
from verification.builtin.drift import InputDriftCheck, OutputDriftCheck
from verification.builtin.integrity import AuditChainCheck, SlotDigestCheck, TelemetryDbCheck
from verification.builtin.model import GoldenVectorsCheck, RollbackReadinessCheck
from verification.builtin.resources import ResourceHeadroomCheck
from verification.builtin.trust import ClockSanityCheck, TrustHorizonCheck

__all__ = [
    "BUILTIN_CHECKS",
    "AuditChainCheck",
    "ClockSanityCheck",
    "GoldenVectorsCheck",
    "InputDriftCheck",
    "OutputDriftCheck",
    "ResourceHeadroomCheck",
    "RollbackReadinessCheck",
    "SlotDigestCheck",
    "TelemetryDbCheck",
    "TrustHorizonCheck",
]

BUILTIN_CHECKS: tuple[type[Check], ...] = (
    GoldenVectorsCheck,
    SlotDigestCheck,
    TelemetryDbCheck,
    AuditChainCheck,
    InputDriftCheck,
    OutputDriftCheck,
    RollbackReadinessCheck,
    TrustHorizonCheck,
    ClockSanityCheck,
    ResourceHeadroomCheck,
)
