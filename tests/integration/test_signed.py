"""ROUNDLOG_AUTH=signed on the real stack: forgers move nothing, revocation holds at its position.

A signed deployment (operator, roles and client keys registered in the log) runs a session
while an outsider, an unsigned producer and a registered client (speaking for another, or as
another role) try every event type against it; each try is refused with its own reason,
recorded with the identity it claimed, and the session ends as if they had said nothing.
Then a client's key is revoked: its later update is refused, the coordinator stops sampling
it, and its earlier updates stay valid in a replay, which re-verifies every signature and
agrees with the live tables.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from roundlog.audit import verify_models
from roundlog.bus import Producer, Topics, make_consumer, make_producer, partition_for
from roundlog.client import provision_keys, revoke_key
from roundlog.codec import encode
from roundlog.config import Settings
from roundlog.domain.decide import round_id_for
from roundlog.domain.events import (
    ClientsAssigned,
    Event,
    Task,
    UpdateReceived,
    answer_event_id,
    derived_id,
    partition_key,
    update_id_for,
)
from roundlog.keys import Signer, create_key_file
from roundlog.projections.schema import upgrade
from roundlog.replay import replay

from tests.builders import Script, every_event
from tests.integration.harness import (
    caught_up,
    client_ids,
    clients,
    first_event,
    role_process,
    start_sessions,
    stop_process,
)


async def send(producer: Producer, topics: Topics, event: Event, headers: Any = None) -> None:
    """Put a record on the session's partition exactly as given (no signing of our own)."""
    await producer.send_and_wait(
        topics.events, encode(event), key=partition_key(event).encode(), headers=headers
    )


def rows(url: str, query: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(query), params).all())
    finally:
        engine.dispose()


async def records_in(settings: Settings, topic: str) -> int:
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(await consumer.topic_partitions(topic))).values())
    finally:
        await consumer.stop()


async def projected_finished(url: str, session_id: str) -> None:
    query = "SELECT 1 FROM sessions WHERE session_id = :s AND state IN ('completed', 'failed')"
    async with asyncio.timeout(120):
        while not await asyncio.to_thread(rows, url, query, s=session_id):
            await asyncio.sleep(0.3)


async def test_forgers_move_nothing_and_a_revoked_key_is_refused_from_its_position(
    topics: tuple[Settings, Topics], database_url: str, tmp_path: Path
) -> None:
    names = topics[1]
    await asyncio.to_thread(upgrade, database_url)
    signed = await provision_keys(
        dataclasses.replace(topics[0], database_url=database_url), tmp_path, client_ids(2)
    )
    settings = signed.roles
    outsider_file = tmp_path / "outsider.pem"
    create_key_file(outsider_file)
    outsider = Signer.from_file(outsider_file)
    client_1 = Signer.from_file(str(signed.clients["client-1"].key_file))
    # a producer that signs nothing itself: each record carries exactly the headers given
    raw = make_producer(dataclasses.replace(settings, key_file=None, auth=False))
    await raw.start()
    roles = [role_process(settings, role) for role in ("coordinator", "aggregator", "projector")]
    forged: dict[str, tuple[str, str | None]] = {}  # event id -> (expected reason, claimed key)
    try:
        async with clients(settings, 2, train_seconds=1.0, signed=signed):
            (session_id,) = await start_sessions(signed.operator, names, 1, rounds=2, round_timeout=60)
            assigned = await first_event(settings, names, ClientsAssigned)
            # every event type against the running session, by an outsider and unsigned
            for who, signer, reason in (
                ("outsider", outsider, "unknown_key"),
                ("unsigned", None, "unsigned"),
                ("client-1", client_1, "not_permitted"),  # a registered client: for another, or not its kind
            ):
                for event in every_event(Script(session_id=session_id)):
                    event = dataclasses.replace(event, event_id=f"{who}-{event.event_id}")
                    value = encode(event)
                    await send(raw, names, event, signer.headers(value) if signer else None)
                    forged[event.event_id] = (reason, signer.key_id if signer else None)
            # client-1 speaking for client-0, in the round it was really assigned
            impostor = UpdateReceived(
                event_id="impostor",
                occurred_at=assigned.occurred_at,
                session_id=session_id,
                round_id=assigned.round_id,
                client_id="client-0",
                update_id=update_id_for(assigned.round_id, "client-0"),
                num_examples=10**6,
                tensor=assigned.model,
            )
            await send(raw, names, impostor, client_1.headers(encode(impostor)))
            forged["impostor"] = ("not_permitted", client_1.key_id)
            # client-1's key under the outsider's signature: the signature cannot hold
            swapped = dataclasses.replace(impostor, event_id="swapped", client_id="client-1")
            headers = [("roundlog-key", client_1.key_id.encode()), outsider.headers(encode(swapped))[1]]
            await send(raw, names, swapped, headers)
            forged["swapped"] = ("bad_signature", client_1.key_id)
            # ids are derived, so anyone can predict the ids of events still to come: forgeries
            # carrying them must not take the rows (and the authors) of the real events
            training_2 = round_id_for(session_id, 2, Task.TRAINING)
            squatters = (
                (
                    derived_id(assigned.round_id, "aggregated"),
                    Script(session_id=session_id).aggregated(round_id=assigned.round_id),
                    outsider,
                    "unknown_key",
                ),
                (
                    derived_id(training_2, "assigned"),
                    Script(session_id=session_id).assigned(
                        round_id=training_2, clients=("client-0", "client-1")
                    ),
                    None,
                    "unsigned",
                ),
                (
                    answer_event_id(training_2, "client-0", Task.TRAINING),
                    dataclasses.replace(
                        impostor, round_id=training_2, update_id=update_id_for(training_2, "client-0")
                    ),
                    client_1,
                    "not_permitted",
                ),
                # client-1's own answer to the round it was assigned, under the id the session's
                # end will have: applied, it would keep the session from ever finishing
                (
                    derived_id(session_id, "finished"),
                    dataclasses.replace(
                        impostor, client_id="client-1", update_id=update_id_for(assigned.round_id, "client-1")
                    ),
                    client_1,
                    "not_permitted",
                ),
                # a heartbeat of its own, on the events topic, under the id round 2's staging will have
                (
                    derived_id(training_2, "staged"),
                    Script(session_id=session_id).heartbeat("client-1"),
                    client_1,
                    "not_permitted",
                ),
            )
            for event_id, template, signer, reason in squatters:
                event = dataclasses.replace(template, event_id=event_id)
                await send(raw, names, event, signer.headers(encode(event)) if signer else None)
                forged[event_id] = (reason, signer.key_id if signer else None)
            # an unsigned record off its session's partition: kept aside before any fold sees it
            stray = dataclasses.replace(impostor, event_id="stray")
            home = partition_for(session_id, len(await raw.partitions_for(names.events)))
            await raw.send_and_wait(
                names.events,
                encode(stray),
                key=session_id.encode(),
                partition=0 if home else 1,
            )
            forged["stray"] = ("wrong_partition", None)
            # a client ending the session
            finish = dataclasses.replace(Script(session_id=session_id).finished(), event_id="client-finish")
            await send(raw, names, finish, client_1.headers(encode(finish)))
            forged["client-finish"] = ("not_permitted", client_1.key_id)
            # (not by reading the log: a forged SessionFinished is in it too)
            await projected_finished(database_url, session_id)

            # client-1's key revoked: a later update of its own is refused, and it is sampled no more
            operator = make_producer(signed.operator)
            await operator.start()
            try:
                await revoke_key(operator, names, client_1.key_id, "lost")
            finally:
                await operator.stop()
            (second,) = await start_sessions(signed.operator, names, 1, rounds=1, round_timeout=60)
            await projected_finished(database_url, second)
        second_round = rows(
            database_url, "SELECT round_id FROM rounds WHERE session_id = :s AND task = 'training'", s=second
        )
        late = dataclasses.replace(
            impostor,
            event_id="after-revocation",
            session_id=second,
            round_id=second_round[0].round_id,
            client_id="client-1",
            update_id=update_id_for(second_round[0].round_id, "client-1"),
        )
        await send(raw, names, late, client_1.headers(encode(late)))
        forged["after-revocation"] = ("revoked_key", client_1.key_id)
        await caught_up(settings, names)
    finally:
        await raw.stop()
        for process in roles:
            stop_process(process)

    refused = {
        r.event_id: (r.reason, r.key_id)
        for r in rows(
            database_url,
            "SELECT event_id, reason, key_id FROM rejected_events WHERE topic = :t",
            t=names.events,
        )
    }
    assert {event_id: refused.get(event_id) for event_id in forged} == forged

    # the forgers moved nothing: the session ran its two rounds, aggregated once each, from its clients
    (session,) = rows(
        database_url, "SELECT state, rounds_done FROM sessions WHERE session_id = :s", s=session_id
    )
    assert (session.state, session.rounds_done) == ("completed", 2)
    applied = rows(
        database_url,
        "SELECT type, key_id FROM events WHERE session_id = :s AND outcome = 'applied'",
        s=session_id,
    )
    assert sum(r.type == "RoundAggregated" for r in applied) == 2
    assert {r.key_id for r in applied} <= {
        signed.operator.operator_key,
        _key_id(settings),
        *_client_keys(signed),
    }

    # the real events hold their own rows, whatever forgeries came first with their ids
    squatted = [event_id for event_id, _, _, _ in squatters]
    owners = rows(
        database_url,
        "SELECT event_id, key_id, outcome FROM events WHERE event_id = ANY(:ids)",
        ids=squatted,
    )
    assert sorted((r.event_id, r.key_id, r.outcome) for r in owners) == sorted(
        [
            (squatted[0], roles_key := _key_id(settings), "applied"),
            (squatted[1], roles_key, "applied"),
            (squatted[2], _client_keys(signed)[0], "applied"),
            (squatted[3], roles_key, "applied"),
            (squatted[4], roles_key, "applied"),
        ]
    )

    # the audit names the author of every step
    authors = rows(
        database_url,
        "SELECT * FROM round_authors WHERE session_id = :s AND task = 'training' ORDER BY round_no",
        s=session_id,
    )
    key_0, key_1 = _client_keys(signed)
    for round_ in authors:
        assert round_.assigned_by == roles_key and round_.aggregated_by == roles_key
        assert round_.submitted_by == {"client-0": key_0, "client-1": key_1}
        assert round_.closed_by in (key_0, key_1)  # the update that filled the buffer
    # after the revocation only client-0 is sampled, and client-1's earlier updates still count
    (assigned_then,) = rows(
        database_url, "SELECT n_assigned FROM rounds WHERE session_id = :s AND task = 'training'", s=second
    )
    assert assigned_then.n_assigned == 1
    earlier = rows(
        database_url,
        "SELECT event_id, status FROM round_updates WHERE session_id = :s AND client_id = 'client-1'",
        s=session_id,
    )
    assert sum(r.status == "accepted" for r in earlier) == 2
    assert {r.event_id for r in earlier if r.status == "rejected"} <= forged.keys()
    keys = rows(database_url, "SELECT key_id, revoked_at FROM keys")
    assert {k.key_id for k in keys if k.revoked_at is not None} == {client_1.key_id}

    # replay re-verifies every signature and lands on the same tables; the models re-fold alike
    report = await replay(settings, "signed_replay")
    assert report.identical, report.render()
    audit = await verify_models(settings)
    assert audit.ok and audit.rounds_checked == 3, audit.mismatches
    # every record of the events topic had its signature checked again: the forgers' unsigned and
    # badly signed ones are the refused ones
    unsigned = sum(reason in ("unsigned", "bad_signature") for reason, _ in forged.values())
    unsigned += 1  # the stray record: refused for its place, and unsigned all the same
    assert audit.signatures_refused == unsigned
    assert audit.signatures_verified + audit.signatures_refused == await records_in(settings, names.events)


def _key_id(settings: Settings) -> str:
    return Signer.from_file(str(settings.key_file)).key_id


def _client_keys(signed: Any) -> list[str]:
    return [_key_id(signed.clients[c]) for c in client_ids(2)]
