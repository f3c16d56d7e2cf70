"""Signed escalation decisions (approvals and rejections) in the hub database.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "escalation_decisions",
        sa.Column("escalation_id", sa.String(64), primary_key=True),
        sa.Column("decision", sa.String(16), primary_key=True),
        sa.Column("operator", sa.String(128), primary_key=True),
        sa.Column("signed_at", sa.String(40), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("escalation_decisions")
