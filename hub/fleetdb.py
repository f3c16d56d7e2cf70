"""The hub's fleet data: enrolled devices, replay nonces, landed batches, reported/attested state, the
review queue (all in the hub's relational store, :mod:`hub.store`) and the telemetry lake
(:mod:`hub.lake`, a local directory or object storage).

Ingest is contained: a batch lands only when its table is in the shared registry
(:mod:`sre_core.telemetry_schema`) and its columns are exactly that table's (plus ``device_id``), every
row belongs to the signing device, it has between 1 and :data:`MAX_BATCH_ROWS` rows, it decodes to at
most :data:`MAX_UNCOMPRESSED_BYTES` and record bodies are JSON objects. The decoded size is counted from
the decoded arrays themselves, step by step, and decoding stops at the cap: the footer's declared sizes
are only a cheap first refusal (the sender writes them). Decoding memory is also bounded across
requests: before anything is decompressed, the page headers (:mod:`hub.parquet_bounds`) bound what
each decoding step can take; the largest step (plus the lake writer's buffer) is reserved from one
shared :class:`DecodeBudget` *before* decoding starts and held until the batch is written (streamed
into the lake, so one batch never sits in memory whole). A request that cannot get its bytes in time
is answered "busy" (:class:`DecodeBusyError`); one that needs more than the whole budget is refused.
Attestation predicates are validated against :class:`DeviceStatePredicate`; the newest attested ``time`` wins.
Readers of record bodies (the escalation review) still check each body's shape
themselves (:func:`escalation_document`): a table carries several
kinds of record.
Each row lands in the partition of its own UTC day.

Landing writes the lake files first (named by batch id, so a retry overwrites the same names) and then,
in one transaction, the receipt, the device's counters and any review item: a crash in between only
means the device's retry writes the same bytes again.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from sqlalchemy import delete, func, select, update

from hub.lake import FLUSH_BYTES, Lake
from hub.parquet_bounds import PageError, scan_pages
from hub.store import HubStore, open_store, store_config
from hub.store._schema import device_state, devices, nonces, receipts, review_queue
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError, SreError
from sre_core.signing import (
    DEVICE_STATE_PREDICATE,
    INTOTO_STATEMENT,
    NonceCache,
    SignatureRefused,
    dsse_verify,
)
from sre_core.telemetry_schema import RECORD_TABLES, TABLES

__all__ = [
    "ATTESTATION_PREDICATE",
    "DECODE_BUDGET_BYTES",
    "MAX_BATCH_ROWS",
    "MAX_UNCOMPRESSED_BYTES",
    "DecodeBudget",
    "DecodeBusyError",
    "DeviceRecord",
    "DeviceStatePredicate",
    "FleetDB",
    "LandResult",
    "SharedNonces",
]

ATTESTATION_PREDICATE = DEVICE_STATE_PREDICATE
MAX_BATCH_ROWS = 1_000_000
MAX_UNCOMPRESSED_BYTES = 256 * 1024 * 1024
DECODE_BUDGET_BYTES = 128 * 1024 * 1024  # decoded chunks in flight across all requests of one hub process
DECODE_CHUNK_BYTES = 8 * 1024 * 1024  # what one decoding step may take (rows per step are planned to fit)
DECODE_MAX_ROWS = 8192  # rows per step at most, however small
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BATCH_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class DeviceRecord:
    """One enrolled device."""

    device_id: str
    key_pem: str
    enrolled_at: str
    revoked_at: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "key_pem": self.key_pem,
            "enrolled_at": self.enrolled_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True)
class LandResult:
    """What landing a batch did."""

    status: str  # "stored" | "duplicate"
    batch_id: str
    table: str
    rows: int
    path: str


def _load_ed25519(pem: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise InputError(
            "read device key", f"not a PEM public key ({exc})", "pass the device's *.pub.pem"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InputError("read device key", "not an Ed25519 public key", "pass the device's Ed25519 key")
    return key


class SharedNonces(NonceCache):
    """Replay protection shared by every replica: nonces live in the database for twice the window.

    Bounded by time, not by count: rows older than ``2 * window_s`` are deleted (at most once per
    ``window_s / 10`` per process), and a request that old is refused as stale before its nonce is read.
    """

    def __init__(self, store: HubStore, window_s: float = 300.0) -> None:
        super().__init__(window_s)
        self.store = store
        self._pruned = 0.0

    def check_and_add(self, key_id: str, nonce: str, created: int, now: float) -> bool:
        if len(nonce) > 128:
            return False
        with self.store.tx() as conn:
            if now - self._pruned > self.window_s / 10:
                conn.execute(delete(nonces).where(nonces.c.created < int(now - 2 * self.window_s)))
                self._pruned = now
            res = conn.execute(
                self.store.insert(nonces)
                .values(key_id=key_id, nonce=nonce, created=created)
                .on_conflict_do_nothing()
                .returning(nonces.c.nonce)
            )
            return res.first() is not None  # (rowcount is not reliable for this statement on psycopg)


class DecodeBusyError(SreError):
    """The hub-wide decoding budget stayed full: the request should be retried later (HTTP 503)."""


class DecodeBudget:
    """Decoded bytes in flight at once across all requests of one hub process (a counting byte semaphore).

    A request reserves, before it decodes anything, what its decoding can take at most (planned from the
    page headers, see :func:`checked_rows`) and holds it until it is done; a new reservation first gives
    back the previous one, so a request never waits while holding budget: waiters never deadlock each
    other. A reservation larger than the whole budget is refused (:class:`~sre_core.errors.InputError`:
    the batch can never be decoded here); one that does not fit within ``timeout_s`` raises
    :class:`DecodeBusyError` (the hub answers 503 with ``Retry-After``).
    """

    def __init__(self, total: int = DECODE_BUDGET_BYTES, timeout_s: float = 60.0) -> None:
        self.total = total
        self.timeout_s = timeout_s
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    def _take(self, n: int) -> int:
        if n > self.total:
            raise InputError(
                "decode a batch",
                f"decoding it may take {n} bytes at once, more than the hub's budget of {self.total}",
                "seal the batch with smaller pages (smaller values per page)",
            )
        with self._cond:
            if not self._cond.wait_for(lambda: self._used + n <= self.total, self.timeout_s):
                raise DecodeBusyError(
                    "decode a batch", f"the hub is decoding {self._used} bytes already", "retry later"
                )
            self._used += n
        return n

    def _give(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    @contextmanager
    def hold(self) -> Iterator[Callable[[int], None]]:
        """A reserve function for one request: ``reserve(n)`` gives back what it held, then takes ``n``
        bytes; what is held is released on exit."""
        held = 0

        def reserve(n: int) -> None:
            nonlocal held
            if held:
                self._give(held)
                held = 0
            held = self._take(n)

        try:
            yield reserve
        finally:
            if held:
                self._give(held)


class _ModuleState(BaseModel):
    """One module as the device's slot manager reports it (:mod:`sre_agent.attestation`)."""

    model_config = ConfigDict(strict=True, extra="allow")  # typed where known; newer agents may add
    state_sha256: str | None = None
    error: str | None = None
    phase: str | None = None
    serving: str | None = None
    version: str | None = None
    sha256: str | None = None
    tree_sha256: str | None = None
    slot: str | None = None
    kind: str | None = None
    installed_at: str | None = None
    last_known_good: dict[str, str] | None = None
    bad_versions: list[str] = []


def _iso_text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("time must be an ISO 8601 string")  # noqa: TRY004 (pydantic wants ValueError)
    return v


class DeviceStatePredicate(BaseModel):
    """The device-state predicate a hub accepts; anything else is refused (never stored, never shown)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    time: Annotated[AwareDatetime, Field(strict=False), BeforeValidator(_iso_text)]  # ISO 8601 with offset
    policy_version: str
    trust_status: str
    audit_head: str
    safe_mode: bool
    modules: dict[str, _ModuleState] = {}


def _newer(when: datetime, stored: str | None) -> bool:
    """Whether an attestation made at ``when`` replaces the stored one (ties replace: a re-send).

    A stored time that is not an aware ISO time (written before predicates were validated) is replaced.
    """
    try:
        old = datetime.fromisoformat(stored or "")
    except ValueError:
        return True
    return old.tzinfo is None or when >= old


def _refuse(what: str, why: str, fix: str = "upgrade the agent") -> InputError:
    return InputError(what, why, fix)


def _json_object(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def escalation_document(body: Any) -> dict[str, Any] | None:
    """The escalation document inside an ``escalations`` row body, or None when it is not one."""
    outer = _json_object(body)
    doc = _json_object(outer.get("document")) if outer else None
    if doc is None:
        return None
    content = doc.get("content")
    if not (isinstance(doc.get("id"), str) and isinstance(doc.get("content_hash"), str)):
        return None
    if not isinstance(content, dict) or not isinstance(content.get("incident"), dict):
        return None
    need = ("created_at", "proposed_action", "what", "expires_at")
    if not all(isinstance(content.get(k), str) for k in need) or not isinstance(content.get("allowed"), list):
        return None
    return doc


def open_batch(device_id: str, batch_id: str, payload: bytes) -> tuple[str, pq.ParquetFile, pa.Schema]:
    """The registry table, the opened file and the expected schema of a sealed batch (footer checks).

    Raises:
        InputError: not Parquet, unknown table, columns or types not the registry's, another device in
            the metadata, no rows, too many rows or a declared size above the cap.
    """
    what = f"land batch {batch_id[:16]} from {device_id}"
    try:
        pf = pq.ParquetFile(pa.BufferReader(payload))  # zero-copy: column chunks are slices of the body
        md = pf.metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise _refuse(what, f"not a Parquet file ({exc})", "re-seal the batch") from exc
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (md.metadata or {}).items()}
    table = meta.get("sre.table", "")
    spec = TABLES.get(table)
    if spec is None:
        raise _refuse(what, f"unknown table {table[:64]!r} (not in the telemetry registry)")
    if meta.get("sre.device") != device_id:
        raise _refuse(what, "the batch names another device", "a device uploads only its own data")
    if md.num_rows < 1:
        raise _refuse(what, "the batch has no rows", "seal batches with at least one row")
    if md.num_rows > MAX_BATCH_ROWS:
        raise _refuse(what, f"{md.num_rows} rows (limit {MAX_BATCH_ROWS})", "seal smaller batches")
    size = sum(  # what the sender declares: a cheap first refusal, never trusted as a bound
        md.row_group(i).column(j).total_uncompressed_size
        for i in range(md.num_row_groups)
        for j in range(md.num_columns)
    )
    if size > MAX_UNCOMPRESSED_BYTES:
        raise _refuse(what, f"{size} bytes uncompressed (limit {MAX_UNCOMPRESSED_BYTES})", "seal smaller")
    expected = pa.schema([*spec.full_schema, pa.field("device_id", pa.string())])
    got = pf.schema_arrow
    if sorted(got.names) != sorted(expected.names) or any(
        not got.field(f.name).type.equals(f.type) for f in expected
    ):
        raise _refuse(what, f"columns are not those of table {table!r}: {got.names}")
    return table, pf, expected


def checked_rows(
    device_id: str,
    batch_id: str,
    payload: bytes,
    reserve: Callable[[int], None] | None = None,
) -> tuple[str, pa.Schema, Iterator[pa.RecordBatch]]:
    """The registry table, its schema and the checked rows of a batch, :data:`DECODE_ROWS` at a time.

    Before anything is decompressed, the page headers are walked (:mod:`hub.parquet_bounds`; each
    dictionary page's size is passed to ``reserve`` before it is read): they bound what decoding any
    ``k`` rows can take, so each row group is decoded in steps planned to stay within
    :data:`DECODE_CHUNK_BYTES` (a single row may need more: a huge page). Then ``reserve(n)`` is called
    once, *before* the first step is decoded, with the largest step's bound, and the reservation is
    meant to be held until the iterator is done (a :meth:`DecodeBudget.hold`; it may raise
    :class:`DecodeBusyError`, or InputError above the whole budget). Each step's rows are let go of
    before the next step decodes; what a consumer keeps must be in its own reservation. The decoded
    bytes are also counted from the decoded arrays; decoding stops (a refusal) once they pass
    :data:`MAX_UNCOMPRESSED_BYTES`. A consumer must treat the rows as provisional until the iterator is
    exhausted: a refusal can come with any chunk.

    Raises:
        InputError: see :func:`open_batch`; also page headers that are malformed or disagree with the
            footer, rows of another device, rows without a timestamp, malformed record bodies, a row
            or a batch too large once decoded, or unreadable pages.
    """
    what = f"land batch {batch_id[:16]} from {device_id}"
    table, pf, expected = open_batch(device_id, batch_id, payload)
    try:
        plan = scan_pages(payload, pf.metadata, pf.schema_arrow, reserve)
    except PageError as exc:
        raise _refuse(what, f"unreadable page headers ({exc})", "re-seal the batch") from exc
    steps = plan.chunks(DECODE_CHUNK_BYTES, DECODE_MAX_ROWS)

    def rows() -> Iterator[pa.RecordBatch]:
        decoded = n = 0
        if reserve is not None:
            reserve(max((s.bytes for s in steps), default=0))  # before anything is decoded; held to the end
        try:
            for step in steps:
                it = pf.iter_batches(batch_size=step.rows, row_groups=[step.row_group], use_threads=False)
                while (raw := next(it, None)) is not None:
                    decoded += raw.nbytes
                    if decoded > MAX_UNCOMPRESSED_BYTES:
                        raise _refuse(
                            what, f"more than {MAX_UNCOMPRESSED_BYTES} bytes once decoded", "seal smaller"
                        )
                    rb = raw.select(expected.names).cast(expected)
                    del raw
                    n += rb.num_rows
                    if rb.column("ts").null_count:
                        raise _refuse(what, "rows without a timestamp")
                    if any(d != device_id for d in pc.unique(rb.column("device_id")).to_pylist()):
                        raise _refuse(
                            what, "rows of another device inside", "a device uploads only its own data"
                        )
                    if table in RECORD_TABLES:
                        bad = sum(1 for b in rb.column("body").to_pylist() if _json_object(b) is None)
                        if bad:
                            raise _refuse(what, f"{bad} {table} row(s) whose body is not a valid record")
                    yield rb
                    del rb  # not held while the next step decodes
        except (pa.ArrowInvalid, OSError) as exc:
            raise _refuse(what, f"unreadable rows ({exc})", "re-seal the batch") from exc
        if n != pf.metadata.num_rows:
            raise _refuse(what, "row count does not match the footer", "re-seal the batch")

    return table, expected, rows()


def validate_batch(device_id: str, batch_id: str, payload: bytes) -> tuple[str, pa.Table]:
    """The registry table name and all the rows of a sealed batch, or a refusal (see :func:`checked_rows`)."""
    table, schema, rows = checked_rows(device_id, batch_id, payload)
    return table, pa.Table.from_batches(list(rows), schema)


class FleetDB:
    """Registry, nonces, receipts and state in the hub store; batches in the lake.

    Args:
        fleet_dir: ``<repo>/fleet`` (the store and lake locations come from ``<repo>/hub.toml``).
        clock: time for enrolment/revocation stamps and reported state.
        store: an open store to share (default: the repository's configured one).
        lake: the lake to land into (default: the repository's configured one).
    """

    def __init__(
        self,
        fleet_dir: Path,
        clock: Clock | None = None,
        store: HubStore | None = None,
        lake: Lake | None = None,
    ) -> None:
        self.root = Path(fleet_dir)
        self.clock = clock or SystemClock()
        conf = store_config(self.root.parent)
        self.store = store or open_store(conf.database_url)
        self.lake = lake or Lake(conf.lake_url)

    # ---- devices ---------------------------------------------------------------------------------

    @staticmethod
    def _rec(row: Any) -> DeviceRecord:
        return DeviceRecord(row.device_id, row.key_pem, row.enrolled_at, row.revoked_at)

    def devices(self) -> list[DeviceRecord]:
        with self.store.tx() as conn:
            return [self._rec(r) for r in conn.execute(select(devices).order_by(devices.c.device_id))]

    def device(self, device_id: str) -> DeviceRecord | None:
        with self.store.tx() as conn:
            row = conn.execute(select(devices).where(devices.c.device_id == device_id)).first()
        return self._rec(row) if row is not None else None

    def enroll(self, device_id: str, key_pem: str) -> DeviceRecord:
        """Enroll a device key (idempotent for the same key); one transaction.

        Raises:
            InputError: bad id or key; the id is enrolled with another key; the id was revoked.
        """
        if not _ID_RE.match(device_id):
            raise InputError(
                f"enroll device {device_id!r}", "not a valid device id", "use letters, digits, . _ -"
            )
        _load_ed25519(key_pem)
        pem = key_pem.strip() + "\n"
        with self.store.tx() as conn:
            conn.execute(
                self.store.insert(devices)
                .values(device_id=device_id, key_pem=pem, enrolled_at=self.clock.now().isoformat())
                .on_conflict_do_nothing()
            )
            rec = self._rec(conn.execute(select(devices).where(devices.c.device_id == device_id)).one())
        if rec.revoked:
            raise InputError(
                f"enroll device {device_id}",
                f"it was revoked at {rec.revoked_at}",
                "provision the device again with a new identity (a new id)",
            )
        if rec.key_pem.strip() != pem.strip():
            raise InputError(
                f"enroll device {device_id}",
                "it is already enrolled with a different key",
                f"revoke it first (sre-hub devices revoke {device_id}) and re-provision",
            )
        return rec

    def revoke(self, device_id: str) -> DeviceRecord:
        """Refuse ``device_id`` from now on (one transaction). Raises InputError when it is not enrolled."""
        with self.store.tx() as conn:
            conn.execute(
                update(devices)
                .where(devices.c.device_id == device_id, devices.c.revoked_at.is_(None))
                .values(revoked_at=self.clock.now().isoformat())
            )
            row = conn.execute(select(devices).where(devices.c.device_id == device_id)).first()
        if row is None:
            raise InputError(
                f"revoke device {device_id}", "no such enrolled device", "see sre-hub devices list"
            )
        return self._rec(row)

    def resolve_key(self, device_id: str) -> Ed25519PublicKey:
        """The enrolled key of ``device_id``.

        Raises:
            SignatureRefused: unknown-device or revoked.
        """
        rec = self.device(device_id) if _ID_RE.match(device_id) else None
        if rec is None:
            raise SignatureRefused("unknown-device", f"{device_id[:128]!r} is not enrolled")
        if rec.revoked:
            raise SignatureRefused("revoked", f"{device_id} was revoked at {rec.revoked_at}")
        return _load_ed25519(rec.key_pem)

    def nonces(self, window_s: float = 300.0) -> SharedNonces:
        """The replay cache shared through the database."""
        return SharedNonces(self.store, window_s)

    # ---- batches ---------------------------------------------------------------------------------

    def _receipt(self, batch_id: str) -> LandResult | None:
        with self.store.tx() as conn:
            r = conn.execute(select(receipts).where(receipts.c.batch_id == batch_id)).first()
        return None if r is None else LandResult("duplicate", batch_id, r.table_name, int(r.rows), r.path)

    def land_batch(
        self, device_id: str, batch_id: str, payload: bytes, budget: DecodeBudget | None = None
    ) -> LandResult:
        """Validate and land one sealed batch (idempotent by batch id).

        ``budget`` bounds the decoded bytes held by all concurrent landings (default: unbounded).

        Raises:
            InputError: the id does not match the content, or the content is refused (see the module).
            DecodeBusyError: the budget stayed full.
        """
        what = f"land batch {batch_id[:16]} from {device_id}"
        if not _BATCH_RE.match(batch_id) or hashlib.sha256(payload).hexdigest()[:40] != batch_id:
            raise InputError(what, "the batch id is not the sha256 of its content", "re-seal the batch")
        dup = self._receipt(batch_id)
        if dup is not None:
            return dup
        rows, items = 0, []
        with (budget or DecodeBudget()).hold() as reserve:
            # the reservation also covers the rows the lake writer buffers (below FLUSH_BYTES)
            table, schema, batches = checked_rows(
                device_id, batch_id, payload, lambda n: reserve(n + FLUSH_BYTES)
            )
            with self.lake.writer(table, batch_id, schema) as out:
                while (rb := next(batches, None)) is not None:  # streamed, one step at a time
                    out.write(rb)
                    rows += rb.num_rows
                    if table == "feedback":
                        items += [json.loads(b) for b in rb.column("body").to_pylist()]
                    del rb  # let go of the step before the next one is decoded
                paths = out.commit()  # reached only when every chunk passed its checks
        now = self.clock.now().isoformat()
        with self.store.tx() as conn:
            arrival = conn.execute(select(func.coalesce(func.max(receipts.c.arrival), 0))).scalar_one()
            res = conn.execute(
                self.store.insert(receipts)
                .values(
                    batch_id=batch_id, device_id=device_id, table_name=table, rows=rows,
                    path=",".join(paths), received=now, arrival=int(arrival) + 1,
                )
                .on_conflict_do_nothing()
                .returning(receipts.c.batch_id)
            )  # fmt: skip
            if res.first() is not None:
                self._touch_state(conn, device_id, table, rows, now)
                if table == "feedback":
                    conn.execute(
                        self.store.insert(review_queue)
                        .values(batch_id=batch_id, device_id=device_id, status="pending",
                                items_json=json.dumps(items))
                        .on_conflict_do_nothing()
                    )  # fmt: skip
                return LandResult("stored", batch_id, table, rows, ",".join(paths))
        found = self._receipt(batch_id)  # landed concurrently by another request or replica
        if found is None:
            raise SreError(what, "the receipt vanished while landing", "retry the upload")
        return found

    def _touch_state(self, conn: Any, device_id: str, table: str, rows: int, now: str) -> None:
        conn.execute(
            self.store.insert(device_state)
            .values(device_id=device_id, batches=0, rows_json="{}")
            .on_conflict_do_nothing()
        )
        st = conn.execute(
            select(device_state).where(device_state.c.device_id == device_id).with_for_update()
        ).one()
        per = json.loads(st.rows_json)
        per[table] = int(per.get(table, 0)) + rows
        conn.execute(
            update(device_state)
            .where(device_state.c.device_id == device_id)
            .values(
                last_seen=now, batches=device_state.c.batches + 1, rows_json=json.dumps(per, sort_keys=True)
            )
        )

    def receipts(self, limit: int = 100_000) -> list[dict[str, Any]]:
        """Landed batches in arrival order (the idempotency records)."""
        with self.store.tx() as conn:
            rows = conn.execute(
                select(receipts).order_by(receipts.c.arrival, receipts.c.received).limit(limit)
            )
            return [
                {"batch_id": r.batch_id, "device_id": r.device_id, "table": r.table_name, "rows": int(r.rows),
                 "path": r.path, "received": r.received}
                for r in rows
            ]  # fmt: skip

    def review_queue(self) -> list[dict[str, Any]]:
        """Device feedback waiting for an operator (never applied automatically)."""
        with self.store.tx() as conn:
            rows = conn.execute(select(review_queue).order_by(review_queue.c.batch_id)).all()
        return [
            {
                "device_id": r.device_id,
                "batch_id": r.batch_id,
                "status": r.status,
                "items": json.loads(r.items_json),
            }
            for r in rows
        ]

    # ---- reported / attested state ---------------------------------------------------------------

    def state(self, device_id: str) -> dict[str, Any]:
        """Reported state of a device ({} when it never reported)."""
        with self.store.tx() as conn:
            r = conn.execute(select(device_state).where(device_state.c.device_id == device_id)).first()
        if r is None:
            return {}
        out: dict[str, Any] = {"device_id": device_id}
        if r.last_seen is not None:
            out.update(last_seen=r.last_seen, batches=int(r.batches), rows=json.loads(r.rows_json))
        if r.attested_json is not None:
            out.update(attested=json.loads(r.attested_json), attested_received=r.attested_received)
        return out

    def land_attestation(self, device_id: str, envelope: bytes) -> dict[str, Any]:
        """Verify a device-state attestation (DSSE, in-toto) and keep it as the device's attested state.

        Raises:
            SignatureRefused: the envelope is malformed, forged, or not signed by ``device_id``.
        """
        key_id, payload = dsse_verify(envelope, self.resolve_key)
        if key_id != device_id:
            raise SignatureRefused("forged", f"envelope signed by {key_id}, request by {device_id}")
        try:
            stmt = json.loads(payload)
            subject = stmt["subject"][0]
            predicate = stmt["predicate"]
            ok = (
                stmt["_type"] == INTOTO_STATEMENT
                and stmt["predicateType"] == ATTESTATION_PREDICATE
                and subject["name"] == device_id
                and isinstance(predicate, dict)
            )
            digest = hashlib.sha256(
                json.dumps(predicate, sort_keys=True, separators=(",", ":")).encode()
            ).hexdigest()
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise SignatureRefused("malformed", f"not a device-state statement ({exc})") from exc
        if not ok or subject.get("digest", {}).get("sha256") != digest:
            raise SignatureRefused("malformed", "statement type, subject or digest does not match")
        try:
            state = DeviceStatePredicate.model_validate(predicate)
        except ValidationError as exc:
            errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            raise InputError(
                f"land attestation from {device_id}",
                f"the device-state predicate is mistyped ({errs})"[:500],
                "upgrade the agent",
            ) from exc
        when = state.time
        with self.store.tx() as conn:
            conn.execute(
                self.store.insert(device_state)
                .values(device_id=device_id, batches=0, rows_json="{}")
                .on_conflict_do_nothing()
            )
            st = conn.execute(
                select(device_state).where(device_state.c.device_id == device_id).with_for_update()
            ).one()
            if _newer(when, st.attested_time):
                conn.execute(
                    update(device_state)
                    .where(device_state.c.device_id == device_id)
                    .values(attested_json=json.dumps(predicate), attested_time=when.isoformat(),
                            attested_received=self.clock.now().isoformat())
                )  # fmt: skip
        return dict(predicate)

    # ---- queries ---------------------------------------------------------------------------------

    def tables(self) -> list[str]:
        """Lake tables that are in the registry (anything else is never queried)."""
        return [t for t in self.lake.tables() if t in TABLES]

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with one view per lake table (Hive partition ``date``)."""
        return self.lake.connect()

    def query(self, sql: str) -> pa.Table:
        """Run SQL over the lake. Raises InputError on a bad query."""
        con = self.connect()
        try:
            return con.sql(sql).to_arrow_table()
        except duckdb.Error as exc:
            raise InputError(
                "run fleet query", str(exc).splitlines()[0], f"tables: {', '.join(self.tables())}"
            ) from exc
        finally:
            con.close()

    def compact(self, max_files: int = 1) -> dict[str, Any]:
        """Merge small lake files (see :meth:`hub.lake.Lake.compact`)."""
        t0 = time.monotonic()
        out = self.lake.compact(max_files)
        return {**out, "seconds": round(time.monotonic() - t0, 3)}


def require_fleet_dir(fleet_dir: Path) -> Path:
    """The fleet dir, created if its parent (the hub repository) exists."""
    p = Path(fleet_dir)
    if not p.parent.exists():
        raise SreError(
            f"open fleet data {p}", "the hub repository does not exist", "run sre-hub init --repo DIR"
        )
    p.mkdir(exist_ok=True)
    return p
