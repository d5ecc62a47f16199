"""The projection tables and the first views a user writes.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

A revision is history: it spells out its tables instead of importing roundlog's current
metadata, so it creates the same schema however the code evolves.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, JSONB

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Time = sa.DateTime(timezone=True)

ROUND_TIMELINE = """
CREATE VIEW round_timeline AS
SELECT
    round_id, session_id, round_no, task, state, timed_out, round_timeout,
    requested_at,
    COALESCE(aggregated_at, completed_at, failed_at) AS ended_at,
    EXTRACT(EPOCH FROM staged_at - requested_at)::float8 AS staging_s,
    EXTRACT(EPOCH FROM collecting_at - staged_at)::float8 AS assigning_s,
    EXTRACT(EPOCH FROM COALESCE(closed_at, completed_at, failed_at) - collecting_at)::float8 AS collecting_s,
    EXTRACT(EPOCH FROM aggregated_at - closed_at)::float8 AS aggregating_s,
    EXTRACT(EPOCH FROM COALESCE(aggregated_at, completed_at, failed_at) - requested_at)::float8 AS total_s,
    n_assigned, n_received, n_accepted, n_rejected
FROM rounds
"""

CLIENT_PARTICIPATION = """
CREATE VIEW client_participation AS
WITH known AS (
    SELECT client_id FROM clients
    UNION SELECT client_id FROM round_clients
    UNION SELECT client_id FROM round_updates
), assigned AS (
    SELECT client_id, count(*) AS n_assigned, count(reported_at) AS n_reported
    FROM round_clients GROUP BY client_id
), updates AS (
    SELECT client_id,
           count(*) AS n_updates,
           count(*) FILTER (WHERE status = 'accepted') AS n_accepted,
           count(*) FILTER (WHERE status = 'rejected') AS n_rejected
    FROM round_updates GROUP BY client_id
), reasons AS (
    SELECT client_id, jsonb_object_agg(reject_reason, n) AS rejected_by_reason
    FROM (
        SELECT client_id, reject_reason, count(*) AS n FROM round_updates
        WHERE status = 'rejected' GROUP BY client_id, reject_reason
    ) AS per_reason
    GROUP BY client_id
)
SELECT
    known.client_id, clients.roles, clients.last_seen,
    COALESCE(assigned.n_assigned, 0) AS n_assigned,
    COALESCE(assigned.n_reported, 0) AS n_reported,
    COALESCE(updates.n_updates, 0) AS n_updates,
    COALESCE(updates.n_accepted, 0) AS n_accepted,
    COALESCE(updates.n_rejected, 0) AS n_rejected,
    COALESCE(reasons.rejected_by_reason, '{}'::jsonb) AS rejected_by_reason
FROM known
LEFT JOIN clients USING (client_id)
LEFT JOIN assigned USING (client_id)
LEFT JOIN updates USING (client_id)
LEFT JOIN reasons USING (client_id)
"""

SESSION_PROGRESS = """
CREATE VIEW session_progress AS
SELECT
    s.session_id, s.name, s.state, s.rounds_total, s.rounds_done,
    round(100.0 * s.rounds_done / s.rounds_total, 1) AS pct_done,
    count(r.round_id) FILTER (WHERE r.task = 'training') AS training_rounds,
    count(r.round_id) FILTER (WHERE r.task <> 'training') AS evaluation_rounds,
    count(r.round_id) FILTER (WHERE r.state = 'failed') AS rounds_failed,
    count(r.round_id) FILTER (WHERE r.state NOT IN ('aggregated', 'failed', 'completed')) AS rounds_open,
    max(r.round_no) AS current_round_no,
    s.latest_model_id,
    s.started_at,
    COALESCE(s.completed_at, s.failed_at) AS finished_at,
    GREATEST(s.started_at, s.completed_at, s.failed_at, max(GREATEST(
        r.requested_at, r.staged_at, r.collecting_at, r.closed_at,
        r.aggregated_at, r.failed_at, r.completed_at
    ))) AS last_change_at
FROM sessions s
LEFT JOIN rounds r USING (session_id)
GROUP BY s.session_id
"""


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("rounds_total", sa.BigInteger, nullable=False),
        sa.Column("rounds_done", sa.Integer, nullable=False),
        sa.Column("config", JSONB, nullable=False),
        sa.Column("validate_each_round", sa.Boolean, nullable=False),
        sa.Column("stop_on_failure", sa.Boolean, nullable=False),
        sa.Column("initial_model_id", sa.Text, nullable=False),
        sa.Column("latest_model_id", sa.Text, nullable=False),
        sa.Column("final_model_id", sa.Text),
        sa.Column("succeeded", sa.Boolean),
        sa.Column("finish_reason", sa.Text),
        sa.Column("started_at", Time, nullable=False),
        sa.Column("completed_at", Time),
        sa.Column("failed_at", Time),
    )
    op.create_table(
        "rounds",
        sa.Column("round_id", sa.Text, primary_key=True),
        sa.Column("session_id", sa.Text, nullable=False, index=True),
        sa.Column("round_no", sa.BigInteger, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("base_model_id", sa.Text, nullable=False),
        sa.Column("new_model_id", sa.Text),
        sa.Column("fail_reason", sa.Text),
        sa.Column("timed_out", sa.Boolean, nullable=False),
        sa.Column("buffer_size", sa.BigInteger, nullable=False),
        sa.Column("clients_required", sa.BigInteger, nullable=False),
        sa.Column("max_clients", sa.BigInteger, nullable=False),
        sa.Column("min_updates", sa.BigInteger, nullable=False),
        sa.Column("round_timeout", sa.Float, nullable=False),
        sa.Column("aggregator", sa.Text, nullable=False),
        sa.Column("aggregator_kwargs", JSONB, nullable=False),
        sa.Column("deadline", Time),
        sa.Column("n_assigned", sa.Integer, nullable=False),
        sa.Column("n_received", sa.Integer, nullable=False),
        sa.Column("n_accepted", sa.Integer, nullable=False),
        sa.Column("n_rejected", sa.Integer, nullable=False),
        sa.Column("total_weight", sa.Float, nullable=False),
        sa.Column("time_model_load", sa.Float),
        sa.Column("time_aggregation", sa.Float),
        sa.Column("requested_at", Time, nullable=False),
        sa.Column("staged_at", Time),
        sa.Column("collecting_at", Time),
        sa.Column("closed_at", Time),
        sa.Column("aggregated_at", Time),
        sa.Column("failed_at", Time),
        sa.Column("completed_at", Time),
    )
    op.create_table(
        "round_clients",
        sa.Column("round_id", sa.Text, primary_key=True),
        sa.Column("client_id", sa.Text, primary_key=True, index=True),
        sa.Column("assigned_at", Time, nullable=False),
        sa.Column("reported_at", Time),
    )
    op.create_table(
        "round_updates",
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("update_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("round_id", sa.Text, nullable=False, index=True),
        sa.Column("client_id", sa.Text, nullable=False, index=True),
        sa.Column("num_examples", sa.BigInteger, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reject_reason", sa.Text),
        sa.Column("reject_detail", sa.Text),
        sa.Column("metrics", JSONB, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("nbytes", sa.BigInteger, nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.CheckConstraint("status IN ('accepted', 'rejected')", name="round_updates_status"),
    )
    op.create_table(
        "models",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("origin", sa.Text, nullable=False),
        sa.Column("name", sa.Text),
        sa.Column("parent_model_id", sa.Text, index=True),
        sa.Column("session_id", sa.Text),
        sa.Column("round_id", sa.Text),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("nbytes", sa.BigInteger, nullable=False),
        sa.Column("layout", JSONB, nullable=False),
        sa.Column("tensor", JSONB, nullable=False),
        sa.Column("optimizer_state", JSONB),
        sa.Column("n_updates", sa.Integer),
        sa.Column("created_at", Time, nullable=False),
        sa.CheckConstraint("origin IN ('imported', 'aggregated')", name="models_origin"),
    )
    for name, extra in (
        ("validations", [sa.Column("num_examples", sa.BigInteger, nullable=False)]),
        ("predictions", [sa.Column("summary", sa.Text, nullable=False)]),
    ):
        op.create_table(
            name,
            sa.Column("round_id", sa.Text, primary_key=True),
            sa.Column("client_id", sa.Text, primary_key=True),
            sa.Column("session_id", sa.Text, nullable=False),
            sa.Column("model_id", sa.Text, nullable=False, index=True),
            *extra,
            sa.Column("metrics", JSONB, nullable=False),
            sa.Column("received_at", Time, nullable=False),
            sa.Column("event_id", sa.Text, nullable=False),
        )
    op.create_table(
        "clients",
        sa.Column("client_id", sa.Text, primary_key=True),
        sa.Column("roles", ARRAY(sa.Text), nullable=False),
        sa.Column("labels", JSONB, nullable=False),
        sa.Column("last_seen", Time, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("offset", sa.BigInteger, primary_key=True),
        sa.Column("event_id", sa.Text, nullable=False, unique=True),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, index=True),
        sa.Column("round_id", sa.Text),
        sa.Column("client_id", sa.Text),
        sa.Column("occurred_at", Time, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("projected_at", Time, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "rejected_events",
        sa.Column("topic", sa.Text, primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("offset", sa.BigInteger, primary_key=True),
        sa.Column("raw_size", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("head", BYTEA, nullable=False),
        sa.Column("key", BYTEA),
        sa.Column("event_id", sa.Text),
        sa.Column("type", sa.Text),
        sa.Column("session_id", sa.Text),
        sa.Column("round_id", sa.Text),
        sa.Column("occurred_at", Time),
        sa.Column("projected_at", Time, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "projector_offsets",
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column("topic", sa.Text, primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("replay_from", sa.BigInteger, nullable=False),
        sa.Column("updated_at", Time, nullable=False, server_default=sa.func.now()),
    )
    for view in (ROUND_TIMELINE, CLIENT_PARTICIPATION, SESSION_PROGRESS):
        op.execute(view)


def downgrade() -> None:
    for view in ("session_progress", "client_participation", "round_timeline"):
        op.execute(f"DROP VIEW {view}")
    for table in (
        "projector_offsets",
        "rejected_events",
        "events",
        "clients",
        "predictions",
        "validations",
        "models",
        "round_updates",
        "round_clients",
        "rounds",
        "sessions",
    ):
        op.drop_table(table)
