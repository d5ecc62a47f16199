"""``roundlog replay``: rebuild every projection from offset 0 into a fresh schema, then diff it
against the live one row by row. Replay is the audit: same log, same fold, same rows.

The replay runs the projector's own code (``Projector``) with every partition assigned and
no consumer group, up to the high-water marks taken when it starts, and writes no dead
letters. The fold is CPU-bound and each partition folds alone, so the partitions are shared
out over processes (``jobs``) that write into the same schema, each its own partitions' rows:
the rows are those of a sequential rebuild. The comparison, in SQL, ignores only the columns
that record when a row was written, and the projector's offsets.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.forkserver
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa
import uvloop
from aiokafka import TopicPartition

from roundlog.bus import Topics, make_consumer
from roundlog.config import Settings
from roundlog.projections import tables
from roundlog.projections.schema import recreate_schema
from roundlog.projections.writer import libpq_url
from roundlog.roles.projector import BATCH_RECORDS, consumer_name, fewer_collections, projector_for

#: A replay schema is created and dropped by name: plain lower-case identifiers only.
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Difference:
    """One differing row: a column that differs, or (column None) a row only one side has."""

    key: str
    column: str | None
    live: Any
    replay: Any

    def render(self) -> str:
        if self.column is None:
            side = "replay" if self.live is None else "live"
            return f"  {self.key}: only in {side}"
        return f"  {self.key}  {self.column}: live {_show(self.live)}  replay {_show(self.replay)}"


@dataclass(frozen=True)
class TableDiff:
    table: str
    live_rows: int
    replay_rows: int
    differing: int
    examples: tuple[Difference, ...]


@dataclass
class ReplayReport:
    schema: str
    live_schema: str
    #: whether the replay's tables are crash-safe (WAL-logged) or UNLOGGED
    logged: bool = False
    records: int = 0
    #: projecting, from the first record fetched to the last row committed
    seconds: float = 0.0
    #: before that: the fresh schema built and the worker processes started, side by side
    prepared_seconds: float = 0.0
    #: per partition ("topic[p]"): the high-water mark replayed up to, and the live projector's offset
    ends: dict[str, int] = field(default_factory=dict)
    live_offsets: dict[str, int] = field(default_factory=dict)
    tables: list[TableDiff] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return all(t.differing == 0 for t in self.tables)

    @property
    def lagging(self) -> list[str]:
        """Partitions where the live projection stands elsewhere than the replay: differences expected."""
        return [p for p, end in self.ends.items() if self.live_offsets.get(p, 0) != end]

    def render(self) -> str:
        rate = self.records / self.seconds if self.seconds else 0.0
        lines = [
            f"replayed {self.records:,} records from {len(self.ends)} partitions into "
            f"{'' if self.logged else 'unlogged '}schema {self.schema!r} "
            f"in {self.seconds:.1f}s ({rate:,.0f} records/s; schema built in {self.prepared_seconds:.1f}s "
            f"before), compared with {self.live_schema!r}:"
        ]
        for t in self.tables:
            verdict = "identical" if t.differing == 0 else f"{t.differing} differing rows"
            lines.append(
                f"  {t.table:<18} live {t.live_rows:>8,} rows  replay {t.replay_rows:>8,} rows  {verdict}"
            )
        for t in self.tables:
            if t.differing:
                lines.append(f"{t.table}: {t.differing} differing rows:")
                lines += [d.render() for d in t.examples]
        if self.lagging:
            lines.append(
                "note: the live projector is not at the replayed offsets for "
                + ", ".join(
                    f"{p} (live {self.live_offsets.get(p, 0)}, replayed {self.ends[p]})" for p in self.lagging
                )
            )
        lines.append(
            "identical: every projection matches" if self.identical else "DIFFERENT: the projections disagree"
        )
        return "\n".join(lines)


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


async def replay(
    settings: Settings,
    schema: str,
    progress: Progress | None = None,
    live_schema: str = "public",
    limit: int = 20,
    jobs: int | None = None,
    logged: bool = False,
) -> ReplayReport:
    """Project the whole log into a fresh ``schema`` and compare it with ``live_schema``.

    ``jobs`` processes share the partitions (default: one per core, at most one per partition
    that holds records); 1 projects in this process. The schema's tables are UNLOGGED unless
    ``logged``: a replay is rebuilt from the log, not recovered from WAL (``recreate_schema``).
    """
    if not (SCHEMA_NAME.fullmatch(schema) and SCHEMA_NAME.fullmatch(live_schema)) or schema == live_schema:
        raise ValueError(
            f"schemas must be two different lower-case identifiers, not {schema!r} and {live_schema!r}"
        )
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    jobs = jobs or os.cpu_count() or 1
    began = time.monotonic()
    if jobs > 1:
        # The worker processes' interpreter starts and imports roundlog while the schema is built.
        await asyncio.to_thread(_warm_workers)
    await asyncio.to_thread(recreate_schema, settings.database_url, schema, logged)
    report = ReplayReport(schema, live_schema, logged)
    ends = await _high_water_marks(settings)
    groups = share_out(ends, jobs)
    started = time.monotonic()
    report.prepared_seconds = started - began
    if len(groups) <= 1:
        report.records = await _project(settings, schema, ends, progress)
    else:
        report.records = await _project_in_processes(settings, schema, groups, progress)
    report.seconds = time.monotonic() - started
    report.ends = {_name(tp): end for tp, end in sorted(ends.items())}
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as conn:
        report.live_offsets = await _live_offsets(conn, live_schema, consumer_name(settings))
        for table in tables.PROJECTIONS:
            report.tables.append(await _diff(conn, table, live_schema, schema, limit))
    return report


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


async def _high_water_marks(settings: Settings) -> dict[TopicPartition, int]:
    """Where every partition of the events and clients topics ends now: the replay stops there."""
    topics = Topics.from_prefix(settings.topic_prefix)
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        partitions = await consumer.topic_partitions(topics.events, topics.clients)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()


def share_out(ends: Mapping[TopicPartition, int], jobs: int) -> list[dict[TopicPartition, int]]:
    """The partitions in at most ``jobs`` groups of about equal records (largest first, each to
    the lightest group); empty partitions ride along with the first group."""
    loaded = sorted((tp for tp, end in ends.items() if end > 0), key=lambda tp: (-ends[tp], tp))
    groups: list[dict[TopicPartition, int]] = [{} for _ in range(max(1, min(jobs, len(loaded))))]
    for tp in loaded:
        min(groups, key=lambda g: sum(g.values()))[tp] = ends[tp]
    groups[0].update({tp: end for tp, end in ends.items() if end == 0})
    return groups


async def _project(
    settings: Settings, schema: str, ends: Mapping[TopicPartition, int], progress: Progress | None
) -> int:
    """Every record of ``ends``' partitions below its high-water mark, through the projector;
    returns how many."""
    fewer_collections()
    total = sum(ends.values())
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        partitions = sorted(ends)
        consumer.assign(partitions)
        async with projector_for(settings, schema, dead_letters=False) as projector:
            await projector.restore(consumer, partitions)

            def done() -> bool:
                folds = projector.folds
                return len(folds) == len(ends) and all(
                    folds[tp].next_offset >= end for tp, end in ends.items()
                )

            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=BATCH_RECORDS)
                await projector.project(
                    consumer, {tp: [r for r in rs if r.offset < ends[tp]] for tp, rs in batch.items()}
                )
                if progress is not None:
                    progress(projector.projected, total)
                if done():
                    await projector.flush(consumer)  # a failed last write restores the folds: not done then
                    if done():
                        return projector.projected
    finally:
        await consumer.stop()


def _project_group(settings: Settings, schema: str, ends: dict[TopicPartition, int]) -> int:
    """A replay process's work: its group of partitions (on uvloop, as every roundlog process)."""
    return uvloop.run(_project(settings, schema, ends, None))


def _workers() -> multiprocessing.context.ForkServerContext:
    """Where replay processes come from: forked from a server process that imported this module
    once. Not forked from the caller, whose event loop, threads and sockets are not the child's;
    not spawned, which costs each process a fresh interpreter and a second of imports."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _warm_workers() -> None:
    """Start the fork server now (it imports in the background); a no-op once it runs."""
    _workers()
    multiprocessing.forkserver.ensure_running()


async def _project_in_processes(
    settings: Settings, schema: str, groups: list[dict[TopicPartition, int]], progress: Progress | None
) -> int:
    """Each group in a process of its own; progress is read from the offsets the processes commit."""
    total = sum(sum(group.values()) for group in groups)
    loop = asyncio.get_running_loop()
    offsets = _qualified(schema, "projector_offsets")
    async with await psycopg.AsyncConnection.connect(
        libpq_url(settings.database_url), autocommit=True
    ) as conn:
        with ProcessPoolExecutor(len(groups), mp_context=_workers()) as pool:
            running = [loop.run_in_executor(pool, _project_group, settings, schema, g) for g in groups]
            pending: set[asyncio.Future[int]] = set(running)
            while pending:
                finished, pending = await asyncio.wait(pending, timeout=0.5)
                for future in finished:
                    future.result()  # a process that failed fails the replay now
                if progress is not None:
                    cursor = await conn.execute(
                        f"SELECT coalesce(sum(next_offset), 0) FROM {offsets} WHERE consumer = %s",
                        [consumer_name(settings)],
                    )
                    (committed,) = await cursor.fetchone() or (0,)
                    progress(int(committed), total)
            return sum(future.result() for future in running)


async def _live_offsets(conn: psycopg.AsyncConnection[Any], schema: str, consumer: str) -> dict[str, int]:
    table = _qualified(schema, "projector_offsets")
    cursor = await conn.execute(
        f"SELECT topic, partition, next_offset FROM {table} WHERE consumer = %s", [consumer]
    )
    return {f"{topic}[{partition}]": offset for topic, partition, offset in await cursor.fetchall()}


def _qualified(schema: str, table: str) -> str:
    return f'"{schema}"."{table}"'


async def _diff(
    conn: psycopg.AsyncConnection[Any], table: sa.Table, live: str, replay: str, limit: int
) -> TableDiff:
    """Rows that differ, compared in the database: a full join on the primary key."""
    key = [c.name for c in table.primary_key.columns]
    columns = ", ".join(f'"{c.name}"' for c in table.columns if c.name not in tables.RECORDING_COLUMNS)
    on = " AND ".join(f'l."{k}" = r."{k}"' for k in key)
    order = ", ".join(f'COALESCE(l."{k}", r."{k}")' for k in key)
    sides = (
        f"(SELECT {columns} FROM {_qualified(live, table.name)}) AS l "
        f"FULL JOIN (SELECT {columns} FROM {_qualified(replay, table.name)}) AS r ON {on}"
    )
    cursor = await conn.execute(
        f"SELECT to_jsonb(l), to_jsonb(r), count(*) OVER () FROM {sides} "
        f"WHERE l IS DISTINCT FROM r ORDER BY {order} LIMIT {int(limit)}"
    )
    rows = await cursor.fetchall()
    counts = await conn.execute(
        f"SELECT (SELECT count(*) FROM {_qualified(live, table.name)}), "
        f"(SELECT count(*) FROM {_qualified(replay, table.name)})"
    )
    live_rows, replay_rows = await counts.fetchone() or (0, 0)
    examples: list[Difference] = []
    for left, right in ((row[0], row[1]) for row in rows):
        either = left or right
        where = ", ".join(f"{k}={either[k]}" for k in key)
        if left is None or right is None:
            examples.append(Difference(where, None, left, right))
            continue
        examples += [Difference(where, c, left[c], right[c]) for c in left if left[c] != right[c]]
    return TableDiff(table.name, live_rows, replay_rows, rows[0][2] if rows else 0, tuple(examples))
