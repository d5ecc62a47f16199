"""The client SDK against the real broker: heartbeats, and answers to the assignments that name it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer

from roundlog.arrays import NamedArrays
from roundlog.bus import Topics, make_consumer, make_producer, publish
from roundlog.client import FederatedClient, Metrics, update_id_for
from roundlog.clock import utc_now
from roundlog.codec import DecodeError, decode
from roundlog.config import Settings
from roundlog.domain.events import (
    ClientHeartbeat,
    ClientRole,
    ClientsAssigned,
    Event,
    PredictionReceived,
    RoundConfig,
    Task,
    TensorRef,
    UpdateReceived,
    ValidationReceived,
    answer_event_id,
    derived_id,
)
from roundlog.tensors import read_tensors, write_tensors

CONFIG = RoundConfig(round_timeout=30, buffer_size=-1)


def base_model() -> list[tuple[str, np.ndarray[Any, Any]]]:
    return [("w", np.arange(12, dtype=np.float32).reshape(3, 4)), ("b", np.ones(4, np.float64))]


def train(arrays: NamedArrays, config: RoundConfig) -> tuple[NamedArrays, int, Metrics]:
    assert config == CONFIG
    return [(name, a + 1) for name, a in arrays], 42, {"loss": np.float32(0.5)}


def validate(arrays: NamedArrays, config: RoundConfig) -> tuple[int, Metrics]:
    return 7, {"accuracy": float(sum(a.sum() for _, a in arrays))}


def predict(arrays: NamedArrays, config: RoundConfig) -> tuple[str, Metrics]:
    return f"{len(arrays)} arrays", {"n": 2}


@contextlib.asynccontextmanager
async def running(*clients: FederatedClient) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in clients]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def read_until(
    settings: Settings, topic: str, done: Callable[[list[Event]], bool], linger: float = 0.0
) -> list[Event]:
    """Events of ``topic`` from the start until ``done(events)`` holds, then ``linger`` seconds more."""
    consumer = make_consumer(settings)
    await consumer.start()
    consumer.subscribe([topic])
    found: list[Event] = []

    async def poll() -> None:
        for records in (await consumer.getmany(timeout_ms=200)).values():
            found.extend(e for r in records if not isinstance(e := decode(r.value or b""), DecodeError))

    try:
        async with asyncio.timeout(20):
            while not done(found):
                await poll()
        await asyncio.sleep(linger)
        await poll()
    finally:
        await consumer.stop()
    return found


async def heartbeats_of(settings: Settings, topics: Topics, *client_ids: str) -> dict[str, ClientHeartbeat]:
    """Wait for every client's first heartbeat: from then on it reads the events topic."""
    beats = await read_until(
        settings,
        topics.clients,
        lambda found: {e.client_id for e in found if isinstance(e, ClientHeartbeat)} >= set(client_ids),
    )
    return {e.client_id: e for e in beats if isinstance(e, ClientHeartbeat)}


async def assign(
    producer: AIOKafkaProducer, topics: Topics, model: TensorRef, task: Task, *client_ids: str
) -> ClientsAssigned:
    round_id = derived_id("test-round", task)
    event = ClientsAssigned(
        event_id=derived_id(round_id, "assigned"),
        occurred_at=utc_now(),
        session_id="s1",
        round_id=round_id,
        client_ids=client_ids,
        deadline=utc_now() + timedelta(seconds=30),
        task=task,
        model_id="m0",
        model=model,
        config=CONFIG,
    )
    await publish(producer, topics, [event])
    return event


async def test_an_assigned_trainer_submits_its_update_and_others_stay_silent(
    topics: tuple[Settings, Topics],
) -> None:
    settings, names = topics
    producer = make_producer(settings)
    await producer.start()
    model = await write_tensors(producer, names.tensors, "m0", base_model())
    alice = FederatedClient(settings, "alice", train=train, heartbeat_every=0.5, labels={"site": "a"})
    bob = FederatedClient(settings, "bob", train=train, heartbeat_every=0.5)
    async with running(alice, bob):
        beats = await heartbeats_of(settings, names, "alice", "bob")
        assigned = await assign(producer, names, model, Task.TRAINING, "alice")
        events = await read_until(
            settings, names.events, lambda f: any(isinstance(e, UpdateReceived) for e in f), linger=1.5
        )
    assert beats["alice"].roles == (ClientRole.TRAINER,) and beats["alice"].labels == {"site": "a"}

    [update] = [e for e in events if isinstance(e, UpdateReceived)]
    assert [e for e in events if getattr(e, "client_id", None) == "bob"] == []
    assert update.client_id == "alice" and update.round_id == assigned.round_id
    assert update.session_id == "s1" and update.num_examples == 42 and update.metrics == {"loss": 0.5}
    assert update.update_id == update_id_for(assigned.round_id, "alice") == update.tensor.key
    assert update.event_id == answer_event_id(assigned.round_id, "alice", Task.TRAINING)
    consumer = make_consumer(settings)
    await consumer.start()
    arrays = await read_tensors(consumer, names.tensors, update.tensor)
    await consumer.stop()
    await producer.stop()
    for (name, got), (want_name, base) in zip(arrays, base_model(), strict=True):
        assert name == want_name and got.dtype == base.dtype
        np.testing.assert_array_equal(got, base + 1)


async def test_a_validator_answers_validation_and_inference_rounds(topics: tuple[Settings, Topics]) -> None:
    settings, names = topics
    producer = make_producer(settings)
    await producer.start()
    model = await write_tensors(producer, names.tensors, "m0", base_model())
    carol = FederatedClient(settings, "carol", validate=validate, predict=predict, heartbeat_every=0.5)
    async with running(carol):
        beats = await heartbeats_of(settings, names, "carol")
        await assign(producer, names, model, Task.VALIDATION, "carol")
        await assign(producer, names, model, Task.INFERENCE, "carol")
        # a trainer-only round for a validator: nothing to answer with, and the client goes on
        await assign(producer, names, model, Task.TRAINING, "carol")
        events = await read_until(
            settings,
            names.events,
            lambda f: sum(isinstance(e, (ValidationReceived, PredictionReceived)) for e in f) == 2,
            linger=1.0,
        )
    await producer.stop()
    assert beats["carol"].roles == (ClientRole.VALIDATOR,)

    [validation] = [e for e in events if isinstance(e, ValidationReceived)]
    [prediction] = [e for e in events if isinstance(e, PredictionReceived)]
    assert not any(isinstance(e, UpdateReceived) for e in events)
    expected_sum = sum(float(a.sum()) for _, a in base_model())
    assert validation.model_id == "m0" and validation.num_examples == 7
    assert validation.metrics == {"accuracy": expected_sum}
    assert prediction.summary == "2 arrays" and prediction.metrics == {"n": 2.0}
    assert prediction.event_id == answer_event_id(prediction.round_id, "carol", Task.INFERENCE)
