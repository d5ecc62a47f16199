"""The aggregator role: consume the events, fold accepted updates as they arrive, emit each new model.

Restart-safe by construction: the group's committed offset of a partition is its replay
point (the first event of its oldest open session), so after a crash or a rebalance the
role re-folds the log from there, folds the open rounds' updates again and emits what is
missing. Emitted events have deterministic ids, so an emission repeated after a crash is
the same event, and the fold ignores the second copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from roundlog.arrays import sha256_of
from roundlog.bus import Consumer, Topics, make_consumer, make_producer, publish
from roundlog.clock import utc_now
from roundlog.codec import DecodeError
from roundlog.config import Settings
from roundlog.domain.events import RoundAggregated, RoundFailed, UpdateRejected, derived_id
from roundlog.domain.round import Round
from roundlog.domain.session import Session
from roundlog.roles.aggregation import Closed, LogAggregation, Unusable
from roundlog.roles.stream import Entry, PartitionFold, refold
from roundlog.tensors import TensorReader, write_tensors

log = logging.getLogger("roundlog.aggregator")


def model_id_of(round_id: str) -> str:
    return derived_id(round_id, "model")


class EmittingSink:
    """Writes each new model to the tensors topic and announces it on the events topic."""

    def __init__(self, producer: AIOKafkaProducer, topics: Topics) -> None:
        self._producer = producer
        self._topics = topics

    async def unusable(self, session: Session, round_: Round, rejection: Unusable) -> None:
        update = rejection.update
        log.warning(
            "update %s of round %s is unusable: %s", update.update_id, round_.round_id, rejection.error
        )
        event = UpdateRejected(
            event_id=derived_id(round_.round_id, "unusable", update.update_id),
            occurred_at=utc_now(),
            session_id=session.session_id,
            round_id=round_.round_id,
            client_id=update.client_id,
            update_id=update.update_id,
            reason=rejection.error.reason,
            detail=rejection.error.detail,
        )
        await publish(self._producer, self._topics, [event])

    async def closed(self, session: Session, round_: Round, outcome: Closed) -> None:
        if outcome.result is None or outcome.aggregation is None:
            log.warning("round %s failed: %s %s", round_.round_id, outcome.fail_reason, outcome.detail)
            failed = RoundFailed(
                event_id=derived_id(round_.round_id, "failed"),
                occurred_at=utc_now(),
                session_id=session.session_id,
                round_id=round_.round_id,
                reason=outcome.fail_reason,
                detail=outcome.detail,
            )
            await publish(self._producer, self._topics, [failed])
            return
        result, aggregation = outcome.result, outcome.aggregation
        model_id = model_id_of(round_.round_id)
        tensor = await write_tensors(self._producer, self._topics.tensors, model_id, result.arrays)
        state = None
        if result.state is not None:
            state_key = derived_id(round_.round_id, "optimizer-state")
            state = await write_tensors(self._producer, self._topics.tensors, state_key, result.state)
        aggregated = RoundAggregated(
            event_id=derived_id(round_.round_id, "aggregated"),
            occurred_at=utc_now(),
            session_id=session.session_id,
            round_id=round_.round_id,
            model_id=model_id,
            parent_model_id=round_.base_model_id,
            tensor=tensor,
            optimizer_state=state,
            update_ids=tuple(u.update_id for u in aggregation.folded),
            total_weight=result.total_weight,
            time_model_load=aggregation.load_seconds,
            time_aggregation=aggregation.fold_seconds,
        )
        await publish(self._producer, self._topics, [aggregated])
        log.info(
            "round %s aggregated: %d updates, weight %g, model %s sha256 %s",
            round_.round_id,
            result.updates,
            result.total_weight,
            model_id,
            sha256_of(result.arrays)[:12],
        )


class AggregatorRole(ConsumerRebalanceListener):
    """One member of the aggregator group: a loop of consume -> fold -> emit -> commit."""

    def __init__(self, settings: Settings) -> None:
        self.topics = Topics.from_prefix(settings.topic_prefix)
        self.consumer: Consumer = make_consumer(settings, group_id=f"{settings.topic_prefix}.aggregator")
        # tensors carry a sha256 over the whole stream, so the per-batch CRC pass is redundant
        self.reader_consumer: Consumer = make_consumer(settings, check_crcs=False)
        self.producer = make_producer(settings)
        self.folds: dict[int, PartitionFold] = {}
        #: a rebalance callback and the processing of a batch never interleave
        self.busy = asyncio.Lock()
        self.failure: Exception | None = None
        self.aggregation = LogAggregation(
            TensorReader(self.reader_consumer, self.topics.tensors), EmittingSink(self.producer, self.topics)
        )

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self.busy:
            for tp in revoked:
                self.folds.pop(tp.partition, None)
                self.aggregation.forget_partition(tp.partition)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        async with self.busy:
            try:
                for tp in assigned:
                    await self._recover(tp)
            except Exception as error:
                # aiokafka logs and swallows a listener's exception; the loop re-raises it instead.
                self.failure = error
                raise

    async def _recover(self, tp: TopicPartition) -> None:
        """Rebuild a new partition from its replay point, then resume its open rounds."""
        start = await self.consumer.committed(tp) or 0
        end = (await self.consumer.end_offsets([tp]))[tp]
        fold = PartitionFold(tp.partition)
        await refold(self.reader_consumer, self.topics.events, fold, start, end)
        self.folds[tp.partition] = fold
        await self.aggregation.resume(fold)
        self.consumer.seek(tp, end)
        log.info("partition %d: re-folded offsets %d..%d, resuming", tp.partition, start, end)

    async def run(self, stop: asyncio.Event) -> None:
        await self.producer.start()
        await self.reader_consumer.start()
        await self.consumer.start()
        self.consumer.subscribe([self.topics.events], listener=self)
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=200, max_records=500)
                if self.failure is not None:
                    raise RuntimeError("recovering assigned partitions failed") from self.failure
                async with self.busy:
                    await self._process(batch)
        finally:
            await self.consumer.stop()
            await self.reader_consumer.stop()
            await self.producer.stop()

    async def _process(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        for tp, records in batch.items():
            fold = self.folds[tp.partition]
            for record in records:
                entry = Entry.of(record)
                if isinstance(entry.decoded, DecodeError):
                    fold.skip(entry.offset)
                else:
                    await self.aggregation.apply(fold, entry.offset, entry.decoded)
            await self.consumer.commit({tp: fold.replay_from})


async def run(settings: Settings, stop: asyncio.Event) -> None:
    await AggregatorRole(settings).run(stop)
