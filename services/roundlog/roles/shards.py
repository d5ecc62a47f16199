"""The shard workers: they fold the shards of sharded rounds, spread over processes by a consumer group.

Every aggregator process is also a member of the group ``<prefix>.shards`` over the tensors
topic. It never reads the tensors through that membership (its partitions stay paused): what the
group gives it is a set of tensors partitions, and with them the shards it folds. Shard k of a
round of K shards belongs to the holder of tensors partition k mod T (the topic's T partitions),
and the round-robin assignment spreads a round's shards over the members. A member that dies
loses its partitions to the others, which fold its shards again from the log: a partial is
emitted under a deterministic id, so one published twice is the same event.

Each member follows every events partition, read only, from the aggregator group's replay
points, with a fold of its own: it knows each round's accepted updates and the moment the
machine closes the round, and folds the updates of its shards as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Sequence

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from roundlog.bus import Consumer, Topics, make_consumer, make_producer, publish
from roundlog.codec import DecodeError
from roundlog.config import Settings
from roundlog.domain.events import Event
from roundlog.roles.aggregation import LogAggregation
from roundlog.roles.emitting import EmittingSink
from roundlog.roles.stream import Entry, PartitionFold
from roundlog.tensors import TensorReader

log = logging.getLogger("roundlog.shards")

#: How often the membership consumer is polled: far below any max.poll.interval.ms.
MEMBERSHIP_POLL_S = 1.0


def shard_group(settings: Settings) -> str:
    return f"{settings.topic_prefix}.shards"


def holder_partition(shard: int, tensor_partitions: int) -> int:
    """The tensors partition whose holder folds ``shard``."""
    return shard % tensor_partitions


async def replay_points(
    settings: Settings, group_id: str, partitions: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """The offsets ``group_id`` committed (its members' replay points), 0 where none: read
    through a manual assignment, which never joins the group."""
    reader = make_consumer(dataclasses.replace(settings, instance_id=None), group_id=group_id)
    await reader.start()
    try:
        reader.assign(list(partitions))
        return {tp: (await reader.committed(tp)) or 0 for tp in partitions}
    finally:
        await reader.stop()


class ShardWorker:
    """One member of the shard group: follow the events -> fold the held shards -> emit partials."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.from_prefix(settings.topic_prefix)
        self.producer = make_producer(settings)
        self.membership: Consumer = make_consumer(
            settings,
            group_id=shard_group(settings),
            partition_assignment_strategy=(RoundRobinPartitionAssignor,),
        )
        self.events: Consumer = make_consumer(settings)
        self.tensors: Consumer = make_consumer(settings, check_crcs=False)
        self.aggregation = LogAggregation(
            TensorReader(self.tensors, self.topics.tensors),
            EmittingSink(self),
            shards=self.holds,
            reduces=False,
        )
        self.folds: dict[int, PartitionFold] = {}
        #: the tensors partitions whose shards this member folds; changed between batches only
        self.held: frozenset[int] = frozenset()
        #: what the group gave this member last, until the fold loop takes it
        self.given: frozenset[int] | None = None
        self.tensor_partitions = 1

    def holds(self, shard: int, shards: int) -> bool:
        return holder_partition(shard, self.tensor_partitions) in self.held

    async def emit(self, events: Sequence[Event]) -> None:
        await publish(self.producer, self.topics, events)

    async def run(self, stop: asyncio.Event) -> None:
        for client in (self.producer, self.events, self.tensors, self.membership):
            await client.start()
        membership: asyncio.Task[None] | None = None
        try:
            await self._follow_from_replay_points()
            self.membership.subscribe([self.topics.tensors], listener=_Holdings(self))
            membership = asyncio.create_task(self._stay_in_group(stop))
            while not stop.is_set():
                if membership.done():
                    membership.result()  # a membership that failed must not leave shards unfolded
                if self.given is not None:
                    await self._take(self.given)
                batch = await self.events.getmany(timeout_ms=200, max_records=1000)
                for tp, records in batch.items():
                    fold = self.folds[tp.partition]
                    for record in records:
                        entry = Entry.of(record)
                        if isinstance(entry.decoded, DecodeError):
                            fold.skip(entry.offset)
                        else:
                            await self.aggregation.apply(fold, entry, entry.decoded)
        finally:
            if membership is not None:
                membership.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await membership
            await self.membership.stop()  # leaves the group: its shards move on at once
            for client in (self.tensors, self.events, self.producer):
                await client.stop()

    async def _follow_from_replay_points(self) -> None:
        self.tensor_partitions = len(await self.events.topic_partitions(self.topics.tensors))
        partitions = await self.events.topic_partitions(self.topics.events)
        starts = await replay_points(self.settings, f"{self.settings.topic_prefix}.aggregator", partitions)
        self.events.assign(partitions)
        for tp, start in starts.items():
            self.folds[tp.partition] = PartitionFold.for_settings(
                tp.partition, len(partitions), self.settings
            )
            self.folds[tp.partition].next_offset = start
            self.events.seek(tp, start)

    async def _stay_in_group(self, stop: asyncio.Event) -> None:
        """Poll the membership consumer on its own, so a long fold never outlasts max.poll.interval.ms
        (its partitions are paused: the polls run the group's heartbeats and rebalances, no fetches)."""
        while not stop.is_set():
            await self.membership.getmany(timeout_ms=0)
            await asyncio.sleep(MEMBERSHIP_POLL_S)

    async def _take(self, given: frozenset[int]) -> None:
        """Between batches: drop the shards that went elsewhere, fold the new ones from the log."""
        self.given = None
        self.held = given
        self.aggregation.forget_unheld()
        for fold in self.folds.values():
            await self.aggregation.resume(fold)
        log.info("holding tensors partitions %s: folding their shards", sorted(given))


class _Holdings(ConsumerRebalanceListener):
    """Records which tensors partitions the group gave this member (the fold loop takes them between
    batches, so a shard's fold never changes hands halfway), and pauses them."""

    def __init__(self, worker: ShardWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._worker.given = frozenset()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        partitions = list(assigned)
        self._worker.membership.pause(*partitions)
        self._worker.given = frozenset(tp.partition for tp in partitions)
