"""Operators at the hub: key generation, the fleet's escalations, signed decisions.

- :func:`keygen` makes an operator's Ed25519 key pair and the ``operators.yaml`` entry that lists it (the
  roster is published to devices inside the signed policy module).
- :class:`HubEscalations` reads escalations uploaded by devices (the ``escalations`` table of the
  telemetry lake, and optionally directories of escalation files carried by hand), checks each one's
  content hash, and keeps the furthest-along copy of each.
- :meth:`HubEscalations.decide` signs an approval or rejection bound to the escalation's content hash,
  checks it against the roster exactly as a device will, records it in the hub database (the
  ``escalation_decisions`` table, shared by every hub replica), exports a copy under
  ``<repo>/escalations/approvals/`` for delivery (``sre-agent escalations apply FILE`` on the device)
  and audits it.

The hub never imports the agent: the shared format lives in :mod:`policies.approvals`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from policies.approvals import (
    Approval,
    ApprovalError,
    OperatorRoster,
    content_hash,
    generate_operator_key,
    load_roster,
    private_key_pem,
    public_key_b64,
    sign_approval,
    verify_approval,
)
from sre_core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError

__all__ = ["HubEscalations", "OperatorKeyFiles", "keygen"]

MAX_FILES = 10_000


@dataclass(frozen=True)
class OperatorKeyFiles:
    key_path: Path
    public_b64: str
    entry: dict[str, Any]


def keygen(out_dir: Path, operator: str, force: bool = False) -> OperatorKeyFiles:
    """Write ``<operator>.key.pem`` (0600) and ``<operator>.pub`` under ``out_dir``.

    Raises:
        InputError: a bad operator id, or the key exists and ``force`` is not set.
    """
    from policies.approvals import OperatorEntry

    key = generate_operator_key()
    pub = public_key_b64(key.public_key())
    try:
        entry = OperatorEntry(id=operator, public_key=pub)
    except ValueError as exc:
        raise InputError(
            f"generate key for {operator!r}", "not a valid operator id", "use letters, digits, . _ @ -"
        ) from exc
    out = Path(out_dir)
    key_path = out / f"{operator}.key.pem"
    if key_path.exists() and not force:
        raise InputError(f"generate key {key_path}", "it already exists", "pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(key_path, private_key_pem(key), mode=0o600)
    atomic_write_text(out / f"{operator}.pub", pub + "\n")
    return OperatorKeyFiles(key_path, pub, entry.model_dump(exclude_none=True))


_FINISHED = {"executed": "executed", "failed": "failed", "reject": "rejected", "expire": "expired"}


def _finished(doc: dict[str, Any]) -> str | None:
    """Why an escalation can no longer be decided (executed, failed, rejected, expired), or None.

    Read from its status and its history (the copy that reached the hub furthest along), so a copy whose
    status field was reset still shows the execution in its history.
    """
    status = str(doc.get("status") or "")
    if status in _FINISHED.values():
        return status
    for h in doc.get("history") or []:
        event = str(h.get("event", "")) if isinstance(h, dict) else ""
        if event in _FINISHED:
            return _FINISHED[event]
    return None


def _progress(doc: dict[str, Any]) -> int:
    return len(doc.get("history") or [])


class HubEscalations:
    """The fleet's escalations under one hub repository.

    Args:
        repo: the hub repository (lake under ``<repo>/fleet``; decisions in its database, with copies to
            deliver and the audit trail under ``<repo>/escalations``).
        clock: time for signing and expiry checks.
    """

    def __init__(self, repo: Path, clock: Clock | None = None) -> None:
        self.repo = Path(repo)
        self.clock = clock or SystemClock()
        self.dir = self.repo / "escalations"
        self.audit = AuditLog(self.dir / "audit.jsonl", self.clock)

    @property
    def approvals_dir(self) -> Path:
        return self.dir / "approvals"

    def _store(self) -> Any:
        from hub.fleetdb import FleetDB

        return FleetDB(self.repo / "fleet", self.clock).store

    def decisions(self, esc_id: str | None = None) -> list[dict[str, Any]]:
        """Signed decisions held in the hub database (all, or one escalation's), oldest first: each with
        ``escalation_id``, ``decision``, ``operator``, ``signed_at``, ``name`` and the ``approval``."""
        from sqlalchemy import select

        from hub.store._schema import escalation_decisions as t

        q = select(t).order_by(t.c.signed_at, t.c.escalation_id, t.c.decision, t.c.operator)
        if esc_id is not None:
            q = q.where(t.c.escalation_id == esc_id)
        with self._store().tx() as conn:
            rows = conn.execute(q).mappings().all()
        return [
            {
                "escalation_id": r["escalation_id"],
                "decision": r["decision"],
                "operator": r["operator"],
                "signed_at": r["signed_at"],
                "name": f"{r['escalation_id']}.{r['decision']}.{r['operator']}.json",
                "approval": json.loads(r["body"]),
            }
            for r in rows
        ]

    def _record(self, approval: Approval, esc_id: str, decision: str, operator: str) -> None:
        """Insert (or, re-signed by the same operator, replace) one decision: one transaction."""
        from hub.store._schema import escalation_decisions as t

        store = self._store()
        values = {
            "escalation_id": esc_id,
            "decision": decision,
            "operator": operator,
            "signed_at": self.clock.now().isoformat(),
            "body": approval.model_dump_json(),
        }
        stmt = store.insert(t).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.escalation_id, t.c.decision, t.c.operator],
            set_={"signed_at": values["signed_at"], "body": values["body"]},
        )
        with store.tx() as conn:
            conn.execute(stmt)

    def _from_lake(self) -> list[tuple[str, dict[str, Any]]]:
        from hub.fleetdb import FleetDB, escalation_document

        fleet = FleetDB(self.repo / "fleet", self.clock)
        if "escalations" not in fleet.tables():
            return []
        con = fleet.connect()
        try:
            rows = con.execute("SELECT device_id, body FROM escalations").fetchall()
        finally:
            con.close()
        out = []
        for device_id, body in rows:
            doc = escalation_document(body)  # other record kinds and malformed bodies are skipped
            if doc is not None:
                out.append((str(device_id), doc))
        return out

    def _from_dirs(self, sources: list[Path]) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for src in sources:
            for p in sorted(Path(src).glob("esc-*.json"))[:MAX_FILES]:
                try:
                    doc = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                out.append((str(doc.get("content", {}).get("device_id", "")), doc))
        return out

    def load(self, sources: list[Path] | None = None) -> dict[str, dict[str, Any]]:
        """Escalation id -> the furthest-along verified document (with ``device_id`` and ``decisions``)."""
        found: dict[str, dict[str, Any]] = {}
        for device_id, raw in self._from_lake() + self._from_dirs(list(sources or [])):
            try:
                h = raw["content_hash"]
                ok = content_hash(raw["content"]) == h and raw["id"] == "esc-" + h[:16]
            except (KeyError, TypeError):
                ok = False
            if not ok:
                continue
            doc = {**raw, "device_id": device_id or raw["content"].get("device_id", "")}
            old = found.get(doc["id"])
            if old is None or _progress(doc) > _progress(old):
                found[doc["id"]] = doc
        signed: dict[str, list[str]] = {}
        for d in self.decisions() if found else []:
            signed.setdefault(d["escalation_id"], []).append(d["name"])
        for esc_id, doc in found.items():
            doc["hub_decisions"] = sorted(signed.get(esc_id, []))
        return found

    def get(self, esc_id: str, sources: list[Path] | None = None) -> dict[str, Any]:
        docs = self.load(sources)
        if esc_id not in docs:
            raise InputError(
                f"show escalation {esc_id}",
                "no verified escalation with this id has reached the hub",
                "run `sre-hub escalations list` (and check that the device has uploaded)",
            )
        return docs[esc_id]

    def decide(
        self,
        esc_id: str,
        *,
        key_path: Path,
        operator: str,
        decision: Literal["approve", "reject"],
        roster_path: Path,
        action: str | None = None,
        ttl: timedelta = timedelta(hours=1),
        reason: str = "",
        sources: list[Path] | None = None,
    ) -> tuple[Approval, Path]:
        """Sign a decision, check it exactly as a device will, write and audit it.

        Raises:
            InputError / ApprovalError: unknown escalation, unreadable key, operator or action refused.
        """
        from policies.approvals import load_operator_key

        doc = self.get(esc_id, sources)
        roster: OperatorRoster = load_roster(roster_path)
        now = self.clock.now()
        content = doc["content"]
        finished = _finished(doc)
        if finished is None and datetime.fromisoformat(str(content["expires_at"])) <= now:
            finished = "expired"
        if finished is not None:
            self.audit.append(
                "escalation.sign_refused", actor=operator, id=esc_id, decision=decision, why=finished
            )
            raise InputError(
                f"{decision} {esc_id}",
                f"the escalation is {finished}; nothing is signed for it",
                "a new incident on the device opens a new escalation",
            )
        approval = sign_approval(
            load_operator_key(key_path),
            operator=operator,
            escalation_id=esc_id,
            escalation_hash=doc["content_hash"],
            decision=decision,
            action=(action or str(content["proposed_action"])) if decision == "approve" else None,
            now=now,
            ttl=ttl,
            reason=reason,
        )
        try:
            verify_approval(
                approval,
                escalation_id=esc_id,
                escalation_hash=doc["content_hash"],
                allowed=[str(a) for a in content["allowed"]],
                proposed=str(content["proposed_action"]),
                roster=roster,
                now=now,
            )
        except ApprovalError as exc:
            self.audit.append(
                "escalation.sign_refused", actor=operator, id=esc_id, decision=decision, why=exc.why
            )
            raise
        self._record(approval, esc_id, decision, operator)  # the record every replica reads
        path = self.approvals_dir / f"{esc_id}.{decision}.{operator}.json"  # the copy to deliver
        atomic_write_json(path, json.loads(approval.model_dump_json()))
        self.audit.append(
            f"escalation.{decision}_signed",
            actor=operator,
            id=esc_id,
            device=doc["device_id"],
            action=approval.action,
            expires_at=approval.expires_at.isoformat(),
            content_hash=doc["content_hash"],
        )
        return approval, path
