"""What every role does with the events topic: decode records, fold them per partition, and
find the point a fold must restart from after a crash or a rebalance.

Sessions are keyed to partitions, so a partition's events fold on their own: each role
keeps one ``PartitionFold`` per assigned partition and drops it when the partition goes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from roundlog.codec import DecodeError, decode
from roundlog.domain.events import Event, SessionFinished, SessionStarted
from roundlog.domain.ledger import Ledger
from roundlog.domain.session import Outcome

#: How many leading bytes of an undecodable record are kept for the rejected_events table.
HEAD_BYTES = 64


@dataclass(frozen=True)
class Entry:
    """One record of the events topic and what it decoded to."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    decoded: Event | DecodeError

    @classmethod
    def of(cls, record: ConsumerRecord[bytes, bytes]) -> Entry:
        value = record.value or b""
        return cls(record.partition, record.offset, record.key, value, decode(value))


@dataclass
class PartitionFold:
    """The ledger of one partition, and the offsets a restart needs."""

    partition: int
    ledger: Ledger = field(default_factory=Ledger)
    next_offset: int = 0
    #: offset of each open session's SessionStarted
    session_starts: dict[str, int] = field(default_factory=dict)

    def apply(self, offset: int, event: Event) -> Outcome:
        outcome = self.ledger.apply(event)
        if outcome.applied and isinstance(event, SessionStarted):
            self.session_starts[event.session_id] = offset
        elif outcome.applied and isinstance(event, SessionFinished):
            self.session_starts.pop(event.session_id, None)
        self.next_offset = offset + 1
        return outcome

    def skip(self, offset: int) -> None:
        """A record that does not enter the ledger (undecodable, or one a role handles on its own,
        like the projector's heartbeats): it moves the offset and nothing else."""
        self.next_offset = offset + 1

    @property
    def replay_from(self) -> int:
        """Where a new fold must start to rebuild every open session: its first event, or here."""
        return min(self.session_starts.values(), default=self.next_offset)


async def read_range(
    consumer: AIOKafkaConsumer, topic: str, partition: int, start: int, stop: int
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
            yield Entry.of(record)
            if record.offset == stop - 1:
                return


async def refold(consumer: AIOKafkaConsumer, topic: str, fold: PartitionFold, start: int, stop: int) -> None:
    """Rebuild a partition's ledger from ``start`` up to ``stop`` without side effects."""
    async for entry in read_range(consumer, topic, fold.partition, start, stop):
        if isinstance(entry.decoded, DecodeError):
            fold.skip(entry.offset)
        else:
            fold.apply(entry.offset, entry.decoded)
    fold.next_offset = max(fold.next_offset, stop)


async def dead_letter(producer: AIOKafkaProducer, topic: str, entry: Entry, reason: str, detail: str) -> None:
    """Keep a refused record, with why and where it came from, on the dead-letter topic."""
    headers = [
        ("roundlog-reason", reason.encode()),
        ("roundlog-detail", detail.encode()[:1000]),
        ("roundlog-origin", f"{entry.partition}:{entry.offset}".encode()),
    ]
    await producer.send_and_wait(topic, entry.value, key=entry.key, headers=headers)
