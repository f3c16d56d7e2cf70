"""The atomic write survives kill -9 of a real child process at random moments."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sre_core.atomic import atomic_write_bytes, atomic_write_json, remove_stale_temps

WRITER = r"""
import sys
from pathlib import Path
from sre_core.atomic import atomic_write_bytes
target = Path(sys.argv[1])
size = int(sys.argv[2])
i = 0
print("ready", flush=True)
while True:
    i += 1
    fill = b"A" if i % 2 else b"B"
    atomic_write_bytes(target, fill * size)
"""


def _ok(data: bytes, size: int) -> bool:
    return data in (b"O" * size, b"A" * size, b"B" * size)


@pytest.mark.slow
def test_atomic_write_survives_kill9_at_random_moments(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    size = 256 * 1024
    atomic_write_bytes(target, b"O" * size)
    rng = random.Random(1234)
    seen: set[bytes] = set()
    for _ in range(40):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), str(size)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        data = target.read_bytes()
        assert _ok(data, size), f"partial content after kill -9: {len(data)} bytes, head {data[:8]!r}"
        seen.add(data[:1])
    # The writer really wrote between kills: new content replaced the original at least once.
    assert seen & {b"A", b"B"}
    remove_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_failed_write_leaves_old_content_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})

    class Boom:
        def __str__(self) -> str:
            raise RuntimeError("serialisation failed")

    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})
    assert target.read_text().strip().startswith("{")
    assert '"v": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_write_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "key"
    atomic_write_bytes(target, b"secret", mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600
