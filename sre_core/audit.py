"""Append-only, hash-chained audit trail (``<state>/audit.jsonl``).

Each record is one JSON line holding ``seq``, ``ts``, ``event``, ``actor``, ``data``, ``prev`` (the
previous record's hash) and ``hash`` (sha256 over the canonical JSON of the other fields). Each append
is fsynced before it returns. A torn last line (power cut mid-write) is detected on open and truncated
away with a note, since it was never acknowledged; any other break is reported by :meth:`AuditLog.verify`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sre_core.clock import Clock, SystemClock

__all__ = ["GENESIS", "AuditBreak", "AuditLog", "AuditRecord"]

GENESIS = "0" * 64
_log = logging.getLogger(__name__)


def _digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One verified line of the trail."""

    seq: int
    ts: str
    event: str
    actor: str
    data: dict[str, Any]
    prev: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "event": self.event,
            "actor": self.actor,
            "data": self.data,
            "prev": self.prev,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class AuditBreak:
    """Where and why the chain is broken."""

    line: int
    reason: str


class AuditLog:
    """The trail. One instance per process; appends are serialised by a lock.

    Args:
        path: the JSONL file.
        clock: time source for record timestamps.
        mirror: optional callback invoked with each appended record (e.g. the DuckDB audit mirror).
    """

    def __init__(
        self,
        path: Path,
        clock: Clock | None = None,
        mirror: Callable[[AuditRecord], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.clock = clock or SystemClock()
        self.mirror = mirror
        self._lock = threading.Lock()
        self._head: tuple[int, str] | None = None
        self._size = -1  # file size after our last append: another writer changed it if it differs

    def _load_head(self) -> tuple[int, str]:
        if not self.path.exists():
            return 0, GENESIS
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A torn final write was never acknowledged to anyone: drop it so the chain stays intact.
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as fh:
                fh.truncate(cut)
                os.fsync(fh.fileno())
            data = data[:cut]
        lines = data.splitlines()
        if not lines:
            return 0, GENESIS
        last = json.loads(lines[-1])
        return int(last["seq"]), str(last["hash"])

    def _sync_head(self, fd: int) -> tuple[int, str]:
        """The head, re-read when another writer (process or instance) appended since our last write."""
        size = os.fstat(fd).st_size
        if self._head is not None and size == self._size:
            return self._head
        window = 65536
        tail = os.pread(fd, min(size, window), max(0, size - window)) if size else b""
        if not size:
            self._head, self._size = (0, GENESIS), 0
        elif not tail.endswith(b"\n") or (size > window and tail.count(b"\n") < 2):
            self._head = self._load_head()  # torn tail (truncated there) or one huge record
            self._size = self.path.stat().st_size
        else:
            last = json.loads(tail[:-1].rsplit(b"\n", 1)[-1])
            self._head, self._size = (int(last["seq"]), str(last["hash"])), size
        return self._head

    def append(self, event: str, actor: str = "agent", **data: Any) -> AuditRecord:
        """Append one record and fsync it. Returns the record written.

        Appends from several instances or processes are serialised by an exclusive ``flock`` on the
        file, and each re-reads the head when the file changed, so the chain never forks.
        """
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                seq, prev = self._sync_head(fd)
                rec = self._append_locked(fd, seq, prev, event, actor, data)
            finally:
                os.close(fd)  # releases the flock
        if self.mirror is not None:
            try:
                self.mirror(rec)
            except Exception:
                # The file is the record of truth; a failing mirror must not block the trail.
                _log.exception("audit mirror failed for record %d", rec.seq)
        return rec

    def _append_locked(
        self, fd: int, seq: int, prev: str, event: str, actor: str, data: dict[str, Any]
    ) -> AuditRecord:
        body = {
            "seq": seq + 1,
            "ts": self.clock.now().isoformat(),
            "event": event,
            "actor": actor,
            "data": data,
            "prev": prev,
        }
        h = _digest(body)
        raw = (json.dumps({**body, "hash": h}, sort_keys=True, default=str) + "\n").encode("utf-8")
        os.write(fd, raw)
        os.fsync(fd)
        self._head = (seq + 1, h)
        self._size = os.fstat(fd).st_size
        return AuditRecord(seq + 1, str(body["ts"]), event, actor, data, prev, h)

    def records(self) -> Iterator[AuditRecord]:
        """Iterate parsed records (no verification; see :meth:`verify`)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    return
                d = json.loads(raw)
                yield AuditRecord(
                    d["seq"], d["ts"], d["event"], d["actor"], d.get("data", {}), d["prev"], d["hash"]
                )

    def verify(self) -> tuple[int, AuditBreak | None]:
        """Walk the whole chain. Returns (records verified, first break or None)."""
        if not self.path.exists():
            return 0, None
        prev = GENESIS
        n = 0
        with self.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    return n, AuditBreak(lineno, "torn final line (incomplete write)")
                try:
                    d = json.loads(raw)
                except json.JSONDecodeError as exc:
                    return n, AuditBreak(lineno, f"not JSON: {exc}")
                if not isinstance(d, dict) or "hash" not in d:
                    return n, AuditBreak(lineno, "not an audit record")
                claimed = d.pop("hash")
                if d.get("prev") != prev:
                    return n, AuditBreak(lineno, "prev does not match the previous record's hash")
                if d.get("seq") != n + 1:
                    return n, AuditBreak(lineno, f"sequence {d.get('seq')} where {n + 1} was expected")
                if _digest(d) != claimed:
                    return n, AuditBreak(lineno, "record content does not match its hash (edited)")
                prev = claimed
                n += 1
        return n, None

    def head(self) -> str:
        """Hash of the last record (GENESIS when empty)."""
        with self._lock:
            if self._head is None:
                self._head = self._load_head()
            return self._head[1]

    def tail(self, n: int = 20) -> list[AuditRecord]:
        """The last ``n`` records."""
        recs = list(self.records())
        return recs[-n:] if n > 0 else []
