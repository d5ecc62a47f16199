"""SIGKILL the coordinator mid-session: restarted, it picks the session up from the log and finishes it."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter

from roundlog.bus import Topics
from roundlog.config import Settings
from roundlog.domain.events import RoundAggregated, RoundRequested, SessionFinished, Task

from tests.integration.harness import (
    clients,
    fold_log,
    role_process,
    start_sessions,
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
            [session] = await start_sessions(
                settings, names, 1, rounds=ROUNDS, round_timeout=30, validate_each_round=True
            )

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
    folded = await fold_log(settings, names)
    applied = [event for event, outcome in folded if outcome.applied]
    requested = Counter((e.round_no, e.task) for e in applied if isinstance(e, RoundRequested))
    assert requested == Counter(
        {(k, t): 1 for k in range(1, ROUNDS + 1) for t in (Task.TRAINING, Task.VALIDATION)}
    )
    aggregated = Counter(e.round_id for e in applied if isinstance(e, RoundAggregated))
    assert len(aggregated) == ROUNDS and set(aggregated.values()) == {1}
    [finished] = [e for e in applied if isinstance(e, SessionFinished)]
    assert finished.succeeded, finished.reason
