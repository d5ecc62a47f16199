"""Arrays over the tensors topic: chunks of at most 1 MiB, located by a TensorRef.

A writer sends one blob (a model or an update) as consecutive chunks keyed by the
blob's id; other blobs may interleave on the same partition, so the reader seeks to
the first offset, keeps the records whose key is the blob's, and stops at the last
offset. Chunks stream out one by one: a blob is never held whole by the reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import numpy as np
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from roundlog.arrays import NamedArrays, Reassembler, StreamError, raw_chunks, sha256_of, specs_of, wire_dtype
from roundlog.bus import TENSOR_CHUNK_BYTES, Consumer
from roundlog.domain.events import ArraySpec, TensorRef
from roundlog.domain.validation import tensor_ref_problem

SEQ_HEADER = "roundlog-chunk"


async def write_tensors(
    producer: AIOKafkaProducer,
    topic: str,
    key: str,
    arrays: NamedArrays,
    chunk_bytes: int = TENSOR_CHUNK_BYTES,
) -> TensorRef:
    """Send the arrays' raw byte stream as chunks and say where they landed."""
    specs = specs_of(arrays)
    chunks = list(raw_chunks(arrays, chunk_bytes)) or [memoryview(b"")]
    key_bytes = key.encode()
    sent = [
        await producer.send(topic, bytes(chunk), key=key_bytes, headers=[(SEQ_HEADER, str(seq).encode())])
        for seq, chunk in enumerate(chunks)
    ]
    first, last = await sent[0], await sent[-1]
    for future in sent[1:-1]:
        await future
    if first.partition != last.partition:
        raise RuntimeError(f"chunks of {key} were spread over partitions: the partitioner must hash the key")
    return TensorRef(
        key=key,
        partition=first.partition,
        first_offset=first.offset,
        last_offset=last.offset,
        chunks=len(chunks),
        nbytes=sum(len(c) for c in chunks),
        sha256=sha256_of(arrays),
        arrays=specs,
    )


#: How long a reader waits for a chunk the broker should already have (it was written before the
#: event that points at it) before calling the stream incomplete.
CHUNK_WAIT_S = 10.0
#: After these waits without a record, the reader asks the broker where the partition ends. A
#: reference is past the end only when every answer says so: a partition whose leader just
#: moved may report its end short for a moment (the new leader's high watermark catches up at
#: its followers' next fetch), and chunks acknowledged by the in-sync replicas are never lost.
#: Once an answer shows the chunks are there, a slow fetch keeps its CHUNK_WAIT_S.
PAST_END_CHECKS_S = (1.0, 3.0)
POLL_MS = 250


async def read_chunks(consumer: Consumer, topic: str, ref: TensorRef) -> AsyncIterator[bytes]:
    """Yield the blob's chunks in order; a missing, misplaced or malformed chunk is a StreamError.

    ``consumer`` is a group-less consumer this reader may re-assign and seek at will. A
    TensorRef comes from a record anyone can write, so every way it can be wrong (a
    partition that does not exist, offsets past the end, a chunk without its sequence
    header) ends as a StreamError, promptly: nothing else escapes, and nothing waits long.
    """
    problem = tensor_ref_problem(ref)  # the fold checked refs from the log; this covers any other
    if problem is not None:
        raise StreamError("incomplete", f"tensors of {ref.key}: {problem}")
    tp = TopicPartition(topic, ref.partition)
    if consumer.assignment() != {tp}:
        consumer.assign([tp])
    consumer.seek(tp, ref.first_offset)
    key = ref.key.encode()
    expected_seq = 0
    position = ref.first_offset
    waited, checks = 0.0, list(PAST_END_CHECKS_S)
    while position <= ref.last_offset:
        records = (await consumer.getmany(tp, timeout_ms=POLL_MS, max_records=64)).get(tp, [])
        if records and records[0].offset < position:
            # The broker called our offset out of range and the consumer reset to the start. A new
            # leader says so while its high watermark catches up, so this is a miss like any
            # other: go back, wait a poll, and let the end-offset checks decide.
            consumer.seek(tp, position)
            records = []
            await asyncio.sleep(POLL_MS / 1000)
        if not records:
            waited += POLL_MS / 1000
            known = consumer.partitions_for_topic(topic)  # metadata of the assigned topic, after a poll
            if known is not None and ref.partition not in known:
                raise StreamError(
                    "incomplete", f"tensors of {ref.key}: {topic} has no partition {ref.partition}"
                )
            if checks and waited >= checks[0]:
                # The true end (Consumer.end_offsets), not the last fetch's high watermark, which may
                # predate the chunks: they were acknowledged before the event that points at them.
                checks.pop(0)
                end = await _end_offset(consumer, tp)
                if end is not None and end > position:
                    checks.clear()  # the chunks are there: wait for them
                elif end is not None and not checks:
                    raise StreamError(
                        "incomplete", f"tensors of {ref.key}: offset {position} is past the end ({end})"
                    )
            if waited >= CHUNK_WAIT_S:
                raise StreamError("incomplete", f"tensors of {ref.key}: no record at offset {position}")
            continue
        waited = 0.0
        for record in records:
            position = record.offset + 1
            if record.offset > ref.last_offset:
                break
            if record.key != key:
                continue
            seq = _sequence_number(record.headers)
            if seq != expected_seq:
                raise StreamError(
                    "incomplete", f"tensors of {ref.key}: chunk {seq} where {expected_seq} belongs"
                )
            if record.value is None:
                raise StreamError("incomplete", f"tensors of {ref.key}: chunk {seq} has no value")
            expected_seq += 1
            yield record.value
    if expected_seq != ref.chunks:
        raise StreamError("incomplete", f"tensors of {ref.key}: {expected_seq} of {ref.chunks} chunks found")


async def _end_offset(consumer: Consumer, tp: TopicPartition) -> int | None:
    """The partition's end, or None while the broker cannot say (its leader is moving)."""
    try:
        return (await consumer.end_offsets([tp]))[tp]
    except KafkaError:
        return None


def _sequence_number(headers: Sequence[tuple[str, bytes]]) -> int | None:
    """The chunk's ``roundlog-chunk`` header as a number, or None when it is missing or not one."""
    value = dict(headers).get(SEQ_HEADER)
    return int(value) if value is not None and value.isdigit() else None


def check_layout(ref: TensorRef, expected: Sequence[ArraySpec]) -> None:
    """An update must have exactly the base model's names, dtypes and shapes."""
    if len(ref.arrays) != len(expected):
        raise StreamError("shape_mismatch", f"{len(ref.arrays)} arrays, the model has {len(expected)}")
    for got, want in zip(ref.arrays, expected, strict=True):
        if got.name != want.name or got.shape != want.shape:
            raise StreamError(
                "shape_mismatch", f"{got.name}{list(got.shape)}, expected {want.name}{list(want.shape)}"
            )
        if wire_dtype(got.dtype) != wire_dtype(want.dtype):
            raise StreamError("dtype_mismatch", f"{got.name} is {got.dtype}, expected {want.dtype}")


async def read_tensors(consumer: Consumer, topic: str, ref: TensorRef) -> NamedArrays:
    """The whole blob as arrays, hash-checked: for export and staging, not for folding."""
    reassembler = Reassembler(ref.arrays)
    try:
        arrays = [np.empty(spec.shape, dtype=wire_dtype(spec.dtype)) for spec in ref.arrays]
    except MemoryError:
        raise StreamError(
            "too_large", f"tensors of {ref.key}: {ref.nbytes} bytes do not fit in memory"
        ) from None
    async for chunk in read_chunks(consumer, topic, ref):
        for piece in reassembler.feed(chunk):
            flat = arrays[piece.index].reshape(-1)
            flat[piece.start : piece.start + piece.values.size] = piece.values
    reassembler.finish(ref.sha256)
    return [(spec.name, array) for spec, array in zip(ref.arrays, arrays, strict=True)]


class TensorReader:
    """Reads blobs from the tensors topic through one group-less consumer, one blob at a time."""

    def __init__(self, consumer: Consumer, topic: str) -> None:
        self._consumer = consumer
        self._topic = topic

    def chunks(self, ref: TensorRef) -> AsyncIterator[bytes]:
        return read_chunks(self._consumer, self._topic, ref)

    async def arrays(self, ref: TensorRef) -> NamedArrays:
        return await read_tensors(self._consumer, self._topic, ref)
