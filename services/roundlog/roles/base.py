"""The loop every role shares: consume -> fold -> react -> commit, restartable from the log.

A ``FoldingRole`` is one member of its role's consumer group on the events topic. On
assignment it re-folds each new partition silently from its restart point (by default
the group's committed offset, which roles keep at the partition's replay point), and
after each batch it commits that replay point again. Subclasses say what to do with an
applied event (``apply``), after a batch (``after_batch``) and after a re-fold
(``resume``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import ClassVar

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError
from aiokafka.structs import ConsumerRecord

from roundlog import observability as obs
from roundlog.bus import Consumer, Topics, make_consumer, make_producer, publish
from roundlog.codec import DecodeError
from roundlog.config import Settings
from roundlog.domain.events import Event
from roundlog.domain.session import Outcome
from roundlog.roles.stream import Entry, PartitionFold, UnhandledRecord, refold

Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class FoldingRole(ConsumerRebalanceListener):
    role: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.from_prefix(settings.topic_prefix)
        self.log = logging.getLogger(f"roundlog.{self.role}")
        self.consumer: Consumer = make_consumer(settings, group_id=f"{settings.topic_prefix}.{self.role}")
        # tensors carry a sha256 over the whole stream, so the per-batch CRC pass is redundant
        self.reader_consumer: Consumer = make_consumer(settings, check_crcs=False)
        self.producer = make_producer(settings)
        self.folds: dict[int, PartitionFold] = {}
        #: a rebalance callback and the processing of a batch never interleave
        self.busy = asyncio.Lock()
        self.failure: Exception | None = None

    # --- hooks ------------------------------------------------------------------------------------

    async def apply(self, fold: PartitionFold, entry: Entry, event: Event) -> Outcome:
        return fold.apply(entry.offset, event, entry.logged_at, entry.seal)

    async def after_batch(self) -> None:
        """Called after every poll, with or without records: time passes for the coordinator."""

    async def resume(self, fold: PartitionFold) -> None:
        """Called when a partition has been re-folded up to its end."""

    def forget(self, partition: int) -> None:
        """Called when a partition moves to another member."""

    # --- shared machinery -------------------------------------------------------------------------

    async def emit(self, events: Sequence[Event]) -> None:
        await publish(self.producer, self.topics, events)
        for event in events:
            obs.EMITTED.labels(self.role, type(event).__name__).inc()

    async def run(self, stop: asyncio.Event) -> None:
        await self.producer.start()
        await self.reader_consumer.start()
        await self.consumer.start()
        try:
            self.consumer.subscribe([self.topics.events], listener=self)
            async with obs.lag_watch(self.consumer, self.topics.events, self.role):
                while not stop.is_set():
                    polled = self.consumer.getmany(timeout_ms=200, max_records=1000)
                    # alive through a rebalance, unless one of its callbacks hangs
                    batch = await obs.beating(self.role, polled, alive=lambda: not self.busy.locked())
                    obs.heartbeat(self.role)
                    if self.failure is not None:
                        raise RuntimeError("re-folding assigned partitions failed") from self.failure
                    async with self.busy:
                        await self._process(batch)
                        await self.after_batch()
        finally:
            await self.consumer.stop()  # a dynamic member leaves the group: its partitions move on at once
            await self.reader_consumer.stop()
            await self.producer.stop()

    async def _process(self, batch: Batch) -> None:
        for tp, records in batch.items():
            fold = self.folds[tp.partition]
            for record in records:
                entry = Entry.of(record)
                if isinstance(entry.decoded, DecodeError):
                    obs.REJECTED.labels(self.role, entry.decoded.reason).inc()
                    fold.skip(entry.offset)
                    continue
                obs.EVENTS.labels(self.role, type(entry.decoded).__name__).inc()
                try:
                    outcome = await self.apply(fold, entry, entry.decoded)
                except Exception as error:
                    unhandled = UnhandledRecord(entry, error)
                    self.log.critical("stopping: %s", unhandled)
                    raise unhandled from error
                if outcome.refusal is not None:
                    obs.REJECTED.labels(self.role, outcome.refusal.reason).inc()
            await self._commit_replay_point(tp, fold)

    async def _commit_replay_point(self, tp: TopicPartition, fold: PartitionFold) -> None:
        """Commit where a re-fold of the partition would start. When the group rebalanced behind
        our back (its coordinator was away longer than the session timeout), the commit is refused:
        the partition's next owner re-folds from the previous replay point, which only costs time
        (folds are deterministic, and what this member emitted meanwhile carries the same ids as
        what the owner emits), and aiokafka rejoins the group at the next poll."""
        try:
            await self.consumer.commit({tp: fold.replay_from})
        except CommitFailedError:
            self.log.warning(
                "replay point %d not committed: the group rebalanced; rejoining",
                fold.replay_from,
                extra={"partition": tp.partition},
            )

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self.busy:
            for tp in revoked:
                self.folds.pop(tp.partition, None)
                self.forget(tp.partition)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        given = sorted(assigned)
        async with self.busy:
            try:
                partitions = len(await self.reader_consumer.topic_partitions(self.topics.events))
                for tp in given:
                    await self._recover(tp, partitions)
            except Exception as error:
                self.failure = error  # aiokafka logs and swallows a listener's error; the loop raises it
                raise
        # the whole assignment (rebalances are eager): which member holds what, for operators and tests
        self.log.info("holding events partitions %s", [tp.partition for tp in given])

    async def _recover(self, tp: TopicPartition, partitions: int) -> None:
        """Re-fold a new partition (of the topic's ``partitions``) from its replay point to its end,
        then let the role resume."""
        start = await self.consumer.committed(tp) or 0
        end = (await self.consumer.end_offsets([tp]))[tp]
        fold = PartitionFold.for_settings(tp.partition, partitions, self.settings)
        await refold(self.reader_consumer, self.topics.events, fold, start, end)
        self.folds[tp.partition] = fold
        await self.resume(fold)
        self.consumer.seek(tp, end)
        obs.heartbeat(self.role)
        self.log.info("re-folded offsets %d..%d", start, end, extra={"partition": tp.partition})
