"""Who said it: the key behind every event, the key registry, and the authors of each round.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Time = sa.DateTime(timezone=True)

#: One row per round: the key that did each step. ``submitted_by`` maps each client whose
#: result the fold applied to the key that signed it; ``closed_by`` signed the event that ended
#: the collection (the result that filled the buffer, or the coordinator's timeout).
ROUND_AUTHORS = """
CREATE VIEW round_authors AS
SELECT
    r.session_id, r.round_id, r.round_no, r.task, r.state,
    (SELECT e.key_id FROM events e
     WHERE e.round_id = r.round_id AND e.type = 'RoundRequested' AND e.outcome = 'applied'
     ORDER BY e.partition, e."offset" LIMIT 1) AS requested_by,
    (SELECT e.key_id FROM events e
     WHERE e.round_id = r.round_id AND e.type = 'ClientsAssigned' AND e.outcome = 'applied'
     ORDER BY e.partition, e."offset" LIMIT 1) AS assigned_by,
    (SELECT jsonb_object_agg(e.client_id, e.key_id ORDER BY e."offset") FROM events e
     WHERE e.round_id = r.round_id AND e.outcome = 'applied'
       AND e.type IN ('UpdateReceived', 'ValidationReceived', 'PredictionReceived')) AS submitted_by,
    (SELECT e.key_id FROM events e WHERE e.event_id = r.closed_by_event) AS closed_by,
    (SELECT e.key_id FROM events e
     WHERE e.round_id = r.round_id AND e.type = 'RoundAggregated' AND e.outcome = 'applied'
     ORDER BY e.partition, e."offset" LIMIT 1) AS aggregated_by,
    (SELECT e.key_id FROM events e
     WHERE e.round_id = r.round_id AND e.type = 'RoundFailed' AND e.outcome = 'applied'
     ORDER BY e.partition, e."offset" LIMIT 1) AS failed_by
FROM rounds r
"""


def upgrade() -> None:
    op.add_column("events", sa.Column("key_id", sa.Text))
    op.create_index("events_round_id", "events", ["round_id"])
    op.add_column("rejected_events", sa.Column("key_id", sa.Text))
    op.add_column("clients", sa.Column("key_id", sa.Text))
    op.add_column("rounds", sa.Column("closed_by_event", sa.Text))
    op.create_table(
        "keys",
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("roles", ARRAY(sa.Text), nullable=False),
        sa.Column("client_id", sa.Text),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("registered_at", Time, nullable=False),
        sa.Column("changed_at", Time, nullable=False),
        sa.Column("revoked_at", Time),
        sa.Column("revoke_reason", sa.Text),
    )
    op.execute(ROUND_AUTHORS)


def downgrade() -> None:
    op.execute("DROP VIEW round_authors")
    op.drop_table("keys")
    op.drop_column("rounds", "closed_by_event")
    op.drop_column("clients", "key_id")
    op.drop_column("rejected_events", "key_id")
    op.drop_index("events_round_id", "events")
    op.drop_column("events", "key_id")
