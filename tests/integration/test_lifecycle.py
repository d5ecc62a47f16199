"""The round lifecycle end to end, read back from the SQL projections.

Three scripted clients answer each assignment exactly as this test says, so every rule of
the machine shows up: a client that submits twice, one that was never assigned, a straggler
after the close, a round closed by its deadline with enough updates, one failed by it with
none, validation rounds after the aggregated ones, and an inference round asked from outside.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from roundlog.bus import Topics, make_consumer, make_producer, publish, read_from_end
from roundlog.client import import_model, request_round, start_session
from roundlog.clock import utc_now
from roundlog.codec import decode
from roundlog.config import Settings
from roundlog.domain.events import (
    ClientHeartbeat,
    ClientRole,
    ClientsAssigned,
    Event,
    PredictionReceived,
    RoundConfig,
    RoundRequested,
    Task,
    UpdateReceived,
    ValidationReceived,
    update_id_for,
)
from roundlog.projections.schema import upgrade
from roundlog.roles import aggregator, coordinator, projector
from roundlog.tensors import TensorReader, write_tensors

from tests.integration.harness import caught_up, model, wait_until_finished

CLIENTS = ("a", "b", "c")
CONFIG = RoundConfig(round_timeout=3, buffer_size=2, min_updates=1)
#: who submits in each training round, in this order: "a*" is a's second submission, z was never assigned
TRAINING_SCRIPT = {1: ["a", "a*", "z", "b", "c"], 2: ["a"], 3: []}


class ScriptedClients:
    """Clients a, b and c: they heartbeat, and answer each assignment as the script says, in one batch."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self.settings, self.topics = settings, topics
        self.round_no: dict[str, int] = {}

    async def run(self, stop: asyncio.Event, ready: asyncio.Event) -> None:
        producer, events = make_producer(self.settings), make_consumer(self.settings)
        tensors = make_consumer(self.settings, check_crcs=False)
        for client in (producer, events, tensors):
            await client.start()
        try:
            await read_from_end(events, self.topics.events)
            reader = TensorReader(tensors, self.topics.tensors)
            beating = asyncio.create_task(self._heartbeats(producer, stop))
            ready.set()
            while not stop.is_set():
                for records in (await events.getmany(timeout_ms=200)).values():
                    for record in records:
                        event = decode(record.value or b"")
                        if isinstance(event, RoundRequested):
                            self.round_no[event.round_id] = event.round_no
                        elif isinstance(event, ClientsAssigned):
                            answers = await self._answers(producer, reader, event)
                            await publish(producer, self.topics, answers)
            beating.cancel()
        finally:
            for client in (tensors, events, producer):
                await client.stop()

    async def _heartbeats(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        roles = (ClientRole.TRAINER, ClientRole.VALIDATOR)
        while not stop.is_set():
            now = utc_now()
            beats = [
                ClientHeartbeat(event_id=str(uuid.uuid4()), occurred_at=now, client_id=c, roles=roles)
                for c in CLIENTS
            ]
            await publish(producer, self.topics, beats)
            await asyncio.sleep(0.5)

    async def _answers(
        self, producer: AIOKafkaProducer, reader: TensorReader, job: ClientsAssigned
    ) -> list[Event]:
        common: dict[str, Any] = {
            "occurred_at": utc_now(),
            "session_id": job.session_id,
            "round_id": job.round_id,
        }
        if job.task == Task.VALIDATION:
            return [
                ValidationReceived(
                    event_id=str(uuid.uuid4()), client_id=c, model_id=job.model_id, num_examples=5, **common
                )
                for c in ("a", "b")
            ]
        if job.task == Task.INFERENCE:
            return [
                PredictionReceived(event_id=str(uuid.uuid4()), client_id="a", model_id=job.model_id, **common)
            ]
        arrays = [(name, array + 1) for name, array in await reader.arrays(job.model)]
        updates: list[Event] = []
        for who in TRAINING_SCRIPT[self.round_no[job.round_id]]:
            update_id = update_id_for(job.round_id, who.rstrip("*"))
            ref = await write_tensors(producer, self.topics.tensors, update_id, arrays)
            client = who.rstrip("*")
            updates.append(
                UpdateReceived(
                    event_id=str(uuid.uuid4()),
                    client_id=client,
                    update_id=update_id,
                    num_examples=10,
                    tensor=ref,
                    **common,
                )
            )
        return updates


@pytest.fixture
async def stack_with_roles(
    topics: tuple[Settings, Topics], database_url: str
) -> AsyncIterator[tuple[Settings, Topics]]:
    """Migrations applied and the three roles running in this process, on the test's topics and database."""
    settings = dataclasses.replace(topics[0], database_url=database_url)
    await asyncio.to_thread(upgrade, database_url)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(role.run(settings, stop)) for role in (coordinator, aggregator, projector)]
    yield settings, topics[1]
    stop.set()
    await asyncio.gather(*tasks)


async def rows(settings: Settings, query: str, *args: object) -> list[tuple[Any, ...]]:
    url = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return await (await conn.execute(query, args)).fetchall()


async def test_a_session_lives_through_every_rule_and_the_projections_say_so(
    stack_with_roles: tuple[Settings, Topics],
) -> None:
    settings, names = stack_with_roles
    stop, ready = asyncio.Event(), asyncio.Event()
    fleet = asyncio.create_task(ScriptedClients(settings, names).run(stop, ready))
    await ready.wait()
    await asyncio.sleep(1.5)  # the coordinator has seen the heartbeats
    producer = make_producer(settings)
    await producer.start()
    model_id, ref = await import_model(producer, names, model())
    session = await start_session(
        producer,
        names,
        model_id=model_id,
        model=ref,
        rounds=3,
        config=CONFIG,
        validate_each_round=True,
        stop_on_failure=False,
    )
    inference = await request_round(
        producer,
        names,
        session_id=session,
        round_no=99,
        task=Task.INFERENCE,
        model_id=model_id,
        config=CONFIG,
    )
    await producer.stop()
    await wait_until_finished(settings, names, {session}, timeout=90)
    await caught_up(settings, names)
    stop.set()
    await fleet

    by_round = {
        (no, task): (state, timed_out, n_accepted, fail_reason)
        for no, task, state, timed_out, n_accepted, fail_reason in await rows(
            settings,
            "SELECT round_no, task, state, timed_out, n_accepted, fail_reason FROM rounds "
            "WHERE session_id = %s",
            session,
        )
    }
    assert by_round == {
        (1, "training"): ("aggregated", False, 2, None),  # closed by the buffer: a and b
        (1, "validation"): ("completed", True, 2, None),  # a and b validated, c did not: the deadline
        (2, "training"): ("aggregated", True, 1, None),  # closed by the deadline with enough updates
        (2, "validation"): ("completed", True, 2, None),
        (3, "training"): ("failed", True, 0, "too_few_updates"),  # the deadline, and nobody came
        (99, "inference"): ("completed", True, 1, None),
    }
    refused = await rows(
        settings,
        "SELECT u.client_id, u.reject_reason FROM round_updates u JOIN rounds r USING (round_id) "
        "WHERE r.session_id = %s AND u.status = 'rejected' ORDER BY u.received_at",
        session,
    )
    assert refused == [("a", "duplicate"), ("z", "not_assigned"), ("c", "late")]
    validations = await rows(
        settings, "SELECT count(*), count(DISTINCT round_id) FROM validations WHERE session_id = %s", session
    )
    assert validations == [(4, 2)]
    assert await rows(settings, "SELECT client_id FROM predictions WHERE round_id = %s", inference) == [
        ("a",)
    ]
    assert await rows(
        settings, "SELECT state, rounds_done, succeeded FROM sessions WHERE session_id = %s", session
    ) == [("failed", 2, False)]
    lineage = await rows(
        settings,
        "SELECT parent_model_id, n_updates FROM models WHERE session_id = %s ORDER BY created_at",
        session,
    )
    assert [n for _, n in lineage] == [2, 1] and lineage[0][0] == model_id
