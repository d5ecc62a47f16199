"""Broker faults on a real 3-node Apache Kafka cluster, survived.

Each test runs several sessions through all three roles (real processes) on a cluster of its
own, does one thing to a broker mid-session, and then holds the run to the bar of a run
without faults: every session finishes, every round is aggregated exactly once from every
update the fold accepted for it, ``replay --verify-models`` re-folds every model bit for bit,
and the replay is identical. What the roles logged and the longest stall of the log after
the fault are printed (``make test-kafka`` shows them; docs/operations.md quotes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from roundlog.audit import verify_models
from roundlog.bus import Consumer, Topics, make_consumer
from roundlog.codec import DecodeError, decode
from roundlog.config import Settings
from roundlog.domain.events import (
    ClientsAssigned,
    Event,
    RoundAggregated,
    RoundFailed,
    SessionFinished,
    UpdateReceived,
)
from roundlog.embedded import EmbeddedStack
from roundlog.kafka_cluster import KafkaCluster
from roundlog.projections.schema import upgrade
from roundlog.replay import replay

from tests.integration.harness import (
    caught_up,
    clients,
    fold_log,
    role_process,
    start_sessions,
    stop_process,
    wait_until_finished,
)

SESSIONS = 3
ROUNDS = 4
CLIENTS = 4
ROLES = ("coordinator", "aggregator", "projector")
#: 4 MiB per update, four chunks: the aggregator is mid-stream for a while when a broker dies.
MODEL_FLOATS = 1 << 20
#: How long a killed broker stays down before it is restarted.
DOWN_S = 5.0


@dataclasses.dataclass
class Fault:
    """What was done to the cluster, and when (wall clock, seconds)."""

    description: str
    started: float


class LogWatcher:
    """Every events record as it arrives, with its partition and broker timestamp."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self.settings, self.topics = settings, topics
        self.seen: list[tuple[float, int, Event]] = []
        self._arrived = asyncio.Condition()
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = make_consumer(self.settings)
        await self._consumer.start()
        partitions = await self._consumer.topic_partitions(self.topics.events)
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._follow(self._consumer))

    async def _follow(self, consumer: Consumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            async with self._arrived:
                for tp, records in batch.items():
                    for record in records:
                        event = decode(record.value or b"")
                        if not isinstance(event, DecodeError):
                            self.seen.append((record.timestamp / 1000, tp.partition, event))
                self._arrived.notify_all()

    async def first(self, wanted: Callable[[Event], bool], after: int = 0) -> tuple[int, Event]:
        """The partition and event of the first record from position ``after`` on that is ``wanted``."""
        async with asyncio.timeout(180), self._arrived:
            while True:
                for _, partition, event in self.seen[after:]:
                    if wanted(event):
                        return partition, event
                await self._arrived.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def longest_stall(self, since: float) -> float:
        """The longest time, from ``since`` on, in which no event reached the log."""
        times = sorted(t for t, _, _ in self.seen if t >= since)
        return max((b - a for a, b in zip([since, *times], times, strict=False)), default=0.0)


@dataclasses.dataclass
class Context:
    stack: EmbeddedStack
    settings: Settings
    topics: Topics
    log: LogWatcher

    @property
    def cluster(self) -> KafkaCluster:
        assert self.stack.kafka_cluster is not None
        return self.stack.kafka_cluster


async def _describe(settings: Settings, topics: list[str]) -> list[dict[str, object]]:
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        described: list[dict[str, object]] = await admin.describe_topics(topics)
        return described
    finally:
        await admin.close()


async def leader_of(settings: Settings, topic: str, partition: int) -> int:
    [described] = await _describe(settings, [topic])
    [found] = [p for p in described["partitions"] if p["partition"] == partition]
    leader: int = found["leader"]
    return leader


async def fully_replicated(settings: Settings, topics: Topics, timeout: float = 120) -> None:
    """Wait until every partition of roundlog's topics has all three replicas in sync."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                described = await _describe(settings, list(topics.all()))
            except KafkaError:  # the node asked is the one just restarted, not ready yet: not in sync either
                described = []
            partitions = [p for t in described for p in t["partitions"]]
            if partitions and all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in partitions):
                return
            await asyncio.sleep(0.5)


async def _mid_session(ctx: Context) -> tuple[int, int]:
    """Wait until some session's first round is aggregated: its events partition, and the position
    in the log after it."""
    partition, _ = await ctx.log.first(lambda e: isinstance(e, RoundAggregated))
    return partition, len(ctx.log.seen)


async def kill_the_events_leader(ctx: Context) -> Fault:
    partition, after = await _mid_session(ctx)
    await ctx.log.first(lambda e: isinstance(e, ClientsAssigned), after=after)
    node = await leader_of(ctx.settings, ctx.topics.events, partition)
    started = time.time()
    ctx.cluster.signal(node, signal.SIGKILL)
    await asyncio.sleep(DOWN_S)
    ctx.stack.restart_node(node)
    return Fault(f"SIGKILL node {node} (leads events[{partition}]), restarted {DOWN_S:.0f} s later", started)


async def kill_while_tensors_stream(ctx: Context) -> Fault:
    _, after = await _mid_session(ctx)
    _, update = await ctx.log.first(lambda e: isinstance(e, UpdateReceived), after=after)
    assert isinstance(update, UpdateReceived)
    node = await leader_of(ctx.settings, ctx.topics.tensors, update.tensor.partition)
    started = time.time()
    ctx.cluster.signal(node, signal.SIGKILL)
    await asyncio.sleep(DOWN_S)
    ctx.stack.restart_node(node)
    return Fault(
        f"SIGKILL node {node} (leads tensors[{update.tensor.partition}]) as the aggregator reads "
        f"{update.update_id[:8]}, restarted {DOWN_S:.0f} s later",
        started,
    )


async def restart_every_broker_in_turn(ctx: Context) -> Fault:
    await _mid_session(ctx)
    started = time.time()
    for node in ctx.cluster.nodes:
        assert node.process is not None
        node.process.terminate()  # a controlled shutdown: leaderships move away first
        await asyncio.to_thread(node.process.wait, 120)
        ctx.stack.restart_node(node.node_id)
        await fully_replicated(ctx.settings, ctx.topics)
    return Fault(
        f"rolling restart of nodes 1-3 (SIGTERM, restart, in sync), {time.time() - started:.0f} s", started
    )


async def pause_the_group_coordinator(ctx: Context) -> Fault:
    await _mid_session(ctx)
    admin = AIOKafkaAdminClient(**ctx.settings.kafka_client_kwargs())
    await admin.start()
    try:
        node = await admin.find_coordinator(f"{ctx.settings.topic_prefix}.aggregator")
    finally:
        await admin.close()
    paused = max(15.0, 3 * ctx.settings.group_session_timeout_ms / 1000)
    started = time.time()
    ctx.cluster.signal(node, signal.SIGSTOP)
    try:
        await asyncio.sleep(paused)
    finally:
        ctx.cluster.signal(node, signal.SIGCONT)
    return Fault(f"SIGSTOP node {node} (the aggregators' group coordinator) for {paused:.0f} s", started)


FAULTS: list[Callable[[Context], Awaitable[Fault]]] = [
    kill_the_events_leader,
    kill_while_tensors_stream,
    restart_every_broker_in_turn,
    pause_the_group_coordinator,
]


async def finished_while_roles_run(
    settings: Settings,
    topics: Topics,
    sessions: set[str],
    roles: dict[str, subprocess.Popen[bytes]],
    logs: dict[str, Path],
) -> None:
    """Wait for every session to finish; a role that exits meanwhile fails the test at once."""
    waiting = asyncio.create_task(wait_until_finished(settings, topics, sessions, timeout=400))
    while not waiting.done():
        if dead := [role for role, process in roles.items() if process.poll() is not None]:
            waiting.cancel()
            tails = "\n".join(f"{role}: {logs[role].read_text(errors='replace')[-3000:]}" for role in dead)
            pytest.fail(f"{', '.join(dead)} exited mid-run:\n{tails}")
        await asyncio.wait([waiting], timeout=1)
    waiting.result()


def _role_logs(logs: dict[str, Path]) -> str:
    """Each role's warnings and errors, counted by message."""
    lines = []
    for role, path in logs.items():
        said: Counter[str] = Counter()
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                    said[f"{entry['level']} {entry.get('logger')}: {str(entry.get('message'))[:120]}"] += 1
        lines += [f"  {role}: {n}x {message}" for message, n in said.most_common(8)] or [f"  {role}: nothing"]
    return "\n".join(lines)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__ for f in FAULTS])
async def test_sessions_survive(
    fault: Callable[[Context], Awaitable[Fault]],
    cluster: EmbeddedStack,
    on_cluster: tuple[Settings, Topics],
    tmp_path: Path,
) -> None:
    settings, names = on_cluster
    await asyncio.to_thread(upgrade, settings.database_url)
    logs = {role: tmp_path / f"{role}.log" for role in ROLES}
    roles: list[subprocess.Popen[bytes]] = [role_process(settings, role, logs[role]) for role in ROLES]
    watcher = LogWatcher(settings, names)
    await watcher.start()
    try:
        async with clients(settings, CLIENTS, train_seconds=0.5):
            big = [("w", np.zeros(MODEL_FLOATS, np.float32))]
            sessions = set(
                await start_sessions(settings, names, SESSIONS, rounds=ROUNDS, round_timeout=120, arrays=big)
            )
            done = await fault(Context(cluster, settings, names, watcher))
            await finished_while_roles_run(
                settings, names, sessions, dict(zip(ROLES, roles, strict=True)), logs
            )
        finished_at = time.time()
        await caught_up(settings, names)
    finally:
        for process in roles:
            stop_process(process)
        await watcher.stop()
    print(
        f"\n{done.description}: sessions done {finished_at - done.started:.1f} s after the fault began; "
        f"longest stall of the log {watcher.longest_stall(done.started):.1f} s\n{_role_logs(logs)}"
    )

    applied = [event for event, outcome in await fold_log(settings, names) if outcome.applied]
    finished = [e for e in applied if isinstance(e, SessionFinished)]
    assert {e.session_id for e in finished} == sessions and all(e.succeeded for e in finished), [
        f"{e.reason} ({e.detail})" for e in applied if isinstance(e, RoundFailed)
    ]
    assert all(e.occurred_at.timestamp() > done.started for e in finished), "a session ended before the fault"
    aggregated = [e for e in applied if isinstance(e, RoundAggregated)]
    assert Counter((e.session_id, e.round_id) for e in aggregated) == Counter(
        {(e.session_id, e.round_id): 1 for e in aggregated}
    )
    assert len(aggregated) == SESSIONS * ROUNDS
    accepted: dict[str, set[str]] = {}
    for e in applied:
        if isinstance(e, UpdateReceived):
            accepted.setdefault(e.round_id, set()).add(e.update_id)
    assert {e.round_id: set(e.update_ids) for e in aggregated} == accepted, (
        "an accepted update was not folded"
    )

    engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        models = conn.execute(
            sa.text("SELECT round_id, count(*) FROM models WHERE origin = 'aggregated' GROUP BY round_id")
        ).all()
    engine.dispose()
    assert sorted(models) == sorted((e.round_id, 1) for e in aggregated)

    audit = await verify_models(settings)
    assert audit.rounds_checked == SESSIONS * ROUNDS and audit.ok, audit.mismatches
    report = await replay(settings, "fault_replay")
    assert report.identical, report.render()
