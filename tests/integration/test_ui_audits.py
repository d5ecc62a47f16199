"""``replay --verify-models`` keeps its verdict on each model in ``model_audits``, for the dashboard."""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa

from roundlog.audit import AuditReport, verify_models
from roundlog.bus import Topics, make_producer, publish
from roundlog.config import Settings
from roundlog.domain.events import RoundAggregated, RoundConfig
from roundlog.projections.audits import record_audits
from roundlog.projections.schema import upgrade
from roundlog.tensors import write_tensors

from tests.builders import Script, uid
from tests.integration.test_aggregator import client_update, running_aggregator, training_round, wait_for

VERDICTS = (
    "SELECT model_id, session_id, round_id, sha256, verified, detail FROM model_audits ORDER BY session_id"
)


def rows(database_url: str, sql: str) -> list[tuple[object, ...]]:
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


async def test_each_verified_model_gets_its_verdict(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    settings, names = topics
    settings = dataclasses.replace(settings, database_url=database_url)
    upgrade(database_url)
    producer = make_producer(settings)
    await producer.start()
    honest = Script("honest", RoundConfig(buffer_size=2))
    async with running_aggregator(settings):
        updates = {"a": client_update(1), "b": client_update(2)}
        await publish(producer, names, await training_round(producer, names, honest, updates))
        [aggregated] = await wait_for(settings, names, (RoundAggregated,), 1)
    # a second session whose logged model is not what its updates fold to (no aggregator runs for it)
    forger = Script("forged", RoundConfig(buffer_size=2))
    events = await training_round(producer, names, forger, {"a": client_update(3), "b": client_update(4)})
    forged_model = await write_tensors(producer, names.tensors, "forged", client_update(5))
    forged = dataclasses.replace(
        forger.aggregated(update_ids=(uid("a"), uid("b")), model_id="m-forged"), tensor=forged_model
    )
    await publish(producer, names, [*events, forged])
    await producer.stop()

    report = await verify_models(settings)

    assert isinstance(aggregated, RoundAggregated) and len(report.mismatches) == 1
    assert rows(database_url, VERDICTS) == [
        ("m-forged", "forged", "r1", forged_model.sha256, False, "the same updates fold to another model"),
        (aggregated.model_id, "honest", "r1", aggregated.tensor.sha256, True, ""),
    ]
    await verify_models(settings)  # each run is kept: the dashboard shows the latest
    assert rows(database_url, "SELECT count(DISTINCT audited_at), count(*) FROM model_audits") == [(2, 4)]


async def test_without_the_projection_tables_nothing_is_kept(database_url: str) -> None:
    """An audit of the log against a database that holds no projections leaves it as it was."""
    model = Script("s1").aggregated(model_id="m1")
    assert await record_audits(database_url, AuditReport(rounds_checked=1, models=[model])) == 0
    assert rows(database_url, "SELECT to_regclass('model_audits') IS NULL") == [(True,)]
