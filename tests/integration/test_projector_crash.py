"""Exactly once under crashes: SIGKILL the projector process at random moments while events flow.

Every table must end up equal to a clean projection of the same log, which the replay
builds from offset 0 into a schema of its own and compares row by row.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from roundlog.bus import Topics
from roundlog.config import Settings
from roundlog.replay import replay

from tests.integration.test_projector import Record, caught_up, prepared, produce, query, records_of, traffic

KILLS = 5


def spawn(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.env(), "ROUNDLOG_METRICS_PORT": "0"}  # any free port
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "roundlog", "-v", "serve", "--role", "projector"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def restores(log: Path) -> int:
    """How many events partitions the projector processes restored so far (one log line each)."""
    return log.read_text(errors="replace").count("re-folded offsets")


def corrupt(names: Topics, rng: random.Random) -> list[Record]:
    return [
        (names.events, b"s0", rng.randbytes(40)),
        (names.events, b"s1", b"\xc3\x01" + rng.randbytes(3)),
        (names.clients, b"c0", b"\xc3\x01" + bytes(8) + b"body"),
    ]


async def stream(settings: Settings, records: list[Record], chunks: int) -> None:
    """Produce in chunks spread over a few seconds, so that kills land while records flow."""
    size = len(records) // chunks + 1
    for start in range(0, len(records), size):
        await produce(settings, records[start : start + size])
        await asyncio.sleep(0.25)


async def test_sigkilled_projector_projects_every_event_exactly_once(
    topics: tuple[Settings, Topics], database_url: str, tmp_path: Path
) -> None:
    settings, names = prepared(topics, database_url)
    rng = random.Random(11)
    records = records_of(names, traffic(seed=11, sessions=60, rounds=4, clients=8))
    for record in corrupt(names, rng):
        records.insert(rng.randrange(len(records)), record)
    assert len(records) > 2000

    log = tmp_path / "projector.log"
    process = spawn(settings, log)
    producing = asyncio.create_task(stream(settings, records, chunks=40))
    kills = 0
    try:
        while kills < KILLS:
            # Once this process has restored its partitions, at a random moment of its work.
            async with asyncio.timeout(30):
                while restores(log) < (kills + 1) * 6:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0.0, 1.2))
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            process = spawn(settings, log)
        await producing
        await caught_up(settings, names, timeout=60)
    finally:
        producing.cancel()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)

    assert not producing.cancelled(), "the stream was still flowing when the last kill landed"
    text = log.read_text(errors="replace")
    (events,) = await query(settings, "SELECT count(*) FROM events")
    assert events[0] > 1500
    rejected = await query(
        settings, "SELECT reason FROM rejected_events WHERE reason IN ('bad_magic', 'truncated')"
    )
    assert len(rejected) >= 2

    report = await replay(settings, "clean")
    assert report.identical and not report.lagging, report.render() + "\n" + text[-3000:]
