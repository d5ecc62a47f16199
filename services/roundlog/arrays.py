"""A model or update as an ordered list of named arrays, and its raw byte stream.

The raw byte stream of a list of arrays is each array's C-contiguous little-endian
bytes, concatenated in order; its sha256 identifies the model. Transport cuts that
stream into chunks anywhere (inside an element, across arrays); the ``Reassembler``
turns chunks back into element-aligned pieces so an update can be folded as it
streams in, never materialised whole. Pure numpy: no I/O here.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from roundlog.domain.events import ArraySpec

#: An ordered list of (name, array): the order is part of the model's identity (its byte stream).
NamedArrays = Sequence[tuple[str, NDArray[Any]]]

#: Array dtype kinds a stream may carry: bool, signed/unsigned integers, floats, complex.
STREAMABLE_KINDS = "biufc"

StreamErrorReason = Literal[
    "incomplete",
    "overflow",
    "hash_mismatch",
    "dtype_mismatch",
    "shape_mismatch",
    "non_finite",
    "too_large",
    "weight_share",
]


class StreamError(Exception):
    """Why a stream of arrays cannot be used; ``reason`` is stable, ``detail`` is for people."""

    def __init__(self, reason: StreamErrorReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: StreamErrorReason = reason
        self.detail = detail


def little_endian(array: NDArray[Any]) -> NDArray[Any]:
    """The array as C-contiguous little-endian data: a view when it already is (the common case)."""
    if array.dtype.kind not in STREAMABLE_KINDS or array.dtype.fields is not None:
        raise StreamError(
            "dtype_mismatch", f"dtype {array.dtype} cannot be streamed (kinds {STREAMABLE_KINDS})"
        )
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def _raw_bytes(array: NDArray[Any]) -> NDArray[np.uint8]:
    return little_endian(array).reshape(-1).view(np.uint8)


def specs_of(arrays: NamedArrays) -> tuple[ArraySpec, ...]:
    """Names, little-endian dtypes (``'<f4'``, or ``'|u1'`` where byte order is moot) and shapes."""
    names = [name for name, _ in arrays]
    if len(set(names)) != len(names):
        raise ValueError(f"array names must be unique: {names}")
    return tuple(
        ArraySpec(name=name, dtype=little_endian(a).dtype.str, shape=tuple(int(d) for d in a.shape))
        for name, a in arrays
    )


def raw_chunks(arrays: NamedArrays, chunk_bytes: int) -> Iterator[memoryview]:
    """The raw byte stream in chunks of ``chunk_bytes`` (the last may be shorter).

    A chunk inside one array is a zero-copy slice of it; only a chunk that spans an
    array boundary is copied, so the chunk count stays minimal for many small arrays.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    pending: bytearray | None = None
    for _, array in arrays:
        raw = _raw_bytes(array).data
        pos = 0
        if pending is not None:
            pos = min(chunk_bytes - len(pending), len(raw))
            pending += raw[:pos]
            if len(pending) == chunk_bytes:
                yield memoryview(pending)
                pending = None
        while len(raw) - pos >= chunk_bytes:
            yield raw[pos : pos + chunk_bytes]
            pos += chunk_bytes
        if pos < len(raw):
            pending = bytearray(raw[pos:])
    if pending:
        yield memoryview(pending)


def sha256_of(arrays: NamedArrays) -> str:
    """Hex sha256 of the raw byte stream, computed without copying the arrays."""
    digest = hashlib.sha256()
    for _, array in arrays:
        digest.update(_raw_bytes(array).data)
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class ArrayPiece:
    """Consecutive elements of array ``index``, from flat element ``start`` on.

    ``values`` is usually a read-only view into the chunk it came from: fold it, don't keep it.
    """

    index: int
    start: int
    values: NDArray[Any]


@dataclass(frozen=True)
class _Layout:
    dtype: np.dtype[Any]
    count: int


#: The number types a stream may carry, as numpy's little-endian type strings: the spelling
#: roundlog writes. Bytes on the wire are always little-endian whatever the spelling.
WIRE_DTYPES = (
    "|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8",
    "<f2", "<f4", "<f8", "<c8", "<c16",
)  # fmt: skip


def _spellings() -> dict[str, np.dtype[Any]]:
    """Each dtype answers to its type string, the string without its byte-order mark and its
    name: ``<f4``, ``f4`` and ``float32`` are one dtype; big-endian (``>f4``) is none."""
    table: dict[str, np.dtype[Any]] = {}
    for typestr in WIRE_DTYPES:
        dtype = np.dtype(typestr)
        table.update({typestr: dtype, typestr[1:]: dtype, dtype.name: dtype})
    return table


DTYPE_SPELLINGS = _spellings()


def wire_dtype(spelling: str) -> np.dtype[Any]:
    """The little-endian dtype a TensorRef's ``dtype`` names: compare dtypes, never spellings."""
    try:
        return DTYPE_SPELLINGS[spelling]
    except KeyError:
        raise StreamError(
            "dtype_mismatch",
            f"unknown dtype {spelling!r}: one of {', '.join(WIRE_DTYPES)} (or its name, e.g. float32)",
        ) from None


def _layout(spec: ArraySpec) -> _Layout:
    try:
        dtype = wire_dtype(spec.dtype)
    except StreamError as exc:
        raise StreamError("dtype_mismatch", f"{spec.name}: {exc.detail}") from None
    if any(d < 0 for d in spec.shape):
        raise StreamError("shape_mismatch", f"{spec.name}: negative dimension in {list(spec.shape)}")
    return _Layout(dtype=dtype, count=math.prod(spec.shape))


@functools.lru_cache(maxsize=256)
def declared_nbytes(specs: tuple[ArraySpec, ...]) -> int:
    """Bytes the arrays of ``specs`` hold; a StreamError if a dtype or shape cannot be streamed.

    Cached: every update of a round declares its model's layout again (the fold checks each)."""
    return sum(lay.count * lay.dtype.itemsize for lay in map(_layout, specs))


class Reassembler:
    """Turns chunks of a raw byte stream, fed in order, into element-aligned ``ArrayPiece`` s.

    Chunks may split an element (its bytes are carried to the next chunk) and cross
    array boundaries. The running sha256 lets ``finish`` reject a corrupt stream
    without ever holding it whole.
    """

    def __init__(self, specs: Sequence[ArraySpec]) -> None:
        self._specs = tuple(specs)
        self._layouts = [_layout(spec) for spec in self._specs]
        self._nbytes = declared_nbytes(self._specs)
        self._hash = hashlib.sha256()
        self._received = 0
        self._index = 0  # array being filled
        self._element = 0  # next element of that array
        self._carry = bytearray()  # bytes of a split element
        self._skip_finished_arrays()

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[ArrayPiece]:
        """The pieces completed by ``chunk``; extra bytes past the declared arrays raise ``overflow``."""
        view = memoryview(chunk).cast("B")
        if self._received + len(view) > self._nbytes:
            raise StreamError(
                "overflow", f"{self._received + len(view)} bytes received, the arrays hold {self._nbytes}"
            )
        self._hash.update(view)
        self._received += len(view)
        pieces: list[ArrayPiece] = []
        pos = 0
        while pos < len(view):
            layout = self._layouts[self._index]
            itemsize = layout.dtype.itemsize
            if self._carry:
                take = min(itemsize - len(self._carry), len(view) - pos)
                self._carry += view[pos : pos + take]
                pos += take
                if len(self._carry) == itemsize:
                    pieces.append(self._piece(np.frombuffer(bytes(self._carry), dtype=layout.dtype), 1))
                    self._carry.clear()
                continue
            count = min(layout.count - self._element, (len(view) - pos) // itemsize)
            if count:
                values = np.frombuffer(view, dtype=layout.dtype, count=count, offset=pos)
                pieces.append(self._piece(values, count))
                pos += count * itemsize
            else:  # fewer bytes left than one element
                self._carry += view[pos:]
                pos = len(view)
        return pieces

    def _piece(self, values: NDArray[Any], count: int) -> ArrayPiece:
        piece = ArrayPiece(index=self._index, start=self._element, values=values)
        self._element += count
        self._skip_finished_arrays()
        return piece

    def _skip_finished_arrays(self) -> None:
        while self._index < len(self._layouts) and self._element == self._layouts[self._index].count:
            self._index += 1
            self._element = 0

    def finish(self, expected_sha256: str) -> None:
        """Raise ``incomplete`` if bytes are missing, ``hash_mismatch`` if they are not the declared ones."""
        self._check_complete()
        actual = self._hash.hexdigest()
        if actual != expected_sha256.lower():
            raise StreamError(
                "hash_mismatch", f"sha256 of the stream is {actual}, expected {expected_sha256}"
            )

    def _check_complete(self) -> None:
        if self._received < self._nbytes:
            where = self._specs[self._index].name if self._index < len(self._specs) else "?"
            raise StreamError(
                "incomplete",
                f"{self._received} of {self._nbytes} bytes received (stopped in {where!r} "
                f"at element {self._element})",
            )


def assemble(
    specs: Sequence[ArraySpec],
    chunks: Iterable[bytes | bytearray | memoryview],
    expected_sha256: str | None = None,
) -> list[NDArray[Any]]:
    """Whole arrays from a chunked stream, for the rare places that need a model in memory.

    With ``expected_sha256`` the stream is hash-checked; without it only completeness is.
    """
    reassembler = Reassembler(specs)
    arrays = [np.empty(lay.count, dtype=lay.dtype) for lay in reassembler._layouts]
    for chunk in chunks:
        for piece in reassembler.feed(chunk):
            arrays[piece.index][piece.start : piece.start + len(piece.values)] = piece.values
    if expected_sha256 is None:
        reassembler._check_complete()
    else:
        reassembler.finish(expected_sha256)
    return [a.reshape(spec.shape) for a, spec in zip(arrays, specs, strict=True)]
