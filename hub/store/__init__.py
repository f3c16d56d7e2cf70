"""The hub's relational store: every piece of fleet state in one SQL database, through SQLAlchemy 2.

Public API::

    StoreConfig(database_url, lake_url)          where state and the lake live
    store_config(repo_dir) -> StoreConfig         env > <repo>/hub.toml [store] > embedded defaults
    open_store(url) -> HubStore                   engine + Alembic ``upgrade head`` (once, under a lock)
    HubStore.tx()   -> a connection in one transaction (commit on exit, rollback on error)
    HubStore.insert(table) -> the dialect's INSERT (``on_conflict_do_nothing`` / ``do_update``)

Backends: embedded SQLite (the default, ``<repo>/fleet/hub.db``: ``make demo`` and single-site hubs) and
PostgreSQL (production: ``postgresql://`` URLs use psycopg 3). Replicas of ``sre-hub serve`` share
nothing but this database and the object store, so every state change is one transaction here:

- SQLite: every transaction is ``BEGIN IMMEDIATE`` (writers queue on the database lock with a busy
  timeout instead of failing on a lock upgrade), WAL journal.
- PostgreSQL: READ COMMITTED plus explicit row locks (``SELECT ... FOR UPDATE``) where a decision reads
  what it then changes (rollout gates), and conflict-free upserts elsewhere.

Configuration (``<repo>/hub.toml``)::

    [store]
    database_url = "postgresql://hub@db.example/hub"
    lake_url = "s3://fleet-lake/prod"            # or a local directory (default <repo>/fleet/lake)

The environment variables ``SRE_HUB_DATABASE_URL`` and ``SRE_HUB_LAKE_URL`` override the file.
"""

from __future__ import annotations

import fcntl
import os
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from sre_core.errors import InputError

__all__ = [
    "ENV_DATABASE_URL",
    "ENV_LAKE_URL",
    "HubStore",
    "StoreConfig",
    "open_store",
    "store_config",
]

ENV_DATABASE_URL = "SRE_HUB_DATABASE_URL"
ENV_LAKE_URL = "SRE_HUB_LAKE_URL"
_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
_PG_MIGRATION_LOCK = 0x5E_4B_0001
_cache: dict[tuple[int, str], HubStore] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class StoreConfig:
    """Where the hub keeps its state (a SQLAlchemy URL) and its lake (a directory or object-store URL)."""

    database_url: str
    lake_url: str


def store_config(repo_dir: Path) -> StoreConfig:
    """The store configuration of the hub repository ``repo_dir``.

    Raises:
        InputError: ``hub.toml`` is not valid TOML.
    """
    repo_dir = Path(repo_dir)
    conf: dict[str, Any] = {}
    path = repo_dir / "hub.toml"
    if path.is_file():
        try:
            conf = dict(tomllib.loads(path.read_text()).get("store", {}))
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"read {path}", f"not TOML ({exc})", "fix the [store] table") from exc
    db = os.environ.get(ENV_DATABASE_URL) or str(conf.get("database_url") or "")
    lake = os.environ.get(ENV_LAKE_URL) or str(conf.get("lake_url") or "")
    return StoreConfig(
        database_url=db or f"sqlite:///{(repo_dir / 'fleet' / 'hub.db').resolve()}",
        lake_url=lake or str((repo_dir / "fleet" / "lake").resolve()),
    )


def _normalise(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class HubStore:
    """One database: an engine plus the few dialect differences the hub code needs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self.engine.begin() as conn:
            yield conn

    def insert(self, table: Any) -> Any:
        """The dialect's INSERT (both dialects offer ``on_conflict_do_nothing`` and ``_do_update``)."""
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_engine(url: str) -> Engine:
    u = make_url(url)
    if u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_con: Any, _record: Any) -> None:
        dbapi_con.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_con.cursor()
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _migrate(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
        return
    db = make_url(str(engine.url)).database or ""
    lock_path = Path(db + ".migrate.lock") if db and db != ":memory:" else None
    fh = lock_path.open("a") if lock_path else None
    try:
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
    finally:
        if fh is not None:
            fh.close()


def open_store(url: str) -> HubStore:
    """The store at ``url``, migrated to the newest schema (cached per process and URL).

    Raises:
        InputError: the URL names no supported database.
    """
    url = _normalise(url)
    key = (os.getpid(), url)
    with _cache_lock:
        found = _cache.get(key)
        if found is not None:
            return found
        if url.startswith("sqlite"):
            engine = _sqlite_engine(url)
        elif url.startswith("postgresql+psycopg://"):
            engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
        else:
            raise InputError(
                f"open hub database {url.split('://', 1)[0]}://...",
                "only sqlite:/// and postgresql:// URLs are supported",
                "set [store] database_url in hub.toml",
            )
        _migrate(engine)
        store = HubStore(engine)
        _cache[key] = store
        return store
