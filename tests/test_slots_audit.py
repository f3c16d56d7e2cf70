"""The audit trail stays one chain when several writers append: two instances, and real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sre_core.audit import AuditLog

CHILD = """
import sys
from sre_core.audit import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[2])):
    log.append("child.step", actor=sys.argv[3], i=i)
"""


def test_interleaved_instances_and_processes_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path), AuditLog(path)
    a.append("a.first")
    b.append("b.first")  # b never saw a's record in memory
    a.append("a.second")  # a's cached head is stale now
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(path), "60", f"p{n}"]) for n in range(3)]
    for i in range(60):
        (a if i % 2 else b).append("parent.step", i=i)
    for p in procs:
        assert p.wait(timeout=120) == 0
    n, broken = AuditLog(path).verify()
    assert broken is None and n == 3 + 60 + 3 * 60


def test_torn_tail_is_dropped_by_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("one")
    with path.open("ab") as fh:
        fh.write(b'{"seq": 2, "torn')  # kill -9 in the middle of a write
    other = AuditLog(path)
    other.append("two")
    log.append("three")
    n, broken = AuditLog(path).verify()
    assert broken is None and n == 3 and [r.event for r in other.records()] == ["one", "two", "three"]
