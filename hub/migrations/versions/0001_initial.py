"""The hub's initial schema: devices, nonces, receipts, state, reports, rollouts, recalls, tokens.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("key_pem", sa.Text, nullable=False),
        sa.Column("enrolled_at", sa.String(40), nullable=False),
        sa.Column("revoked_at", sa.String(40), nullable=True),
    )
    op.create_table(
        "nonces",
        sa.Column("key_id", sa.String(128), primary_key=True),
        sa.Column("nonce", sa.String(128), primary_key=True),
        sa.Column("created", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_nonces_created", "nonces", ["created"])
    op.create_table(
        "receipts",
        sa.Column("batch_id", sa.String(40), primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("table_name", sa.String(63), nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("received", sa.String(40), nullable=False),
        sa.Column("arrival", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_receipts_device_id", "receipts", ["device_id"])
    op.create_table(
        "device_state",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("last_seen", sa.String(40), nullable=True),
        sa.Column("batches", sa.BigInteger, nullable=False),
        sa.Column("rows_json", sa.Text, nullable=False),
        sa.Column("attested_json", sa.Text, nullable=True),
        sa.Column("attested_time", sa.String(64), nullable=True),
        sa.Column("attested_received", sa.String(40), nullable=True),
    )
    op.create_table(
        "review_queue",
        sa.Column("batch_id", sa.String(40), primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("items_json", sa.Text, nullable=False),
    )
    op.create_table(
        "reports",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("channel", sa.String(64), nullable=True),
        sa.Column("received_at", sa.String(40), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_reports_channel", "reports", ["channel"])
    op.create_table(
        "rollout_channels",
        sa.Column("channel", sa.String(64), primary_key=True),
        sa.Column("current_id", sa.String(64), nullable=True),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_rollouts_channel", "rollouts", ["channel"])
    op.create_table(
        "rollout_members",
        sa.Column("rollout_id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("flags", sa.Integer, nullable=False),
    )
    op.create_table(
        "rollout_counters",
        sa.Column("rollout_id", sa.String(64), primary_key=True),
        sa.Column("wave", sa.Integer, primary_key=True),
        sa.Column("members_known", sa.BigInteger, nullable=False),
        sa.Column("reachable", sa.BigInteger, nullable=False),
        sa.Column("on_candidate", sa.BigInteger, nullable=False),
        sa.Column("healthy", sa.BigInteger, nullable=False),
        sa.Column("failed", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "recalls",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("at", sa.String(40), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_recalls_channel", "recalls", ["channel"])
    op.create_table(
        "operator_tokens",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    )


def downgrade() -> None:
    for name in (
        "operator_tokens", "recalls", "rollout_counters", "rollout_members", "rollouts",
        "rollout_channels", "reports", "review_queue", "device_state", "receipts", "nonces", "devices",
    ):  # fmt: skip
        op.drop_table(name)
