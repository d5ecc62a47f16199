"""The aggregator role: consume the events, fold accepted updates as they arrive, emit each new model.

Restart-safe by construction: the group's committed offset of a partition is its replay
point (the first event of its oldest open session), so after a crash or a rebalance the
role re-folds the log from there, folds the open rounds' updates again and emits what is
missing. Emitted events have deterministic ids, so an emission repeated after a crash is
the same event, and the fold ignores the second copy.

A process of this role also folds shards of sharded rounds (``shards``): the aggregator group
member reduces them, whichever members of the shard group fold them.
"""

from __future__ import annotations

import asyncio

from roundlog.config import Settings
from roundlog.domain.events import Event
from roundlog.domain.session import Outcome
from roundlog.roles.aggregation import LogAggregation
from roundlog.roles.base import FoldingRole
from roundlog.roles.emitting import EmittingSink
from roundlog.roles.shards import ShardWorker
from roundlog.roles.stream import Entry, PartitionFold
from roundlog.tensors import TensorReader


class AggregatorRole(FoldingRole):
    """One member of the aggregator group: consume -> fold updates -> emit models -> commit."""

    role = "aggregator"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.aggregation = LogAggregation(
            TensorReader(self.reader_consumer, self.topics.tensors), EmittingSink(self)
        )

    async def apply(self, fold: PartitionFold, entry: Entry, event: Event) -> Outcome:
        return await self.aggregation.apply(fold, entry, event)

    async def resume(self, fold: PartitionFold) -> None:
        await self.aggregation.resume(fold)

    def forget(self, partition: int) -> None:
        self.aggregation.forget_partition(partition)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """An aggregator process: a member of the aggregator group (unsharded rounds, reduces) and of
    the shard group (shards of sharded rounds). Either failing stops both, loudly."""
    tasks = [
        asyncio.create_task(AggregatorRole(settings).run(stop)),
        asyncio.create_task(ShardWorker(settings).run(stop)),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
