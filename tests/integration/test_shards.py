"""Sharded rounds on the real stack: K shards folded by aggregator processes, reduced exactly once.

Each aggregator process (``roundlog serve --role aggregator``) is a member of the aggregator group
(reduces) and of the shard group (folds the shards of the tensors partitions it holds). The
models are checked against the published FedAvg formula, summed here the way the shards and the
reduce sum (each shard in log order, then the partials in shard order), so they must agree to the
bit; the audit re-folds every partial and model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from roundlog.arrays import sha256_of
from roundlog.audit import verify_models
from roundlog.bus import Topics, make_consumer, make_producer, partition_for, publish
from roundlog.client import FederatedClient
from roundlog.clock import utc_now
from roundlog.codec import DecodeError, decode
from roundlog.config import Settings
from roundlog.domain.decide import round_id_for
from roundlog.domain.events import (
    Event,
    RoundAggregated,
    SessionFinished,
    ShardAggregated,
    Task,
    UpdateReceived,
    derived_id,
    shard_of,
    update_id_for,
)
from roundlog.domain.session import Outcome
from roundlog.projections.schema import upgrade
from roundlog.roles.shards import holder_partition
from roundlog.tensors import read_tensors, write_tensors

from tests.integration.harness import (
    client_ids,
    clients,
    fold_log,
    model,
    role_process,
    start_sessions,
    stop_process,
    trainer,
    validator,
    wait_until_finished,
)

ROUNDS = 2
Arrays = Sequence[tuple[str, np.ndarray[Any, Any]]]


def k_of(client_id: str) -> int:
    """Client k of ``harness.client_ids``."""
    return int(client_id.rsplit("-", 1)[1])


def partial_sum(array: np.ndarray[Any, Any], updates: Sequence[UpdateReceived]) -> np.ndarray[Any, Any]:
    """One shard's float64 sum(n_i * x_i) of ``array``, its updates added in log order. Client k trains
    to base + 0.1·(k + 1) with 10 + k examples (``harness.trainer``), in float32 like the model."""
    partial = np.zeros(array.shape, dtype=np.float64)
    for update in updates:
        trained = (array + np.float32(0.1 * (k_of(update.client_id) + 1))).astype(array.dtype)
        partial = partial + float(update.num_examples) * trained.astype(np.float64)
    return partial


def expected_model(
    base: Arrays, updates: Sequence[UpdateReceived], shards: int
) -> list[tuple[str, np.ndarray[Any, Any]]]:
    """FedAvg, sum(n_i * x_i) / sum(n_i): each shard's updates summed in log order into float64,
    then the partials in shard order."""
    out = []
    for name, array in base:
        total = np.zeros(array.shape, dtype=np.float64)
        for shard in range(shards):
            total = total + partial_sum(array, [u for u in updates if shard_of(u, shards) == shard])
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
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        base: Arrays = model()
        for aggregate in aggregates:
            folded_updates = [updates[uid] for uid in aggregate.update_ids]
            got = await read_tensors(consumer, names.tensors, aggregate.tensor)
            for (name, array), (_, want) in zip(
                got, expected_model(base, folded_updates, shards), strict=True
            ):
                np.testing.assert_array_equal(array, want, err_msg=name)
            base = got
    finally:
        await consumer.stop()
    audit = await verify_models(settings)
    assert audit.ok, audit.mismatches
    assert (audit.rounds_checked, audit.partials_checked) == (ROUNDS, ROUNDS * shards)
    return folded


def log_lines(log: Path) -> list[dict[str, Any]]:
    """A process's JSON log lines (``role_process(..., log)``), but a last one still being written."""
    complete = log.read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line.startswith("{")]


def shards_folded(log: Path, round_id: str | None = None) -> set[int]:
    """The shards a process's log says it folded (of round ``round_id``, when given)."""
    return {
        int(line["message"].split()[1])
        for line in log_lines(log)
        if "folded:" in line.get("message", "") and round_id in (None, line.get("round_id"))
    }


def reduced(log: Path, round_id: str) -> bool:
    """Whether a process's log says it aggregated (for a sharded round: reduced) round ``round_id``."""
    return any(
        line.get("message", "").startswith("round aggregated") and line.get("round_id") == round_id
        for line in log_lines(log)
    )


def latest_holding(log: Path, topic: str) -> set[int]:
    """The ``topic`` ("events" or "tensors") partitions a process's log last said it holds: in the
    aggregator group and in the shard group."""
    held: set[int] = set()
    prefix = f"holding {topic} partitions "
    for line in log_lines(log) if log.exists() else []:
        if (message := line.get("message", "")).startswith(prefix):
            held = set(json.loads(message.removeprefix(prefix).split(":")[0]))
    return held


def events_holder(logs: Sequence[Path], partition: int) -> int:
    """Which process (its index in ``logs``) holds events ``partition`` in the aggregator group."""
    holders = [index for index, log in enumerate(logs) if partition in latest_holding(log, "events")]
    assert len(holders) == 1, f"events partition {partition} is held by processes {holders}"
    return holders[0]


async def groups_settled(logs: Sequence[Path], timeout: float = 60) -> None:
    """Until, in the aggregator group and in the shard group, every process holds a share of the
    partitions and none holds one twice: a process that joins a group first holds all its
    partitions (and may reduce a round or fold both shards) until the other's join rebalances it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for topic in ("events", "tensors"):
        while not (all(held := [latest_holding(log, topic) for log in logs]) and not set.intersection(*held)):
            assert loop.time() < deadline, f"the groups over {topic} did not settle: holdings {held}"
            await asyncio.sleep(0.2)


class LogWatch:
    """The events topic as it grows, read by one consumer for the whole test."""

    def __init__(self, settings: Settings, names: Topics) -> None:
        self.consumer = make_consumer(settings)
        self.topic = names.events
        self.seen: list[Event] = []

    async def __aenter__(self) -> LogWatch:
        await self.consumer.start()
        self.consumer.assign(await self.consumer.topic_partitions(self.topic))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    def matching(self, match: Callable[[Event], bool]) -> list[Event]:
        return [e for e in self.seen if match(e)]

    async def until(
        self, match: Callable[[Event], bool], count: int = 1, timeout: float = 120
    ) -> list[Event]:
        """Until ``count`` events ``match``; those events, in log order (per partition)."""
        async with asyncio.timeout(timeout):
            while len(self.matching(match)) < count:
                await self._poll()
        return self.matching(match)

    async def caught_up(self) -> None:
        """Until everything logged so far has been read."""
        ends = await self.consumer.end_offsets(self.consumer.assignment())
        async with asyncio.timeout(60):
            for tp, end in ends.items():
                while await self.consumer.position(tp) < end:
                    await self._poll()

    async def _poll(self) -> None:
        for records in (await self.consumer.getmany(timeout_ms=200)).values():
            self.seen += [
                event for r in records if not isinstance(event := decode(r.value or b""), DecodeError)
            ]


@contextlib.asynccontextmanager
async def gated_clients(settings: Settings, count: int) -> AsyncIterator[list[threading.Event]]:
    """``count`` clients as ``harness.clients`` makes them, except that each trains its first round
    at once and every later one only when its gate (yielded, one per client) is set: the test
    decides when each update of those rounds is logged."""
    gates = [threading.Event() for _ in range(count)]

    def gated(k: int) -> Any:
        train, rounds = trainer(k), itertools.count()

        def train_when_let(arrays: Arrays, config: Any) -> Any:
            if next(rounds) > 0:
                gates[k].wait(timeout=180)
            return train(arrays, config)

        return train_when_let

    stop = asyncio.Event()
    fleet = [
        FederatedClient(settings, client_id, train=gated(k), validate=validator, heartbeat_every=0.5)
        for k, client_id in enumerate(client_ids(count))
    ]
    tasks = [asyncio.create_task(c.run(stop)) for c in fleet]
    try:
        yield gates
    finally:
        for gate in gates:
            gate.set()
        stop.set()
        await asyncio.gather(*tasks)


def in_round(kind: type[Event], round_id: str, **fields: object) -> Callable[[Event], bool]:
    return lambda e: (
        isinstance(e, kind)
        and getattr(e, "round_id", None) == round_id
        and all(getattr(e, name) == value for name, value in fields.items())
    )


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
        await groups_settled(logs)
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


CLIENTS = 6
SHARDS = 2


@pytest.mark.parametrize("target", ["shard", "reducer"])
async def test_a_killed_aggregator_is_taken_over_and_each_round_reduces_once(
    topics: tuple[Settings, Topics], database_url: str, tmp_path: Path, target: str
) -> None:
    """Two aggregator processes, each folding one of a round's two shards; one of them reduces (the
    aggregator-group member holding the session's events partition). Round 1 runs freely and shows
    from the logs who reduces and who holds which shard; in round 2 the clients train when the test
    lets them, and one process is SIGKILLed at a chosen point:

    - ``shard``: the holder of a shard with at least two updates this round (the non-reducer's
      shard when it has two), once one of them is logged and the others are still to come (so
      before its partial); the survivor must fold that shard again from the log;
    - ``reducer``: the reducer, once every partial is in the log and before ``RoundAggregated``.
      To hit that window every time, the other process is SIGSTOPped before the round's last
      update, the reducer is SIGSTOPped as soon as its own partial is logged, the other is let go
      to log its partial, and the frozen reducer, which cannot have read it, is then killed.

    Either way the survivor takes over, every round is aggregated exactly once, to the formula's
    model, and the audit re-folds every partial and model."""
    settings, names = dataclasses.replace(topics[0], database_url=database_url), topics[1]
    await asyncio.to_thread(upgrade, database_url)
    logs = [tmp_path / "aggregator-0.log", tmp_path / "aggregator-1.log"]
    coordinator = role_process(settings, "coordinator")
    aggregators = [role_process(settings, "aggregator", log) for log in logs]
    try:
        await groups_settled(logs)
        async with gated_clients(settings, CLIENTS) as gates, LogWatch(settings, names) as watch:
            (session,) = await start_sessions(
                settings, names, 1, rounds=ROUNDS, round_timeout=90, shards=SHARDS
            )
            first, second = (round_id_for(session, n, Task.TRAINING) for n in (1, 2))
            await watch.until(in_round(RoundAggregated, first))
            reducer = await reducer_of(logs, first)
            other = 1 - reducer
            holders = [latest_holding(log, "tensors") for log in logs]
            held_shards = [
                [k for k in range(SHARDS) if holder_partition(k, settings.partitions) in held]
                for held in holders
            ]
            assert sorted(held_shards) == [[0], [1]], holders  # one shard each
            shard_of_process = [shard for (shard,) in held_shards]
            # where each client's round-2 update will sit (its tensors key is its update id)
            shard_of_client = [
                partition_for(update_id_for(second, client), settings.partitions) % SHARDS
                for client in client_ids(CLIENTS)
            ]
            session_partition = partition_for(session, settings.partitions)
            assert events_holder(logs, session_partition) == reducer
            if target == "shard":
                victim, shard = await kill_a_shard_mid_fold(
                    watch, aggregators, gates, second, shard_of_client, shard_of_process, other
                )
            else:
                victim, shard = await kill_the_reducer_before_its_reduce(
                    watch, aggregators, gates, second, shard_of_process, reducer
                )
                # its last word on the aggregator group: it still held the session (was the reducer)
                assert session_partition in latest_holding(logs[victim], "events")
            await wait_until_finished(settings, names, {session}, timeout=240)
    finally:
        for process in aggregators:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
        for process in (coordinator, *aggregators):
            stop_process(process)
    survivor = 1 - victim
    folded = await check_session(settings, names, shards=SHARDS)
    assert shard in shards_folded(logs[survivor], second), "the survivor did not fold the victim's shard"
    assert shard not in shards_folded(logs[victim], second)
    assert reduced(logs[survivor], second) and not reduced(logs[victim], second)
    # one aggregation of the round: any copy in the log is the same event, with the same model
    copies = [e for e, _ in folded if in_round(RoundAggregated, second)(e)]
    assert len({(e.event_id, e.tensor.sha256) for e in copies if isinstance(e, RoundAggregated)}) == 1


async def reducer_of(logs: Sequence[Path], round_id: str) -> int:
    """The process (its index in ``logs``) whose log says it reduced ``round_id``, once it says so."""
    async with asyncio.timeout(30):
        while not (found := [i for i, log in enumerate(logs) if reduced(log, round_id)]):
            await asyncio.sleep(0.2)
    (reducer,) = found
    return reducer


async def kill_a_shard_mid_fold(
    watch: LogWatch,
    aggregators: Sequence[subprocess.Popen[bytes]],
    gates: Sequence[threading.Event],
    round_id: str,
    shard_of_client: Sequence[int],
    shard_of_process: Sequence[int],
    other: int,
) -> tuple[int, int]:
    """SIGKILL the holder of a shard with two updates or more once its first is logged: (victim, shard)."""
    counts = Counter(shard_of_client)
    shard = shard_of_process[other] if counts[shard_of_process[other]] >= 2 else shard_of_process[1 - other]
    assert counts[shard] >= 2, shard_of_client  # 6 updates in 2 shards: one has 3 or more
    victim = shard_of_process.index(shard)
    first = shard_of_client.index(shard)  # the shard's first update: its others are still to come
    gates[first].set()
    (update,) = await watch.until(in_round(UpdateReceived, round_id, client_id=f"client-{first}"))
    assert isinstance(update, UpdateReceived) and shard_of(update, SHARDS) == shard
    await asyncio.sleep(1)  # the victim folds it: the kill loses a fold in progress
    assert not watch.matching(in_round(ShardAggregated, round_id))
    aggregators[victim].send_signal(signal.SIGKILL)
    aggregators[victim].wait()
    for gate in gates:  # the victim's shard's later updates, and the others
        gate.set()
    return victim, shard


async def kill_the_reducer_before_its_reduce(
    watch: LogWatch,
    aggregators: Sequence[subprocess.Popen[bytes]],
    gates: Sequence[threading.Event],
    round_id: str,
    shard_of_process: Sequence[int],
    reducer: int,
) -> tuple[int, int]:
    """SIGKILL the reducer with every partial logged and no RoundAggregated: (victim, its shard)."""
    other, last = aggregators[1 - reducer], len(gates) - 1
    for gate in gates[:last]:
        gate.set()
    await watch.until(in_round(UpdateReceived, round_id), count=last)
    other.send_signal(signal.SIGSTOP)  # it cannot close the round, so its partial waits
    try:
        gates[last].set()
        await watch.until(in_round(ShardAggregated, round_id, shard=shard_of_process[reducer]))
        aggregators[reducer].send_signal(signal.SIGSTOP)  # it cannot read the other partial, to come
    finally:
        other.send_signal(signal.SIGCONT)
    await watch.until(in_round(ShardAggregated, round_id), count=SHARDS)
    await watch.caught_up()
    assert not watch.matching(in_round(RoundAggregated, round_id)), "the reduce came before the kill"
    aggregators[reducer].send_signal(signal.SIGKILL)
    aggregators[reducer].wait()
    return reducer, shard_of_process[1 - reducer]


async def test_the_audit_names_the_shard_whose_partial_was_forged(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    """A forger logs shard k's partial of round 1 before any aggregator runs (the round is closed, its
    updates all in): the right updates and weight, but the bytes of another sum, under their own
    (consistent) sha256. The aggregator, started then, sees shard k reported, folds only the other
    shard and reduces the forged partial into the model, so the model agrees with the logged
    partials; only the audit's re-fold of the shard can tell, and its mismatch must name the shard."""
    settings, names = dataclasses.replace(topics[0], database_url=database_url), topics[1]
    await asyncio.to_thread(upgrade, database_url)
    roles = [role_process(settings, "coordinator")]
    try:
        async with clients(settings, 3), LogWatch(settings, names) as watch:
            (session,) = await start_sessions(
                settings, names, 1, rounds=ROUNDS, round_timeout=60, shards=SHARDS
            )
            first = round_id_for(session, 1, Task.TRAINING)
            updates = [
                u
                for u in await watch.until(in_round(UpdateReceived, first), count=3)
                if isinstance(u, UpdateReceived)
            ]
            shard = shard_of(updates[0], SHARDS)
            mine = [u for u in updates if shard_of(u, SHARDS) == shard]
            honest = [(f"sum/{name}", partial_sum(array, mine)) for name, array in model()]
            forged = [(name, array.copy()) for name, array in honest]
            forged[0][1][0, 0] += 1.0
            producer = make_producer(settings)
            await producer.start()
            try:
                ref = await write_tensors(producer, names.tensors, derived_id(first, "forged"), forged)
                partial = ShardAggregated(
                    event_id=derived_id(first, "shard", str(shard)),
                    occurred_at=utc_now(),
                    session_id=session,
                    round_id=first,
                    shard=shard,
                    shards=SHARDS,
                    update_ids=tuple(u.update_id for u in mine),
                    total_weight=float(sum(u.num_examples for u in mine)),
                    partial=ref,
                )
                await publish(producer, names, [partial])
            finally:
                await producer.stop()
            roles.append(role_process(settings, "aggregator"))
            await wait_until_finished(settings, names, {session}, timeout=180)
    finally:
        for process in roles:
            stop_process(process)
    folded = await fold_log(settings, names)
    logged = [e for e, o in folded if o.applied and in_round(ShardAggregated, first, shard=shard)(e)]
    assert logged == [partial], "the forged partial is not the one the log holds"
    audit = await verify_models(settings)
    assert (audit.rounds_checked, audit.partials_checked) == (ROUNDS, ROUNDS * SHARDS)
    (mismatch,) = audit.mismatches  # the model is the reduce of the logged partials: only the shard
    assert (mismatch.session_id, mismatch.round_id) == (session, first)
    assert mismatch.detail == f"shard {shard}: the same updates fold to another model"
    assert mismatch.logged.sha256 == ref.sha256 == sha256_of(forged)
    assert mismatch.refolded is not None and mismatch.refolded.sha256 == sha256_of(honest)
