"""The aggregator role against the real broker: it folds updates as they arrive and emits the model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from roundlog.audit import verify_models
from roundlog.bus import Topics, make_consumer, make_producer, publish
from roundlog.config import Settings
from roundlog.domain.events import Event, RoundAggregated, RoundConfig, RoundFailed, UpdateRejected
from roundlog.roles.aggregator import AggregatorRole
from roundlog.roles.stream import Entry
from roundlog.tensors import TensorReader, write_tensors

from tests.builders import Script, uid

Arrays = list[tuple[str, np.ndarray[Any, Any]]]


def base_model() -> Arrays:
    return [("w", np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)), ("b", np.zeros(4, np.float32))]


def client_update(seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return [
        (name, (array + rng.standard_normal(array.shape)).astype(np.float32)) for name, array in base_model()
    ]


@contextlib.asynccontextmanager
async def running_aggregator(settings: Settings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(AggregatorRole(settings).run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def wait_for(settings: Settings, topics: Topics, kinds: tuple[type, ...], count: int) -> list[Event]:
    """Read the events topic from the start until ``count`` events of ``kinds`` are there."""
    consumer = make_consumer(settings)
    await consumer.start()
    consumer.subscribe([topics.events])
    found: list[Event] = []
    try:
        async with asyncio.timeout(60):
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    found += [e.decoded for r in records if isinstance((e := Entry.of(r)).decoded, kinds)]  # type: ignore[misc]
    finally:
        await consumer.stop()
    return found


async def training_round(
    producer: AIOKafkaProducer, topics: Topics, script: Script, updates: dict[str, Arrays], **config: Any
) -> list[Event]:
    """A session whose one round assigns the clients of ``updates`` and receives their tensors."""
    model_ref = await write_tensors(producer, topics.tensors, "m0", base_model())
    started = dataclasses.replace(script.started(), initial_model=model_ref)
    events: list[Event] = [
        started,
        script.requested(**config),
        script.staged(),
        script.assigned(clients=tuple(updates)),
    ]
    for client, arrays in updates.items():
        ref = await write_tensors(producer, topics.tensors, uid(client), arrays)
        events.append(dataclasses.replace(script.update(client), tensor=ref, num_examples=10 + len(events)))
    return events


async def test_a_round_aggregates_to_the_example_weighted_mean(topics: tuple[Settings, Topics]) -> None:
    settings, names = topics
    producer = make_producer(settings)
    await producer.start()
    updates = {c: client_update(i) for i, c in enumerate("abc")}
    events = await training_round(producer, names, Script(config=RoundConfig(buffer_size=-1)), updates)
    async with running_aggregator(settings):
        await publish(producer, names, events)
        [aggregated] = await wait_for(settings, names, (RoundAggregated,), 1)
    await producer.stop()

    assert isinstance(aggregated, RoundAggregated)
    weights = {e.client_id: e.num_examples for e in events if hasattr(e, "num_examples")}
    total = sum(weights.values())
    reader_consumer = make_consumer(settings)
    await reader_consumer.start()
    model = await TensorReader(reader_consumer, names.tensors).arrays(aggregated.tensor)
    await reader_consumer.stop()
    for index, (name, array) in enumerate(model):
        expected = sum(weights[c] * updates[c][index][1].astype(np.float64) for c in updates) / total
        assert name == updates["a"][index][0] and array.dtype == np.float32
        np.testing.assert_array_equal(array, expected.astype(np.float32))
    assert aggregated.update_ids == (uid("a"), uid("b"), uid("c"))
    assert aggregated.total_weight == total


@pytest.mark.parametrize(
    ("flaw", "reason"),
    [
        ("nan", "non_finite"),
        ("float64", "dtype_mismatch"),
        ("shape", "shape_mismatch"),
        ("hash", "hash_mismatch"),
    ],
)
async def test_an_unusable_update_is_rejected_with_its_reason(
    topics: tuple[Settings, Topics], flaw: str, reason: str
) -> None:
    settings, names = topics
    producer = make_producer(settings)
    await producer.start()
    bad = client_update(9)
    if flaw == "nan":
        bad[0][1][1, 2] = np.nan
    elif flaw == "float64":
        bad = [(n, a.astype(np.float64)) for n, a in bad]
    elif flaw == "shape":
        bad = [(n, a.reshape(-1)) for n, a in bad]
    updates = {"a": client_update(1), "b": bad, "c": client_update(3)}
    events = await training_round(producer, names, Script(config=RoundConfig(buffer_size=-1)), updates)
    if flaw == "hash":
        index = next(i for i, e in enumerate(events) if getattr(e, "client_id", "") == "b")
        forged = dataclasses.replace(events[index].tensor, sha256="f" * 64)  # type: ignore[union-attr]
        events[index] = dataclasses.replace(events[index], tensor=forged)  # type: ignore[type-var]
    async with running_aggregator(settings):
        await publish(producer, names, events)
        found = await wait_for(settings, names, (UpdateRejected, RoundAggregated, RoundFailed), 2)
    await producer.stop()

    rejected = [e for e in found if isinstance(e, UpdateRejected)]
    aggregated = [e for e in found if isinstance(e, RoundAggregated)]
    assert [(e.client_id, e.reason) for e in rejected] == [("b", reason)]
    assert aggregated and aggregated[0].update_ids == (uid("a"), uid("c"))


async def test_the_audit_refolds_every_round_to_the_logged_model(topics: tuple[Settings, Topics]) -> None:
    settings, names = topics
    producer = make_producer(settings)
    await producer.start()
    sessions = [Script(f"s{i}", RoundConfig(buffer_size=2)) for i in range(3)]
    async with running_aggregator(settings):
        for i, script in enumerate(sessions):
            updates = {c: client_update(10 * i + j) for j, c in enumerate("abc")}
            await publish(producer, names, await training_round(producer, names, script, updates))
        await wait_for(settings, names, (RoundAggregated,), len(sessions))
    await producer.stop()

    report = await verify_models(settings)
    assert report.rounds_checked == len(sessions)
    assert report.ok, report.mismatches


async def test_the_audit_reports_a_model_the_updates_do_not_fold_to(topics: tuple[Settings, Topics]) -> None:
    settings, names = topics
    producer = make_producer(settings)
    await producer.start()
    script = Script(config=RoundConfig(buffer_size=2))
    events = await training_round(producer, names, script, {"a": client_update(1), "b": client_update(2)})
    forged_model = await write_tensors(producer, names.tensors, "forged", client_update(3))
    forged = dataclasses.replace(script.aggregated(update_ids=(uid("a"), uid("b"))), tensor=forged_model)
    await publish(producer, names, [*events, forged])
    await producer.stop()

    report = await verify_models(settings)
    assert report.rounds_checked == 1
    [mismatch] = report.mismatches
    assert mismatch.round_id == "r1" and mismatch.detail == "the same updates fold to another model"
    assert mismatch.logged.sha256 == forged_model.sha256
