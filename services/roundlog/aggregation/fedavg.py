"""FedAvg (McMahan et al. 2017): the example-weighted mean of the client models.

new model = Σ wᵢ·xᵢ / Σ wᵢ with wᵢ = num_examples, folded into one float64
accumulator per array as the updates stream in, so memory is O(model) whatever
the number of clients. A clipped update folds as base + scale·(xᵢ - base).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from roundlog.aggregation.base import (
    BLOCK,
    F64,
    AggregateResult,
    BaseModel,
    Builder,
    Fold,
    NonFiniteAggregate,
    NothingToAggregate,
    Params,
    Partial,
    all_finite,
    clipped,
)
from roundlog.arrays import ArrayPiece


class FedAvg(Fold):
    """Example-weighted mean; kwargs: ``max_norm`` only (clipping, handled by the caller's scale)."""

    def __init__(self, base: BaseModel) -> None:
        super().__init__(base)
        self._acc = [np.zeros(len(flat), dtype=F64) for flat in base.flat]
        self._scratch = np.empty(BLOCK, dtype=F64)
        #: None until the fold takes updates (False) or partials (True): never both
        self._absorbed_only: bool | None = None

    #: a non-finite value poisons the accumulator for good, so one check at finalize finds it
    checks_finite_itself = True

    def _commit(self) -> None:
        if self._absorbed_only:
            raise RuntimeError("a fold that absorbed partials takes no updates")
        self._absorbed_only = False

    def _fold(self, piece: ArrayPiece) -> None:
        # Block by block through a small float64 scratch that stays in cache, so the
        # fold reads the update once and makes one pass over the accumulator, like a
        # bare ``acc += x``.
        values, start = piece.values, piece.start
        acc, base = self._acc[piece.index], self.base.flat[piece.index]
        weight, scale = self._weight, self._scale
        for pos in range(0, len(values), BLOCK):
            x: NDArray[Any] = values[pos : pos + BLOCK]
            lo, hi = start + pos, start + pos + len(x)
            scratch = self._scratch[: len(x)]
            if scale != 1.0:
                clipped(x, base[lo:hi], scale, out=scratch)
            else:
                np.copyto(scratch, x)  # exact widening, so w·x is one float64 rounding
            np.multiply(scratch, weight, out=scratch)
            np.add(acc[lo:hi], scratch, out=acc[lo:hi])

    def partial(self) -> Partial:
        if self._open or self._spent:
            raise RuntimeError("partial() while an update is open, or after the fold was spent")
        self._check_finite()
        self._spent = True
        return Partial(self._acc, self.total_weight, self.updates)

    def absorb(self, partial: Partial) -> None:
        for index, sums in enumerate(partial.sums):
            self.absorb_piece(ArrayPiece(index, 0, sums))
        self.absorb_count(partial.total_weight, partial.updates)

    def absorb_piece(self, piece: ArrayPiece) -> None:
        self._absorbing()
        acc = self._acc[piece.index][piece.start : piece.start + len(piece.values)]
        np.add(acc, piece.values, out=acc)

    def absorb_count(self, total_weight: float, updates: int) -> None:
        self._absorbing()
        self.updates += updates
        self.total_weight += total_weight

    def _absorbing(self) -> None:
        if self._open or self._spent or self._absorbed_only is False:
            raise RuntimeError("absorb() into a fold that folded updates itself, or was spent")
        self._absorbed_only = True

    def _check_finite(self) -> None:
        for name, acc in zip(self.base.names, self._acc, strict=True):
            if not all_finite(acc):
                raise NonFiniteAggregate(f"{name}: a committed update held a NaN or an infinity")

    def _weighted_mean(self) -> list[NDArray[np.float64]]:
        """The accumulators turned, in place, into the weighted mean of the committed updates."""
        if self.total_weight == 0:
            raise NothingToAggregate(f"the {self.updates} committed updates have a total weight of 0")
        self._check_finite()
        for acc in self._acc:
            np.divide(acc, self.total_weight, out=acc)
        return self._acc

    def _finalize(self) -> AggregateResult:
        mean = self._weighted_mean()
        return AggregateResult(
            arrays=[
                (name, self.base.emit(i, acc))
                for i, (name, acc) in enumerate(zip(self.base.names, mean, strict=True))
            ],
            state=None,
            updates=self.updates,
            total_weight=self.total_weight,
        )


def fedavg(params: Params) -> Builder:
    return lambda base, state: FedAvg(base)
