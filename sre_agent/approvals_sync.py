"""Approvals come down: fetch the signed decisions on this device's open escalations and apply them.

Public API::

    sync_approvals(hubs, paths, store, roster_path, clock=None, client=None, timeout_s=10) -> ApprovalSync

For the device's open escalations, ``GET /v1/devices/{id}/approvals?ids=...`` (RFC 9421-signed, like
every device request) goes to the first hub in ``hubs`` that answers (a regional hub first: it relays to
the root and answers from its cache while the root is down). Each decision is applied exactly as
``sre-agent escalations apply FILE`` applies one: :meth:`EscalationStore.decide` verifies the operator's
signature against the roster, the binding to the escalation's content hash and the allowed action, and
audits a refusal; nothing changes for a refused one. A decision on an escalation that is no longer open
is skipped. Rejections are applied first: a verified rejection of an escalation wins over an approval of
it served alongside (the operator changed their mind).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from policies.approvals import Approval, ApprovalError, load_roster
from sre_agent.escalations import EscalationStatus, EscalationStore
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError, SreError
from sre_core.identity import load_identity
from sre_core.paths import StatePaths
from sre_core.signing import sign_request

__all__ = ["APPROVALS_PATH", "ApprovalSync", "sync_approvals"]

APPROVALS_PATH = "/v1/devices/{device_id}/approvals"  # the hub's route (hub.approvals_api)
_MAX_IDS = 64


@dataclass
class ApprovalSync:
    """What one fetch did."""

    hub: str | None = None
    asked: int = 0
    applied: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sync_approvals(
    hubs: Sequence[str],
    paths: StatePaths,
    store: EscalationStore,
    roster_path: Path,
    clock: Clock | None = None,
    client: httpx.Client | None = None,
    timeout_s: float = 10.0,
) -> ApprovalSync:
    """Fetch and apply the decisions on this device's open escalations (see the module docstring)."""
    clock = clock or SystemClock()
    out = ApprovalSync()
    open_ids = [e.id for e in store.select(EscalationStatus.OPEN)][:_MAX_IDS]
    urls = [h.rstrip("/") for h in hubs if h.startswith(("http://", "https://"))]
    if not open_ids or not urls:
        return out
    out.asked = len(open_ids)
    try:
        ident = load_identity(paths)
    except SreError as exc:
        out.errors.append(exc.message)
        return out
    own = client is None
    c = client or httpx.Client(timeout=timeout_s, trust_env=False)
    doc: dict[str, Any] | None = None
    try:
        for base in urls:
            url = (
                base + APPROVALS_PATH.format(device_id=quote(ident.device_id)) + "?ids=" + ",".join(open_ids)
            )
            headers = sign_request(
                "GET", url, b"", ident.private_key, ident.device_id, int(clock.now().timestamp()),
                secrets.token_hex(12),
            )  # fmt: skip
            try:
                resp = c.get(url, headers=headers, timeout=timeout_s)
            except httpx.HTTPError as exc:
                out.errors.append(f"{base}: {type(exc).__name__}")
                continue
            if resp.status_code != 200:
                out.errors.append(f"{base}: HTTP {resp.status_code}")
                continue
            try:
                doc = resp.json()
            except json.JSONDecodeError:
                out.errors.append(f"{base}: not JSON")
                continue
            out.hub = base
            break
    finally:
        if own:
            c.close()
    if not isinstance(doc, dict):
        return out
    try:
        roster = load_roster(roster_path)
    except InputError as exc:
        out.errors.append(f"no operator roster: {exc.why}")
        return out
    still_open = set(open_ids)
    decisions: list[Approval] = []
    for raw in doc.get("approvals") or []:
        try:
            decisions.append(Approval.model_validate(raw))
        except ValueError:
            out.refused["?"] = "not an approval document"
    # a verified rejection wins over an approval of the same escalation, whatever order they came in:
    # an operator who changed their mind must not be bypassed by a hub or a tier serving both
    decisions.sort(key=lambda a: (a.decision != "reject", a.issued_at))
    for approval in decisions:
        if approval.escalation_id not in still_open:
            continue
        try:
            store.decide(approval, roster)  # the path `sre-agent escalations apply` takes
        except (ApprovalError, InputError) as exc:
            out.refused[approval.escalation_id] = exc.why
            continue
        still_open.discard(approval.escalation_id)
        out.applied.append(approval.escalation_id)
    return out
