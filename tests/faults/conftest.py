"""A 3-node Apache Kafka cluster of each fault test's own, so what one test breaks no other sees."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator

import pytest

from roundlog.bus import Topics
from roundlog.config import Settings
from roundlog.embedded import EmbeddedStack, stack_settings

from tests.servers import fresh_topics


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    """The shared servers, for their PostgreSQL only: the embedded stack's single-binary broker
    goes unused, which spares a second Kafka cluster beside each test's own."""
    with stack_settings() as settings:
        yield settings


@pytest.fixture
def cluster() -> Iterator[EmbeddedStack]:
    """Three combined broker+controller nodes (PostgreSQL comes from the shared stack)."""
    with EmbeddedStack(broker="kafka", brokers=3, postgres=False) as stack:
        yield stack


@pytest.fixture
async def on_cluster(
    cluster: EmbeddedStack, stack: Settings, database_url: str
) -> AsyncIterator[tuple[Settings, Topics]]:
    """Settings for this test's cluster and a fresh database, with roundlog's topics created on it."""
    assert cluster.kafka_bootstrap is not None
    base = dataclasses.replace(
        stack, kafka_bootstrap=cluster.kafka_bootstrap, kafka_idempotence=True, database_url=database_url
    )
    async with fresh_topics(base) as created:
        yield created
