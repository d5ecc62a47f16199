"""What every role does with the events topic: decode records, fold them per partition, and
find the point a fold must restart from after a crash or a rebalance.

Sessions are keyed to partitions, so a partition's events fold on their own: each role
keeps one ``PartitionFold`` per assigned partition and drops it when the partition goes.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from roundlog.bus import partition_for
from roundlog.codec import DecodeError, decode, decode_with_json
from roundlog.config import Settings
from roundlog.domain.authority import KEY_HEADER, SIGNATURE_HEADER, Authority, Seal
from roundlog.domain.events import (
    ClientHeartbeat,
    Event,
    KeyRegistered,
    KeyRevoked,
    ModelImported,
    SessionFinished,
    SessionStarted,
    partition_key,
)
from roundlog.domain.ledger import Ledger
from roundlog.domain.rules import Reason, Refusal
from roundlog.domain.session import Outcome

#: How many leading bytes of an undecodable record are kept for the rejected_events table.
HEAD_BYTES = 64

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def seal_of(headers: Sequence[tuple[str, bytes]], value: bytes) -> Seal | None:
    """The author a record's headers claim, or None when it carries no (or a mangled) claim."""
    found = dict(headers)
    key, signature = found.get(KEY_HEADER), found.get(SIGNATURE_HEADER)
    if key is None or signature is None:
        return None
    return Seal(key.decode("ascii", "replace"), signature, value)


def log_time(timestamp_ms: int | None) -> datetime | None:
    """A record's timestamp as an aware time: the broker's own where the topic appends log time.

    A timestamp no calendar holds is taken as the epoch, so the events it carries are refused
    as skewed rather than let through unchecked.
    """
    if timestamp_ms is None or timestamp_ms < 0:
        return None
    try:
        return EPOCH + timedelta(milliseconds=timestamp_ms)
    except OverflowError:
        return EPOCH


class Entry(NamedTuple):
    """One record of the events topic and what it decoded to (a tuple: one is made per record)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    decoded: Event | DecodeError
    #: when the log took the record (see ``log_time``)
    logged_at: datetime | None = None
    #: who the headers say signed it
    seal: Seal | None = None
    #: the event as JSON, where the reader asked for it (the projector)
    json: str | None = None

    @classmethod
    def of(cls, record: ConsumerRecord[bytes, bytes], with_json: bool = False) -> Entry:
        value = record.value or b""
        decoded, json = decode_with_json(value) if with_json else (decode(value), None)
        return cls(
            record.partition,
            record.offset,
            record.key,
            value,
            decoded,
            log_time(record.timestamp),
            seal_of(record.headers, value) if record.headers else None,
            json,
        )


class UnhandledRecord(RuntimeError):
    """A record a role failed on for a reason nobody classified: a bug, reported with the record's
    place so it can be found, rather than retried in a loop."""

    def __init__(self, entry: Entry, error: BaseException) -> None:
        what = type(entry.decoded).__name__
        event_id = getattr(entry.decoded, "event_id", "-")
        super().__init__(
            f"{type(error).__name__}: {error} while handling {what} {event_id} "
            f"at partition {entry.partition} offset {entry.offset}"
        )


def placement_refusal(event: Event, partition: int, partitions: int) -> Refusal | None:
    """A session's events fold on its partition alone: one found elsewhere is refused as such,
    not as news of a session that partition never saw. Registry events (copied to every
    partition), imports and heartbeats belong to no session."""
    if isinstance(event, ClientHeartbeat | ModelImported | KeyRegistered | KeyRevoked):
        return None
    key = partition_key(event)
    expected = partition_for(key, partitions)
    if expected == partition:
        return None
    return Refusal(
        Reason.WRONG_PARTITION,
        f"session {key} is on partition {expected} of {partitions}, not {partition}: "
        "key the record by session_id and place it with murmur2 (docs/protocol.md)",
    )


@dataclass
class PartitionFold:
    """The ledger of one partition, and the offsets a restart needs."""

    partition: int
    ledger: Ledger = field(default_factory=Ledger)
    #: the events topic's partition count, to refuse events of another partition's sessions;
    #: None folds every event as if it were in place (a log read without its topic)
    partitions: int | None = None
    next_offset: int = 0
    #: offset of each open session's SessionStarted
    session_starts: dict[str, int] = field(default_factory=dict)
    #: offsets of each key's applied registry events (signed deployments), oldest first
    key_events: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def for_settings(cls, partition: int, partitions: int | None, settings: Settings) -> PartitionFold:
        """A fresh fold of one of the topic's ``partitions`` that enforces signatures when the
        deployment signs (``ROUNDLOG_AUTH``)."""
        authority = Authority(settings.operator_key) if settings.operator_key and settings.auth else None
        return cls(partition, Ledger(authority=authority), partitions)

    def apply(
        self, offset: int, event: Event, logged_at: datetime | None = None, seal: Seal | None = None
    ) -> Outcome:
        self.next_offset = offset + 1
        if self.partitions is not None and (
            misplaced := placement_refusal(event, self.partition, self.partitions)
        ):
            return Outcome(misplaced)
        outcome = self.ledger.apply(event, logged_at, seal)
        if outcome.applied and isinstance(event, SessionStarted):
            self.session_starts[event.session_id] = offset
        elif outcome.applied and isinstance(event, SessionFinished):
            self.session_starts.pop(event.session_id, None)
        elif outcome.applied and isinstance(event, KeyRegistered | KeyRevoked) and self.ledger.authority:
            self.key_events.setdefault(event.key_id, []).append(offset)
        return outcome

    def skip(self, offset: int) -> None:
        """A record that does not enter the ledger (undecodable, or one a role handles on its own,
        like the projector's heartbeats): it moves the offset and nothing else."""
        self.next_offset = offset + 1

    @property
    def replay_from(self) -> int:
        """Where a new fold must start to rebuild every open session: its first event, or here.

        Where events are signed, also the registry those sessions' events are judged by: a key's
        state at a position is that of its last registry event before it, so for each key the last
        one at or before the sessions' start is needed (``roundlog keys refresh`` restates every key,
        which moves this point on). Offsets older than that are never needed again.
        """
        start = min(self.session_starts.values(), default=self.next_offset)
        anchors = []
        for offsets in self.key_events.values():
            kept = [o for o in offsets if o <= start][-1:] + [o for o in offsets if o > start]
            offsets[:] = kept
            if kept[0] <= start:
                anchors.append(kept[0])
        return min([start, *anchors])


async def read_range(
    consumer: AIOKafkaConsumer, topic: str, partition: int, start: int, stop: int, with_json: bool = False
) -> AsyncIterator[Entry]:
    """Entries at offsets [start, stop) of one partition, through a group-less consumer."""
    if start >= stop:
        return
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek(tp, start)
    while True:
        batch = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
        for record in batch.get(tp, []):
            if record.offset >= stop:
                return
            yield Entry.of(record, with_json)
            if record.offset == stop - 1:
                return


async def refold(consumer: AIOKafkaConsumer, topic: str, fold: PartitionFold, start: int, stop: int) -> None:
    """Rebuild a partition's ledger from ``start`` up to ``stop`` without side effects."""
    async for entry in read_range(consumer, topic, fold.partition, start, stop):
        if isinstance(entry.decoded, DecodeError):
            fold.skip(entry.offset)
        else:
            fold.apply(entry.offset, entry.decoded, entry.logged_at, entry.seal)
    fold.next_offset = max(fold.next_offset, stop)


#: A refused record up to this size goes to the dead-letter topic whole; a larger one as its
#: first DEAD_LETTER_PREFIX bytes, so a dead letter always fits the producer's request limit.
DEAD_LETTER_WHOLE_BYTES = 256 * 1024
DEAD_LETTER_PREFIX = 4096
DEAD_LETTER_KEY_BYTES = 1024


async def dead_letter(producer: AIOKafkaProducer, topic: str, entry: Entry, reason: str, detail: str) -> None:
    """Keep a refused record, with why and where it came from, on the dead-letter topic.

    Any record, however large: the headers always carry its origin, size and sha256, and the
    value is the record itself or, past DEAD_LETTER_WHOLE_BYTES, a prefix of it.
    """
    value = entry.value
    kept = value if len(value) <= DEAD_LETTER_WHOLE_BYTES else value[:DEAD_LETTER_PREFIX]
    headers = [
        ("roundlog-reason", reason.encode()[:200]),
        ("roundlog-detail", detail.encode()[:1000]),
        ("roundlog-origin", f"{entry.partition}:{entry.offset}".encode()),
        ("roundlog-size", str(len(value)).encode()),
        ("roundlog-sha256", hashlib.sha256(value).hexdigest().encode()),
        ("roundlog-truncated", str(len(kept) < len(value)).lower().encode()),
    ]
    key = entry.key[:DEAD_LETTER_KEY_BYTES] if entry.key is not None else None
    await producer.send_and_wait(topic, kept, key=key, headers=headers)
