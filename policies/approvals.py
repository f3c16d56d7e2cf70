"""Operator approvals of escalations: Ed25519 signatures bound to an escalation's content hash.

Shared by the device (``sre_agent``) and the hub (``hub``), which must not import each other.

- :class:`OperatorRoster` is the policy document listing operator public keys (``operators.yaml``). On a
  device it is read from ``<state>/policies/operators.yaml``, which only the signed policy module (TUF
  verified by the pull path) writes; the hub keeps the same document in its repository.
- :func:`sign_approval` makes an :class:`Approval` (approve with an action, or reject) over the
  escalation id, its content hash, the operator, the issue and expiry times.
- :func:`verify_approval` is pure: it takes the approval, what the device holds for the escalation, the
  roster and "now", and returns the operator or raises :class:`ApprovalError`. Nothing acts on an
  approval without it.

The signed bytes are ``b"sre-agent approval v1\\n"`` followed by the canonical JSON (sorted keys, no
spaces) of every field except ``signature``: a signature for another purpose can never pass as one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from policies.base import PolicyModel, load_document
from sre_core.errors import InputError

__all__ = [
    "DOMAIN",
    "Approval",
    "ApprovalError",
    "OperatorEntry",
    "OperatorRoster",
    "canonical_json",
    "content_hash",
    "generate_operator_key",
    "key_id",
    "load_approval",
    "load_operator_key",
    "load_roster",
    "private_key_pem",
    "public_key_b64",
    "sign_approval",
    "verify_approval",
]

DOMAIN = b"sre-agent approval v1\n"
MAX_REASON = 500


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def content_hash(content: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of an escalation's immutable content."""
    return hashlib.sha256(canonical_json(content)).hexdigest()


def public_key_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def key_id(key: Ed25519PublicKey) -> str:
    """Short stable id of a public key: 16 hex chars of sha256 over its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class ApprovalError(InputError):
    """An approval that must not be acted on: forged, expired, unknown operator, wrong escalation."""


class OperatorEntry(PolicyModel):
    """One operator and the key that signs their approvals."""

    id: str = Field(pattern=r"^[A-Za-z0-9._@-]{1,64}$")
    public_key: str = Field(description="Ed25519 public key: base64 of the 32 raw bytes, or a PEM block")
    may_approve: list[str] | None = Field(
        default=None, description="actions this operator may approve; none = any allowed action"
    )
    expires: datetime | None = None

    @field_validator("public_key")
    @classmethod
    def _parse(cls, v: str) -> str:
        _load_public(v)
        return v

    def key(self) -> Ed25519PublicKey:
        return _load_public(self.public_key)


def _load_public(text: str) -> Ed25519PublicKey:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"not an Ed25519 public key (base64 raw or PEM): {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")  # noqa: TRY004 (pydantic needs ValueError)
    return key


class OperatorRoster(PolicyModel):
    """The ``operators.yaml`` policy document."""

    version: int = Field(ge=1)
    max_ttl_s: int = Field(default=86_400, ge=60, le=30 * 86_400, description="longest approval lifetime")
    clock_skew_s: int = Field(default=300, ge=0, le=3600, description="tolerated issue time in the future")
    operators: list[OperatorEntry] = Field(default_factory=list)

    def find(self, operator: str) -> OperatorEntry | None:
        return next((o for o in self.operators if o.id == operator), None)


def load_roster(path: Path) -> OperatorRoster:
    """Load ``operators.yaml``. Raises InputError when missing or invalid."""
    if not Path(path).exists():
        raise InputError(
            f"load operator roster {path}",
            "the file does not exist, so no approval can be verified",
            "install the signed policy module that carries operators.yaml",
        )
    return load_document(OperatorRoster, Path(path))


class Approval(BaseModel):
    """An operator's signed decision on one escalation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    escalation_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,80}$")
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    decision: Literal["approve", "reject"]
    action: str | None = Field(default=None, max_length=40)
    operator: str = Field(pattern=r"^[A-Za-z0-9._@-]{1,64}$")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    issued_at: datetime
    expires_at: datetime
    reason: str = Field(default="", max_length=MAX_REASON)
    signature: str = ""

    def signed_bytes(self) -> bytes:
        body = self.model_dump(mode="json", exclude={"signature"})
        return DOMAIN + canonical_json(body)


def sign_approval(
    key: Ed25519PrivateKey,
    *,
    operator: str,
    escalation_id: str,
    escalation_hash: str,
    decision: Literal["approve", "reject"],
    now: datetime,
    ttl: timedelta,
    action: str | None = None,
    reason: str = "",
) -> Approval:
    """Sign an approval (``action`` required for approve) valid from ``now`` for ``ttl``."""
    if decision == "approve" and not action:
        raise InputError("sign approval", "an approval must name the action to take", "pass --action")
    unsigned = Approval(
        escalation_id=escalation_id,
        content_hash=escalation_hash,
        decision=decision,
        action=action if decision == "approve" else None,
        operator=operator,
        key_id=key_id(key.public_key()),
        issued_at=now,
        expires_at=now + ttl,
        reason=reason[:MAX_REASON],
    )
    sig = base64.b64encode(key.sign(unsigned.signed_bytes())).decode()
    return unsigned.model_copy(update={"signature": sig})


def load_approval(data: bytes | str) -> Approval:
    """Parse an approval document. Raises ApprovalError when it is not one."""
    try:
        return Approval.model_validate_json(data)
    except ValidationError as exc:
        raise ApprovalError(
            "read approval", f"not a valid approval document: {exc.errors()[0]['msg']}", "ask for a new one"
        ) from exc


def verify_approval(
    approval: Approval,
    *,
    escalation_id: str,
    escalation_hash: str,
    allowed: Sequence[str],
    proposed: str,
    roster: OperatorRoster,
    now: datetime,
) -> OperatorEntry:
    """Check every property an approval must have before anything acts on it.

    An approval may name the proposed action or a milder allowed one, never a more severe one: an
    operator who wants more than the agent proposed must get the incident re-triaged (or act through the
    operator commands, which are audited as the operator's own action).

    Returns the operator's roster entry.

    Raises:
        ApprovalError: unknown operator or key, bad signature, another escalation or content,
            expired or not yet valid, lifetime over policy, or an action not allowed, more severe than
            the proposed one, or not permitted to this operator.
    """
    what = f"verify approval of {escalation_id} by {approval.operator}"

    def refuse(why: str, fix: str) -> ApprovalError:
        return ApprovalError(what, why, fix)

    entry = roster.find(approval.operator)
    if entry is None:
        raise refuse("the operator is not listed in the signed operator policy", "use a listed operator key")
    pub = entry.key()
    if key_id(pub) != approval.key_id:
        raise refuse("the approval names a key the policy does not list for this operator", "re-sign")
    if not approval.signature:
        raise refuse("the approval is unsigned", "sign it with the operator key")
    try:
        pub.verify(base64.b64decode(approval.signature, validate=True), approval.signed_bytes())
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise refuse("the signature does not verify (forged or altered)", "re-sign the approval") from exc
    if approval.escalation_id != escalation_id:
        raise refuse(f"the approval is for {approval.escalation_id}", "approve the right escalation")
    if approval.content_hash != escalation_hash:
        raise refuse(
            "the approval is bound to different escalation content (changed since it was signed)",
            "review the escalation again and re-sign",
        )
    if entry.expires is not None and now >= entry.expires:
        raise refuse("the operator's key has expired in policy", "rotate the operator key")
    if now >= approval.expires_at:
        raise refuse(f"the approval expired at {approval.expires_at.isoformat()}", "sign a fresh approval")
    if approval.issued_at - now > timedelta(seconds=roster.clock_skew_s):
        raise refuse("the approval is issued in the future", "check the operator's clock")
    if approval.expires_at - approval.issued_at > timedelta(seconds=roster.max_ttl_s):
        raise refuse(f"the approval lives longer than the {roster.max_ttl_s} s policy allows", "shorten it")
    if approval.decision == "approve":
        if approval.action not in allowed:
            raise refuse(
                f"action {approval.action!r} is not allowed for this escalation", "pick an allowed one"
            )
        if _severity(approval.action) > _severity(proposed):
            raise refuse(
                f"action {approval.action!r} is more severe than the proposed {proposed!r}; an approval "
                "may name the proposed action or a milder one",
                f"approve {proposed!r} or a milder allowed action, or have the incident re-triaged",
            )
        if entry.may_approve is not None and approval.action not in entry.may_approve:
            raise refuse(f"operator may not approve {approval.action!r}", "ask an operator who may")
    return entry


def _severity(action: str | None) -> int:
    """Rank of an action (unknown names rank above every known one, so they are never "milder")."""
    from policies.triage import ACTION_RANK, Action

    try:
        return ACTION_RANK[Action(str(action))]
    except ValueError:
        return len(ACTION_RANK)


def generate_operator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_operator_key(path: Path) -> Ed25519PrivateKey:
    """Read an operator private key (PEM, PKCS8). Raises InputError when unreadable or not Ed25519."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"read operator key {p}", str(exc), "check the path") from exc
    if p.stat().st_mode & 0o077:
        raise InputError(f"read operator key {p}", "the key file is readable by others", f"chmod 600 {p}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"read operator key {p}", f"not a PEM private key: {exc}", "use keygen") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"read operator key {p}", "not an Ed25519 key", "use `sre-hub operators keygen`")
    return key
