"""The projector role against the real broker and PostgreSQL: what lands in each table.

The helpers here (a realistic event stream, running the role until it has caught up, a
snapshot of every table) are shared by the other ``test_projector_*`` modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import psycopg
import pytest

from roundlog.bus import Topics, make_consumer, make_producer
from roundlog.codec import encode
from roundlog.config import Settings
from roundlog.domain.events import (
    ClientHeartbeat,
    Event,
    ModelImported,
    RoundConfig,
    Task,
    partition_key,
)
from roundlog.domain.ledger import Ledger
from roundlog.domain.round import RoundState
from roundlog.projections import tables
from roundlog.projections.schema import upgrade
from roundlog.projections.writer import libpq_url
from roundlog.replay import replay
from roundlog.roles.projector import consumer_name, run

from tests.builders import T0, Script, tensor_ref, uid
from tests.integration.harness import GROUP_SESSION_MS

#: A record as produced: topic, key, value.
Record = tuple[str, bytes | None, bytes]


def prepared(topics: tuple[Settings, Topics], database_url: str) -> tuple[Settings, Topics]:
    """Settings on the test's topics and database (migrated), with quick consumer-group moves."""
    settings, names = topics
    upgrade(database_url)
    return dataclasses.replace(
        settings, database_url=database_url, group_session_timeout_ms=GROUP_SESSION_MS
    ), names


# --- a realistic stream ------------------------------------------------------------------------


def session_events(rng: random.Random, n: int, rounds: int, clients: Sequence[str]) -> list[Event]:
    """One session, decided against an in-memory fold so that aggregates fold what was accepted.

    It holds what the machine must judge: duplicate and not-assigned and late updates,
    unusable updates, timeouts that close or fail, validation rounds, re-emitted events.
    """
    sid = f"s{n}"
    s = Script(sid, RoundConfig(round_timeout=30, buffer_size=rng.choice([2, 3, -1])))
    ledger, out = Ledger(), []

    def emit(event: Event, again: float = 0.03) -> None:
        ledger.apply(event)
        out.append(event)
        if rng.random() < again:  # a re-emission after a crash: the same event once more
            out.append(event)

    model = f"{sid}-m0"
    emit(s.started(rounds=rounds, model_id=model))
    for k in range(1, rounds + 1):
        rid = f"{sid}-r{k}"
        emit(s.requested(rid, model_id=model, round_no=k))
        if rng.random() < 0.05:
            emit(s.failed(rid, "model_missing"))
            emit(s.finished(succeeded=False))
            return out
        emit(s.staged(rid, model_id=model))
        assigned = tuple(rng.sample(clients, rng.randint(2, len(clients) - 1)))
        emit(s.assigned(rid, assigned))
        for client in [c for c in assigned if rng.random() < 0.8]:
            emit(s.update(client, rid))
            if rng.random() < 0.1:
                emit(s.update(client, rid, update_id=f"{rid}-{client}-again"))
            if rng.random() < 0.1:
                emit(s.update(rng.choice([c for c in clients if c not in assigned]), rid))
        round_ = ledger.sessions[sid].rounds[rid]
        if round_.state == RoundState.COLLECTING:
            emit(s.timed_out(rid))
        if round_.state == RoundState.CLOSED:
            if round_.accepted and rng.random() < 0.2:
                emit(s.rejected(next(iter(round_.accepted.values())).client_id, rid, "non_finite"))
            usable = tuple(u.update_id for u in round_.usable_updates)
            if usable:
                emit(s.aggregated(rid, usable, model_id=f"{sid}-m{k}", parent=model), again=0.2)
                model = f"{sid}-m{k}"
            else:
                emit(s.failed(rid, "no_valid_update"))
        if round_.state == RoundState.FAILED:
            emit(s.finished(succeeded=False), again=0.2)
            return out
        if rng.random() < 0.3:
            emit(s.update(assigned[0], rid, update_id=f"{rid}-late"))
        if rng.random() < 0.3:
            vid = f"{rid}-v"
            task = rng.choice([Task.VALIDATION, Task.INFERENCE])
            emit(s.requested(vid, task, model_id=model, round_no=k))
            emit(s.staged(vid, model_id=model))
            emit(s.assigned(vid, assigned))
            for client in [c for c in assigned if rng.random() < 0.7]:
                emit(
                    s.validation(client, vid, model)
                    if task == Task.VALIDATION
                    else s.prediction(client, vid, model)
                )
            if ledger.sessions[sid].rounds[vid].state == RoundState.COLLECTING:
                emit(s.timed_out(vid))
    emit(s.finished(succeeded=True), again=0.2)
    return out


def traffic(seed: int, sessions: int, rounds: int = 3, clients: int = 6) -> list[Event]:
    """Interleaved sessions (each in its own order), heartbeats and a model import."""
    rng = random.Random(seed)
    names = [f"c{i}" for i in range(clients)]
    streams = [session_events(rng, n, rounds, names) for n in range(sessions)]
    beats = Script("hb")
    streams.append([beats.heartbeat(c) for _ in range(3) for c in names])
    streams.append(
        [ModelImported(event_id="import-1", occurred_at=T0, model_id="s0-m0", tensor=tensor_ref("s0-m0"))]
    )
    merged: list[Event] = []
    while streams := [s for s in streams if s]:
        merged.append(rng.choice(streams).pop(0))
    return merged


def records_of(names: Topics, events: Iterable[Event]) -> list[Record]:
    return [
        (
            names.clients if isinstance(event, ClientHeartbeat) else names.events,
            partition_key(event).encode(),
            encode(event),
        )
        for event in events
    ]


async def produce(settings: Settings, records: Iterable[Record]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key) for topic, key, value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


# --- running the role, reading the tables ----------------------------------------------------------


async def end_offsets(settings: Settings, names: Topics) -> dict[tuple[str, int], int]:
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        partitions = await consumer.topic_partitions(names.events, names.clients)
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): end for tp, end in ends.items()}


async def stored_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as conn:
        cursor = await conn.execute(
            "SELECT topic, partition, next_offset FROM projector_offsets WHERE consumer = %s",
            [consumer_name(settings)],
        )
        return {(topic, p): offset for topic, p, offset in await cursor.fetchall()}


async def caught_up(settings: Settings, names: Topics, timeout: float = 60.0) -> None:
    """Wait until the stored offsets reach the end of every partition."""
    ends = await end_offsets(settings, names)
    async with asyncio.timeout(timeout):
        while True:
            stored = await stored_offsets(settings)
            if all(stored.get(tp, 0) >= end for tp, end in ends.items()):
                return
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def projector(settings: Settings) -> AsyncIterator[None]:
    """The role, in this process, for the duration of the block."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def project(settings: Settings, names: Topics) -> None:
    async with projector(settings):
        await caught_up(settings, names)


async def query(settings: Settings, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as conn:
        cursor = await conn.execute(sql, params or None)
        return await cursor.fetchall()


async def execute(settings: Settings, sql: str) -> None:
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as conn:
        await conn.execute(sql)  # type: ignore[arg-type]


async def snapshot(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """Every projection's rows, sorted, without the recording timestamps."""
    found = {}
    for table in tables.PROJECTIONS:
        columns = ", ".join(f'"{c.name}"' for c in table.columns if c.name not in tables.RECORDING_COLUMNS)
        rows = await query(settings, f"SELECT {columns} FROM {table.name}")
        found[table.name] = sorted(rows, key=repr)
    return found


# --- tests ---------------------------------------------------------------------------------------


async def test_a_session_lands_in_every_table(topics: tuple[Settings, Topics], database_url: str) -> None:
    settings, names = prepared(topics, database_url)
    s, v = Script("s1"), Script("s2")
    events: list[Event] = [
        ModelImported(event_id="imp", occurred_at=T0, model_id="m0", name="base", tensor=tensor_ref("m0")),
        s.started(rounds=2),
        s.requested("s1-r1"),
        s.staged("s1-r1"),
        s.assigned("s1-r1", ("a", "b", "c")),
        s.update("a", "s1-r1"),
        s.update("x", "s1-r1"),
        s.update("b", "s1-r1"),
        s.update("c", "s1-r1"),
        s.aggregated("s1-r1", (uid("a", "s1-r1"), uid("b", "s1-r1"))),
        s.requested("s1-r2", model_id="m1", round_no=2),
        s.staged("s1-r2", model_id="m1"),
        s.assigned("s1-r2", ("a", "b")),
        s.update("a", "s1-r2"),
        s.timed_out("s1-r2"),
        s.rejected("a", "s1-r2", "hash_mismatch"),
        s.failed("s1-r2", "no_valid_update"),
        s.finished(succeeded=False),
        v.started(),
        v.requested("s2-p1", Task.INFERENCE),
        v.staged("s2-p1"),
        v.assigned("s2-p1", ("a", "b")),
        v.prediction("a", "s2-p1"),
        v.heartbeat("a"),
    ]
    await produce(settings, records_of(names, events))
    await project(settings, names)

    sessions = await query(settings, "SELECT session_id, state, rounds_done, latest_model_id FROM sessions")
    assert sorted(sessions) == [("s1", "failed", 1, "m1"), ("s2", "running", 0, "m0")]
    rounds = await query(
        settings,
        "SELECT round_id, state, n_assigned, n_received, n_accepted, n_rejected, total_weight, fail_reason "
        "FROM rounds ORDER BY round_id",
    )
    assert rounds == [
        ("s1-r1", "aggregated", 3, 4, 2, 2, 20.0, None),
        ("s1-r2", "failed", 2, 1, 0, 1, 0.0, "no_valid_update"),
        ("s2-p1", "collecting", 2, 1, 1, 0, 0.0, None),
    ]
    updates = await query(
        settings, "SELECT round_id, client_id, status, reject_reason FROM round_updates ORDER BY received_at"
    )
    assert updates == [
        ("s1-r1", "a", "accepted", None),
        ("s1-r1", "x", "rejected", "not_assigned"),
        ("s1-r1", "b", "accepted", None),
        ("s1-r1", "c", "rejected", "late"),
        ("s1-r2", "a", "rejected", "hash_mismatch"),
    ]
    lineage = await query(
        settings, "SELECT model_id, origin, parent_model_id, round_id FROM models ORDER BY 1"
    )
    assert lineage == [("m0", "imported", None, None), ("m1", "aggregated", "m0", "s1-r1")]
    assert await query(settings, "SELECT round_id, client_id, model_id FROM predictions") == [
        ("s2-p1", "a", "m0")
    ]
    assert await query(settings, "SELECT client_id, roles FROM clients") == [("a", ["trainer"])]
    assert await query(settings, "SELECT count(*) FROM events") == [(len(events) - 1,)], (
        "heartbeats: clients topic"
    )
    reporting = await query(settings, "SELECT count(*) FROM round_clients WHERE reported_at IS NOT NULL")
    assert reporting == [(4,)]
    timeline = await query(
        settings, "SELECT round_id, staging_s, collecting_s FROM round_timeline ORDER BY 1"
    )
    assert timeline[0] == ("s1-r1", 1.0, 3.0)
    participation = await query(
        settings,
        "SELECT n_assigned, n_accepted, rejected_by_reason FROM client_participation WHERE client_id='a'",
    )
    assert participation == [(3, 1, {"hash_mismatch": 1})]
    progress = await query(
        settings, "SELECT session_id, pct_done, rounds_failed FROM session_progress ORDER BY 1"
    )
    assert [(sid, float(pct), failed) for sid, pct, failed in progress] == [("s1", 50.0, 1), ("s2", 0.0, 0)]


async def test_the_same_event_twice_changes_nothing(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    settings, names = prepared(topics, database_url)
    events = traffic(seed=3, sessions=4)
    records = records_of(names, events)
    async with projector(settings):
        await produce(settings, records)
        await caught_up(settings, names)
        before = await snapshot(settings)
        # Every event once more, in a new order: re-emissions after crashes, a replayed producer.
        again = records[:]
        random.Random(4).shuffle(again)
        await produce(settings, again)
        await caught_up(settings, names)
        assert await snapshot(settings) == before


async def test_replay_is_identical_and_finds_a_tampered_row(
    topics: tuple[Settings, Topics], database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    settings, names = prepared(topics, database_url)
    await produce(settings, [*records_of(names, traffic(seed=5, sessions=6)), (names.events, b"k", b"junk")])
    await project(settings, names)

    report = await replay(settings, "audit")  # a process per core
    assert report.identical and not report.lagging, report.render()
    assert {t.table: t.live_rows for t in report.tables}["events"] > 100
    # Processes sharing the partitions build what one process building them in turn builds, and
    # UNLOGGED tables (the default) hold what WAL-logged ones do.
    sequential = await replay(settings, "sequential", jobs=1, logged=True)
    parallel = await replay(settings, "parallel", live_schema="sequential", jobs=3)
    assert parallel.identical, parallel.render()
    assert parallel.records == sequential.records == sum(sequential.ends.values())
    persistence = await query(
        settings,
        "SELECT n.nspname, array_agg(DISTINCT c.relpersistence::text) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname IN ('sequential', 'parallel') AND c.relkind IN ('r', 'i') GROUP BY n.nspname",
    )
    assert dict(persistence) == {"sequential": ["p"], "parallel": ["u"]}  # p: permanent, u: unlogged

    await execute(settings, "UPDATE rounds SET state = 'failed' WHERE round_id = 's1-r1'")
    for name, value in settings.env().items():
        monkeypatch.setenv(name, value)
    from roundlog.cli import main

    assert await asyncio.to_thread(main, ["replay", "--schema", "audit"]) == 1
    out = capsys.readouterr().out
    assert "rounds" in out and 'round_id=s1-r1  state: live "failed"  replay' in out, out
    assert "DIFFERENT" in out and "into unlogged schema 'audit'" in out


async def test_database_errors_are_retried_and_nothing_is_skipped(
    topics: tuple[Settings, Topics], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings, names = prepared(topics, database_url)
    records = records_of(names, traffic(seed=9, sessions=6))
    half = len(records) // 2
    async with projector(settings):
        await produce(settings, records[:half])
        await caught_up(settings, names)
        # Every write fails while this constraint stands; the connection is cut as well.
        await execute(settings, "ALTER TABLE events ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
        await produce(settings, records[half:])
        await asyncio.sleep(1.5)
        await query(
            settings,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        await execute(settings, "ALTER TABLE events DROP CONSTRAINT refuse_all")
        await caught_up(settings, names)
    assert "writing a batch failed" in caplog.text
    report = await replay(settings, "audit")
    assert report.identical, report.render()
