"""What the dashboard shows, read from the projection tables and views and nothing else.

Each function takes an open SQLAlchemy connection and returns rows or small shapes ready
for a template: the pages hold no SQL and no arithmetic beyond layout, so whatever a page
shows is what these queries (and, through them, the views) say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

#: Example-weighted means of every metric: training metrics from accepted updates, others from
#: results (what `roundlog status --session` prints, too).
METRICS_SQL = """
    SELECT m.round_id, kv.key, sum(kv.value::float8 * m.weight) / NULLIF(sum(m.weight), 0) AS mean
    FROM (
        SELECT round_id, num_examples AS weight, metrics FROM round_updates
        WHERE session_id = :session_id AND status = 'accepted'
        UNION ALL
        SELECT round_id, num_examples, metrics FROM validations WHERE session_id = :session_id
    ) AS m, jsonb_each_text(m.metrics) AS kv
    GROUP BY m.round_id, kv.key ORDER BY kv.key
"""


Row = sa.Row[Any]

_SESSIONS = sa.text(
    """
    SELECT p.session_id, p.name, p.state, p.rounds_done, p.rounds_total, p.pct_done, p.rounds_open,
           p.rounds_failed, p.started_at, p.finished_at, s.succeeded, s.finish_reason, s.latest_model_id
    FROM session_progress p JOIN sessions s USING (session_id)
    """
)

#: Per session, the example-weighted mean of each metric of its latest validation round.
_LAST_METRICS = sa.text(
    """
    WITH latest AS (
        SELECT DISTINCT ON (r.session_id) r.session_id, r.round_id, r.round_no
        FROM rounds r
        WHERE EXISTS (SELECT 1 FROM validations v WHERE v.round_id = r.round_id)
        ORDER BY r.session_id, r.round_no DESC, r.requested_at DESC
    )
    SELECT l.session_id, l.round_no, kv.key,
           sum(kv.value::float8 * v.num_examples) / NULLIF(sum(v.num_examples), 0) AS mean
    FROM latest l JOIN validations v USING (round_id), jsonb_each_text(v.metrics) AS kv
    GROUP BY l.session_id, l.round_no, kv.key
    ORDER BY kv.key
    """
)

_ROUNDS = sa.text(
    """
    SELECT t.round_id, t.round_no, t.task, t.state, t.timed_out, t.round_timeout, t.requested_at,
           r.staged_at, r.collecting_at, COALESCE(r.closed_at, t.ended_at) AS closed_at, t.ended_at,
           t.staging_s, t.assigning_s, t.collecting_s, t.aggregating_s, t.total_s,
           t.n_assigned, t.n_received, t.n_accepted, t.n_rejected, r.buffer_size, r.min_updates,
           r.fail_reason, r.new_model_id
    FROM round_timeline t JOIN rounds r USING (round_id)
    WHERE t.session_id = :session_id
    ORDER BY t.round_no, t.task <> 'training', t.requested_at
    """
)

_UPDATE_COUNTS = sa.text(
    """
    SELECT round_id, COALESCE(reject_reason, status) AS outcome, count(*) AS n
    FROM round_updates WHERE session_id = :session_id
    GROUP BY round_id, COALESCE(reject_reason, status)
    """
)

#: The session's models (and the model it started from), each with its latest audit's verdict.
_LINEAGE = sa.text(
    """
    SELECT m.model_id, m.origin, m.name, m.parent_model_id, m.round_id, r.round_no, m.sha256, m.nbytes,
           m.n_updates, m.created_at, a.verified AND a.sha256 = m.sha256 AS verified, a.detail,
           a.audited_at
    FROM models m
    LEFT JOIN rounds r USING (round_id)
    LEFT JOIN LATERAL (
        SELECT verified, sha256, detail, audited_at FROM model_audits
        WHERE model_audits.model_id = m.model_id ORDER BY audited_at DESC LIMIT 1
    ) AS a ON true
    WHERE m.session_id = :session_id
       OR m.model_id = (SELECT initial_model_id FROM sessions WHERE session_id = :session_id)
    ORDER BY m.session_id IS NOT DISTINCT FROM :session_id, r.round_no, m.created_at
    """
)

#: Every client's result for every round of the session: updates as the fold and the aggregator
#: judged them, evaluation results applied, and evaluation results the fold refused.
_RESULTS = sa.text(
    """
    SELECT round_id, client_id, status, reject_reason FROM round_updates WHERE session_id = :session_id
    UNION ALL
    SELECT round_id, client_id, 'accepted', NULL FROM validations WHERE session_id = :session_id
    UNION ALL
    SELECT round_id, client_id, 'accepted', NULL FROM predictions WHERE session_id = :session_id
    UNION ALL
    SELECT round_id, client_id, 'rejected', outcome FROM events
    WHERE session_id = :session_id AND outcome <> 'applied'
      AND type IN ('ValidationReceived', 'PredictionReceived')
    """
)

_ASSIGNED = sa.text(
    """
    SELECT c.round_id, c.client_id FROM round_clients c JOIN rounds r USING (round_id)
    WHERE r.session_id = :session_id
    """
)

_CLIENT_TOTALS = sa.text(
    """
    SELECT client_id, roles, last_seen, n_assigned, n_reported, n_updates, n_accepted, n_rejected,
           rejected_by_reason
    FROM client_participation WHERE client_id = ANY(:client_ids) ORDER BY client_id
    """
)

_REJECTED_BY_REASON = sa.text(
    """
    SELECT reason, count(*) AS n FROM rejected_events
    WHERE CAST(:session_id AS text) IS NULL OR session_id = :session_id
    GROUP BY reason ORDER BY count(*) DESC, reason
    """
)

_REJECTED = sa.text(
    """
    SELECT topic, partition, "offset", reason, detail, type, session_id, round_id, event_id, raw_size,
           occurred_at, projected_at
    FROM rejected_events
    WHERE CAST(:session_id AS text) IS NULL OR session_id = :session_id
    ORDER BY projected_at DESC, topic, partition, "offset" DESC
    LIMIT :limit
    """
)

RUNNING = "running"


# --- sessions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LastMetrics:
    """The example-weighted means of a session's latest validation round."""

    round_no: int
    means: dict[str, float]


def sessions(conn: sa.Connection, limit: int = 100) -> list[Row]:
    """The most recent sessions with their progress (``session_progress``)."""
    query = sa.text(f"{_SESSIONS.text} ORDER BY p.started_at DESC, p.session_id LIMIT :limit")
    return list(conn.execute(query, {"limit": limit}))


def last_metrics(conn: sa.Connection) -> dict[str, LastMetrics]:
    """Per session id, the metrics of its latest validation round (sessions without one are absent)."""
    found: dict[str, LastMetrics] = {}
    for row in conn.execute(_LAST_METRICS):
        found.setdefault(row.session_id, LastMetrics(row.round_no, {})).means[row.key] = row.mean
    return found


def session(conn: sa.Connection, session_id: str) -> Row | None:
    """One session's progress row, or None if the projections do not know it."""
    query = sa.text(f"{_SESSIONS.text} WHERE p.session_id = :session_id")
    return conn.execute(query, {"session_id": session_id}).first()


# --- one session -----------------------------------------------------------------------------------


def rounds(conn: sa.Connection, session_id: str) -> list[Row]:
    """The session's rounds in order (``round_timeline`` with the times each state began)."""
    return list(conn.execute(_ROUNDS, {"session_id": session_id}))


@dataclass(frozen=True)
class Series:
    label: str
    #: one value per x of the chart, None where that round has no value
    values: list[float | None]


@dataclass(frozen=True)
class Chart:
    metric: str
    series: list[Series]


@dataclass(frozen=True)
class Curves:
    """One chart per metric over the session's round numbers, one series per task that reports it."""

    round_nos: list[int]
    charts: list[Chart]


def curves(conn: sa.Connection, session_id: str, session_rounds: Sequence[Row]) -> Curves:
    """Metric curves per round: example-weighted means of training updates and of validation results."""
    round_nos = sorted({r.round_no for r in session_rounds})
    where = {r.round_id: (r.task, round_nos.index(r.round_no)) for r in session_rounds}
    per_metric: dict[str, dict[str, list[float | None]]] = {}
    for row in conn.execute(sa.text(METRICS_SQL), {"session_id": session_id}):
        if row.round_id not in where:  # a result whose round the projections do not hold (yet)
            continue
        task, x = where[row.round_id]
        values = per_metric.setdefault(row.key, {}).setdefault(task, [None] * len(round_nos))
        values[x] = row.mean
    charts = [
        Chart(metric, [Series(f"{task} {metric}", values) for task, values in sorted(by_task.items())])
        for metric, by_task in sorted(per_metric.items(), key=lambda item: _metric_order(item[0]))
    ]
    return Curves(round_nos, charts)


def _metric_order(metric: str) -> tuple[int, str]:
    """Accuracy and loss first: the curves people look for."""
    return ({"accuracy": 0, "loss": 1}.get(metric, 2), metric)


@dataclass(frozen=True)
class Segment:
    """One state of a round on the timeline bar, placed in percent of the session's span."""

    state: str
    seconds: float
    left: float
    width: float


def timeline(session_rounds: Sequence[Row], started_at: datetime) -> dict[str, list[Segment]]:
    """Per round id, the states it went through, each placed on one time axis for the whole session."""
    known = [t for r in session_rounds for t in (*_moments(r), r.ended_at) if t is not None]
    now = max(known, default=started_at)
    span = max((now - started_at).total_seconds(), 1e-9)
    bars: dict[str, list[Segment]] = {}
    for r in session_rounds:
        moments = _moments(r)
        end = r.ended_at or now  # an open round runs to the latest moment the projections know
        segments = []
        for state, begin, until in zip(
            ("requested", "staged", "collecting", "closed"), moments, [*moments[1:], end], strict=True
        ):
            if begin is None:
                continue
            until = until or end
            seconds = max((until - begin).total_seconds(), 0.0)
            left = 100 * (begin - started_at).total_seconds() / span
            segments.append(Segment(state, seconds, left, 100 * seconds / span))
        bars[r.round_id] = segments
    return bars


def _moments(r: Row) -> list[datetime | None]:
    """When the round entered each state: requested, staged, collecting, closed (None: not yet)."""
    return [r.requested_at, r.staged_at, r.collecting_at, r.closed_at]


@dataclass(frozen=True)
class UpdateCounts:
    """Updates per round by outcome: ``accepted`` or the reason they were rejected."""

    outcomes: list[str]
    per_round: dict[str, dict[str, int]]


def update_counts(conn: sa.Connection, session_id: str) -> UpdateCounts:
    per_round: dict[str, dict[str, int]] = {}
    for row in conn.execute(_UPDATE_COUNTS, {"session_id": session_id}):
        per_round.setdefault(row.round_id, {})[row.outcome] = row.n
    reasons = sorted({o for counts in per_round.values() for o in counts} - {"accepted"})
    return UpdateCounts(["accepted", *reasons], per_round)


def lineage(conn: sa.Connection, session_id: str) -> list[Row]:
    """The session's models from the one it started from, with each one's latest audit verdict."""
    return list(conn.execute(_LINEAGE, {"session_id": session_id}))


# --- participation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """A client's part in a round: ``accepted``, ``late``, ``rejected``, ``silent`` or ``not_sampled``."""

    kind: str
    label: str


@dataclass
class Grid:
    rounds: list[Row]
    clients: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    def cell(self, client_id: str, round_id: str) -> Cell:
        return self.cells.get((client_id, round_id), Cell("not_sampled", "not sampled"))


def participation(conn: sa.Connection, session_id: str, session_rounds: Sequence[Row]) -> Grid:
    """Client x round: what became of each client's result, or that it was not asked for one."""
    params = {"session_id": session_id}
    accepted: dict[tuple[str, str], int] = {}
    reasons: dict[tuple[str, str], list[str]] = {}
    for row in conn.execute(_RESULTS, params):
        key = (row.client_id, row.round_id)
        if row.status == "accepted":
            accepted[key] = accepted.get(key, 0) + 1
        else:
            reasons.setdefault(key, []).append(row.reject_reason)
    assigned = {(row.client_id, row.round_id) for row in conn.execute(_ASSIGNED, params)}
    keys = assigned | accepted.keys() | reasons.keys()
    grid = Grid(list(session_rounds), sorted({client for client, _ in keys}))
    for key in keys:
        refused = sorted(reasons.get(key, []))
        if key in accepted:
            extra = f" (+{len(refused)} refused: {', '.join(refused)})" if refused else ""
            grid.cells[key] = Cell("accepted", "accepted" + extra)
        elif refused:
            grid.cells[key] = Cell("late" if "late" in refused else "rejected", ", ".join(refused))
        else:
            grid.cells[key] = Cell("silent", "assigned, no result")
    return grid


def client_totals(conn: sa.Connection, client_ids: Sequence[str]) -> list[Row]:
    """``client_participation`` for these clients: their record over every session."""
    return list(conn.execute(_CLIENT_TOTALS, {"client_ids": list(client_ids)}))


# --- rejections ------------------------------------------------------------------------------------


def rejected_by_reason(conn: sa.Connection, session_id: str | None) -> list[Row]:
    """How many records the projector kept aside (and dead-lettered), per reason."""
    return list(conn.execute(_REJECTED_BY_REASON, {"session_id": session_id}))


def rejected(conn: sa.Connection, session_id: str | None, limit: int) -> list[Row]:
    """The records kept aside, newest first: reason, detail, and where they were on the log."""
    return list(conn.execute(_REJECTED, {"session_id": session_id, "limit": limit}))
