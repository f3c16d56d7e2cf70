"""The hub's relational schema (SQLAlchemy Core). Alembic revisions under ``hub/migrations`` create it;
this module is what the code reads and writes through. Change both together (a new revision per change).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text

__all__ = [
    "device_state",
    "devices",
    "escalation_decisions",
    "metadata",
    "nonces",
    "operator_tokens",
    "recalls",
    "receipts",
    "reports",
    "review_queue",
    "rollout_channels",
    "rollout_counters",
    "rollout_members",
    "rollouts",
    "sites",
]

metadata = MetaData()

devices = Table(
    "devices",
    metadata,
    Column("device_id", String(128), primary_key=True),
    Column("key_pem", Text, nullable=False),
    Column("enrolled_at", String(40), nullable=False),
    Column("revoked_at", String(40), nullable=True),
)

nonces = Table(
    "nonces",
    metadata,
    Column("key_id", String(128), primary_key=True),
    Column("nonce", String(128), primary_key=True),
    Column("created", BigInteger, nullable=False),
    Index("ix_nonces_created", "created"),
)

receipts = Table(
    "receipts",
    metadata,
    Column("batch_id", String(40), primary_key=True),
    Column("device_id", String(128), nullable=False, index=True),
    Column("table_name", String(63), nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("path", Text, nullable=False),
    Column("received", String(40), nullable=False),
    Column("arrival", BigInteger, nullable=False, default=0),
)

device_state = Table(
    "device_state",
    metadata,
    Column("device_id", String(128), primary_key=True),
    Column("last_seen", String(40), nullable=True),
    Column("batches", BigInteger, nullable=False, default=0),
    Column("rows_json", Text, nullable=False, default="{}"),
    Column("attested_json", Text, nullable=True),
    Column("attested_time", String(64), nullable=True),
    Column("attested_received", String(40), nullable=True),
)

review_queue = Table(
    "review_queue",
    metadata,
    Column("batch_id", String(40), primary_key=True),
    Column("device_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("items_json", Text, nullable=False),
)

reports = Table(
    "reports",
    metadata,
    Column("device_id", String(128), primary_key=True),
    Column("channel", String(64), nullable=True, index=True),
    Column("received_at", String(40), nullable=False),
    Column("body", Text, nullable=False),
)

rollout_channels = Table(
    "rollout_channels",
    metadata,
    Column("channel", String(64), primary_key=True),
    Column("current_id", String(64), nullable=True),
    Column("count", Integer, nullable=False, default=0),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("channel", String(64), nullable=False, index=True),
    Column("seq", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("body", Text, nullable=False),
)

rollout_members = Table(
    "rollout_members",
    metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("wave", Integer, nullable=False),
    Column("flags", Integer, nullable=False, default=0),
)

rollout_counters = Table(
    "rollout_counters",
    metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("wave", Integer, primary_key=True),
    Column("members_known", BigInteger, nullable=False, default=0),
    Column("reachable", BigInteger, nullable=False, default=0),
    Column("on_candidate", BigInteger, nullable=False, default=0),
    Column("healthy", BigInteger, nullable=False, default=0),
    Column("failed", BigInteger, nullable=False, default=0),
)

recalls = Table(
    "recalls",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("channel", String(64), nullable=False, index=True),
    Column("at", String(40), nullable=False),
    Column("body", Text, nullable=False),
)

operator_tokens = Table(
    "operator_tokens",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
)

escalation_decisions = Table(
    "escalation_decisions",
    metadata,
    Column("escalation_id", String(64), primary_key=True),
    Column("decision", String(16), primary_key=True),
    Column("operator", String(128), primary_key=True),
    Column("signed_at", String(40), nullable=False),
    Column("body", Text, nullable=False),
)

sites = Table(
    "sites",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("added_at", String(40), nullable=False),
    Column("last_seen", String(40), nullable=True),
    Column("last_sync", String(40), nullable=True),
    Column("status", Text, nullable=True),
)
