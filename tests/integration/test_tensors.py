"""Arrays through the tensors topic: chunked, interleaved with other blobs, checked by hash."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from roundlog.arrays import StreamError
from roundlog.bus import Topics, make_consumer, make_producer
from roundlog.config import Settings
from roundlog.domain.events import ArraySpec, TensorRef
from roundlog.tensors import check_layout, read_tensors, write_tensors

CHUNK = 200  # bytes: small, so chunks split elements and cross arrays

Clients = tuple[AIOKafkaProducer, AIOKafkaConsumer, Topics]


def model(seed: int) -> list[tuple[str, np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(seed)
    return [
        ("dense/kernel", rng.standard_normal((37, 11)).astype(np.float32)),
        ("dense/bias", rng.standard_normal(11).astype(np.float64)),
        ("steps", np.arange(5, dtype=np.int16)),
    ]


@pytest.fixture
async def clients(topics: tuple[Settings, Topics]) -> AsyncIterator[Clients]:
    settings, names = topics
    producer, consumer = make_producer(settings), make_consumer(settings)
    await producer.start()
    await consumer.start()
    yield producer, consumer, names
    await producer.stop()
    await consumer.stop()


async def test_blobs_written_at_once_read_back_identically(clients: Clients) -> None:
    producer, consumer, names = clients
    blobs = {f"blob-{i}": model(i) for i in range(8)}
    refs = await asyncio.gather(
        *(
            write_tensors(producer, names.tensors, key, arrays, chunk_bytes=CHUNK)
            for key, arrays in blobs.items()
        )
    )
    shared = {r.partition for r in refs}
    assert len(shared) < len(refs), "some blobs share a partition, so their chunks interleave"
    for ref, arrays in zip(refs, blobs.values(), strict=True):
        assert ref.chunks > 3
        back = await read_tensors(consumer, names.tensors, ref)
        assert [name for name, _ in back] == [name for name, _ in arrays]
        for (_, got), (_, want) in zip(back, arrays, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


async def test_a_wrong_hash_is_refused(clients: Clients) -> None:
    producer, consumer, names = clients
    ref = await write_tensors(producer, names.tensors, "blob", model(1), chunk_bytes=CHUNK)
    with pytest.raises(StreamError) as refused:
        await read_tensors(consumer, names.tensors, dataclasses.replace(ref, sha256="0" * 64))
    assert refused.value.reason == "hash_mismatch"


async def test_a_missing_chunk_is_refused(clients: Clients) -> None:
    producer, consumer, names = clients
    ref = await write_tensors(producer, names.tensors, "blob", model(1), chunk_bytes=CHUNK)
    with pytest.raises(StreamError) as refused:
        await read_tensors(consumer, names.tensors, dataclasses.replace(ref, last_offset=ref.last_offset - 1))
    assert refused.value.reason == "incomplete"


def _ref(arrays: tuple[ArraySpec, ...]) -> TensorRef:
    return TensorRef(
        key="k", partition=0, first_offset=0, last_offset=0, chunks=1, nbytes=0, sha256="", arrays=arrays
    )


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ((ArraySpec(name="w", dtype="<f4", shape=(4,)),), "shape_mismatch"),
        ((ArraySpec(name="v", dtype="<f4", shape=(2, 2)),), "shape_mismatch"),
        ((), "shape_mismatch"),
        ((ArraySpec(name="w", dtype="<f8", shape=(2, 2)),), "dtype_mismatch"),
    ],
)
def test_an_update_must_match_the_models_layout(update: tuple[ArraySpec, ...], reason: str) -> None:
    base = (ArraySpec(name="w", dtype="<f4", shape=(2, 2)),)
    with pytest.raises(StreamError) as refused:
        check_layout(_ref(update), base)
    assert refused.value.reason == reason
    check_layout(_ref(base), base)
