"""Fresh, isolated room on the test stack: topics under a new prefix, and a new database, removed after."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator

import sqlalchemy as sa
from aiokafka.admin import AIOKafkaAdminClient

from roundlog.bus import Topics, create_topics
from roundlog.config import Settings


@contextlib.asynccontextmanager
async def fresh_topics(stack: Settings) -> AsyncIterator[tuple[Settings, Topics]]:
    """Settings with a fresh topic prefix, and its topics created (deleted afterwards)."""
    settings = dataclasses.replace(stack, topic_prefix=f"test-{uuid.uuid4().hex[:12]}")
    names = Topics.from_prefix(settings.topic_prefix)
    await create_topics(settings)
    try:
        yield settings, names
    finally:
        admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
        await admin.start()
        try:
            await admin.delete_topics(list(names.all()))
        finally:
            await admin.close()


@contextlib.contextmanager
def fresh_database(stack: Settings) -> Iterator[str]:
    """The SQLAlchemy URL of a fresh, empty database on the stack's server (dropped afterwards)."""
    name = f"test_{uuid.uuid4().hex}"
    server = sa.create_engine(stack.database_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with server.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(stack.database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()
