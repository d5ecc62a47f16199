"""Shared fixtures: one real broker and one real PostgreSQL per test session, isolated per test.

With ROUNDLOG_KAFKA_BOOTSTRAP and ROUNDLOG_DATABASE_URL set, the tests use those
servers; otherwise they start the embedded stack once, with Tansu, or with a 3-node
Apache Kafka cluster when ROUNDLOG_TEST_BROKER=kafka (``make test-kafka``). Each test gets its own topic
prefix and its own database, so tests never see each other's data.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from roundlog.bus import Topics
from roundlog.config import Settings
from roundlog.embedded import stack_settings

from tests.servers import fresh_database, fresh_topics

BROKER = os.environ.get("ROUNDLOG_TEST_BROKER", "tansu")


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    with stack_settings(broker=BROKER, brokers=3 if BROKER == "kafka" else 1) as settings:
        yield settings


@pytest.fixture
async def topics(stack: Settings) -> AsyncIterator[tuple[Settings, Topics]]:
    """Settings with a fresh topic prefix, and its topics created (deleted afterwards)."""
    async with fresh_topics(stack) as created:
        yield created


@pytest.fixture
def database_url(stack: Settings) -> Iterator[str]:
    """The SQLAlchemy URL of a fresh, empty database on the stack's server (dropped afterwards)."""
    with fresh_database(stack) as url:
        yield url
