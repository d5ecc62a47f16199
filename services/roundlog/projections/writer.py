"""Batch writes of the projection rows, over one psycopg connection.

A batch costs a handful of round trips whatever its size: binary COPY for the two tables
that get a row per event (``events``, ``round_updates``), and one multi-row statement per
other table, its columns passed as arrays and turned into rows by ``unnest`` (statements
are generated once from ``tables``).

The offsets row of each partition is both the projector's bookmark and its fence: it is
locked first and must still hold the offset the batch starts from, so two projectors that
both believe they own a partition can never both write it.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.types.json import Jsonb, set_json_dumps
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB

from roundlog.codec import json_text
from roundlog.domain.session import SessionState
from roundlog.projections import tables as t
from roundlog.projections.rows import EVENT_COLUMNS, UPDATE_COLUMNS, BatchRows

Partition = tuple[str, int]
Connection = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class Bookmark:
    """Where a partition's projection stands: the next offset to project, and where its fold starts."""

    next_offset: int
    replay_from: int


class Fenced(RuntimeError):
    """The stored offsets moved under us: another projector wrote the partition."""


class SchemaMissing(RuntimeError):
    """The projection tables do not exist (yet) where the projector looks."""


def libpq_url(database_url: str) -> str:
    """The libpq form of roundlog's SQLAlchemy URL (``postgresql+psycopg://`` -> ``postgresql://``)."""
    return sa.make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class Database:
    """One connection to the projections in ``schema`` (default: the server's search_path).

    A connection that fails is dropped; the next transaction opens a fresh one.
    """

    def __init__(self, database_url: str, schema: str | None = None) -> None:
        self.url = libpq_url(database_url)
        self.schema = schema
        self._conn: Connection | None = None

    async def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            options: dict[str, Any] = {"options": f"-c search_path={self.schema}"} if self.schema else {}
            self._conn = await psycopg.AsyncConnection.connect(self.url, **options)
        return self._conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        conn = await self._connection()
        try:
            async with conn.transaction():
                yield conn
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def check(self) -> None:
        async with self.transaction() as conn:
            cursor = await conn.execute(
                "SELECT to_regclass('projector_offsets') IS NOT NULL, current_schemas(false)::text"
            )
            found, where = await cursor.fetchone() or (False, "?")
        if not found:
            raise SchemaMissing(f"no projection tables in schema {where}: run `roundlog db upgrade` first")


# --- statements, generated once from the tables ----------------------------------------------------


def _array_type(column: sa.Column[Any]) -> str:
    """The cast of a whole column passed as one array parameter (JSONB travels as text)."""
    if isinstance(column.type, JSONB):
        return "text[]::jsonb[]"
    return f"{column.type.compile(dialect=postgresql.dialect())}[]"


@dataclass(frozen=True)
class _Insert:
    """A multi-row INSERT of one table: each column is one array parameter, ``unnest`` makes the rows.

    One statement and one round trip per table and batch, however many rows. The arrays go in
    binary (``%b``): psycopg's text format quotes every element with a regular expression.
    """

    sql: str
    #: each column's name, and whether it is JSONB (its values are sent as JSON text)
    columns: tuple[tuple[str, bool], ...]

    @classmethod
    def of(cls, table: sa.Table, conflict: str) -> _Insert:
        columns = [c for c in table.columns if c.name not in t.RECORDING_COLUMNS]
        names = ", ".join(f'"{c.name}"' for c in columns)
        arrays = ", ".join(f"%({c.name})b::{_array_type(c)}" for c in columns)
        return cls(
            f"INSERT INTO {table.name} ({names}) SELECT * FROM unnest({arrays}) {conflict}",
            tuple((c.name, isinstance(c.type, JSONB)) for c in columns),
        )

    @classmethod
    def upsert(cls, table: sa.Table, *key: str, where: str = "", **overrides: str) -> _Insert:
        """ON CONFLICT (key) DO UPDATE every other column to the new row's value, or to an override."""
        sets = {
            c.name: f'excluded."{c.name}"'
            for c in table.columns
            if c.name not in key and c.name not in t.RECORDING_COLUMNS
        }
        sets.update(overrides)
        assignments = ", ".join(f'"{name}" = {value}' for name, value in sets.items())
        keys = ", ".join(f'"{k}"' for k in key)
        return cls.of(table, f"ON CONFLICT ({keys}) DO UPDATE SET {assignments} {where}")

    async def run(self, conn: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        params: dict[str, list[Any]] = {}
        for name, is_json in self.columns:
            values = [row[name] for row in rows]
            params[name] = [None if v is None else json_text(v) for v in values] if is_json else values
        await conn.execute(self.sql, params)


_SESSIONS = _Insert.upsert(t.sessions, "session_id")
_ROUNDS = _Insert.upsert(
    t.rounds,
    "round_id",
    # The fold knows the accepted updates; how many results arrived adds up batch by batch.
    n_received="rounds.n_received + excluded.n_received",
    n_rejected="rounds.n_received + excluded.n_rejected",
)
_ASSIGNMENTS = _Insert.of(t.round_clients, "ON CONFLICT DO NOTHING")
_MODELS = _Insert.of(t.models, "ON CONFLICT DO NOTHING")
_VALIDATIONS = _Insert.of(t.validations, "ON CONFLICT DO NOTHING")
_PREDICTIONS = _Insert.of(t.predictions, "ON CONFLICT DO NOTHING")
_PARTIALS = _Insert.of(t.round_shards, "ON CONFLICT DO NOTHING")
_REJECTED = _Insert.of(t.rejected_events, "ON CONFLICT DO NOTHING")
_OFFSETS = _Insert.upsert(t.projector_offsets, "consumer", "topic", "partition", updated_at="now()")
_NEW_OFFSETS = _Insert.of(t.projector_offsets, "ON CONFLICT DO NOTHING")
# Roles are an array per client, which unnest cannot carry: one pipelined statement per client.
_CLIENTS = """
    INSERT INTO clients (client_id, roles, labels, last_seen, key_id)
    VALUES (%(client_id)s, %(roles)s, %(labels)s, %(last_seen)s, %(key_id)s)
    ON CONFLICT (client_id) DO UPDATE
    SET roles = excluded.roles, labels = excluded.labels, last_seen = excluded.last_seen,
        key_id = excluded.key_id
    WHERE clients.last_seen < excluded.last_seen
"""

# Each partition holds a copy of every registry event: whichever copy comes first, the row ends
# the same (the first registration's time, the latest registration's roles, the first revocation).
_REGISTRATIONS = """
    INSERT INTO keys (key_id, roles, client_id, name, registered_at, changed_at)
    VALUES (%(key_id)s, %(roles)s, %(client_id)s, %(name)s, %(at)s, %(at)s)
    ON CONFLICT (key_id) DO UPDATE SET
        registered_at = LEAST(keys.registered_at, excluded.registered_at),
        roles = CASE WHEN excluded.changed_at > keys.changed_at THEN excluded.roles ELSE keys.roles END,
        client_id = CASE WHEN excluded.changed_at > keys.changed_at
                         THEN excluded.client_id ELSE keys.client_id END,
        name = CASE WHEN excluded.changed_at > keys.changed_at THEN excluded.name ELSE keys.name END,
        changed_at = GREATEST(keys.changed_at, excluded.changed_at)
"""
_REVOCATIONS = """
    UPDATE keys SET revoked_at = %(at)s, revoke_reason = %(reason)s
    WHERE key_id = %(key_id)s AND (revoked_at IS NULL OR revoked_at > %(at)s)
"""

_REPORTS = """
    UPDATE round_clients AS rc SET reported_at = v.reported_at
    FROM unnest(%(round_ids)b::text[], %(client_ids)b::text[], %(ats)b::timestamptz[])
        AS v(round_id, client_id, reported_at)
    WHERE rc.round_id = v.round_id AND rc.client_id = v.client_id AND rc.reported_at IS NULL
"""
_FLIPS = """
    UPDATE round_updates AS ru SET status = 'rejected', reject_reason = v.reason, reject_detail = v.detail
    FROM unnest(%(update_ids)b::text[], %(round_ids)b::text[], %(reasons)b::text[], %(details)b::text[])
        AS v(update_id, round_id, reason, detail)
    WHERE ru.update_id = v.update_id AND ru.round_id = v.round_id AND ru.status = 'accepted'
"""
_SELECT_OFFSETS = """
    SELECT topic, partition, next_offset, replay_from FROM projector_offsets
    WHERE consumer = %(consumer)s AND (topic, partition) IN (
        SELECT * FROM unnest(%(topics)b::text[], %(partitions)b::int[]))
"""


def _pg_type(column: sa.Column[Any]) -> str:
    return str(column.type.compile(dialect=postgresql.dialect())).lower()


async def _copy(
    conn: Connection, table: sa.Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """Binary COPY: psycopg encodes in C, and PostgreSQL parses nothing but the JSON.

    JSONB values arrive as JSON text already (the rows carry the text they were built with).
    """
    if not rows:
        return
    names = ", ".join(f'"{c}"' for c in columns)
    async with conn.cursor() as cursor:
        set_json_dumps(str, cursor)
        async with cursor.copy(f"COPY {table.name} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([_pg_type(table.c[c]) for c in columns])
            for row in rows:
                await copy.write_row(row)


async def write(
    conn: Connection, rows: BatchRows, consumer: str, bookmarks: Mapping[Partition, Bookmark]
) -> None:
    """Every row change of one batch and the partitions' new bookmarks, in ``conn``'s transaction."""
    await _copy(conn, t.events, EVENT_COLUMNS, rows.events)
    await _copy(conn, t.round_updates, UPDATE_COLUMNS, rows.round_updates)
    if rows.update_flips:
        flips = rows.update_flips
        await conn.execute(
            _FLIPS,
            {
                "update_ids": [f["update_id"] for f in flips],
                "round_ids": [f["round_id"] for f in flips],
                "reasons": [f["reason"] for f in flips],
                "details": [f["detail"] for f in flips],
            },
        )
    await _ASSIGNMENTS.run(conn, rows.assignments.values())
    if rows.reports:
        keys = list(rows.reports)
        await conn.execute(
            _REPORTS,
            {
                "round_ids": [r for r, _ in keys],
                "client_ids": [c for _, c in keys],
                "ats": list(rows.reports.values()),
            },
        )
    await _SESSIONS.run(conn, rows.session_rows)
    await _ROUNDS.run(conn, rows.round_rows)
    await _MODELS.run(conn, rows.models.values())
    await _VALIDATIONS.run(conn, rows.validations)
    await _PREDICTIONS.run(conn, rows.predictions)
    await _PARTIALS.run(conn, rows.partials)
    if rows.clients:
        async with conn.cursor() as cursor:
            await cursor.executemany(
                _CLIENTS, [{**row, "labels": Jsonb(row["labels"])} for row in rows.clients.values()]
            )
    if rows.registrations or rows.revocations:
        # In key order, as every writer locks them: each events partition holds a copy of the
        # registry, so projectors (and replay processes) of other partitions write the same rows.
        # Both statements give the same row whatever the order of the copies.
        by_key = operator.itemgetter("key_id")
        async with conn.cursor() as cursor:
            await cursor.executemany(_REGISTRATIONS, sorted(rows.registrations, key=by_key))
            await cursor.executemany(_REVOCATIONS, sorted(rows.revocations, key=by_key))
    await _REJECTED.run(conn, (rejection.row() for rejection in rows.rejections))
    await _OFFSETS.run(conn, _offset_rows(consumer, bookmarks))


def _offset_rows(consumer: str, bookmarks: Mapping[Partition, Bookmark]) -> list[dict[str, Any]]:
    return [
        {
            "consumer": consumer,
            "topic": topic,
            "partition": partition,
            "next_offset": mark.next_offset,
            "replay_from": mark.replay_from,
        }
        for (topic, partition), mark in bookmarks.items()
    ]


async def _select_offsets(
    conn: Connection, consumer: str, partitions: list[Partition], lock: bool
) -> list[Any]:
    params = {
        "consumer": consumer,
        "topics": [p[0] for p in partitions],
        "partitions": [p[1] for p in partitions],
    }
    cursor = await conn.execute(_SELECT_OFFSETS + (" FOR UPDATE" if lock else ""), params)
    return await cursor.fetchall()


async def bookmarks(
    conn: Connection, consumer: str, partitions: Iterable[Partition]
) -> dict[Partition, Bookmark]:
    """The stored bookmark of each partition; a partition never projected gets a row at offset 0."""
    wanted = sorted(set(partitions))
    await _NEW_OFFSETS.run(conn, _offset_rows(consumer, dict.fromkeys(wanted, Bookmark(0, 0))))
    rows = await _select_offsets(conn, consumer, wanted, lock=False)
    return {
        (topic, partition): Bookmark(next_offset, replay_from)
        for topic, partition, next_offset, replay_from in rows
    }


async def fence(conn: Connection, consumer: str, expected: Mapping[Partition, int]) -> None:
    """Lock the batch's offset rows and check they still hold the offsets its fold started from."""
    rows = await _select_offsets(conn, consumer, list(expected), lock=True)
    stored = {(topic, partition): next_offset for topic, partition, next_offset, _ in rows}
    moved = {tp: (stored.get(tp), at) for tp, at in expected.items() if stored.get(tp) != at}
    if moved:
        detail = ", ".join(f"{topic}[{p}] stored {s}, expected {e}" for (topic, p), (s, e) in moved.items())
        raise Fenced(f"offsets moved under the projector: {detail}")


async def known_event_ids(conn: Connection, event_ids: list[str]) -> set[str]:
    """Which of ``event_ids`` the events table holds already."""
    if not event_ids:
        return set()
    cursor = await conn.execute("SELECT event_id FROM events WHERE event_id = ANY(%b::text[])", [event_ids])
    return {event_id for (event_id,) in await cursor.fetchall()}


async def finished_sessions(conn: Connection, partition: int) -> set[str]:
    """Sessions of an events partition that have finished, so a restored fold still refuses them."""
    cursor = await conn.execute(
        "SELECT session_id FROM sessions WHERE partition = %s AND state <> %s",
        [partition, SessionState.RUNNING.value],
    )
    return {session_id for (session_id,) in await cursor.fetchall()}
