"""Events go through the real broker and fold back to the states an in-memory fold gives."""

from __future__ import annotations

from roundlog.bus import Topics, make_consumer, make_producer, publish
from roundlog.config import Settings
from roundlog.domain.events import Event, Task
from roundlog.domain.ledger import Ledger
from roundlog.roles.stream import PartitionFold, refold

from tests.builders import Script, uid


def scripted_sessions() -> list[Event]:
    """Three sessions, interleaved: one aggregates, one fails on timeout, one is still collecting."""
    a, b, c = Script("sa"), Script("sb"), Script("sc")
    per_session = [
        [
            a.started(),
            a.requested(),
            a.staged(),
            a.assigned(),
            a.update("a"),
            a.update("a", update_id="again"),
            a.update("b"),
            a.update("c"),
            a.aggregated(update_ids=(uid("a"), uid("b"))),
        ],
        [b.started(), b.requested(), b.staged(), b.assigned(), b.timed_out(), b.finished(succeeded=False)],
        [
            c.started(),
            c.requested("v1", Task.VALIDATION),
            c.staged("v1"),
            c.assigned("v1"),
            c.validation("a", "v1"),
        ],
    ]
    log: list[Event] = []
    while any(per_session):
        for events in per_session:
            if events:
                log.append(events.pop(0))
    return log


def states(ledger_sessions: dict[str, object]) -> dict[str, object]:
    return {
        sid: (s.state, {rid: (r.state, list(r.accepted), sorted(r.results)) for rid, r in s.rounds.items()})  # type: ignore[attr-defined]
        for sid, s in ledger_sessions.items()
    }


async def test_events_fold_back_from_the_broker_to_the_same_states(topics: tuple[Settings, Topics]) -> None:
    settings, names = topics
    log = scripted_sessions()
    producer = make_producer(settings)
    await producer.start()
    try:
        await publish(producer, names, log)
    finally:
        await producer.stop()

    in_memory = Ledger()
    for event in log:
        in_memory.apply(event)

    consumer = make_consumer(settings)
    await consumer.start()
    try:
        from_broker: dict[str, object] = {}
        ends = await consumer.end_offsets(await consumer.topic_partitions(names.events))
        for tp, end in ends.items():
            fold = PartitionFold(tp.partition)
            await refold(consumer, names.events, fold, 0, end)
            from_broker.update(fold.ledger.sessions)
    finally:
        await consumer.stop()

    assert states(from_broker) == states(in_memory.sessions)
    assert set(from_broker) == {"sa", "sc"}, "sb finished, so it left the ledger"
