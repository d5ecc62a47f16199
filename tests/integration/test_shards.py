"""Sharded rounds on the real stack: K shards folded by aggregator processes, reduced exactly once.

Each aggregator process (``roundlog serve --role aggregator``) is a member of the aggregator group
(reduces) and of the shard group (folds the shards of the tensors partitions it holds). The
models are checked against the published FedAvg formula, summed here the way the shards and the
reduce sum (each shard in log order, then the partials in shard order), so they must agree to the
bit; the audit re-folds every partial and model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from roundlog.audit import verify_models
from roundlog.bus import Topics, make_consumer
from roundlog.config import Settings
from roundlog.domain.events import (
    Event,
    RoundAggregated,
    SessionFinished,
    ShardAggregated,
    UpdateReceived,
    shard_of,
)
from roundlog.domain.session import Outcome
from roundlog.projections.schema import upgrade
from roundlog.tensors import read_tensors

from tests.integration.harness import (
    clients,
    first_event,
    fold_log,
    model,
    role_process,
    start_sessions,
    stop_process,
    wait_until_finished,
)

ROUNDS = 2
Arrays = Sequence[tuple[str, np.ndarray[Any, Any]]]


def expected_model(
    base: Arrays,
    updates: Sequence[UpdateReceived],
    shards: int,
    k_of: dict[str, int],
) -> list[tuple[str, np.ndarray[Any, Any]]]:
    """FedAvg, sum(n_i * x_i) / sum(n_i): each shard's updates summed in log order into float64,
    then the partials in shard order. Client k trains to base + 0.1·(k + 1) with 10 + k examples
    (``harness.trainer``), in float32 like the model."""
    out = []
    for name, array in base:
        total = np.zeros(array.shape, dtype=np.float64)
        for shard in range(shards):
            partial = np.zeros(array.shape, dtype=np.float64)
            for update in updates:
                if shard_of(update, shards) != shard:
                    continue
                k = k_of[update.client_id]
                trained = (array + np.float32(0.1 * (k + 1))).astype(array.dtype)
                partial = partial + float(update.num_examples) * trained.astype(np.float64)
            total = total + partial
        weight = float(sum(u.num_examples for u in updates))
        out.append((name, (total / weight).astype(array.dtype)))
    return out


async def check_session(settings: Settings, names: Topics, shards: int) -> list[tuple[Event, Outcome]]:
    """Every round aggregated once from exactly its K partials, each model the formula's to the bit."""
    folded = await fold_log(settings, names)
    applied = [e for e, o in folded if o.applied]
    (finished,) = [e for e in applied if isinstance(e, SessionFinished)]
    assert finished.succeeded, finished.reason
    aggregates = [e for e in applied if isinstance(e, RoundAggregated)]
    assert len(aggregates) == ROUNDS
    partials = Counter((e.round_id, e.shard) for e in applied if isinstance(e, ShardAggregated))
    assert set(partials.values()) == {1} and len(partials) == ROUNDS * shards
    updates = {e.update_id: e for e in applied if isinstance(e, UpdateReceived)}
    k_of = {client: int(client.rsplit("-", 1)[1]) for client in {u.client_id for u in updates.values()}}
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        base: Arrays = model()
        for aggregate in aggregates:
            folded_updates = [updates[uid] for uid in aggregate.update_ids]
            got = await read_tensors(consumer, names.tensors, aggregate.tensor)
            for (name, array), (_, want) in zip(
                got, expected_model(base, folded_updates, shards, k_of), strict=True
            ):
                np.testing.assert_array_equal(array, want, err_msg=name)
            base = got
    finally:
        await consumer.stop()
    audit = await verify_models(settings)
    assert audit.ok, audit.mismatches
    assert (audit.rounds_checked, audit.partials_checked) == (ROUNDS, ROUNDS * shards)
    return folded


def shards_folded(log: Path) -> set[int]:
    """The shards a process's log says it folded."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return {int(line["message"].split()[1]) for line in lines if "folded:" in line.get("message", "")}


def latest_holding(log: Path) -> set[int]:
    """The tensors partitions a process's log last said it holds in the shard group."""
    held: set[int] = set()
    for line in log.read_text().splitlines() if log.exists() else []:
        message = json.loads(line).get("message", "") if line.startswith("{") else ""
        if message.startswith("holding tensors partitions "):
            held = set(json.loads(message.removeprefix("holding tensors partitions ").split(":")[0]))
    return held


async def shard_group_settled(logs: Sequence[Path], timeout: float = 60) -> None:
    """Until every process holds a share of the tensors partitions and none holds one twice: a
    process that joins the group first holds them all until the other's join rebalances it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (all(held := [latest_holding(log) for log in logs]) and not set.intersection(*held)):
        assert loop.time() < deadline, f"the shard group did not settle: holdings {held}"
        await asyncio.sleep(0.2)


async def test_two_aggregator_processes_fold_one_rounds_two_shards(
    topics: tuple[Settings, Topics], database_url: str, tmp_path: Path
) -> None:
    settings, names = dataclasses.replace(topics[0], database_url=database_url), topics[1]
    await asyncio.to_thread(upgrade, database_url)
    logs = [tmp_path / "aggregator-0.log", tmp_path / "aggregator-1.log"]
    roles = [
        role_process(settings, "coordinator"),
        *(role_process(settings, "aggregator", log) for log in logs),
    ]
    try:
        await shard_group_settled(logs)
        async with clients(settings, 6):
            sessions = await start_sessions(settings, names, 1, rounds=ROUNDS, round_timeout=60, shards=2)
            await wait_until_finished(settings, names, set(sessions), timeout=180)
    finally:
        for process in roles:
            stop_process(process)
    await check_session(settings, names, shards=2)
    # the round-robin shard group gives each process one of the two shards (once both have joined)
    assert [shards_folded(log) for log in logs] in ([{0}, {1}], [{1}, {0}])


async def test_more_shards_than_updates_leaves_shards_empty_and_the_model_exact(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    settings, names = dataclasses.replace(topics[0], database_url=database_url), topics[1]
    await asyncio.to_thread(upgrade, database_url)
    roles = [role_process(settings, "coordinator"), role_process(settings, "aggregator")]
    try:
        async with clients(settings, 3):
            sessions = await start_sessions(settings, names, 1, rounds=ROUNDS, round_timeout=60, shards=8)
            await wait_until_finished(settings, names, set(sessions), timeout=180)
    finally:
        for process in roles:
            stop_process(process)
    folded = await check_session(settings, names, shards=8)
    empty = [e for e, o in folded if o.applied and isinstance(e, ShardAggregated) and not e.update_ids]
    assert len(empty) >= ROUNDS * 5, "8 shards, 3 updates a round: at least 5 empty partials each"


async def test_a_killed_aggregator_is_taken_over_and_each_round_reduces_once(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    """Two aggregator processes share the shards and the partitions; one is SIGKILLed as soon as the
    first partial is out. The other takes over its shards (the shard group) and its partitions (the
    aggregator group, whose reduce it then does), and every round still aggregates exactly once."""
    settings, names = dataclasses.replace(topics[0], database_url=database_url), topics[1]
    await asyncio.to_thread(upgrade, database_url)
    victim, survivor = role_process(settings, "aggregator"), role_process(settings, "aggregator")
    coordinator = role_process(settings, "coordinator")
    try:
        async with clients(settings, 6, train_seconds=0.5):
            sessions = await start_sessions(settings, names, 1, rounds=ROUNDS, round_timeout=90, shards=2)
            await first_event(settings, names, ShardAggregated)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            await wait_until_finished(settings, names, set(sessions), timeout=240)
    finally:
        for process in (coordinator, victim, survivor):
            stop_process(process)
    await check_session(settings, names, shards=2)
