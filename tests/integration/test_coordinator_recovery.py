"""SIGKILL the coordinator mid-session: restarted, it picks the session up from the log and finishes it."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter

from roundlog.bus import Topics, make_producer
from roundlog.client import import_model, start_session
from roundlog.config import Settings
from roundlog.domain.events import RoundAggregated, RoundConfig, RoundRequested, SessionFinished, Task

from tests.integration.harness import (
    clients,
    fold_log,
    model,
    read_log,
    role_process,
    stop_process,
    wait_until_finished,
)

ROUNDS = 4


async def test_a_killed_coordinator_resumes_and_each_round_takes_effect_once(
    topics: tuple[Settings, Topics],
) -> None:
    settings, names = topics
    aggregator = role_process(settings, "aggregator")
    coordinator = role_process(settings, "coordinator")
    kills = 0
    try:
        async with clients(settings, 3):
            producer = make_producer(settings)
            await producer.start()
            model_id, ref = await import_model(producer, names, model())
            config = RoundConfig(round_timeout=30, buffer_size=-1)
            session = await start_session(
                producer,
                names,
                model_id=model_id,
                model=ref,
                rounds=ROUNDS,
                config=config,
                validate_each_round=True,
            )
            await producer.stop()

            async def kill_now_and_then() -> None:
                nonlocal coordinator, kills
                chance = random.Random(3)
                for _ in range(3):
                    await asyncio.sleep(chance.uniform(1.0, 5.0))
                    coordinator.send_signal(signal.SIGKILL)
                    coordinator.wait()
                    kills += 1
                    coordinator = role_process(settings, "coordinator")

            killer = asyncio.create_task(kill_now_and_then())
            await wait_until_finished(settings, names, {session}, timeout=180)
            killer.cancel()
    finally:
        stop_process(coordinator)
        stop_process(aggregator)

    assert kills >= 2, "the coordinator died at least twice while the session ran"
    folded = fold_log(await read_log(settings, names))
    applied = [event for event, outcome in folded if outcome.applied]
    requested = Counter((e.round_no, e.task) for e in applied if isinstance(e, RoundRequested))
    assert requested == Counter(
        {(k, t): 1 for k in range(1, ROUNDS + 1) for t in (Task.TRAINING, Task.VALIDATION)}
    )
    aggregated = Counter(e.round_id for e in applied if isinstance(e, RoundAggregated))
    assert len(aggregated) == ROUNDS and set(aggregated.values()) == {1}
    [finished] = [e for e in applied if isinstance(e, SessionFinished)]
    assert finished.succeeded, finished.reason
