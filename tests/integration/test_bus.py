"""The bus's promises, checked against the real broker."""

from __future__ import annotations

from aiokafka import TopicPartition

from roundlog.bus import Topics, make_consumer, make_producer
from roundlog.config import Settings


async def test_end_offsets_count_every_record_of_multi_record_batches(
    topics: tuple[Settings, Topics],
) -> None:
    settings, names = topics
    tp = TopicPartition(names.events, 0)
    producer, consumer = make_producer(settings), make_consumer(settings)
    await producer.start()
    await consumer.start()
    try:
        produced = 0
        for batch_size in (10, 5, 1, 7):
            futures = [
                await producer.send(names.events, b"x", key=b"k", partition=0) for _ in range(batch_size)
            ]
            last = [await f for f in futures][-1]
            produced += batch_size
            assert last.offset == produced - 1
            assert (await consumer.end_offsets([tp]))[tp] == produced
    finally:
        await producer.stop()
        await consumer.stop()


async def test_end_offsets_of_an_empty_partition_is_zero(topics: tuple[Settings, Topics]) -> None:
    settings, names = topics
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tp = TopicPartition(names.events, 1)
        assert await consumer.end_offsets([tp]) == {tp: 0}
    finally:
        await consumer.stop()
