"""End-to-end aggregation through the broker: fold throughput and the aggregator's peak memory.

For each client count, one training round of N clients x a 4 MB float32 update runs
through the embedded broker; the aggregator is a real ``roundlog serve --role
aggregator`` subprocess. Reported per run:

- fold throughput: update bytes / the fold time the aggregator itself records in
  RoundAggregated.time_aggregation (chunks read by offset from the broker and folded);
- end to end: update bytes / wall time from the first UpdateReceived produced to the
  RoundAggregated read back (includes the consumer group join);
- peak RSS of the aggregator process (VmHWM), against the goal 3 x model + 200 MB.

Clients reuse a few distinct update blobs (each UpdateReceived still streams its blob
from the broker), so 3,000 clients do not need 12 GB of broker memory.

    python bench/bench_aggregator.py --clients 100 1000 3000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
from machine import describe
from rounds import collecting_round, updates

from roundlog.bus import Topics, create_topics, make_consumer, make_producer, publish
from roundlog.config import Settings
from roundlog.domain.events import (
    RoundAggregated,
)
from roundlog.embedded import stack_settings
from roundlog.roles.stream import Entry
from roundlog.tensors import write_tensors

MB = 1_000_000


def model(seed: int, megabytes: int) -> list[tuple[str, np.ndarray]]:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    params = megabytes * MB // 4
    return [
        ("dense_1/kernel", rng.standard_normal((params // 2 // 1000, 1000)).astype(np.float32)),
        ("dense_2/kernel", rng.standard_normal((params // 2 // 500, 500)).astype(np.float32)),
    ]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def one_round(settings: Settings, clients: int, megabytes: int, distinct: int) -> dict[str, float]:
    topics = Topics.from_prefix(settings.topic_prefix)
    await create_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    base = model(0, megabytes)
    base_ref = await write_tensors(producer, topics.tensors, "base", base)
    blobs = [
        await write_tensors(producer, topics.tensors, f"blob-{i}", model(i + 1, megabytes))
        for i in range(distinct)
    ]
    update_bytes = sum(b.nbytes for b in blobs) / distinct

    process = subprocess.Popen(
        [sys.executable, "-m", "roundlog", "serve", "--role", "aggregator"],
        env={**os.environ, **settings.env()},
    )
    names = [f"client-{i}" for i in range(clients)]
    sid, rid, setup = collecting_round("base", base_ref, tuple(names))
    submitted = updates(sid, rid, names, [blobs[i % distinct] for i in range(len(names))])
    await publish(producer, topics, setup)
    started = time.perf_counter()
    await publish(producer, topics, submitted)
    consumer = make_consumer(settings)
    await consumer.start()
    consumer.subscribe([topics.events])
    aggregated: RoundAggregated | None = None
    while aggregated is None:
        for records in (await consumer.getmany(timeout_ms=500)).values():
            for record in records:
                if isinstance(event := Entry.of(record).decoded, RoundAggregated):
                    aggregated = event
    wall = time.perf_counter() - started
    rss = peak_rss_mb(process.pid)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    await consumer.stop()
    await producer.stop()
    folded = clients * update_bytes / MB
    return {
        "clients": clients,
        "model_mb": base_ref.nbytes / MB,
        "fold_mb_s": folded / aggregated.time_aggregation,
        "e2e_mb_s": folded / wall,
        "peak_rss_mb": rss,
        "goal_rss_mb": 3 * base_ref.nbytes / MB + 200,
    }


async def main(arguments: argparse.Namespace) -> None:
    with stack_settings() as settings:
        rows = []
        for clients in arguments.clients:
            run = dataclasses.replace(settings, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}")
            rows.append(await one_round(run, clients, arguments.update_mb, arguments.distinct))
            print(rows[-1], flush=True)
    print(f"\nmachine: {describe()}")
    print("| clients | update MB | fold MB/s (goal >= 150) | end to end MB/s | peak RSS MB | goal RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']:,.0f} | {r['model_mb']:.1f} | {r['fold_mb_s']:.0f} | {r['e2e_mb_s']:.0f} "
            f"| {r['peak_rss_mb']:.0f} | {r['goal_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--update-mb", type=int, default=4)
    parser.add_argument("--distinct", type=int, default=8, help="distinct update blobs the clients share")
    asyncio.run(main(parser.parse_args()))
