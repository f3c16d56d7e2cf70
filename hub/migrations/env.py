"""Alembic environment: runs on the connection :func:`hub.store.open_store` passes in (online only)."""

from __future__ import annotations

from alembic import context

from hub.store._schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - the hub always passes its connection
    raise RuntimeError("run migrations through hub.store.open_store(url)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
