"""Coordinate-wise median and trimmed mean: robust to a minority of outlying updates.

Neither can fold in O(model) memory: a coordinate's result needs every update's
value of it at once. So each update is buffered on disk as it streams in, one row
per update (its raw little-endian bytes) in an anonymous temporary file of the
round (under ``$TMPDIR``; the OS deletes it when it is closed, by ``finalize`` or
when the aggregator is dropped, or when the process dies). ``finalize`` reduces
column blocks of at most ``BLOCK_BUDGET`` bytes of working memory, so memory stays
O(model) for the output plus one block, while disk holds updates x model bytes.

Both are unweighted, as in Flower's FedMedian and FedTrimmedAvg: ``num_examples``
is ignored, since a robust statistic must not let one client's claimed weight
dominate it. A clipped update enters as base + scale·(x - base), computed in
float64 at ``finalize`` from the stored row and its scale.
"""

from __future__ import annotations

import os
import tempfile
from abc import abstractmethod
from typing import Any

import numpy as np
from numpy.typing import NDArray

from roundlog.aggregation.base import (
    F64,
    AggregateResult,
    BaseModel,
    Builder,
    Fold,
    Params,
    clipped,
    to_dtype,
)
from roundlog.arrays import ArrayPiece

#: Working memory of one column block at finalize (raw rows + their float64 transpose).
BLOCK_BUDGET = 64 << 20


def _pwrite_all(fd: int, data: NDArray[np.uint8], offset: int) -> None:
    view = data.data
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _pread_into(fd: int, buffer: NDArray[np.uint8], offset: int) -> None:
    view = buffer.data
    while view:
        read = os.preadv(fd, [view], offset)
        if read == 0:
            raise OSError(f"the update buffer ended at byte {offset}")
        view, offset = view[read:], offset + read


class Buffered(Fold):
    """Rows on disk while folding, column blocks reduced by ``_reduce`` at finalize."""

    def __init__(self, base: BaseModel) -> None:
        super().__init__(base)
        sizes = [flat.nbytes for flat in base.flat]
        self._offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._row_bytes = sum(sizes)
        # Lives until finalize (or until the aggregator is dropped), so no `with`.
        self._file = tempfile.TemporaryFile(prefix="roundlog-robust-", buffering=0)  # noqa: SIM115
        self._scales: list[float] = []

    def _fold(self, piece: ArrayPiece) -> None:
        values = np.ascontiguousarray(piece.values)
        offset = self.updates * self._row_bytes + self._offsets[piece.index] + piece.start * values.itemsize
        _pwrite_all(self._file.fileno(), values.view(np.uint8), offset)

    def _commit(self) -> None:
        self._scales.append(self._scale)

    def _finalize(self) -> AggregateResult:
        try:
            arrays = [(name, self._reduce_array(i)) for i, name in enumerate(self.base.names)]
        finally:
            self._file.close()
        return AggregateResult(
            arrays=arrays, state=None, updates=self.updates, total_weight=self.total_weight
        )

    def _reduce_array(self, index: int) -> NDArray[Any]:
        flat = self.base.flat[index]
        rows, itemsize = self.updates, flat.itemsize
        clipped_rows = [(row, scale) for row, scale in enumerate(self._scales) if scale != 1.0]
        cols = max(1, min(len(flat), BLOCK_BUDGET // (rows * (itemsize + 8))))
        raw = np.empty((rows, cols), dtype=flat.dtype)
        work = np.empty((cols, rows), dtype=F64)
        out = np.empty(len(flat), dtype=flat.dtype)
        for lo in range(0, len(flat), cols):
            hi = min(lo + cols, len(flat))
            block, columns = raw[:, : hi - lo], work[: hi - lo]
            for row in range(rows):
                offset = row * self._row_bytes + self._offsets[index] + lo * itemsize
                _pread_into(self._file.fileno(), block[row].view(np.uint8), offset)
            np.copyto(columns, block.T)  # one row of `columns` per coordinate: contiguous to sort
            for row, scale in clipped_rows:
                clipped(columns[:, row], flat[lo:hi], scale, out=columns[:, row])
            np.add(columns, 0.0, out=columns)  # -0.0 → +0.0: equal values then sort to equal bits
            columns.sort(axis=1)
            out[lo:hi] = to_dtype(self._reduce(columns), flat.dtype)
        return out.reshape(self.base.shapes[index])

    @abstractmethod
    def _reduce(self, sorted_columns: NDArray[np.float64]) -> NDArray[np.float64]:
        """One float64 result per row of ``sorted_columns`` (a coordinate's values, ascending)."""


class Median(Buffered):
    """Coordinate-wise median; with an even count, the mean of the two middle values."""

    def _reduce(self, sorted_columns: NDArray[np.float64]) -> NDArray[np.float64]:
        n = sorted_columns.shape[1]
        if n % 2:
            return sorted_columns[:, n // 2].copy()
        result = np.add(sorted_columns[:, n // 2 - 1], sorted_columns[:, n // 2])
        np.divide(result, 2.0, out=result)
        return result


class TrimmedMean(Buffered):
    """Coordinate-wise mean after cutting ``int(beta·n)`` values at each end (Flower's and scipy's rule)."""

    def __init__(self, base: BaseModel, beta: float) -> None:
        super().__init__(base)
        self._beta = beta

    def _reduce(self, sorted_columns: NDArray[np.float64]) -> NDArray[np.float64]:
        n = sorted_columns.shape[1]
        cut = int(self._beta * n)
        kept = np.add.reduce(sorted_columns[:, cut : n - cut], axis=1)
        np.divide(kept, n - 2 * cut, out=kept)
        return kept


def median(params: Params) -> Builder:
    return lambda base, state: Median(base)


def trimmed_mean(params: Params) -> Builder:
    beta = params.number("beta", 0.2, low=0.0, high=0.5, high_open=True)  # Flower's default
    return lambda base, state: TrimmedMean(base, beta)
