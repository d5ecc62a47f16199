"""Model audits: what each ``replay --verify-models`` run found for each aggregated model.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

Not a projection of the log: a verdict about it, one row per model per audit run, so the
dashboard can show whether (and when) each model was re-folded to the sha256 the log names.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_audits",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("audited_at", Time, primary_key=True),
        sa.Column("session_id", sa.Text, nullable=False, index=True),
        sa.Column("round_id", sa.Text, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("verified", sa.Boolean, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("model_audits")
