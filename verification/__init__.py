"""Continuous verification: checks, the isolating runner, learned gates and their schedule.

Public surface::

    Check, CheckResult, CheckSpec, Severity, Status      what a check is and returns
    SlotView, VerificationContext, SessionCache         what checks judge
    CheckRegistry, PlannedCheck, ENTRY_POINT_GROUP      where checks come from
    Runner, RESULTS_TABLE                               isolation, telemetry rows, incidents
    Harness                                             policy + registry + gates + runner
    GateDefinition, GateStore                           learned gates
    SampleRecorder                                      recent inputs/outputs for the drift checks
"""

from __future__ import annotations

from verification.base import Check, CheckResult, CheckSpec, Severity, Status
from verification.context import SessionCache, SlotView, VerificationContext
from verification.gates import GateDefinition, GateStore
from verification.harness import Harness
from verification.recorder import SampleRecorder
from verification.registry import ENTRY_POINT_GROUP, CheckRegistry, PlannedCheck
from verification.runner import RESULTS_TABLE, Runner

__all__ = [
    "ENTRY_POINT_GROUP",
    "RESULTS_TABLE",
    "Check",
    "CheckRegistry",
    "CheckResult",
    "CheckSpec",
    "GateDefinition",
    "GateStore",
    "Harness",
    "PlannedCheck",
    "Runner",
    "SampleRecorder",
    "SessionCache",
    "Severity",
    "SlotView",
    "Status",
    "VerificationContext",
]
