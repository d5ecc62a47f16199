"""The projection tables as SQLAlchemy Core metadata: the shape the migrations create, in code.

Tables carry no schema: statements name them unqualified and PostgreSQL resolves them on
the connection's ``search_path``, so the same code writes the live schema and a replay's.
A test compares this metadata with what the migrations build, so the two cannot drift.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, JSONB

metadata = sa.MetaData()

Time = sa.DateTime(timezone=True)

sessions = sa.Table(
    "sessions",
    metadata,
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

rounds = sa.Table(
    "rounds",
    metadata,
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
    sa.Column("closed_by_event", sa.Text),
    sa.Column("shards", sa.Integer, nullable=False, server_default="1"),
)

#: One row per shard's partial of a sharded round (``ShardAggregated``).
round_shards = sa.Table(
    "round_shards",
    metadata,
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

round_clients = sa.Table(
    "round_clients",
    metadata,
    sa.Column("round_id", sa.Text, primary_key=True),
    sa.Column("client_id", sa.Text, primary_key=True, index=True),
    sa.Column("assigned_at", Time, nullable=False),
    sa.Column("reported_at", Time),
)

round_updates = sa.Table(
    "round_updates",
    metadata,
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

models = sa.Table(
    "models",
    metadata,
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

validations = sa.Table(
    "validations",
    metadata,
    sa.Column("round_id", sa.Text, primary_key=True),
    sa.Column("client_id", sa.Text, primary_key=True),
    sa.Column("session_id", sa.Text, nullable=False),
    sa.Column("model_id", sa.Text, nullable=False, index=True),
    sa.Column("num_examples", sa.BigInteger, nullable=False),
    sa.Column("metrics", JSONB, nullable=False),
    sa.Column("received_at", Time, nullable=False),
    sa.Column("event_id", sa.Text, nullable=False),
)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("round_id", sa.Text, primary_key=True),
    sa.Column("client_id", sa.Text, primary_key=True),
    sa.Column("session_id", sa.Text, nullable=False),
    sa.Column("model_id", sa.Text, nullable=False, index=True),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("metrics", JSONB, nullable=False),
    sa.Column("received_at", Time, nullable=False),
    sa.Column("event_id", sa.Text, nullable=False),
)

clients = sa.Table(
    "clients",
    metadata,
    sa.Column("client_id", sa.Text, primary_key=True),
    sa.Column("roles", ARRAY(sa.Text), nullable=False),
    sa.Column("labels", JSONB, nullable=False),
    sa.Column("last_seen", Time, nullable=False),
    sa.Column("key_id", sa.Text),
)

keys = sa.Table(
    "keys",
    metadata,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("roles", ARRAY(sa.Text), nullable=False),
    sa.Column("client_id", sa.Text),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("registered_at", Time, nullable=False),
    sa.Column("changed_at", Time, nullable=False),
    sa.Column("revoked_at", Time),
    sa.Column("revoke_reason", sa.Text),
)

events = sa.Table(
    "events",
    metadata,
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
    sa.Column("key_id", sa.Text),
    sa.Index("events_round_id", "round_id"),
)

rejected_events = sa.Table(
    "rejected_events",
    metadata,
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
    sa.Column("key_id", sa.Text),
)

projector_offsets = sa.Table(
    "projector_offsets",
    metadata,
    sa.Column("consumer", sa.Text, primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column("replay_from", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Time, nullable=False, server_default=sa.func.now()),
)

#: What each ``replay --verify-models`` run found for each aggregated model: a verdict about the log,
#: written by ``roundlog.projections.audits``, not a projection of it.
model_audits = sa.Table(
    "model_audits",
    metadata,
    sa.Column("model_id", sa.Text, primary_key=True),
    sa.Column("audited_at", Time, primary_key=True),
    sa.Column("session_id", sa.Text, nullable=False, index=True),
    sa.Column("round_id", sa.Text, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("verified", sa.Boolean, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)

#: The views the migrations create; they derive from the tables, so replay compares only tables.
VIEWS = ("round_timeline", "client_participation", "session_progress", "round_authors")

#: Columns that record when the projector wrote a row, not what the log says: replay ignores them.
RECORDING_COLUMNS = frozenset({"projected_at", "updated_at"})

#: The projections replay rebuilds and compares: not the projector's own bookkeeping (offsets), nor
#: the audits' verdicts about the log.
NOT_PROJECTIONS = frozenset({projector_offsets.name, model_audits.name})
PROJECTIONS = tuple(table for table in metadata.sorted_tables if table.name not in NOT_PROJECTIONS)
