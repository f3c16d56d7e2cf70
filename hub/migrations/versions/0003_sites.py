"""Regional hub sites: hashed site tokens and each site's last reported sync and backlog.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sites",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("added_at", sa.String(40), nullable=False),
        sa.Column("last_seen", sa.String(40), nullable=True),
        sa.Column("last_sync", sa.String(40), nullable=True),
        sa.Column("status", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("sites")
