"""The raw byte stream of named arrays: chunking, hashing and element-aligned reassembly."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roundlog.arrays import (
    NamedArrays,
    Reassembler,
    StreamError,
    assemble,
    raw_chunks,
    sha256_of,
    specs_of,
)
from roundlog.domain.events import ArraySpec, TensorRef
from roundlog.tensors import check_layout

DTYPES = ("<f4", ">f4", "<f8", "<f2", "<i4", ">i8", "|u1", "|b1", "<c8")


def little_endian_bytes(arrays: NamedArrays) -> bytes:
    """The stream as the spec defines it, computed the slow obvious way."""
    return b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes(order="C") for _, a in arrays)


def random_arrays(seed: int, count: int) -> NamedArrays:
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        shape = tuple(int(d) for d in rng.integers(0, 5, size=rng.integers(0, 3)))
        dtype = np.dtype(DTYPES[rng.integers(len(DTYPES))])
        values = rng.standard_normal(shape) * 100
        arrays.append((f"a{i}", np.asarray(values).astype(dtype)))
    return arrays


def cut(stream: bytes, sizes: list[int]) -> list[bytes]:
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(stream[pos : pos + size])
        pos += size
    return [*chunks, stream[pos:]] if pos < len(stream) else chunks


def reassemble(arrays: NamedArrays, chunks: list[bytes]) -> list[np.ndarray]:
    specs = specs_of(arrays)
    out = [np.zeros(int(np.prod(s.shape)), dtype=s.dtype) for s in specs]
    reassembler = Reassembler(specs)
    for chunk in chunks:
        for piece in reassembler.feed(chunk):
            assert piece.values.dtype == np.dtype(specs[piece.index].dtype)
            out[piece.index][piece.start : piece.start + len(piece.values)] = piece.values
    reassembler.finish(hashlib.sha256(b"".join(chunks)).hexdigest())
    return [a.reshape(s.shape) for a, s in zip(out, specs, strict=True)]


MODEL: NamedArrays = [
    ("w", np.arange(12, dtype=np.float32).reshape(3, 4)),
    ("b", np.array([1, -2, 3], dtype=">i8")),
    ("half", np.array([0.5, 1.5], dtype=np.float16)),
    ("step", np.array(7.0)),
    ("empty", np.zeros((0, 3), dtype=np.float32)),
]


def test_specs_name_little_endian_dtypes_and_shapes() -> None:
    assert specs_of(MODEL) == (
        ArraySpec(name="w", dtype="<f4", shape=(3, 4)),
        ArraySpec(name="b", dtype="<i8", shape=(3,)),
        ArraySpec(name="half", dtype="<f2", shape=(2,)),
        ArraySpec(name="step", dtype="<f8", shape=()),
        ArraySpec(name="empty", dtype="<f4", shape=(0, 3)),
    )
    assert specs_of([("flag", np.array([True]))])[0].dtype == "|b1"


def test_specs_reject_duplicate_names_and_unstreamable_dtypes() -> None:
    with pytest.raises(ValueError, match="unique"):
        specs_of([("x", np.zeros(1)), ("x", np.zeros(1))])
    with pytest.raises(StreamError) as error:
        specs_of([("x", np.array(["a"], dtype=object))])
    assert error.value.reason == "dtype_mismatch"


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 16, 1000])
def test_raw_chunks_cut_the_little_endian_stream_into_full_chunks(chunk_bytes: int) -> None:
    chunks = [bytes(c) for c in raw_chunks(MODEL, chunk_bytes)]
    assert b"".join(chunks) == little_endian_bytes(MODEL)
    assert all(len(c) == chunk_bytes for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= chunk_bytes


def test_raw_chunks_of_non_contiguous_and_big_endian_arrays() -> None:
    strided = np.arange(20, dtype=">f8").reshape(4, 5).T[::2]
    arrays = [("strided", strided)]
    assert b"".join(raw_chunks(arrays, 8)) == little_endian_bytes(arrays)
    assert sha256_of(arrays) == hashlib.sha256(little_endian_bytes(arrays)).hexdigest()


def test_a_chunk_inside_one_array_is_a_zero_copy_slice() -> None:
    big = np.arange(1000, dtype=np.float32)
    first = next(raw_chunks([("big", big)], 400))
    assert np.shares_memory(np.frombuffer(first, dtype=np.uint8), big)


def test_no_arrays_no_chunks() -> None:
    assert list(raw_chunks([("empty", np.zeros(0))], 10)) == []
    assert sha256_of([]) == hashlib.sha256(b"").hexdigest()


def test_sha256_is_the_hash_of_the_raw_stream() -> None:
    assert sha256_of(MODEL) == hashlib.sha256(little_endian_bytes(MODEL)).hexdigest()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    count=st.integers(1, 6),
    sizes=st.lists(st.integers(1, 40), max_size=30),
)
def test_any_chunking_reassembles_the_arrays(seed: int, count: int, sizes: list[int]) -> None:
    """Chunks may split elements and cross arrays; pieces always carry whole elements."""
    arrays = random_arrays(seed, count)
    stream = little_endian_bytes(arrays)
    for got, (_, want) in zip(reassemble(arrays, cut(stream, sizes)), arrays, strict=True):
        assert got.shape == want.shape
        assert got.tobytes() == want.astype(want.dtype.newbyteorder("<")).tobytes()


def test_assemble_returns_whole_arrays_and_checks_the_hash() -> None:
    chunks = list(raw_chunks(MODEL, 5))
    arrays = assemble(specs_of(MODEL), chunks, sha256_of(MODEL))
    for got, (_, want) in zip(arrays, MODEL, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(StreamError) as error:
        assemble(specs_of(MODEL), chunks[:-1])
    assert error.value.reason == "incomplete"


def test_truncated_stream_is_incomplete() -> None:
    stream = little_endian_bytes(MODEL)
    reassembler = Reassembler(specs_of(MODEL))
    reassembler.feed(stream[:-3])  # stops inside the last element
    with pytest.raises(StreamError) as error:
        reassembler.finish(sha256_of(MODEL))
    assert error.value.reason == "incomplete"
    assert f"{len(stream) - 3} of {len(stream)} bytes" in error.value.detail


def test_extra_bytes_overflow_as_soon_as_they_arrive() -> None:
    reassembler = Reassembler(specs_of(MODEL))
    reassembler.feed(little_endian_bytes(MODEL))
    with pytest.raises(StreamError) as error:
        reassembler.feed(b"\x00")
    assert error.value.reason == "overflow"


def test_a_flipped_byte_is_a_hash_mismatch() -> None:
    stream = bytearray(little_endian_bytes(MODEL))
    stream[5] ^= 0x01
    reassembler = Reassembler(specs_of(MODEL))
    reassembler.feed(bytes(stream))
    with pytest.raises(StreamError) as error:
        reassembler.finish(sha256_of(MODEL))
    assert error.value.reason == "hash_mismatch"
    assert str(error.value).startswith("hash_mismatch: ")


def test_finish_accepts_an_upper_case_hex_digest() -> None:
    reassembler = Reassembler(specs_of(MODEL))
    reassembler.feed(little_endian_bytes(MODEL))
    reassembler.finish(sha256_of(MODEL).upper())


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (ArraySpec(name="x", dtype=">f4", shape=(2,)), "dtype_mismatch"),
        (ArraySpec(name="x", dtype="|O", shape=(2,)), "dtype_mismatch"),
        (ArraySpec(name="x", dtype="nonsense", shape=(2,)), "dtype_mismatch"),
        (ArraySpec(name="x", dtype="<f4", shape=(-1,)), "shape_mismatch"),
    ],
)
def test_specs_a_stream_cannot_carry_are_rejected(spec: ArraySpec, reason: str) -> None:
    with pytest.raises(StreamError) as error:
        Reassembler([spec])
    assert error.value.reason == reason


@pytest.mark.parametrize(
    ("update", "model", "same"),
    [
        ("float32", "<f4", True),
        ("f4", "<f4", True),
        ("<f4", "float32", True),
        ("uint8", "|u1", True),
        ("bool", "|b1", True),
        ("float64", "<f4", False),
        ("int32", "<f4", False),
        ("<i8", "<u8", False),
    ],
)
def test_an_update_matches_the_model_by_dtype_not_by_its_spelling(
    update: str, model: str, same: bool
) -> None:
    """A client that writes ``float32`` where roundlog wrote ``<f4`` sent the same bytes."""
    got = ref_with(update)
    want = ref_with(model)
    if same:
        check_layout(got, want.arrays)
    else:
        with pytest.raises(StreamError) as error:
            check_layout(got, want.arrays)
        assert error.value.reason == "dtype_mismatch"


def ref_with(dtype: str) -> TensorRef:
    spec = ArraySpec(name="w", dtype=dtype, shape=(3,))
    return TensorRef(
        key="k", partition=0, first_offset=0, last_offset=0, chunks=1, nbytes=0, sha256="", arrays=(spec,)
    )


@pytest.mark.parametrize("spelling", ["float32", "f4", "<f4"])
def test_every_spelling_of_a_dtype_reads_the_same_little_endian_values(spelling: str) -> None:
    values = np.array([1.5, -2.0, 3.25], dtype="<f4")
    reassembler = Reassembler([ArraySpec(name="w", dtype=spelling, shape=(3,))])
    (piece,) = reassembler.feed(values.tobytes())
    assert piece.values.dtype.str == "<f4" and np.array_equal(piece.values, values)
