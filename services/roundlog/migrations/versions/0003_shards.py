"""Sharded rounds: each round's shard count, and one row per shard's partial.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    # every round before this revision had one shard, which the log says by its schema's default
    op.add_column("rounds", sa.Column("shards", sa.Integer, nullable=False, server_default="1"))
    op.create_table(
        "round_shards",
        sa.Column("round_id", sa.Text, primary_key=True),
        sa.Column("shard", sa.Integer, primary_key=True),
        sa.Column("session_id", sa.Text, nullable=False, index=True),
        sa.Column("shards", sa.Integer, nullable=False),
        sa.Column("n_updates", sa.Integer, nullable=False),
        sa.Column("update_ids", JSONB, nullable=False),
        sa.Column("total_weight", sa.Float, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("nbytes", sa.BigInteger, nullable=False),
        sa.Column("tensor", JSONB, nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("created_at", Time, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("round_shards")
    op.drop_column("rounds", "shards")
