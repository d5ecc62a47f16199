"""SIGKILL the aggregator at random points: the models it emits are bit-identical to an undisturbed run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from roundlog.bus import Topics, create_topics, make_consumer, make_producer, publish
from roundlog.config import Settings
from roundlog.domain.events import Event, RoundAggregated, RoundConfig
from roundlog.roles.aggregator import AggregatorRole
from roundlog.roles.emitting import model_id_of
from roundlog.roles.stream import Entry
from roundlog.tensors import write_tensors

from tests.builders import Script, uid

ROUNDS = 4
CLIENTS = ("a", "b", "c", "d", "e")
CONFIG = RoundConfig(buffer_size=4, aggregator="fedadam", aggregator_kwargs='{"eta": 0.05}')


def arrays(seed: int) -> list[tuple[str, np.ndarray]]:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    return [
        ("w", rng.standard_normal((64, 32)).astype(np.float32)),
        ("b", rng.standard_normal(32).astype(np.float32)),
    ]


async def aggregated_events(settings: Settings, topics: Topics, count: int) -> list[RoundAggregated]:
    consumer = make_consumer(settings)
    await consumer.start()
    consumer.subscribe([topics.events])
    found: list[RoundAggregated] = []
    try:
        async with asyncio.timeout(240):
            while len({e.round_id for e in found}) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    found += [e for r in records if isinstance(e := Entry.of(r).decoded, RoundAggregated)]
    finally:
        await consumer.stop()
    return found


async def play_session(settings: Settings, topics: Topics) -> list[RoundAggregated]:
    """Plays coordinator and clients: each round starts once the previous one's model is in the log."""
    producer = make_producer(settings)
    await producer.start()
    script = Script("session", CONFIG)
    try:
        initial = await write_tensors(producer, topics.tensors, "m0", arrays(0))
        await publish(
            producer, topics, [dataclasses.replace(script.started(rounds=ROUNDS), initial_model=initial)]
        )
        base = "m0"
        for k in range(1, ROUNDS + 1):
            rid = f"r{k}"
            events: list[Event] = [
                script.requested(rid, model_id=base, round_no=k),
                script.staged(rid, base),
                script.assigned(rid, CLIENTS),
            ]
            for n, client in enumerate(CLIENTS):
                ref = await write_tensors(producer, topics.tensors, uid(client, rid), arrays(100 * k + n))
                events.append(
                    dataclasses.replace(script.update(client, rid), tensor=ref, num_examples=10 + n)
                )
            await publish(producer, topics, events)
            await aggregated_events(settings, topics, k)
            base = model_id_of(rid)
    finally:
        await producer.stop()
    return await aggregated_events(settings, topics, ROUNDS)


@contextlib.asynccontextmanager
async def in_process_aggregator(settings: Settings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(AggregatorRole(settings).run(stop))
    yield
    stop.set()
    await task


def spawn(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.env(), "ROUNDLOG_METRICS_PORT": "0"}
    return subprocess.Popen([sys.executable, "-m", "roundlog", "serve", "--role", "aggregator"], env=env)


async def killing(
    settings: Settings, kills: int, play: Callable[[], Awaitable[list[RoundAggregated]]]
) -> tuple[list[RoundAggregated], int]:
    """Run ``play`` while a subprocess aggregator is SIGKILLed up to ``kills`` times at random moments."""
    chance = random.Random(7)
    process = spawn(settings)
    killed = 0

    async def killer() -> None:
        nonlocal process, killed
        for _ in range(kills):
            await asyncio.sleep(chance.uniform(0.5, 6.0))
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed += 1
            process = spawn(settings)

    kill_task = asyncio.create_task(killer())
    try:
        return await play(), killed
    finally:
        kill_task.cancel()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


async def test_models_survive_sigkills_bit_for_bit(topics: tuple[Settings, Topics]) -> None:
    settings, names = topics
    async with in_process_aggregator(settings):
        calm = await play_session(settings, names)

    other = dataclasses.replace(settings, topic_prefix=settings.topic_prefix + "-killed")
    other_names = Topics.from_prefix(other.topic_prefix)
    await create_topics(other)
    disturbed, killed = await killing(other, kills=3, play=lambda: play_session(other, other_names))
    assert killed == 3, "every kill landed while the session was still running"

    def by_round(events: list[RoundAggregated]) -> dict[str, set[tuple[str, str, tuple[str, ...]]]]:
        rounds: dict[str, set[tuple[str, str, tuple[str, ...]]]] = {}
        for e in events:
            rounds.setdefault(e.round_id, set()).add((e.event_id, e.tensor.sha256, e.update_ids))
        return rounds

    calm_rounds, disturbed_rounds = by_round(calm), by_round(disturbed)
    assert all(len(v) == 1 for v in disturbed_rounds.values()), "a re-emission is the same event and model"
    assert disturbed_rounds == calm_rounds
    assert calm[0].optimizer_state is not None, "fedadam carries its state across rounds"
