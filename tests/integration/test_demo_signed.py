"""The demo with every party signing (``roundlog demo --auth signed``), on the test stack.

``demo.run`` returns 0 only when the session succeeded, the replay, which checks every
signature again, equals the live projections, and every model re-folds to its sha256.
"""

from __future__ import annotations

import dataclasses
import uuid

import sqlalchemy as sa

from roundlog import demo
from roundlog.config import Settings


def test_the_demo_runs_signed_end_to_end(stack: Settings, database_url: str) -> None:
    settings = dataclasses.replace(
        stack, topic_prefix=f"test-{uuid.uuid4().hex[:12]}", database_url=database_url
    )
    assert demo.run(settings, demo.Options(clients=3, rounds=2, stragglers=1, signed=True)) == 0
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            unsigned = conn.execute(sa.text("SELECT count(*) FROM events WHERE key_id IS NULL")).scalar()
            authors = conn.execute(
                sa.text(
                    "SELECT count(DISTINCT assigned_by), count(*) FROM round_authors WHERE task = 'training'"
                )
            ).one()
            refused = conn.execute(
                sa.text(
                    "SELECT count(*) FROM rejected_events WHERE reason IN "
                    "('unsigned', 'bad_signature', 'unknown_key', 'revoked_key', 'not_permitted')"
                )
            ).scalar()
    finally:
        engine.dispose()
    assert unsigned == 0 and refused == 0
    assert tuple(authors) == (1, 2)  # one roles key assigned both training rounds
