"""The hub's fleet data: enrolled devices, the telemetry lake, reported/attested state, the review queue.

Layout under ``<repo>/fleet/`` (the fleet dir)::

    devices.json                       enrolled devices: id -> key, enrolled_at, revoked_at
    lake/table=<t>/date=<d>/<id>.parquet   landed batches (Hive layout: DuckDB here, Trino/Spark/ClickHouse
                                       on object storage read the same tree)
    receipts/<id>.json                 one per landed batch: the idempotency record
    state/<device>.json                reported state: last seen, batches, rows, latest verified attestation
    review/<id>.json                   device feedback waiting for an operator; never applied to policy

Every file is written atomically; landing writes the Parquet file before its receipt, so a crash in
between only means the same bytes are written again on the device's retry.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sre_core.atomic import atomic_write_bytes, atomic_write_json
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError, SreError
from sre_core.signing import DEVICE_STATE_PREDICATE, INTOTO_STATEMENT, SignatureRefused, dsse_verify

__all__ = [
    "ATTESTATION_PREDICATE",
    "DeviceRecord",
    "FleetDB",
    "LandResult",
]

ATTESTATION_PREDICATE = DEVICE_STATE_PREDICATE
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TABLE_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
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


class FleetDB:
    """Registry and lake under one fleet directory. Thread-safe within a process.

    Args:
        fleet_dir: e.g. ``<repo>/fleet``.
        clock: time for enrolment/revocation stamps and reported state.
    """

    def __init__(self, fleet_dir: Path, clock: Clock | None = None) -> None:
        self.root = Path(fleet_dir)
        self.clock = clock or SystemClock()
        self._lock = threading.RLock()
        self._devices: dict[str, DeviceRecord] = {}
        self._mtime: float | None = None

    # ---- devices ---------------------------------------------------------------------------------

    @property
    def devices_file(self) -> Path:
        return self.root / "devices.json"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    def _reload(self) -> None:
        """Pick up enrolments/revocations made by another process (the CLI) since the last read."""
        try:
            mtime = self.devices_file.stat().st_mtime_ns
        except FileNotFoundError:
            self._devices, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        doc = json.loads(self.devices_file.read_text())
        self._devices = {
            d: DeviceRecord(d, v["key_pem"], v["enrolled_at"], v.get("revoked_at")) for d, v in doc.items()
        }
        self._mtime = mtime

    def _save(self) -> None:
        atomic_write_json(self.devices_file, {d: r.to_dict() for d, r in sorted(self._devices.items())})
        self._mtime = None

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            self._reload()
            return sorted(self._devices.values(), key=lambda r: r.device_id)

    def enroll(self, device_id: str, key_pem: str) -> DeviceRecord:
        """Enroll a device key (idempotent for the same key).

        Raises:
            InputError: bad id or key; the id is enrolled with another key; the id was revoked.
        """
        if not _ID_RE.match(device_id):
            raise InputError(
                f"enroll device {device_id!r}", "not a valid device id", "use letters, digits, . _ -"
            )
        _load_ed25519(key_pem)
        with self._lock:
            self._reload()
            old = self._devices.get(device_id)
            if old is not None:
                if old.revoked:
                    raise InputError(
                        f"enroll device {device_id}",
                        f"it was revoked at {old.revoked_at}",
                        "provision the device again with a new identity (a new id)",
                    )
                if old.key_pem.strip() != key_pem.strip():
                    raise InputError(
                        f"enroll device {device_id}",
                        "it is already enrolled with a different key",
                        f"revoke it first (sre-hub devices revoke {device_id}) and re-provision",
                    )
                return old
            rec = DeviceRecord(device_id, key_pem.strip() + "\n", self.clock.now().isoformat(), None)
            self._devices[device_id] = rec
            self.root.mkdir(parents=True, exist_ok=True)
            self._save()
            return rec

    def revoke(self, device_id: str) -> DeviceRecord:
        """Refuse ``device_id`` from now on. Raises InputError when it is not enrolled."""
        with self._lock:
            self._reload()
            old = self._devices.get(device_id)
            if old is None:
                raise InputError(
                    f"revoke device {device_id}", "no such enrolled device", "see sre-hub devices list"
                )
            if old.revoked:
                return old
            rec = DeviceRecord(device_id, old.key_pem, old.enrolled_at, self.clock.now().isoformat())
            self._devices[device_id] = rec
            self._save()
            return rec

    def resolve_key(self, device_id: str) -> Ed25519PublicKey:
        """The enrolled key of ``device_id``.

        Raises:
            SignatureRefused: unknown-device or revoked.
        """
        with self._lock:
            self._reload()
            rec = self._devices.get(device_id)
        if rec is None:
            raise SignatureRefused("unknown-device", f"{device_id!r} is not enrolled")
        if rec.revoked:
            raise SignatureRefused("revoked", f"{device_id} was revoked at {rec.revoked_at}")
        return _load_ed25519(rec.key_pem)

    # ---- batches ---------------------------------------------------------------------------------

    def land_batch(self, device_id: str, batch_id: str, payload: bytes) -> LandResult:
        """Validate and land one sealed batch (idempotent by batch id).

        Raises:
            InputError: the id does not match the content, or the content is not a batch of this device.
        """
        what = f"land batch {batch_id[:16]} from {device_id}"
        if not _BATCH_RE.match(batch_id) or hashlib.sha256(payload).hexdigest()[:40] != batch_id:
            raise InputError(what, "the batch id is not the sha256 of its content", "re-seal the batch")
        receipt = self.root / "receipts" / f"{batch_id}.json"
        with self._lock:
            if receipt.exists():
                r = json.loads(receipt.read_text())
                return LandResult("duplicate", batch_id, r["table"], int(r["rows"]), r["path"])
        try:
            tbl = pq.read_table(io.BytesIO(payload))
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(what, f"not a Parquet file ({exc})", "re-seal the batch") from exc
        meta = {k.decode(): v.decode() for k, v in (tbl.schema.metadata or {}).items()}
        table = meta.get("sre.table", "")
        if not _TABLE_RE.match(table):
            raise InputError(what, f"bad table name {table!r}", "upgrade the agent")
        if meta.get("sre.device") != device_id or "device_id" not in tbl.column_names:
            raise InputError(what, "the batch names another device", "a device uploads only its own data")
        devs = pc.unique(tbl.column("device_id")).to_pylist()
        if devs and devs != [device_id]:
            raise InputError(what, "rows of another device inside", "a device uploads only its own data")
        date = "unknown"
        if "ts" in tbl.column_names and tbl.num_rows:
            lo = pc.min(tbl.column("ts")).as_py()
            if isinstance(lo, datetime):
                date = lo.date().isoformat()
        rel = Path("lake") / f"table={table}" / f"date={date}" / f"{batch_id}.parquet"
        with self._lock:
            if receipt.exists():
                r = json.loads(receipt.read_text())
                return LandResult("duplicate", batch_id, r["table"], int(r["rows"]), r["path"])
            atomic_write_bytes(self.root / rel, payload)
            if table == "feedback":
                self._queue_review(device_id, batch_id, tbl)
            atomic_write_json(
                receipt,
                {
                    "batch_id": batch_id,
                    "device_id": device_id,
                    "table": table,
                    "rows": tbl.num_rows,
                    "path": str(rel),
                    "received": self.clock.now().isoformat(),
                },
            )
            self._touch_state(device_id, table, tbl.num_rows)
        return LandResult("stored", batch_id, table, tbl.num_rows, str(rel))

    def _queue_review(self, device_id: str, batch_id: str, tbl: pa.Table) -> None:
        items = [json.loads(b) for b in tbl.column("body").to_pylist()] if "body" in tbl.column_names else []
        atomic_write_json(
            self.root / "review" / f"{batch_id}.json",
            {"device_id": device_id, "batch_id": batch_id, "status": "pending", "items": items},
        )

    def review_queue(self) -> list[dict[str, Any]]:
        """Device feedback waiting for an operator (never applied automatically)."""
        d = self.root / "review"
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []

    # ---- reported / attested state ---------------------------------------------------------------

    def _state_path(self, device_id: str) -> Path:
        return self.root / "state" / f"{device_id}.json"

    def state(self, device_id: str) -> dict[str, Any]:
        """Reported state of a device ({} when it never reported)."""
        p = self._state_path(device_id)
        return dict(json.loads(p.read_text())) if p.exists() else {}

    def _touch_state(self, device_id: str, table: str, rows: int) -> None:
        st = self.state(device_id)
        st["device_id"] = device_id
        st["last_seen"] = self.clock.now().isoformat()
        st["batches"] = int(st.get("batches", 0)) + 1
        per = dict(st.get("rows", {}))
        per[table] = int(per.get(table, 0)) + rows
        st["rows"] = per
        atomic_write_json(self._state_path(device_id), st)

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
            )
            digest = hashlib.sha256(
                json.dumps(predicate, sort_keys=True, separators=(",", ":")).encode()
            ).hexdigest()
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise SignatureRefused("malformed", f"not a device-state statement ({exc})") from exc
        if not ok or subject.get("digest", {}).get("sha256") != digest:
            raise SignatureRefused("malformed", "statement type, subject or digest does not match")
        with self._lock:
            st = self.state(device_id)
            prev = st.get("attested") or {}
            if str(predicate.get("time", "")) >= str(prev.get("time", "")):
                st["device_id"] = device_id
                st["attested"] = predicate
                st["attested_received"] = self.clock.now().isoformat()
                atomic_write_json(self._state_path(device_id), st)
        return dict(predicate)

    # ---- queries ---------------------------------------------------------------------------------

    def tables(self) -> list[str]:
        if not self.lake.is_dir():
            return []
        return sorted(p.name.split("=", 1)[1] for p in self.lake.glob("table=*") if p.is_dir())

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with one view per lake table (Hive partitions ``table``, ``date``)."""
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        for t in self.tables():
            glob = str(self.lake / f"table={t}" / "*" / "*.parquet").replace("'", "''")
            con.execute(
                f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true, "  # noqa: S608
                "union_by_name = true)"
            )
        return con

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


def require_fleet_dir(fleet_dir: Path) -> Path:
    """The fleet dir, created if its parent (the hub repository) exists."""
    p = Path(fleet_dir)
    if not p.parent.exists():
        raise SreError(
            f"open fleet data {p}", "the hub repository does not exist", "run sre-hub init --repo DIR"
        )
    p.mkdir(exist_ok=True)
    return p
