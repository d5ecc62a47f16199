"""Input the projector did not write itself: corrupt records, and events from a plain Avro library."""

from __future__ import annotations

import json
import random
import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import murmur2
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import to_parsing_canonical_form

from roundlog.bus import Topics, make_producer
from roundlog.codec import encode
from roundlog.config import Settings

from tests.builders import Script
from tests.integration.test_projector import prepared, produce, project, query, records_of

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


async def test_corrupt_records_are_kept_aside_and_the_rest_projects(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    settings, names = prepared(topics, database_url)
    s = Script("s1")
    before = records_of(names, [s.started(), s.requested("s1-r1")])
    good = records_of(names, [s.staged("s1-r1"), s.assigned("s1-r1", ("a", "b"))])
    header = good[0][2][:10]
    corrupt = [  # topic, value, the reason it must be rejected with
        (names.events, random.Random(1).randbytes(64), "bad_magic"),
        (names.events, header[:6], "truncated"),
        (names.events, b"\xc3\x01" + bytes(8) + good[0][2][10:], "unknown_fingerprint"),
        (names.events, good[1][2][:-9], "truncated"),
        (names.events, good[1][2] + b"\x00", "trailing_bytes"),
        (names.clients, b"\xff not a heartbeat", "bad_magic"),
        (names.clients, good[0][2], "wrong_topic"),
    ]
    await produce(settings, [*before, *((topic, b"s1", value) for topic, value, _ in corrupt), *good])
    await project(settings, names)

    rejected = await query(
        settings, 'SELECT topic, head, raw_size, reason FROM rejected_events ORDER BY "offset"'
    )
    expected = [(topic, value[:64], len(value), reason) for topic, value, reason in corrupt]
    assert sorted((t, bytes(h), n, r) for t, h, n, r in rejected) == sorted(expected)
    assert await query(settings, "SELECT state, n_assigned FROM rounds") == [("collecting", 2)], (
        "later events project"
    )
    dead = await dead_letters(settings, names.deadletter, len(corrupt))
    assert sorted(dead) == sorted((value, reason) for _, value, reason in corrupt)


async def dead_letters(settings: Settings, topic: str, count: int) -> list[tuple[bytes, str]]:
    """The dead letters: each record's value and its reason header."""
    consumer = AIOKafkaConsumer(topic, auto_offset_reset="earliest", **settings.kafka_client_kwargs())
    await consumer.start()
    found: list[tuple[bytes, str]] = []
    try:
        while len(found) < count:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    headers = dict(record.headers)
                    assert headers["roundlog-origin"]
                    found.append((record.value, headers["roundlog-reason"].decode()))
    finally:
        await consumer.stop()
    return found


# --- a producer with no roundlog code: fastavro, the .avsc files and the Avro spec ------------------

_EMPTY = 0xC15D213AA4D7A795
_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_EMPTY & -(_fp & 1))
    _TABLE.append(_fp)


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint of the Avro spec ("Schema Fingerprints")."""
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def single_object(name: str, record: dict[str, Any]) -> bytes:
    """Avro single-object encoding, by hand: C3 01, the little-endian fingerprint, the body."""
    schema = json.loads((SCHEMAS / f"{name}.avsc").read_text())
    canonical = to_parsing_canonical_form(schema)
    body = bytearray()

    class Sink:
        def write(self, data: bytes) -> None:
            body.extend(data)

    schemaless_writer(Sink(), parse_schema(schema), record)
    return b"\xc3\x01" + struct.pack("<Q", crc64_avro(canonical.encode())) + bytes(body)


async def test_events_from_a_plain_avro_library_appear_in_the_tables(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    settings, names = prepared(topics, database_url)
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    tensor = {
        "key": "foreign-m0",
        "partition": 0,
        "first_offset": 0,
        "last_offset": 0,
        "chunks": 1,
        "nbytes": 8,
        "sha256": "ab" * 32,
        "arrays": [{"name": "w", "dtype": "float32", "shape": [2]}],
    }
    config = {
        "round_timeout": 60.0,
        "buffer_size": 1,
        "clients_required": 1,
        "max_clients": -1,
        "min_updates": 1,
        "aggregator": "fedavg",
        "aggregator_kwargs": "{}",
    }
    started = {
        "event_id": "f-1",
        "occurred_at": at,
        "session_id": "foreign",
        "name": "from fastavro",
        "rounds": 1,
        "initial_model_id": "foreign-m0",
        "initial_model": tensor,
        "round_config": config,
        "validate_each_round": False,
        "stop_on_failure": True,
    }
    requested = {
        "event_id": "f-2",
        "occurred_at": at,
        "session_id": "foreign",
        "round_id": "foreign-r1",
        "round_no": 1,
        "task": "training",
        "model_id": "foreign-m0",
        "config": config,
    }
    beat = {
        "event_id": "f-3",
        "occurred_at": at,
        "client_id": "far",
        "roles": ["validator"],
        "labels": {"zone": "x"},
    }

    producer = AIOKafkaProducer(**settings.kafka_client_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(names.events, single_object("SessionStarted", started), key=b"foreign")
        await producer.send_and_wait(names.events, single_object("RoundRequested", requested), key=b"foreign")
        await producer.send_and_wait(names.clients, single_object("ClientHeartbeat", beat), key=b"far")
    finally:
        await producer.stop()
    await project(settings, names)

    assert await query(settings, "SELECT session_id, name, state, rounds_total FROM sessions") == [
        ("foreign", "from fastavro", "running", 1)
    ]
    assert await query(settings, "SELECT round_id, state, buffer_size, requested_at FROM rounds") == [
        ("foreign-r1", "requested", 1, at)
    ]
    assert await query(settings, "SELECT client_id, roles, labels, last_seen FROM clients") == [
        ("far", ["validator"], {"zone": "x"}, at)
    ]
    assert await query(settings, "SELECT count(*) FROM rejected_events") == [(0,)]


async def test_an_event_on_another_partition_than_its_sessions_is_kept_aside_against_its_session(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    """A producer that places by another hash than Kafka's murmur2 (here librdkafka's default) is
    told so, and its event sent again where it belongs counts once: the tables agree."""
    settings, names = prepared(topics, database_url)
    s = Script("s1")
    await produce(
        settings, records_of(names, [s.started(), s.requested(), s.staged(), s.assigned(clients=("a",))])
    )
    update = s.update("a")
    producer = make_producer(settings)
    await producer.start()
    try:
        count = len(await producer.partitions_for(names.events))
        home = (murmur2(b"s1") & 0x7FFFFFFF) % count  # Kafka's rule, by hand
        # where librdkafka's default partitioner (consistent_random: CRC32 of the key) puts it
        elsewhere = zlib.crc32(b"s1") % count
        assert elsewhere != home, "a key both partitioners place alike shows nothing"
        await producer.send_and_wait(names.events, encode(update), key=b"s1", partition=elsewhere)
    finally:
        await producer.stop()
    await produce(settings, records_of(names, [update]))  # the same event, on its session's partition
    await project(settings, names)

    (rejected,) = await query(
        settings,
        "SELECT partition, reason, detail, session_id, round_id, event_id, type FROM rejected_events",
    )
    assert rejected[:2] == (elsewhere, "wrong_partition")
    assert f"partition {home} of {count}, not {elsewhere}" in rejected[2]
    assert rejected[3:] == ("s1", "r1", update.event_id, "UpdateReceived")
    assert await query(settings, "SELECT status, reject_reason FROM round_updates") == [("accepted", None)]
    assert await query(
        settings, "SELECT partition, outcome FROM events WHERE event_id = %s", update.event_id
    ) == [(home, "applied")]
    assert await query(settings, "SELECT n_received FROM rounds") == [(1,)]
    assert await query(
        settings, "SELECT n_updates, n_accepted, n_rejected FROM client_participation WHERE client_id = 'a'"
    ) == [(1, 1, 0)]
    dead = await dead_letters(settings, names.deadletter, 1)
    assert dead == [(encode(update), "wrong_partition")]
