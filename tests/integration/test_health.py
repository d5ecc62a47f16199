"""/healthz tells the truth: idle roles stay alive, a projector stuck on its database does not.

Each role runs as a real ``roundlog serve`` process with a stale limit of a few seconds; the
projector's database is wedged from the test with a real PostgreSQL lock, or made to fail with
a real missing table.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from roundlog.bus import Topics, make_producer, publish
from roundlog.clock import utc_now
from roundlog.config import Settings
from roundlog.domain.events import ClientHeartbeat, ClientRole
from roundlog.projections.writer import libpq_url

from tests.integration.harness import GROUP_SESSION_MS
from tests.integration.test_observability import free_port, health
from tests.integration.test_projector import prepared, query

#: The stale limit of the roles under test: short, so a stuck loop shows within seconds.
STALE = 2.0


@asynccontextmanager
async def serving(settings: Settings, role: str, log: Path) -> AsyncIterator[Callable[[], int]]:
    """``roundlog serve --role ROLE`` with a short stale limit, healthy once; yields its /healthz status."""
    port = free_port()
    env = {
        **os.environ,
        **settings.env(),
        "ROUNDLOG_METRICS_PORT": str(port),
        "ROUNDLOG_HEALTH_STALE_SECONDS": str(STALE),
        "ROUNDLOG_GROUP_SESSION_TIMEOUT_MS": str(GROUP_SESSION_MS),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "roundlog", "serve", "--role", role], env=env, stderr=out
        )

    def status() -> int:
        assert process.poll() is None, log.read_text()
        try:
            code, body = health(port)
        except urllib.error.URLError:
            return 0
        assert set(body["roles"]) <= {role}, body
        return code

    try:
        await until(lambda: status() == 200, 30)
        yield status
    finally:
        process.terminate()
        process.wait(timeout=60)


async def until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.1)


async def beat(settings: Settings, names: Topics, client_id: str) -> None:
    """One client heartbeat on the clients topic: a record the projector must write."""
    producer = make_producer(settings)
    await producer.start()
    try:
        event = ClientHeartbeat(
            event_id=uuid.uuid4().hex, occurred_at=utc_now(), client_id=client_id, roles=(ClientRole.TRAINER,)
        )
        await publish(producer, names, [event])
    finally:
        await producer.stop()


async def projected(settings: Settings, client_id: str) -> bool:
    return bool(await query(settings, "SELECT 1 FROM clients WHERE client_id = %s", client_id))


async def wait_projected(settings: Settings, client_id: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not await projected(settings, client_id):
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("role", ["projector", "aggregator", "coordinator"])
async def test_an_idle_role_stays_healthy_past_the_stale_limit(
    role: str, topics: tuple[Settings, Topics], database_url: str, tmp_path: Path
) -> None:
    settings, _ = prepared(topics, database_url) if role == "projector" else topics
    async with serving(settings, role, tmp_path / f"{role}.log") as status:
        began = time.monotonic()
        seen = set()
        while time.monotonic() - began < 3 * STALE:
            seen.add(status())
            await asyncio.sleep(0.2)
    assert seen == {200}


async def test_a_projector_blocked_by_a_table_lock_turns_unhealthy(
    topics: tuple[Settings, Topics], database_url: str, tmp_path: Path
) -> None:
    settings, names = prepared(topics, database_url)
    async with serving(settings, "projector", tmp_path / "projector.log") as status:
        await beat(settings, names, "before")
        await wait_projected(settings, "before")  # partitions assigned, first batch written

        async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as conn:
            await conn.execute("LOCK TABLE clients IN EXCLUSIVE MODE")  # reads pass, writes wait
            await beat(settings, names, "blocked")
            await until(lambda: status() == 503, STALE + 15)
            assert not await projected(settings, "blocked")
        # the lock went with the connection: the write goes through, the projector beats again
        await wait_projected(settings, "blocked")
        await until(lambda: status() == 200, 10)


async def test_a_projector_retrying_a_failing_database_turns_unhealthy(
    topics: tuple[Settings, Topics], database_url: str, tmp_path: Path
) -> None:
    settings, names = prepared(topics, database_url)
    async with serving(settings, "projector", tmp_path / "projector.log") as status:
        await beat(settings, names, "before")
        await wait_projected(settings, "before")

        await alter(settings, "ALTER TABLE clients RENAME TO clients_gone")  # every write fails
        await beat(settings, names, "failing")
        await until(lambda: status() == 503, STALE + 15)
        await alter(settings, "ALTER TABLE clients_gone RENAME TO clients")
        await wait_projected(settings, "failing", timeout=60)  # after its backoff
        await until(lambda: status() == 200, 10)
    assert "writing a batch failed" in (tmp_path / "projector.log").read_text()


async def alter(settings: Settings, sql: Any) -> None:
    async with await psycopg.AsyncConnection.connect(
        libpq_url(settings.database_url), autocommit=True
    ) as conn:
        await conn.execute(sql)
