"""Operator approvals of escalated chaos experiments: Ed25519, the incident escalations' roster.

An escalated experiment runs only with an approval signed by an operator listed in the signed operator
policy (``<state>/policies/operators.yaml``, :class:`policies.approvals.OperatorRoster`, the same roster
that approves incident escalations), bound to the experiment's content hash, with an expiry. The
signature scheme and every check are :mod:`policies.approvals`' own (no second implementation): the
escalation id of an experiment is ``chaos-<first 16 hex of its hash>``, the content hash is the
experiment's sha256, and the approved action is :data:`ACTION`.

What an approval can sanction is pre-flight's business (:meth:`chaos.preflight.Preflight.check`):
never the policy's ``never_approvable`` rules, never the device's state, never a reject.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.approvals import (
    Approval,
    ApprovalError,
    OperatorEntry,
    OperatorRoster,
    load_approval,
    load_roster,
    sign_approval,
    verify_approval,
)
from sre_core.errors import InputError
from sre_core.paths import StatePaths

__all__ = [
    "ACTION",
    "MAX_APPROVAL_BYTES",
    "ApprovalError",
    "escalation_id",
    "read_approval",
    "roster_for",
    "sign_chaos_approval",
    "verify_chaos_approval",
]

ACTION = "run-experiment"
MAX_APPROVAL_BYTES = 16 * 1024


def _hex(experiment_hash: str) -> str:
    digest = experiment_hash.split(":", 1)[-1]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ApprovalError(
            "bind an approval", f"{experiment_hash!r} is not an experiment content hash", "use sha256:<hex>"
        )
    return digest


def escalation_id(experiment_hash: str) -> str:
    """The escalation id an approval of this experiment names."""
    return "chaos-" + _hex(experiment_hash)[:16]


def sign_chaos_approval(
    key: Ed25519PrivateKey,
    *,
    operator: str,
    experiment_hash: str,
    now: datetime,
    ttl: timedelta,
    reason: str = "",
) -> Approval:
    """An operator's signed approval to run exactly this experiment content until ``now + ttl``."""
    return sign_approval(
        key,
        operator=operator,
        escalation_id=escalation_id(experiment_hash),
        escalation_hash=_hex(experiment_hash),
        decision="approve",
        now=now,
        ttl=ttl,
        action=ACTION,
        reason=reason,
    )


def verify_chaos_approval(
    approval: Approval, *, experiment_hash: str, roster: OperatorRoster, now: datetime
) -> OperatorEntry:
    """The operator whose valid approval covers this experiment content now.

    Raises:
        ApprovalError: forged, another experiment (or changed content), expired, unknown operator or
            key, an operator who may not approve chaos runs, or a rejection rather than an approval.
    """
    if approval.decision != "approve":
        raise ApprovalError("verify chaos approval", "the operator rejected this experiment", "do not run it")
    return verify_approval(
        approval,
        escalation_id=escalation_id(experiment_hash),
        escalation_hash=_hex(experiment_hash),
        allowed=[ACTION],
        proposed=ACTION,
        roster=roster,
        now=now,
    )


def read_approval(path: Path) -> Approval:
    """Read a signed approval file (bounded). Raises ApprovalError/InputError when it is not one."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_APPROVAL_BYTES + 1)
    except OSError as exc:
        raise InputError(
            f"read approval {p}", exc.strerror or str(exc), "pass the signed approval file"
        ) from exc
    if len(data) > MAX_APPROVAL_BYTES:
        raise ApprovalError(f"read approval {p}", "too large to be an approval", "check the file")
    return load_approval(data)


def roster_for(paths: StatePaths) -> OperatorRoster:
    """The device's operator roster (``<state>/policies/operators.yaml``). Raises InputError if absent."""
    return load_roster(paths.policies / "operators.yaml")
