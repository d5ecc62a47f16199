"""What the end-to-end tests share: roles as real processes, simulated clients, reading the log back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psycopg

from roundlog.bus import Topics, make_consumer, make_producer
from roundlog.client import FederatedClient, SignedDeployment, import_model, start_session
from roundlog.codec import DecodeError, decode
from roundlog.config import Settings
from roundlog.domain.events import Event, RoundAggregated, RoundConfig, SessionFinished
from roundlog.domain.session import Outcome
from roundlog.roles.projector import consumer_name
from roundlog.roles.stream import PartitionFold, read_range

E = TypeVar("E", bound=Event)

#: Short group sessions, so a killed member's partitions move on within seconds: the shortest
#: Apache Kafka accepts by default (``group.min.session.timeout.ms``).
GROUP_SESSION_MS = 6000
FAST_GROUPS = {"ROUNDLOG_GROUP_SESSION_TIMEOUT_MS": str(GROUP_SESSION_MS), "ROUNDLOG_METRICS_PORT": "0"}


def role_process(
    settings: Settings, role: str, log: Path | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """``roundlog serve --role ROLE`` as a real process on the test's topics (and database);
    its log lines go to ``log`` (as JSON, one per line) when given, else to the test's stderr."""
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("ab")) if log is not None else None
        json_log = {"ROUNDLOG_LOG_FORMAT": "json"} if log is not None else {}
        return subprocess.Popen(
            [sys.executable, "-m", "roundlog", "serve", "--role", role],
            env={**os.environ, **settings.env(), **FAST_GROUPS, **json_log, **env},
            stderr=stderr,
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)


def model() -> list[tuple[str, np.ndarray[Any, Any]]]:
    return [("w", np.zeros((16, 8), np.float32)), ("b", np.zeros(8, np.float32))]


def trainer(k: int, seconds: float = 0.0) -> Any:
    """Client k's training: a deterministic step away from the model, weighted by 10 + k examples,
    taking ``seconds`` (so a session can be made to last)."""

    def train(arrays: Sequence[tuple[str, np.ndarray[Any, Any]]], config: RoundConfig) -> Any:
        time.sleep(seconds)
        step = [(name, (a + np.float32(0.1 * (k + 1))).astype(a.dtype)) for name, a in arrays]
        return step, 10 + k, {"loss": 1.0 / (k + 1)}

    return train


def validator(arrays: Sequence[tuple[str, np.ndarray[Any, Any]]], config: RoundConfig) -> Any:
    return 5, {"mean": float(np.mean(arrays[0][1]))}


def client_ids(count: int) -> list[str]:
    return [f"client-{k}" for k in range(count)]


@contextlib.asynccontextmanager
async def clients(
    settings: Settings,
    count: int,
    train_seconds: float = 0.0,
    signed: SignedDeployment | None = None,
    **options: Any,
) -> AsyncIterator[list[FederatedClient]]:
    """``count`` simulated clients that train and validate, running until the block ends; each
    signs with its own key of ``signed`` when given."""
    stop = asyncio.Event()
    fleet = [
        FederatedClient(
            settings if signed is None else signed.clients[client_id],
            client_id,
            train=trainer(k, train_seconds),
            validate=validator,
            heartbeat_every=0.5,
            **options,
        )
        for k, client_id in enumerate(client_ids(count))
    ]
    tasks = [asyncio.create_task(c.run(stop)) for c in fleet]
    try:
        yield fleet
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def start_sessions(
    settings: Settings,
    topics: Topics,
    count: int,
    *,
    rounds: int,
    round_timeout: float,
    arrays: Sequence[tuple[str, np.ndarray[Any, Any]]] | None = None,
    shards: int = 1,
    **options: Any,
) -> list[str]:
    """Import ``arrays`` (``model()`` by default) and start ``count`` sessions of ``rounds`` rounds on
    it, each round waiting for every assigned client for up to ``round_timeout`` seconds."""
    producer = make_producer(settings)
    await producer.start()
    try:
        model_id, ref = await import_model(producer, topics, model() if arrays is None else arrays)
        config = RoundConfig(round_timeout=round_timeout, buffer_size=-1, shards=shards)
        return [
            await start_session(
                producer, topics, model_id=model_id, model=ref, rounds=rounds, config=config, **options
            )
            for _ in range(count)
        ]
    finally:
        await producer.stop()


async def fold_log(settings: Settings, topics: Topics) -> list[tuple[Event, Outcome]]:
    """Fold every partition of the events topic as any role does, signatures checked where
    ``settings`` sign; every decodable event with what it did."""
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(await consumer.topic_partitions(topics.events))
        folded = []
        for tp, end in ends.items():
            fold = PartitionFold.for_settings(tp.partition, len(ends), settings)
            async for e in read_range(consumer, topics.events, tp.partition, 0, end):
                if not isinstance(e.decoded, DecodeError):
                    folded.append((e.decoded, fold.apply(e.offset, e.decoded, e.logged_at, e.seal)))
        return folded
    finally:
        await consumer.stop()


async def wait_until_finished(settings: Settings, topics: Topics, sessions: set[str], timeout: float) -> None:
    consumer = make_consumer(settings)
    await consumer.start()
    consumer.subscribe([topics.events])
    left = set(sessions)
    try:
        async with asyncio.timeout(timeout):
            while left:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        event = decode(record.value or b"")
                        if isinstance(event, SessionFinished):
                            left.discard(event.session_id)
    finally:
        await consumer.stop()


async def first_event(settings: Settings, topics: Topics, kind: type[E]) -> E:
    """The first event of type ``kind`` in the events topic (waiting for it)."""
    consumer = make_consumer(settings)
    await consumer.start()
    consumer.subscribe([topics.events])
    try:
        async with asyncio.timeout(120):
            while True:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        if isinstance(event := decode(record.value or b""), kind):
                            return event
    finally:
        await consumer.stop()


async def first_aggregate(settings: Settings, topics: Topics) -> RoundAggregated:
    return await first_event(settings, topics, RoundAggregated)


async def caught_up(settings: Settings, topics: Topics) -> None:
    """Wait until the surviving projector has committed every partition's end offset to PostgreSQL."""
    consumer = make_consumer(settings)
    await consumer.start()
    ends = await consumer.end_offsets(await consumer.topic_partitions(topics.events))
    await consumer.stop()
    url = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    async with asyncio.timeout(90):
        while True:
            async with await psycopg.AsyncConnection.connect(url) as conn:
                query = (
                    "SELECT partition, next_offset FROM projector_offsets WHERE consumer = %s AND topic = %s"
                )
                rows = await (await conn.execute(query, (consumer_name(settings), topics.events))).fetchall()
            done = {p: o for p, o in rows}
            if all(done.get(tp.partition, 0) >= end for tp, end in ends.items()):
                return
            await asyncio.sleep(0.5)
