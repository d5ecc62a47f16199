"""docs/sql.md is real: every query in it runs against a projected log and prints what the doc shows.

The log is a small clinic federation: two training sessions (one completes, one fails) and an
inference session still collecting. Each ```sql block followed by a ```text block in the doc
is run here, and its output must equal the text block. When a query or the log changes,
``ROUNDLOG_WRITE_DOCS=1`` rewrites the text blocks in place instead of comparing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from roundlog.bus import Topics
from roundlog.config import Settings
from roundlog.domain.events import (
    ArraySpec,
    ClientRole,
    ClientsAssigned,
    Event,
    ModelImported,
    RoundAggregated,
    RoundConfig,
    Task,
    TensorRef,
)

from tests.builders import Script, tensor_ref, uid
from tests.integration.test_projector import prepared, produce, project, query, records_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"
PAIR = re.compile(r"```sql\n(?P<sql>.*?)```\n\n```text\n(?P<out>.*?)```", re.DOTALL)
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def tensor(key: str, nbytes: int = 1_704_000) -> TensorRef:
    """A model's reference with a sha256 of its own, so lineage shows distinct hashes: ``nbytes`` of
    float32 weights in 1 MiB chunks, as a well-formed reference has them."""
    chunks = -(-nbytes // (1 << 20))
    return dataclasses.replace(
        tensor_ref(key),
        sha256=hashlib.sha256(key.encode()).hexdigest(),
        nbytes=nbytes,
        chunks=chunks,
        last_offset=chunks - 1,
        arrays=(ArraySpec(name="w", dtype="<f4", shape=(nbytes // 4,)),),
    )


class Clock:
    """Stamps a session's events at given seconds after its start, so durations look like a real run."""

    def __init__(self, script: Script, start: datetime) -> None:
        self.script, self.start = script, start

    def at(self, seconds: float, event: Event, **changes: Any) -> Event:
        if isinstance(event, RoundAggregated):
            changes["tensor"] = tensor(event.model_id)
        moment = self.start + timedelta(seconds=seconds)
        if isinstance(event, ClientsAssigned):
            changes.setdefault("deadline", moment + timedelta(hours=1))
        return dataclasses.replace(event, occurred_at=moment, **changes)  # type: ignore[arg-type]


def by_time(*events: Event) -> list[Event]:
    """A session's events in the order they happened, which is the order the log holds them in."""
    return sorted(events, key=lambda e: e.occurred_at)


def mnist(out: list[Event]) -> None:
    """Three FedAvg rounds over four hospitals: a straggler, a duplicate, an outsider, a broken update."""
    s = Script("mnist-fedavg", RoundConfig(round_timeout=120, buffer_size=3, clients_required=3))
    c = Clock(s, START)
    out += by_time(
        c.at(0, s.started(rounds=3, model_id="mnist-init", name="mnist, fedavg")),
        c.at(1, s.requested("mnist-r1", model_id="mnist-init")),
        c.at(4, s.staged("mnist-r1", model_id="mnist-init")),
        c.at(5, s.assigned("mnist-r1", ("hospital-a", "hospital-b", "hospital-c", "clinic-d"))),
        c.at(26, s.update("hospital-a", "mnist-r1"), num_examples=1200),
        c.at(41, s.update("hospital-b", "mnist-r1"), num_examples=800),
        c.at(67, s.update("hospital-c", "mnist-r1"), num_examples=1000),
        c.at(
            74,
            s.aggregated(
                "mnist-r1",
                (uid("hospital-a", "mnist-r1"), uid("hospital-b", "mnist-r1"), uid("hospital-c", "mnist-r1")),
                "mnist-m1",
                "mnist-init",
            ),
            total_weight=3000.0,
        ),
        c.at(98, s.update("clinic-d", "mnist-r1"), num_examples=400),
        c.at(75, s.requested("mnist-v1", Task.VALIDATION, model_id="mnist-m1")),
        c.at(76, s.staged("mnist-v1", model_id="mnist-m1")),
        c.at(77, s.assigned("mnist-v1", ("hospital-a", "hospital-b", "clinic-d"))),
        c.at(90, s.validation("hospital-a", "mnist-v1", "mnist-m1"), metrics={"accuracy": 0.91}),
        c.at(93, s.validation("hospital-b", "mnist-v1", "mnist-m1"), metrics={"accuracy": 0.88}),
        c.at(197, s.timed_out("mnist-v1")),
        c.at(100, s.requested("mnist-r2", model_id="mnist-m1", round_no=2)),
        c.at(102, s.staged("mnist-r2", model_id="mnist-m1")),
        c.at(103, s.assigned("mnist-r2", ("hospital-a", "hospital-b", "hospital-c", "clinic-e"))),
        c.at(121, s.update("hospital-a", "mnist-r2"), num_examples=1200),
        c.at(
            124,
            s.update("hospital-a", "mnist-r2", update_id="u-mnist-r2-hospital-a-retry"),
            num_examples=1200,
        ),
        c.at(130, s.update("lab-f", "mnist-r2"), num_examples=300),
        c.at(142, s.update("hospital-b", "mnist-r2"), num_examples=800),
        c.at(151, s.update("clinic-e", "mnist-r2"), num_examples=500),
        c.at(153, s.rejected("clinic-e", "mnist-r2", "non_finite")),
        c.at(
            160,
            s.aggregated(
                "mnist-r2",
                (uid("hospital-a", "mnist-r2"), uid("hospital-b", "mnist-r2")),
                "mnist-m2",
                "mnist-m1",
            ),
            total_weight=2000.0,
        ),
        c.at(171, s.update("hospital-c", "mnist-r2"), num_examples=1000),
        c.at(175, s.requested("mnist-r3", model_id="mnist-m2", round_no=3)),
        c.at(176, s.staged("mnist-r3", model_id="mnist-m2")),
        c.at(177, s.assigned("mnist-r3", ("hospital-a", "hospital-b", "hospital-c", "clinic-d"))),
        c.at(199, s.update("hospital-a", "mnist-r3"), num_examples=1200),
        c.at(230, s.update("hospital-c", "mnist-r3"), num_examples=1000),
        c.at(262, s.update("clinic-d", "mnist-r3"), num_examples=400),
        c.at(
            270,
            s.aggregated(
                "mnist-r3",
                (uid("hospital-a", "mnist-r3"), uid("hospital-c", "mnist-r3"), uid("clinic-d", "mnist-r3")),
                "mnist-m3",
                "mnist-m2",
            ),
            total_weight=2600.0,
        ),
        c.at(271, s.finished(succeeded=True), final_model_id="mnist-m3"),
    )


def cifar(out: list[Event]) -> None:
    """A FedAdam session whose first round times out with one update: the round and the session fail."""
    s = Script(
        "cifar-fedadam", RoundConfig(round_timeout=60, buffer_size=4, min_updates=2, aggregator="fedadam")
    )
    c = Clock(s, START + timedelta(minutes=10))
    out += by_time(
        c.at(0, s.started(rounds=2, model_id="cifar-init", name="cifar, fedadam")),
        c.at(2, s.requested("cifar-r1", model_id="cifar-init")),
        c.at(9, s.staged("cifar-r1", model_id="cifar-init")),
        c.at(10, s.assigned("cifar-r1", ("hospital-a", "clinic-d", "clinic-e", "lab-f"))),
        c.at(48, s.update("lab-f", "cifar-r1"), num_examples=300),
        c.at(70, s.timed_out("cifar-r1")),
        c.at(71, s.finished(succeeded=False), reason="round cifar-r1 failed: too_few_updates"),
        c.at(75, s.update("clinic-d", "cifar-r1"), num_examples=400),
    )


def inference(out: list[Event]) -> None:
    s = Script("mnist-inference")
    c = Clock(s, START + timedelta(minutes=20))
    out += by_time(
        c.at(0, s.started(rounds=1, model_id="mnist-m3", name="mnist, batch scoring")),
        c.at(1, s.requested("mnist-p1", Task.INFERENCE, model_id="mnist-m3")),
        c.at(2, s.staged("mnist-p1", model_id="mnist-m3")),
        c.at(3, s.assigned("mnist-p1", ("hospital-a", "hospital-b", "hospital-c"))),
        c.at(20, s.prediction("hospital-a", "mnist-p1", "mnist-m3"), summary="1,204 scans scored"),
        c.at(33, s.prediction("hospital-c", "mnist-p1", "mnist-m3"), summary="988 scans scored"),
    )


def federation() -> list[Event]:
    beats = Script("beats")
    clients = ["hospital-a", "hospital-b", "hospital-c", "clinic-d", "clinic-e", "lab-f"]
    out: list[Event] = [
        ModelImported(
            event_id="import-mnist",
            occurred_at=START - timedelta(hours=1),
            model_id="mnist-init",
            name="mnist cnn, random init",
            tensor=tensor("mnist-init"),
        ),
        ModelImported(
            event_id="import-cifar",
            occurred_at=START - timedelta(hours=1),
            model_id="cifar-init",
            name="resnet-8, random init",
            tensor=tensor("cifar-init", 10_920_000),
        ),
    ]
    for n, client in enumerate(clients):
        roles = (
            (ClientRole.TRAINER, ClientRole.VALIDATOR)
            if client.startswith("hospital")
            else (ClientRole.TRAINER,)
        )
        beat = beats.heartbeat(client, *roles)
        out.append(dataclasses.replace(beat, occurred_at=START + timedelta(minutes=21, seconds=n)))
    mnist(out)
    cifar(out)
    inference(out)
    return out


def render(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    """psql's aligned format, near enough: text left, numbers right, booleans t/f."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "t" if value else "f"
        if isinstance(value, dict | list):
            return json.dumps(value, sort_keys=True)
        if isinstance(value, datetime):
            return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(r[i], int | float | Decimal) or r[i] is None for r in rows)
        for i in range(len(columns))
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [" " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("-" + "-+-".join("-" * w for w in widths) + "-")
    for r in cells:
        fields = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True)]
        lines.append(" " + " | ".join(fields).rstrip())
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines) + "\n"


async def run_query(settings: Settings, sql: str) -> str:
    import psycopg

    from roundlog.projections.writer import libpq_url

    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as conn:
        cursor = await conn.execute(sql)  # type: ignore[arg-type]
        columns = [d.name for d in cursor.description or ()]
        return render(columns, await cursor.fetchall())


async def test_every_query_in_the_sql_guide_prints_what_the_guide_shows(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    settings, names = prepared(topics, database_url)
    await produce(settings, records_of(names, federation()))
    await project(settings, names)
    assert await query(settings, "SELECT count(*) FROM rejected_events") == [(5,)]

    text = DOC.read_text()
    pairs = list(PAIR.finditer(text))
    assert len(pairs) >= 10, "the guide has its ten queries"
    actual = {m.group("sql"): await run_query(settings, m.group("sql")) for m in pairs}
    if os.environ.get("ROUNDLOG_WRITE_DOCS"):
        DOC.write_text(
            PAIR.sub(lambda m: f"```sql\n{m.group('sql')}```\n\n```text\n{actual[m.group('sql')]}```", text)
        )
        return
    for m in pairs:
        assert actual[m.group("sql")] == m.group("out"), f"{m.group('sql')}\nprints\n{actual[m.group('sql')]}"
