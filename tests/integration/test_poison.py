"""No record can stop the cluster: poison records, produced raw, against the three roles as real processes.

An assigned client ("mallory") answers each round of a session with one kind of poison
(bad weights, bad tensor references, malformed chunks, another client's update id), while
raw records that no one assigned (a 2 MB garbage record, the largest a topic takes,
sessions with absurd timeouts, a heartbeat from the year 9000) go onto the topics directly.
Afterwards every role still runs, every bad record is refused with its reason in SQL, a
following session succeeds, and replay and ``--verify-models`` pass over the whole poisoned log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime

import numpy as np
import psycopg
from aiokafka import AIOKafkaProducer
from hypothesis import Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from roundlog.audit import verify_models
from roundlog.bus import MAX_RECORD_BYTES, Topics, make_consumer, make_producer, publish, read_from_end
from roundlog.client import import_model, start_session
from roundlog.clock import utc_now
from roundlog.codec import decode, encode
from roundlog.config import Settings
from roundlog.domain.decide import round_id_for
from roundlog.domain.events import (
    ArraySpec,
    ClientHeartbeat,
    ClientRole,
    ClientsAssigned,
    Event,
    RoundConfig,
    SessionStarted,
    Task,
    TensorRef,
    UpdateReceived,
    derived_id,
    update_id_for,
)
from roundlog.projections.schema import upgrade
from roundlog.replay import replay
from roundlog.tensors import SEQ_HEADER, write_tensors

from tests.integration.harness import (
    caught_up,
    clients,
    model,
    role_process,
    stop_process,
    wait_until_finished,
)
from tests.strategies import PRIMITIVES, any_event

Poison = Callable[[AIOKafkaProducer, Topics, ClientsAssigned], Awaitable[UpdateReceived]]


def _update(job: ClientsAssigned, ref: TensorRef, **changes: object) -> UpdateReceived:
    update = UpdateReceived(
        event_id=str(uuid.uuid4()),
        occurred_at=utc_now(),
        session_id=job.session_id,
        round_id=job.round_id,
        client_id="mallory",
        update_id=update_id_for(job.round_id, "mallory"),
        num_examples=10,
        tensor=ref,
    )
    return dataclasses.replace(update, **changes)  # type: ignore[arg-type]


async def _good_ref(producer: AIOKafkaProducer, topics: Topics, job: ClientsAssigned) -> TensorRef:
    key = update_id_for(job.round_id, "mallory")
    return await write_tensors(producer, topics.tensors, key, [(n, a + 1) for n, a in model()])


def _with(**changes: object) -> Poison:
    """An update whose fields (or whose TensorRef's, for the ``ref_`` ones) are changed."""

    async def poison(producer: AIOKafkaProducer, topics: Topics, job: ClientsAssigned) -> UpdateReceived:
        ref = await _good_ref(producer, topics, job)
        ref_changes = {k.removeprefix("ref_"): v for k, v in changes.items() if k.startswith("ref_")}
        update_changes = {k: v for k, v in changes.items() if not k.startswith("ref_")}
        return _update(job, dataclasses.replace(ref, **ref_changes), **update_changes)  # type: ignore[arg-type]

    return poison


def _raw_chunk(value: bytes | None, seq: bytes) -> Poison:
    """An update of one chunk written by hand: a null value or a sequence header that is no number."""

    async def poison(producer: AIOKafkaProducer, topics: Topics, job: ClientsAssigned) -> UpdateReceived:
        good = await _good_ref(producer, topics, job)
        sent = await producer.send_and_wait(
            topics.tensors, value, key=good.key.encode(), headers=[(SEQ_HEADER, seq)]
        )
        ref = dataclasses.replace(
            good, partition=sent.partition, first_offset=sent.offset, last_offset=sent.offset, chunks=1
        )
        return _update(job, ref)

    return poison


def _past_the_end() -> Poison:
    async def poison(producer: AIOKafkaProducer, topics: Topics, job: ClientsAssigned) -> UpdateReceived:
        ref = await _good_ref(producer, topics, job)
        return _update(
            job,
            dataclasses.replace(ref, first_offset=ref.last_offset + 100, last_offset=ref.last_offset + 100),
        )

    return poison


def _foreign_update_id() -> Poison:
    async def poison(producer: AIOKafkaProducer, topics: Topics, job: ClientsAssigned) -> UpdateReceived:
        other = next(client for client in job.client_ids if client != "mallory")
        return _update(
            job, await _good_ref(producer, topics, job), update_id=update_id_for(job.round_id, other)
        )

    return poison


#: One poison per round of the victim session, with the reason it must be refused with.
POISONS: list[tuple[str, Poison, str]] = [
    ("negative num_examples", _with(num_examples=-5), "weight_limit"),
    ("2**62 examples", _with(num_examples=2**62), "weight_limit"),
    ("a first offset of -1", _with(ref_first_offset=-1), "invalid_tensor_ref"),
    (
        "a shape of 2**40 elements",
        _with(
            ref_arrays=(
                ArraySpec(name="w", dtype="<f4", shape=(2**20, 2**20)),
                ArraySpec(name="b", dtype="<f4", shape=(8,)),
            )
        ),
        "invalid_tensor_ref",
    ),
    ("a chunk header that is no number", _raw_chunk(b"\0" * 544, b"first"), "incomplete"),
    ("a null chunk", _raw_chunk(None, b"0"), "incomplete"),
    ("offsets past the end", _past_the_end(), "incomplete"),
    ("a partition that does not exist", _with(ref_partition=999), "incomplete"),
    ("another client's update id", _foreign_update_id(), "foreign_update_id"),
]


async def mallory(settings: Settings, topics: Topics, stop: asyncio.Event, answered: list[str]) -> None:
    """A trainer that heartbeats and answers round k of any session with the k-th poison."""
    producer, events = make_producer(settings), make_consumer(settings)
    await producer.start()
    await events.start()
    try:
        await read_from_end(events, topics.events)
        next_beat = 0.0
        while not stop.is_set():
            if asyncio.get_running_loop().time() >= next_beat:
                beat = ClientHeartbeat(
                    event_id=str(uuid.uuid4()),
                    occurred_at=utc_now(),
                    client_id="mallory",
                    roles=(ClientRole.TRAINER,),
                )
                await publish(producer, topics, [beat])
                next_beat = asyncio.get_running_loop().time() + 0.5
            for records in (await events.getmany(timeout_ms=200)).values():
                for record in records:
                    job = decode(record.value or b"")
                    if not (
                        isinstance(job, ClientsAssigned)
                        and "mallory" in job.client_ids
                        and job.task == Task.TRAINING
                    ):
                        continue
                    round_no = len(answered)
                    if round_no >= len(POISONS):
                        continue
                    update = await POISONS[round_no][1](producer, topics, job)
                    await producer.send_and_wait(topics.events, encode(update), key=job.session_id.encode())
                    answered.append(update.event_id)
    finally:
        await events.stop()
        await producer.stop()


async def unassigned_poison(
    settings: Settings, topics: Topics, ref: TensorRef, model_id: str
) -> dict[str, str]:
    """Records nobody asked for, straight onto the topics: each one's event id (or place) and reason."""
    producer = make_producer(settings)
    await producer.start()
    expected = {}
    try:
        # as large as the topic's max.message.bytes lets anyone write (Tansu would take more)
        garbage = b"\xc3\x01" + bytes(8) + np.random.default_rng(7).bytes(MAX_RECORD_BYTES - 4096)
        sent = await producer.send_and_wait(topics.events, garbage, key=b"garbage")
        expected[f"offset:{sent.partition}:{sent.offset}"] = "unknown_fingerprint"
        for timeout in (1e12, math.nan, math.inf):
            session_id = str(uuid.uuid4())
            started = SessionStarted(
                event_id=derived_id(session_id, "started"),
                occurred_at=utc_now(),
                session_id=session_id,
                rounds=1,
                initial_model_id=model_id,
                initial_model=ref,
                round_config=RoundConfig(round_timeout=timeout),
            )
            await publish(producer, topics, [started])
            expected[started.event_id] = "invalid_config"
        ghost = ClientHeartbeat(
            event_id=str(uuid.uuid4()),
            occurred_at=utc_now().replace(year=9000),
            client_id="ghost",
            roles=(ClientRole.TRAINER,),
        )
        await publish(producer, topics, [ghost])
        expected[ghost.event_id] = "clock_skew"
    finally:
        await producer.stop()
    return expected


@dataclasses.dataclass(frozen=True)
class Cluster:
    settings: Settings
    topics: Topics
    producer: AIOKafkaProducer
    model_id: str
    model: TensorRef


@contextlib.asynccontextmanager
async def running_cluster(
    topics: tuple[Settings, Topics], database_url: str, **coordinator_env: str
) -> AsyncIterator[Cluster]:
    """The three roles as real processes and a stored model; on leaving, the projector has caught up
    with the whole log and no role has exited."""
    settings = dataclasses.replace(topics[0], database_url=database_url)
    await asyncio.to_thread(upgrade, database_url)
    roles = [
        role_process(settings, "coordinator", **coordinator_env),
        role_process(settings, "aggregator"),
        role_process(settings, "projector"),
    ]
    try:
        producer = make_producer(settings)
        await producer.start()
        try:
            model_id, ref = await import_model(producer, topics[1], model())
            yield Cluster(settings, topics[1], producer, model_id, ref)
        finally:
            await producer.stop()
        await caught_up(settings, topics[1])
        assert [r.poll() for r in roles] == [None, None, None], "a role exited"
    finally:
        for process in roles:
            stop_process(process)


async def test_poison_records_are_refused_with_a_reason_and_every_role_keeps_running(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    stop, answered = asyncio.Event(), []
    async with running_cluster(topics, database_url, ROUNDLOG_CLIENT_TTL_S="3") as cluster:
        settings, names, producer = cluster.settings, cluster.topics, cluster.producer
        model_id, ref = cluster.model_id, cluster.model
        unassigned = await unassigned_poison(settings, names, ref, model_id)
        attacker = asyncio.create_task(mallory(settings, names, stop, answered))
        try:
            # honest clients answer a second later, so each poisoned update is the round's first
            async with clients(settings, 3, delay=1.0):
                await asyncio.sleep(1.5)  # heartbeats seen
                config = RoundConfig(round_timeout=30, buffer_size=3)
                victim = await start_session(
                    producer, names, model_id=model_id, model=ref, rounds=len(POISONS), config=config
                )
                await wait_until_finished(settings, names, {victim}, timeout=240)
                stop.set()
                await attacker
                after = await start_session(
                    producer, names, model_id=model_id, model=ref, rounds=2, config=config
                )
                await wait_until_finished(settings, names, {after}, timeout=120)
        finally:
            stop.set()

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    async with await psycopg.AsyncConnection.connect(url) as conn:
        sessions = dict(await (await conn.execute("SELECT session_id, state FROM sessions")).fetchall())
        rounds = await (
            await conn.execute("SELECT payload->>'detail' FROM events WHERE type = 'RoundFailed'")
        ).fetchall()
        assert sessions[victim] == sessions[after] == "completed", rounds
        rows = await (
            await conn.execute(
                "SELECT event_id, status, reject_reason FROM round_updates WHERE client_id = 'mallory'"
            )
        ).fetchall()
        mallory_updates = {event_id: (status, reason) for event_id, status, reason in rows}
        for event_id, (name, _, reason) in zip(answered, POISONS, strict=True):
            assert mallory_updates[event_id] == ("rejected", reason), name
        honest = await (
            await conn.execute(
                "SELECT count(*) FROM round_updates WHERE client_id <> 'mallory' AND status = 'accepted'"
            )
        ).fetchone()
        assert honest is not None and honest[0] >= 3 * len(POISONS)
        refused = await (
            await conn.execute('SELECT event_id, reason, partition, "offset", raw_size FROM rejected_events')
        ).fetchall()
        by_id = {event_id: reason for event_id, reason, *_ in refused if event_id}
        by_place = {f"offset:{p}:{o}": reason for _, reason, p, o, _ in refused}
        for key, reason in unassigned.items():
            assert (by_place if key.startswith("offset:") else by_id).get(key) == reason, key
        ghost_rounds = await (
            await conn.execute("SELECT count(*) FROM round_clients WHERE client_id = 'ghost'")
        ).fetchone()
        assert ghost_rounds == (0,), "a heartbeat from the future made a client live"

    audit = await verify_models(settings)
    assert audit.ok and audit.rounds_checked == len(POISONS) + 2, audit.mismatches
    report = await replay(settings, "poison_replay")
    assert report.identical, report.render()


#: Events the fuzz test produces into the running roles.
FUZZ_EVENTS = 300


def fuzz_events(session_id: str, model_id: str) -> list[Event]:
    """Events with arbitrary field values within their Avro types, their ids drawn mostly from the live
    session's (its rounds, clients, update ids and model), so they reach every guard of the fold."""
    rounds = [round_id_for(session_id, n, task) for n in (1, 2) for task in Task]
    clients_ = ["client-0", "client-1", "client-2", "ghost"]
    ids = [session_id, model_id, *rounds, *clients_, *(update_id_for(r, c) for r in rounds for c in clients_)]
    primitives = {
        **PRIMITIVES,
        str: st.sampled_from(ids) | st.text(max_size=12),
        int: st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers(min_value=-2, max_value=20),
        float: st.floats(),  # NaN and infinities included
        datetime: st.sampled_from([utc_now()]) | PRIMITIVES[datetime],
    }
    drawn: list[Event] = []

    @hypothesis_settings(max_examples=FUZZ_EVENTS, database=None, derandomize=True, phases=[Phase.generate])
    @given(any_event(primitives))
    def draw(event: Event) -> None:
        drawn.append(event)

    draw()
    # Every record its own event id: the same id on two partitions is projected in whichever order
    # the partitions happen to be read, so a replay may keep the other one (a known limit).
    return [dataclasses.replace(event, event_id=f"fuzz-{n}") for n, event in enumerate(drawn)]


async def test_arbitrary_events_leave_every_role_running_and_every_record_accounted_for(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    async with running_cluster(topics, database_url) as cluster:
        settings, names, producer = cluster.settings, cluster.topics, cluster.producer
        model_id, ref = cluster.model_id, cluster.model
        config = RoundConfig(round_timeout=10, buffer_size=-1)
        async with clients(settings, 3):
            await asyncio.sleep(1.5)  # heartbeats seen
            fuzzed = await start_session(
                producer, names, model_id=model_id, model=ref, rounds=2, config=config
            )
            events = fuzz_events(fuzzed, model_id)
            await publish(producer, names, events)
            after = await start_session(
                producer, names, model_id=model_id, model=ref, rounds=2, config=config
            )
            await wait_until_finished(settings, names, {after}, timeout=120)

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    async with await psycopg.AsyncConnection.connect(url) as conn:
        projected = {r[0] for r in await (await conn.execute("SELECT event_id FROM events")).fetchall()}
        refused = {
            r[0] for r in await (await conn.execute("SELECT event_id FROM rejected_events")).fetchall()
        }
        state = await (
            await conn.execute("SELECT state FROM sessions WHERE session_id = %s", (after,))
        ).fetchone()
    assert state == ("completed",)
    on_events_topic = {e.event_id for e in events if not isinstance(e, ClientHeartbeat)}
    assert on_events_topic <= projected | refused, "a record was neither projected nor refused"
    audit = await verify_models(settings)
    assert audit.ok, audit.mismatches
    report = await replay(settings, "fuzz_replay")
    assert report.identical, report.render()
