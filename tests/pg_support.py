"""A private PostgreSQL server for tests: initdb + pg_ctl in a temp dir, unix socket only, no TCP.

``pg_server`` (session) starts it once per test process and stops it at the end; ``pg_url`` (function)
creates a fresh database on it for each test. As root, the server runs as the ``postgres`` user
(initdb refuses root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install PostgreSQL (make system-deps)")
    return path


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The socket directory of a running private server (superuser ``postgres``, trust auth)."""
    root = Path(tempfile.mkdtemp(prefix="sre-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    subprocess.run(
        _as_owner([_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    opts = f"-k {root} -c listen_addresses='' -c max_connections=200 -c fsync=off"
    subprocess.run(
        _as_owner([_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield str(root)
    finally:
        subprocess.run(
            _as_owner([_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
            check=False,
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A new, empty database on the private server, as a SQLAlchemy URL."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(f"host={pg_server} user=postgres dbname=postgres", autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return f"postgresql://postgres@/{name}?host={pg_server}"
