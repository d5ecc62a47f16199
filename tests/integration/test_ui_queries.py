"""The dashboard's queries against a projected log: the clinic federation of docs/sql.md.

The log is projected by the real projector into a real PostgreSQL; the expected values are
worked out by hand from the federation's script (tests/integration/test_projector_docs.py),
never read back through the code under test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from roundlog.bus import Topics
from roundlog.config import Settings
from roundlog.ui import queries

from tests.integration.test_projector import prepared, produce, project, records_of
from tests.integration.test_projector_docs import START, federation

MNIST = "mnist-fedavg"


@contextlib.contextmanager
def connected(settings: Settings) -> Iterator[sa.Connection]:
    engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


async def projected(topics: tuple[Settings, Topics], database_url: str) -> Settings:
    settings, names = prepared(topics, database_url)
    await produce(settings, records_of(names, federation()))
    await project(settings, names)
    return settings


async def test_sessions_rounds_curves_and_timeline(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    settings = await projected(topics, database_url)
    with connected(settings) as conn:
        listed = {s.session_id: s for s in queries.sessions(conn)}
        last = queries.last_metrics(conn)
        session = queries.session(conn, MNIST)
        missing = queries.session(conn, "no-such-session")
        rounds = queries.rounds(conn, MNIST)
        curves = queries.curves(conn, MNIST, rounds)
    assert set(listed) == {"mnist-fedavg", "cifar-fedadam", "mnist-inference"}
    assert (listed[MNIST].state, listed[MNIST].rounds_done, listed[MNIST].rounds_total) == ("completed", 3, 3)
    assert (listed["cifar-fedadam"].state, listed["cifar-fedadam"].rounds_failed) == ("failed", 1)
    assert listed["mnist-inference"].state == queries.RUNNING
    # mnist-v1: hospital-a 0.91 and hospital-b 0.88, 5 examples each; no other session validated
    assert list(last) == [MNIST]
    assert last[MNIST].round_no == 1 and last[MNIST].means == {"accuracy": pytest.approx(0.895)}
    assert session is not None and session.started_at == START and missing is None

    assert [(r.round_id, r.round_no, r.task) for r in rounds] == [
        ("mnist-r1", 1, "training"),
        ("mnist-v1", 1, "validation"),
        ("mnist-r2", 2, "training"),
        ("mnist-r3", 3, "training"),
    ]
    validation = rounds[1]
    assert (validation.state, validation.timed_out) == ("completed", True)
    # the updates carry no metrics: one chart, the validation accuracy, over rounds 1..3
    assert curves.round_nos == [1, 2, 3]
    assert [(c.metric, [(s.label, s.values) for s in c.series]) for c in curves.charts] == [
        ("accuracy", [("validation accuracy", [pytest.approx(0.895), None, None])])
    ]

    # mnist-r1: requested at 1 s, staged at 4, collecting at 5, closed at 67 (the third update), aggregated
    # at 74; the session's last moment is mnist-r3's aggregation at 270 s
    bars = queries.timeline(rounds, START)
    first = [(s.state, s.seconds, s.left, s.width) for s in bars["mnist-r1"]]
    assert first == [
        pytest.approx(("requested", 3.0, 100 * 1 / 270, 100 * 3 / 270)),
        pytest.approx(("staged", 1.0, 100 * 4 / 270, 100 * 1 / 270)),
        pytest.approx(("collecting", 62.0, 100 * 5 / 270, 100 * 62 / 270)),
        pytest.approx(("closed", 7.0, 100 * 67 / 270, 100 * 7 / 270)),
    ]
    last_bar = bars["mnist-r3"][-1]
    assert last_bar.left + last_bar.width == pytest.approx(100.0)


async def test_updates_and_participation(topics: tuple[Settings, Topics], database_url: str) -> None:
    settings = await projected(topics, database_url)
    with connected(settings) as conn:
        counts = queries.update_counts(conn, MNIST)
        rounds = queries.rounds(conn, MNIST)
        grid = queries.participation(conn, MNIST, rounds)
        totals = {c.client_id: c for c in queries.client_totals(conn, grid.clients)}
    assert counts.per_round == {
        "mnist-r1": {"accepted": 3, "late": 1},
        "mnist-r2": {"accepted": 2, "duplicate": 1, "not_assigned": 1, "non_finite": 1, "late": 1},
        "mnist-r3": {"accepted": 3},
    }
    assert counts.outcomes == ["accepted", "duplicate", "late", "non_finite", "not_assigned"]

    assert grid.clients == ["clinic-d", "clinic-e", "hospital-a", "hospital-b", "hospital-c", "lab-f"]
    assert [r.round_id for r in grid.rounds] == ["mnist-r1", "mnist-v1", "mnist-r2", "mnist-r3"]
    kinds = {(c, r.round_id): grid.cell(c, r.round_id).kind for c in grid.clients for r in grid.rounds}
    assert kinds == {
        ("clinic-d", "mnist-r1"): "late",
        ("clinic-d", "mnist-v1"): "silent",
        ("clinic-d", "mnist-r2"): "not_sampled",
        ("clinic-d", "mnist-r3"): "accepted",
        ("clinic-e", "mnist-r1"): "not_sampled",
        ("clinic-e", "mnist-v1"): "not_sampled",
        ("clinic-e", "mnist-r2"): "rejected",
        ("clinic-e", "mnist-r3"): "not_sampled",
        ("hospital-a", "mnist-r1"): "accepted",
        ("hospital-a", "mnist-v1"): "accepted",
        ("hospital-a", "mnist-r2"): "accepted",
        ("hospital-a", "mnist-r3"): "accepted",
        ("hospital-b", "mnist-r1"): "accepted",
        ("hospital-b", "mnist-v1"): "accepted",
        ("hospital-b", "mnist-r2"): "accepted",
        ("hospital-b", "mnist-r3"): "silent",
        ("hospital-c", "mnist-r1"): "accepted",
        ("hospital-c", "mnist-v1"): "not_sampled",
        ("hospital-c", "mnist-r2"): "late",
        ("hospital-c", "mnist-r3"): "accepted",
        ("lab-f", "mnist-r1"): "not_sampled",
        ("lab-f", "mnist-v1"): "not_sampled",
        ("lab-f", "mnist-r2"): "rejected",
        ("lab-f", "mnist-r3"): "not_sampled",
    }
    assert grid.cell("hospital-a", "mnist-r2").label == "accepted (+1 refused: duplicate)"
    assert grid.cell("clinic-e", "mnist-r2").label == "non_finite"
    assert grid.cell("lab-f", "mnist-r2").label == "not_assigned"
    # over every session: clinic-d was late for mnist-r1 and for cifar-r1 (after that session failed)
    assert (totals["clinic-d"].n_rejected, totals["clinic-d"].rejected_by_reason) == (
        2,
        {"late": 1, "session_finished": 1},
    )


async def test_lineage_with_audits_and_rejections(topics: tuple[Settings, Topics], database_url: str) -> None:
    settings = await projected(topics, database_url)
    insert = sa.text(
        "INSERT INTO model_audits (model_id, audited_at, session_id, round_id, sha256, verified, detail) "
        "VALUES (:model, :at, :session, :round, :sha256, :verified, :detail)"
    )
    with connected(settings) as conn:
        sha = {
            row.model_id: row.sha256 for row in conn.execute(sa.text("SELECT model_id, sha256 FROM models"))
        }
        audit = {"session": MNIST, "detail": ""}
        conn.execute(
            insert,
            [
                # m1: refuted by an older audit, verified by the latest one
                {
                    **audit,
                    "model": "mnist-m1",
                    "round": "mnist-r1",
                    "sha256": sha["mnist-m1"],
                    "verified": False,
                    "at": START,
                    "detail": "the same updates fold to another model",
                },
                {
                    **audit,
                    "model": "mnist-m1",
                    "round": "mnist-r1",
                    "sha256": sha["mnist-m1"],
                    "verified": True,
                    "at": START.replace(hour=10),
                },
                # m2: re-folded to the logged hash, but the projection holds another one
                {
                    **audit,
                    "model": "mnist-m2",
                    "round": "mnist-r2",
                    "sha256": "0" * 64,
                    "verified": True,
                    "at": START,
                },
            ],
        )
        conn.commit()
        lineage = queries.lineage(conn, MNIST)
        by_reason_all = [tuple(r) for r in queries.rejected_by_reason(conn, None)]
        by_reason_cifar = [tuple(r) for r in queries.rejected_by_reason(conn, "cifar-fedadam")]
        cifar_records = queries.rejected(conn, "cifar-fedadam", 10)
        limited = queries.rejected(conn, None, 2)
    assert [(m.model_id, m.origin, m.round_no, m.verified) for m in lineage] == [
        ("mnist-init", "imported", None, None),
        ("mnist-m1", "aggregated", 1, True),
        ("mnist-m2", "aggregated", 2, False),
        ("mnist-m3", "aggregated", 3, None),
    ]
    assert [m.sha256 for m in lineage] == [sha[m.model_id] for m in lineage]
    # docs/sql.md, question 13: what the projector kept aside
    assert by_reason_all == [("late", 2), ("duplicate", 1), ("not_assigned", 1), ("session_finished", 1)]
    assert by_reason_cifar == [("session_finished", 1)]
    assert [(r.reason, r.round_id, r.type) for r in cifar_records] == [
        ("session_finished", "cifar-r1", "UpdateReceived")
    ]
    assert len(limited) == 2
