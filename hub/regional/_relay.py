"""The regional hub's upward path: durable store-and-forward of device requests to the root hub.

Public API::

    Relay(state, store_url, upstream, site, site_token, clock, client=None)
        .roster_ready() -> bool ; .resolve_key(device_id) -> Ed25519PublicKey   the mirrored roster
        .operator(authorization) -> bool          the site's own view token (never a root credential)
        .accept(item) -> "queued" | "duplicate"  durable before it returns (the device is answered after)
        .receipt(key) -> dict | None              the root's signed receipt of a forwarded batch
        .forward_up(max_items=500) -> ForwardResult
        .refresh_roster() -> bool ; .report_status(status) -> bool
        .backlog() -> int ; .site_reports() -> dict[device_id, report]
    SpoolItem, ForwardResult

What is stored is the device's request as it arrived: the body bytes and the headers that carry its
RFC 9421 signature (``Signature``, ``Signature-Input``, ``Content-Digest``, ``x-sre-device``) and the
URI it signed. Forwarding sends them unchanged with the site token and ``X-Sre-Relay-Uri``; the root
verifies the device signature again (see :mod:`hub.sites`). Each item has an idempotency key (the batch
id; the sha256 of an attestation or report body): a device retry is stored once, and a re-forward after
a crash is a no-op at the root (batches are deduplicated by id, reports and attestations are
newest-wins). An item leaves the spool only when the root answers 200, or refuses it (kept in
``relay_refused`` with the answer, audited). Transient failures back off exponentially per item.

Why verify at the regional tier: garbage (unsigned, forged, unknown or revoked devices, replays within
the window) is refused before it takes spool space or uplink bandwidth, with the same answers the root
gives. The roster (device keys, revocations) is mirrored from the root with the site token; until the
first roster arrives the regional hub answers 503 (devices keep their own backlog or fall back to the
next hub: nothing is lost, nothing unverified is stored). A device enrolled after the last roster sync
is refused (401) until the next one; a device revoked after it is still accepted here and refused at
the root (recorded in ``relay_refused``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import (
    Column,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import sqlite

from hub.sites import RELAY_URI_HEADER
from sre_core.atomic import atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.signing import SignatureRefused

__all__ = [
    "DEFAULT_SPOOL_MAX_BYTES",
    "FORWARDED_HEADERS",
    "ForwardResult",
    "Relay",
    "SpoolFullError",
    "SpoolItem",
]

DEFAULT_SPOOL_MAX_BYTES = 8 * 1024**3


class SpoolFullError(Exception):
    """The spool holds its byte budget: the device keeps the item (HTTP 503, retried later)."""


FORWARDED_HEADERS = ("content-type", "content-digest", "signature", "signature-input", "x-sre-device")
_PERMANENT = {400, 401, 403, 409, 411, 413, 415, 422}
_BACKOFF_S = 5.0
_MAX_BACKOFF_S = 600.0

_meta = MetaData()
spool = Table(
    "relay_spool",
    _meta,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("key", String(128), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("device_id", String(128), nullable=False),
    Column("path", Text, nullable=False),
    Column("uri", Text, nullable=False),
    Column("headers", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("size", Integer, nullable=False, default=0),
    Column("received_at", String(40), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_at", Float, nullable=False, default=0.0),
    Column("last_error", Text, nullable=True),
)
refused = Table(
    "relay_refused",
    _meta,
    Column("key", String(128), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("device_id", String(128), nullable=False),
    Column("status", Integer, nullable=False),
    Column("answer", Text, nullable=False),
    Column("at", String(40), nullable=False),
)
site_reports = Table(
    "site_reports",
    _meta,
    Column("device_id", String(128), primary_key=True),
    Column("report", Text, nullable=False),
    Column("received_at", String(40), nullable=False),
)

receipts_t = Table(
    "relay_receipts",
    _meta,
    Column("key", String(128), primary_key=True),
    Column("receipt", Text, nullable=False),
    Column("at", Float, nullable=False),
)
"""The root's signed receipt of each batch forwarded (sre_core.receipts), answered to the device's
re-send; kept :data:`RECEIPT_KEEP_S`."""
RECEIPT_KEEP_S = 30 * 24 * 3600.0

approvals_cache = Table(
    "approvals_cache",
    _meta,
    Column("device_id", String(128), primary_key=True),
    Column("escalation_id", String(80), primary_key=True),
    Column("digest", String(64), primary_key=True),
    Column("body", Text, nullable=False),
    Column("fetched_at", String(40), nullable=False),
)


@dataclass(frozen=True)
class SpoolItem:
    """One verified device request, as it will be forwarded."""

    key: str
    kind: str
    device_id: str
    path: str
    uri: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ForwardResult:
    """What one forwarding round did."""

    forwarded: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    deferred: int = 0
    online: bool = True
    error: str | None = None
    backlog: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi: Any, _record: Any) -> None:
            cur = dbapi.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an answered upload survives a power cut
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    _meta.create_all(engine)
    return engine


class Relay:
    """Durable spool + forwarder + mirrored roster of one regional hub.

    Args:
        state: the state directory (the roster is ``<state>/roster.json``).
        store_url: SQLAlchemy URL of the spool (default ``sqlite:///<state>/relay.db``).
        upstream: the root hub's base URL.
        site, site_token: this site at the root (no token: nothing is forwarded, the backlog grows).
        clock: backoff and record times.
        client: the HTTP client to the upstream (default: httpx with timeouts, no proxies from env).
        max_bytes: the spool's byte budget (bodies waiting to be forwarded); above it uploads get 503.
        view_token: the bearer token of this site's ``GET /v1/fleet/status`` (None: that view is closed).
    """

    def __init__(
        self,
        state: Path,
        store_url: str | None,
        upstream: str,
        site: str,
        site_token: str | None,
        clock: Clock,
        audit: AuditLog,
        client: httpx.Client | None = None,
        max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        view_token: str | None = None,
    ) -> None:
        self.state = Path(state)
        self.view_token_sha256 = hashlib.sha256(view_token.encode()).hexdigest() if view_token else None
        self.max_bytes = max_bytes
        self.engine = _engine(store_url or f"sqlite:///{self.state / 'relay.db'}")
        self.upstream = upstream.rstrip("/")
        self.site = site
        self.site_token = site_token
        self.clock = clock
        self.audit = audit
        self._own = client is None
        self.client = client or httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), trust_env=False)
        self._roster_file = self.state / "roster.json"
        self._roster: dict[str, Any] | None = None
        self._rng = random.Random()
        self.unreachable_since: str | None = None

    def close(self) -> None:
        if self._own:
            self.client.close()
        self.engine.dispose()

    # ----- roster ---------------------------------------------------------------------------------
    def _load_roster(self) -> dict[str, Any] | None:
        if self._roster is None:
            try:
                self._roster = json.loads(self._roster_file.read_text())
            except (OSError, ValueError):
                return None
        return self._roster

    def roster_ready(self) -> bool:
        return self._load_roster() is not None

    def resolve_key(self, device_id: str) -> Ed25519PublicKey:
        """The enrolled key of ``device_id`` from the mirrored roster.

        Raises:
            SignatureRefused: unknown-device or revoked (as the root would answer).
        """
        roster = self._load_roster() or {}
        rec = roster.get("devices", {}).get(device_id)
        if rec is None:
            raise SignatureRefused("unknown-device", f"{device_id[:128]!r} is not enrolled (site roster)")
        if rec.get("revoked_at"):
            raise SignatureRefused("revoked", f"{device_id} was revoked at {rec['revoked_at']}")
        key = serialization.load_pem_public_key(str(rec["key_pem"]).encode())
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureRefused("unknown-device", f"{device_id}: not an Ed25519 key")
        return key

    def operator(self, authorization: str | None) -> bool:
        """True when ``authorization`` carries this site's view token (compared by sha256, constant time).
        Root operator tokens are never accepted here: a site must not receive a root credential."""
        if not self.view_token_sha256 or not authorization or not authorization.lower().startswith("bearer "):
            return False
        digest = hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
        return hmac.compare_digest(self.view_token_sha256, digest)

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.site_token}"} if self.site_token else {}

    def refresh_roster(self) -> bool:
        """Mirror the root's device roster (site token). False when the root cannot be asked now."""
        if not self.site_token:
            return False
        try:
            resp = self.client.get(f"{self.upstream}/v1/sites/roster", headers=self._auth())
        except httpx.HTTPError:
            return False
        if resp.status_code != 200:
            self.audit.append("regional.roster_refused", status=resp.status_code, answer=resp.text[:200])
            return False
        doc = resp.json()
        roster = {
            "devices": {
                d["device_id"]: {"key_pem": d["key_pem"], "revoked_at": d.get("revoked_at")}
                for d in doc.get("devices", [])
            },
            "fetched_at": self.clock.now().isoformat(),
        }
        atomic_write_json(self._roster_file, roster, mode=0o600)
        self._roster = roster
        return True

    # ----- spool ----------------------------------------------------------------------------------
    def accept(self, item: SpoolItem) -> str:
        """Store a verified device request durably (committed before this returns).

        Returns ``queued``, or ``duplicate`` when an item with this key is already waiting.

        Raises:
            SpoolFullError: storing it would exceed the byte budget (nothing stored).
        """
        now = self.clock.now().isoformat()
        stmt = (
            sqlite.insert(spool) if self.engine.dialect.name == "sqlite" else insert(spool)
        )  # the default store is SQLite; others take plain INSERT and a unique-key error below
        values = {
            "key": item.key, "kind": item.kind, "device_id": item.device_id, "path": item.path,
            "uri": item.uri, "headers": json.dumps(item.headers), "body": item.body,
            "received_at": now, "attempts": 0, "next_at": 0.0, "size": len(item.body),
        }  # fmt: skip
        with self.engine.begin() as conn:
            held = int(conn.execute(select(func.coalesce(func.sum(spool.c.size), 0))).scalar_one())
            if held + len(item.body) > self.max_bytes:
                raise SpoolFullError(f"the spool holds {held} of {self.max_bytes} bytes")
            if self.engine.dialect.name == "sqlite":
                res = conn.execute(stmt.values(**values).on_conflict_do_nothing())  # type: ignore[attr-defined]
                stored = bool(res.rowcount)
            else:
                exists = conn.execute(select(spool.c.seq).where(spool.c.key == item.key)).first()
                stored = exists is None
                if stored:
                    conn.execute(insert(spool).values(**values))
            if item.kind == "report":
                report = json.loads(item.body)
                conn.execute(delete(site_reports).where(site_reports.c.device_id == item.device_id))
                conn.execute(
                    insert(site_reports).values(
                        device_id=item.device_id, report=json.dumps(report), received_at=now
                    )
                )
        return "queued" if stored else "duplicate"

    def backlog(self) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(select(func.count()).select_from(spool)).scalar_one())

    def backlog_bytes(self) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(spool.c.size), 0))).scalar_one())

    def refused_items(self) -> list[dict[str, Any]]:
        with self.engine.begin() as conn:
            rows = conn.execute(select(refused).order_by(refused.c.at)).all()
        return [dict(r._mapping) for r in rows]

    def site_reports(self) -> dict[str, dict[str, Any]]:
        with self.engine.begin() as conn:
            rows = conn.execute(select(site_reports)).all()
        return {r.device_id: {**json.loads(r.report), "received_at": r.received_at} for r in rows}

    # ----- forwarding -----------------------------------------------------------------------------
    def forward_up(self, max_items: int = 500) -> ForwardResult:
        """Forward due items in arrival order, each at most once per round; stop at the first transport
        failure (the uplink is down) or when the root refuses the site token."""
        result = ForwardResult()
        if not self.site_token:
            result.online, result.error = False, "no site token: nothing can be forwarded"
            result.backlog = self.backlog()
            return result
        now = self.clock.now().timestamp()  # wall time: next_at survives a restart
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(spool).where(spool.c.next_at <= now).order_by(spool.c.seq).limit(max_items)
            ).all()
        for row in rows:
            headers = {**json.loads(row.headers), **self._auth(), RELAY_URI_HEADER: row.uri}
            try:
                resp = self.client.post(f"{self.upstream}{row.path}", content=row.body, headers=headers)
            except httpx.HTTPError as exc:
                self._defer(row, f"{type(exc).__name__}: {exc}")
                result.online, result.error = False, f"upstream unreachable: {exc}"
                self.unreachable_since = self.unreachable_since or self.clock.now().isoformat()
                break
            self.unreachable_since = None
            answer = resp.text[:500]
            if resp.status_code == 200:
                answer_doc = _json(resp)
                dup = answer_doc.get("status") == "duplicate"
                (result.duplicates if dup else result.forwarded).append(row.key)
                self._drop(row.key, answer_doc.get("receipt") if row.kind == "batch" else None)
            elif resp.status_code == 401 and _json(resp).get("refused") == "site-unauthorized":
                result.error = "the root refuses this site's token: run `sre-hub sites add` and restart"
                self.audit.append("regional.site_refused", site=self.site, answer=answer)
                break
            elif resp.status_code in _PERMANENT:
                result.refused[row.key] = resp.status_code
                self._refuse(row, resp.status_code, answer)
            else:
                self._defer(row, f"HTTP {resp.status_code}: {answer}")
                result.deferred += 1
        result.backlog = self.backlog()
        return result

    def _drop(self, key: str, receipt: Any = None) -> None:
        """The root has the item: out of the spool; its receipt (if any) kept for the device's re-send."""
        now = self.clock.now().timestamp()
        with self.engine.begin() as conn:
            conn.execute(delete(spool).where(spool.c.key == key))
            if isinstance(receipt, dict):
                conn.execute(delete(receipts_t).where(receipts_t.c.key == key))
                conn.execute(insert(receipts_t).values(key=key, receipt=json.dumps(receipt), at=now))
            conn.execute(delete(receipts_t).where(receipts_t.c.at < now - RECEIPT_KEEP_S))

    def receipt(self, key: str) -> dict[str, Any] | None:
        """The root's receipt for a forwarded item (the device verifies it; nothing here can forge it)."""
        with self.engine.begin() as conn:
            found = conn.execute(select(receipts_t.c.receipt).where(receipts_t.c.key == key)).scalar()
        doc = json.loads(found) if found else None
        return doc if isinstance(doc, dict) else None

    def _refuse(self, row: Any, status: int, answer: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(refused).where(refused.c.key == row.key))
            conn.execute(
                insert(refused).values(
                    key=row.key, kind=row.kind, device_id=row.device_id, status=status, answer=answer,
                    at=self.clock.now().isoformat(),
                )
            )  # fmt: skip
            conn.execute(delete(spool).where(spool.c.key == row.key))
        self.audit.append(
            "regional.forward_refused",
            key=row.key,
            kind=row.kind,
            device=row.device_id,
            status=status,
            answer=answer,
        )

    def _defer(self, row: Any, error: str) -> None:
        attempts = int(row.attempts) + 1
        delay = min(_BACKOFF_S * 2 ** min(attempts - 1, 16), _MAX_BACKOFF_S) * self._rng.uniform(0.5, 1.0)
        with self.engine.begin() as conn:
            conn.execute(
                update(spool)
                .where(spool.c.key == row.key)
                .values(
                    attempts=attempts, next_at=self.clock.now().timestamp() + delay, last_error=error[:500]
                )
            )

    def approvals(
        self, device_id: str, path: str, uri: str, headers: dict[str, str], ids: list[str]
    ) -> tuple[int, dict[str, Any]]:
        """Relay a device's (signed) approvals request to the root; cache what comes back per device.

        Returns (status, answer). When the root cannot be reached (or fails), the cached approvals for
        ``ids`` are answered with ``"source": "regional-cache"``; a root refusal is passed on as it is.
        """
        if self.site_token:
            try:
                resp = self.client.get(
                    f"{self.upstream}{path}", headers={**headers, **self._auth(), RELAY_URI_HEADER: uri}
                )
            except httpx.HTTPError:
                resp = None
            if resp is not None and resp.status_code == 200:
                doc = _json(resp)
                self._cache_approvals(device_id, doc.get("approvals") or [])
                return 200, {**doc, "source": "root"}
            if resp is not None and resp.status_code < 500 and resp.status_code != 429:
                return resp.status_code, _json(resp)
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(approvals_cache.c.body).where(
                    approvals_cache.c.device_id == device_id, approvals_cache.c.escalation_id.in_(ids)
                )
            ).all()
        return 200, {
            "device_id": device_id,
            "approvals": [json.loads(r.body) for r in rows],
            "source": "regional-cache",
        }

    def _cache_approvals(self, device_id: str, approvals: list[Any]) -> None:
        now = self.clock.now().isoformat()
        with self.engine.begin() as conn:
            for a in approvals[:256]:
                if not isinstance(a, dict) or not isinstance(a.get("escalation_id"), str):
                    continue
                body = json.dumps(a, sort_keys=True)
                digest = hashlib.sha256(body.encode()).hexdigest()
                conn.execute(
                    delete(approvals_cache).where(
                        approvals_cache.c.device_id == device_id, approvals_cache.c.digest == digest
                    )
                )
                conn.execute(
                    insert(approvals_cache).values(
                        device_id=device_id, escalation_id=a["escalation_id"][:80], digest=digest, body=body,
                        fetched_at=now,
                    )
                )  # fmt: skip

    def report_status(self, status: dict[str, Any]) -> bool:
        """Tell the root this site's sync state and backlog (site token). False when not delivered."""
        if not self.site_token:
            return False
        try:
            resp = self.client.post(
                f"{self.upstream}/v1/sites/{self.site}/status", json=status, headers=self._auth()
            )
        except httpx.HTTPError:
            return False
        return resp.status_code == 200


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        doc = resp.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
