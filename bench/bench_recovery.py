"""Recovery after SIGKILL: how long until a role restarted at once works again, with and without
static group membership (ROUNDLOG_INSTANCE_ID).

Each role runs as a real ``roundlog serve --role ROLE`` process on the embedded stack, alone in
its group. It is SIGKILLed, restarted at once, and a probe goes into the log right after the
restart; the time from the kill to the probe's effect, seen from outside the process, is the
recovery time:

- projector: a ClientHeartbeat whose client shows up in SQL (``clients`` table);
- coordinator: a SessionStarted answered by the coordinator's RoundRequested;
- aggregator: a round with its updates in the log answered by a RoundAggregated.

The bound, measured the same way in the same run, is a cold start: a fresh process joining the
empty group and answering a probe. A restart cannot beat it (it is process start + join), so
recovery / cold start near 1 means the dead member costs nothing.

    python bench/bench_recovery.py --reps 3 --session-timeout-ms 10000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import psycopg
import sqlalchemy as sa
from machine import describe
from rounds import collecting_round

from roundlog.bus import Topics, create_topics, make_consumer, make_producer, publish, read_from_end
from roundlog.client import import_model, start_session
from roundlog.clock import utc_now
from roundlog.config import Settings
from roundlog.domain.events import (
    ClientHeartbeat,
    ClientRole,
    RoundAggregated,
    RoundConfig,
    RoundRequested,
    UpdateReceived,
    update_id_for,
)
from roundlog.embedded import stack_settings
from roundlog.projections.schema import upgrade
from roundlog.projections.writer import libpq_url
from roundlog.roles.stream import Entry
from roundlog.tensors import write_tensors

ROLES = ("projector", "coordinator", "aggregator")
#: A probe puts something into the log and returns a coroutine that waits for the role's answer.
Probe = Callable[[], Awaitable[Callable[[], Awaitable[None]]]]


def arrays(seed: int) -> list[tuple[str, np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(seed)
    return [("w", rng.standard_normal((32, 8)).astype(np.float32))]


class Bench:
    """One role's group on fresh topics (and database): start, kill, probe."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.settings, self.role = settings, role
        self.topics = Topics.from_prefix(settings.topic_prefix)
        self.producer = make_producer(settings)
        self.watcher = make_consumer(settings)
        self.seen: list[object] = []
        self.model: tuple[str, Any] | None = None

    async def start(self) -> None:
        await create_topics(self.settings)
        await self.producer.start()
        await self.watcher.start()
        await read_from_end(self.watcher, self.topics.events)
        if self.role != "projector":
            self.model = await import_model(self.producer, self.topics, arrays(0))

    async def stop(self) -> None:
        await self.watcher.stop()
        await self.producer.stop()

    def spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "roundlog", "serve", "--role", self.role],
            env={**os.environ, **self.settings.env(), "ROUNDLOG_METRICS_PORT": "0", **env},
            stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL,
        )

    async def answered(self, found: Callable[[object], bool]) -> None:
        while not any(found(e) for e in self.seen):
            for records in (await self.watcher.getmany(timeout_ms=50)).values():
                self.seen += [Entry.of(r).decoded for r in records]

    async def probe(self) -> Callable[[], Awaitable[None]]:
        """Put the role's probe into the log; return what waits for its effect."""
        if self.role == "projector":
            client = f"probe-{uuid.uuid4().hex[:8]}"
            beat = ClientHeartbeat(
                event_id=str(uuid.uuid4()),
                occurred_at=utc_now(),
                client_id=client,
                roles=(ClientRole.TRAINER,),
            )
            await publish(self.producer, self.topics, [beat])
            return lambda: self.in_sql(client)
        assert self.model is not None
        model_id, ref = self.model
        if self.role == "coordinator":
            config = RoundConfig(buffer_size=-1, round_timeout=3600)
            sid = await start_session(
                self.producer, self.topics, model_id=model_id, model=ref, rounds=1, config=config
            )
            return lambda: self.answered(lambda e: isinstance(e, RoundRequested) and e.session_id == sid)
        rid = await self.round(model_id, ref)
        return lambda: self.answered(lambda e: isinstance(e, RoundAggregated) and e.round_id == rid)

    async def round(self, model_id: str, ref: Any) -> str:
        """A training round with two updates in: all the aggregator needs to aggregate it."""
        clients = ("a", "b")
        sid, rid, events = collecting_round(model_id, ref, clients)
        ids: dict[str, Any] = {"session_id": sid, "round_id": rid}
        now = utc_now()
        for n, client in enumerate(clients):
            key = update_id_for(rid, client)
            update = await write_tensors(self.producer, self.topics.tensors, key, arrays(n + 1))
            events.append(
                UpdateReceived(
                    event_id=str(uuid.uuid4()),
                    occurred_at=now,
                    client_id=client,
                    update_id=key,
                    num_examples=10 + n,
                    tensor=update,
                    **ids,
                )
            )
        await publish(self.producer, self.topics, events)
        return rid

    async def in_sql(self, client: str) -> None:
        async with await psycopg.AsyncConnection.connect(libpq_url(self.settings.database_url)) as conn:
            while not await (
                await conn.execute("SELECT 1 FROM clients WHERE client_id = %s", (client,))
            ).fetchone():
                await asyncio.sleep(0.05)

    async def timed(self, since: float) -> float:
        """Probe now; seconds from ``since`` until the role answered it."""
        wait = await self.probe()
        async with asyncio.timeout(120):
            await wait()
        return time.monotonic() - since


def fresh_database(settings: Settings) -> Settings:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    server = sa.create_engine(settings.database_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with server.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    server.dispose()
    url = sa.make_url(settings.database_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return dataclasses.replace(settings, database_url=url)


async def measure(settings: Settings, role: str, static: bool, reps: int) -> dict[str, Any]:
    run = dataclasses.replace(settings, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}")
    if role == "projector":
        run = await asyncio.to_thread(fresh_database, run)
    env = {"ROUNDLOG_INSTANCE_ID": f"bench-{role}-0"} if static else {}
    bench = Bench(run, role)
    await bench.start()
    began = time.monotonic()
    process = bench.spawn(env)
    try:
        cold = await bench.timed(began)
        recoveries = []
        for _ in range(reps):
            await asyncio.sleep(1.0)
            process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            process.wait()
            process = bench.spawn(env)
            recoveries.append(await bench.timed(killed))
            print(
                f"  {role} {'static' if static else 'dynamic'}: recovered in {recoveries[-1]:.1f}s",
                flush=True,
            )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        await bench.stop()
    return {"role": role, "static": static, "cold": cold, "recoveries": recoveries}


async def main(arguments: argparse.Namespace) -> None:
    rows = []
    with stack_settings() as stack:
        settings = dataclasses.replace(stack, group_session_timeout_ms=arguments.session_timeout_ms)
        for role in arguments.roles:
            for static in (False, True):
                rows.append(await measure(settings, role, static, arguments.reps))
                print(rows[-1], flush=True)
    print(f"\nmachine: {describe()}")
    print(f"session timeout {arguments.session_timeout_ms} ms, {arguments.reps} kills per row\n")
    print("| role | membership | cold start s | recovery s, median | min-max | recovery / cold start |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        median = statistics.median(r["recoveries"])
        print(
            f"| {r['role']} | {'static' if r['static'] else 'dynamic'} | {r['cold']:.1f} | {median:.1f} "
            f"| {min(r['recoveries']):.1f}-{max(r['recoveries']):.1f} | {median / r['cold']:.1f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--session-timeout-ms", type=int, default=10_000)
    asyncio.run(main(parser.parse_args()))
