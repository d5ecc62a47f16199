"""The projector role: fold the log into PostgreSQL, every event exactly once.

Each batch is one transaction holding its row changes and the next offset of every
partition it touched, so the database alone says how far the projection got. On
assignment the projector reads those offsets, re-folds the partition silently from its
replay point to rebuild the ledger, and seeks there; Kafka's committed offsets are never
used. The fold runs before the write commits, so when a write fails the folds are thrown
away and rebuilt the same way, after a backoff: a record is never skipped.

Heartbeats (on the clients topic, or stray ones on the events topic) only move
``clients.last_seen`` forward, which needs no fold.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from roundlog import observability as obs
from roundlog.bus import Consumer, Topics, make_consumer, make_producer
from roundlog.codec import DecodeError
from roundlog.config import Settings
from roundlog.domain.authority import seal_problem
from roundlog.domain.events import ClientHeartbeat
from roundlog.domain.validation import event_problem
from roundlog.projections import writer
from roundlog.projections.rows import BatchRows, Folded, storable
from roundlog.roles.stream import Entry, PartitionFold, dead_letter, read_range

log = logging.getLogger("roundlog.projector")
#: The role's name in ``roundlog serve`` and in liveness.
ROLE = "projector"

#: Records per batch (one transaction): large enough that per-batch statements are amortised.
BATCH_RECORDS = 20_000
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
#: Records folded between two chances for the write in flight to move on.
YIELD_EVERY = 100

Batch = Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]]
#: A record of a batch: its topic, the entry, and the fold's view of it (events topic, decoded only).
Item = tuple[str, Entry, Folded | None]


def fewer_collections() -> None:
    """Run the cyclic garbage collector only past a million young objects (first generation: 700).

    A batch keeps hundreds of thousands of young objects alive (records, events, JSON, rows)
    until it is written, and every collection that runs meanwhile scans them all, twice on their
    way to the old generation: at 50,000 that still cost 15-20 us per event. Above two batches'
    worth, collections run between batches, when those objects are gone. The objects form no
    cycles worth collecting promptly. Process-wide, so it also holds for roles sharing the process.
    """
    first, *older = gc.get_threshold()
    gc.set_threshold(max(first, 1_000_000), *older)


def consumer_name(settings: Settings) -> str:
    """The projector's consumer group, and its key in ``projector_offsets``."""
    return f"{settings.topic_prefix}.projector"


def fold_entry(fold: PartitionFold, entry: Entry) -> Folded | None:
    """One record of the events topic through the fold, the same step live and when restoring;
    None for a record that does not decode."""
    if isinstance(entry.decoded, DecodeError):
        fold.skip(entry.offset)
        return None
    event, text = storable(entry.decoded, entry.json)
    session_id: str | None = getattr(event, "session_id", None)
    # Held before applying: a SessionFinished takes the session out of the ledger.
    before = fold.ledger.sessions.get(session_id) if session_id else None
    outcome = fold.apply(entry.offset, event, entry.logged_at, entry.seal)
    session = fold.ledger.sessions.get(session_id, before) if session_id else None
    return Folded(entry, event, outcome, session, text)


@dataclass(frozen=True)
class _Folded:
    """A folded batch waiting to be written: its records, where each partition started and ends."""

    items: list[Item]
    started: dict[writer.Partition, int]
    marks: dict[writer.Partition, writer.Bookmark]


class Projector:
    """Folds batches of records into rows and writes each batch in one transaction with its offsets.

    The write of one batch overlaps the fold of the next (PostgreSQL works on its own core
    meanwhile); its rows are derived before that fold starts, a batch is only written once the
    previous one has committed, and when a write fails, everything folded since is thrown away
    with the folds, which are then restored.

    Used by the consumer-group role and by replay (assigned partitions, no dead-letter
    producer): the same code, so a replay that differs from the live tables is a finding.
    A lock keeps restores (rebalance callbacks) and batches from interleaving.
    """

    def __init__(
        self,
        settings: Settings,
        db: writer.Database,
        reader: Consumer,
        producer: AIOKafkaProducer | None,
        name: str,
    ) -> None:
        self.settings = settings
        self.topics = Topics.from_prefix(settings.topic_prefix)
        self.db = db
        self.reader = reader
        self.producer = producer
        self.name = name
        self.folds: dict[TopicPartition, PartitionFold] = {}
        self.projected = 0
        self._failures = 0
        self._lock = asyncio.Lock()
        self._writing: asyncio.Task[int] | None = None

    @property
    def failing(self) -> bool:
        """True from a failed database round trip until a batch commits again: not alive meanwhile."""
        return self._failures > 0

    @property
    def busy(self) -> bool:
        """True while a batch, a restore or a revocation runs (e.g. in a rebalance callback)."""
        return self._lock.locked()

    async def restore(self, consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]) -> None:
        """The assignment path: stored bookmarks, a silent re-fold up to them, a seek to them."""
        async with self._lock:
            if await self._settle(consumer):
                await self._restore(consumer, partitions)

    async def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions revoked: their last batch is written first, then their folds go."""
        async with self._lock:
            await self._settle(consumer=None)
            for tp in partitions:
                self.folds.pop(tp, None)

    async def flush(self, consumer: AIOKafkaConsumer) -> None:
        """Wait until the batch in flight has committed (or failed, and the folds were restored)."""
        async with self._lock:
            await self._settle(consumer)

    async def close(self) -> None:
        """Abandon the batch in flight: uncommitted, it is simply projected again next time."""
        if self._writing is not None:
            self._writing.cancel()
            await asyncio.gather(self._writing, return_exceptions=True)
            self._writing = None

    async def project(self, consumer: AIOKafkaConsumer, batch: Batch) -> int:
        """Fold one batch and start writing it; returns the records folded (0 after a failure, which
        rebuilds the folds from the database: the records then come again)."""
        async with self._lock:
            if any(tp not in self.folds for tp in batch):
                # The restore in the rebalance callback failed.
                await self._recover(consumer)
                return 0
            folded = await self._fold_batch(batch)
            if not await self._settle(consumer) or not folded.items:
                return 0
            try:
                # The rows are taken now, before the next batch folds on: they are this batch's state.
                rows = await self._rows(folded)
            except Exception:
                self._failures += 1
                log.exception("projector: reading known event ids failed (attempt %d)", self._failures)
                await self._recover(consumer)
                return 0
            self._writing = asyncio.create_task(self._write(folded, rows))
            return len(folded.items)

    async def _fold_batch(self, batch: Batch) -> _Folded:
        started: dict[writer.Partition, int] = {}
        items: list[Item] = []
        for tp, records in batch.items():
            fold = self.folds[tp]
            # Records below the bookmark were fetched before a seek: they are projected already.
            fresh = [r for r in records if r.offset >= fold.next_offset]
            if fresh:
                started[(tp.topic, tp.partition)] = fold.next_offset
            for n, record in enumerate(fresh, start=1):
                items.append(self._fold(tp, fold, Entry.of(record, with_json=True)))
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let the write in flight send its next statement
        marks = {
            (tp.topic, tp.partition): writer.Bookmark(fold.next_offset, fold.replay_from)
            for tp, fold in self.folds.items()
            if (tp.topic, tp.partition) in started
        }
        return _Folded(items, started, marks)

    def _fold(self, tp: TopicPartition, fold: PartitionFold, entry: Entry) -> Item:
        if tp.topic == self.topics.events:
            return (tp.topic, entry, fold_entry(fold, entry))
        fold.skip(entry.offset)
        return (tp.topic, entry, None)

    async def _settle(self, consumer: AIOKafkaConsumer | None) -> bool:
        """Wait for the write in flight. False if it failed: the folds were then restored (when a
        consumer is at hand) or dropped, so whatever was folded after that batch is void."""
        writing, self._writing = self._writing, None
        if writing is None:
            return True
        try:
            self.projected += await writing
        except Exception:
            self._failures += 1
            log.exception(
                "projector: writing a batch failed (attempt %d); rebuilding the folds from the database "
                "and projecting again from the stored offsets",
                self._failures,
            )
            if consumer is None:
                self.folds.clear()
            else:
                await self._recover(consumer)
            return False
        self._failures = 0
        return True

    async def _restore(self, consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]) -> None:
        wanted = sorted(partitions)
        for tp in wanted:
            self.folds.pop(tp, None)
        async with self.db.transaction() as conn:
            marks = await writer.bookmarks(conn, self.name, [(tp.topic, tp.partition) for tp in wanted])
            finished = {
                tp.partition: await writer.finished_sessions(conn, tp.partition)
                for tp in wanted
                if tp.topic == self.topics.events
            }
        count = len(await self.reader.topic_partitions(self.topics.events))
        for tp in wanted:
            mark = marks[(tp.topic, tp.partition)]
            fold = PartitionFold.for_settings(tp.partition, count, self.settings)
            if tp.topic == self.topics.events:
                # Sessions that finished before the replay point are not re-folded: the table knows them.
                fold.ledger.finished |= finished[tp.partition]
                began = time.monotonic()
                async for entry in read_range(
                    self.reader, tp.topic, tp.partition, mark.replay_from, mark.next_offset, with_json=True
                ):
                    fold_entry(fold, entry)
                log.info(
                    "%s[%d]: re-folded offsets %d..%d in %.1fs (%d open sessions), projecting from %d",
                    tp.topic,
                    tp.partition,
                    mark.replay_from,
                    mark.next_offset,
                    time.monotonic() - began,
                    len(fold.ledger.sessions),
                    mark.next_offset,
                )
            fold.next_offset = mark.next_offset
            self.folds[tp] = fold
            consumer.seek(tp, mark.next_offset)

    async def _recover(self, consumer: AIOKafkaConsumer) -> None:
        """Throw every fold away and restore the assignment from the database, backing off until it works."""
        self.folds.clear()
        while True:
            if self._failures:
                await asyncio.sleep(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1)))
            try:
                await self._restore(consumer, consumer.assignment())
                return
            except Exception:
                self._failures += 1
                log.exception("projector: restoring from the database failed (attempt %d)", self._failures)

    async def _rows(self, folded: _Folded) -> BatchRows:
        """The batch's row changes; its event ids already in the table are re-emissions."""
        ids = [f.event.event_id for _, _, f in folded.items if f is not None]
        async with self.db.transaction() as conn:
            known = await writer.known_event_ids(conn, ids)
        rows = BatchRows(self.topics.events, known)
        for topic, entry, f in folded.items:
            if f is not None:
                rows.folded(f)
            elif isinstance(entry.decoded, DecodeError):
                rows.undecodable(topic, entry, entry.decoded)
            elif isinstance(event := storable(entry.decoded, entry.json)[0], ClientHeartbeat):
                refusal = event_problem(event, entry.logged_at)
                if refusal is None and self.settings.auth:
                    # Its signature only: whether the key may speak for the client is the registry's
                    # answer in each partition, which ``clients.key_id`` joined with ``keys`` shows.
                    refusal = seal_problem(entry.seal)
                if refusal is None:
                    rows.heartbeat(event, entry)
                else:
                    rows.refused(topic, entry, event, refusal)
            else:
                rows.misplaced(topic, entry, event)
        rows.snapshot()
        return rows

    async def _write(self, folded: _Folded, rows: BatchRows) -> int:
        async with self.db.transaction() as conn:
            await writer.fence(conn, self.name, folded.started)
            await self._dead_letter(rows)
            await writer.write(conn, rows, self.name, folded.marks)
        return len(folded.items)

    async def _dead_letter(self, rows: BatchRows) -> None:
        """Before the commit: a crash in between repeats a dead letter (with its origin), never loses one."""
        if not rows.rejections:
            return
        reasons = collections.Counter(r.reason for r in rows.rejections)
        log.info(
            "projector: %d records rejected (%s), kept in rejected_events%s",
            len(rows.rejections),
            ", ".join(f"{reason} {n}" for reason, n in reasons.most_common()),
            " and on the dead-letter topic" if self.producer is not None else "",
        )
        for r in rows.rejections:
            if r.event is None:
                log.warning(
                    "undecodable record %s[%d]@%d: %s: %s",
                    r.topic,
                    r.entry.partition,
                    r.entry.offset,
                    r.reason,
                    r.detail,
                )
        if self.producer is not None:
            producer = self.producer
            await asyncio.gather(
                *(
                    dead_letter(producer, self.topics.deadletter, r.entry, r.reason, r.detail)
                    for r in rows.rejections
                )
            )


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, projector: Projector, consumer: AIOKafkaConsumer) -> None:
        self.projector = projector
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.projector.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await self.projector.restore(self.consumer, assigned)
        except Exception:
            # aiokafka would swallow it; the loop sees the partitions without a fold and recovers.
            log.exception("projector: restoring %s on assignment failed; will retry", sorted(assigned))


@contextlib.asynccontextmanager
async def projector_for(
    settings: Settings, schema: str | None = None, dead_letters: bool = True
) -> AsyncIterator[Projector]:
    """A projector with its database, re-fold reader and dead-letter producer, all closed after."""
    db = writer.Database(settings.database_url, schema)
    reader = make_consumer(settings)
    producer = make_producer(settings) if dead_letters else None
    try:
        await db.check()
        await reader.start()
        if producer is not None:
            await producer.start()
        projector = Projector(settings, db, reader, producer, consumer_name(settings))
        try:
            yield projector
        finally:
            await projector.close()
    finally:
        if producer is not None:
            await producer.stop()
        await reader.stop()
        await db.close()


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """``roundlog serve --role projector``: consume, fold, persist, until ``stop`` is set."""
    topics = Topics.from_prefix(settings.topic_prefix)
    fewer_collections()
    async with projector_for(settings) as projector:
        consumer = make_consumer(settings, group_id=consumer_name(settings))
        await consumer.start()
        consumer.subscribe([topics.events, topics.clients], listener=_Rebalance(projector, consumer))
        log.info("projector: consuming %s and %s as %s", topics.events, topics.clients, projector.name)

        def waiting_alive() -> bool:
            """Waiting on the group counts as alive unless a callback holds the projector, or it fails."""
            return not (projector.busy or projector.failing)

        async def loop() -> None:
            reported = time.monotonic()
            while True:
                polled = consumer.getmany(timeout_ms=500, max_records=BATCH_RECORDS)
                batch = await obs.beating(ROLE, polled, alive=waiting_alive)
                if batch:
                    await projector.project(consumer, batch)
                else:
                    await projector.flush(consumer)  # idle: commit the last batch now
                # A blocked write holds the loop above; a failing one leaves the projector failing.
                # Either way no beat, so /healthz turns 503 after the stale limit.
                if not projector.failing:
                    obs.heartbeat(ROLE)
                if time.monotonic() - reported > 10:
                    log.info("projector: %d records projected so far", projector.projected)
                    reported = time.monotonic()

        work = asyncio.create_task(loop())
        stopping = asyncio.create_task(stop.wait())
        try:
            # Stop at once, even mid-batch or mid-backoff: an uncommitted batch is simply done again.
            await asyncio.wait([work, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, stopping):
                task.cancel()
            await asyncio.gather(work, stopping, return_exceptions=True)
            await consumer.stop()
        if work.done() and not work.cancelled() and (error := work.exception()) is not None:
            raise error
