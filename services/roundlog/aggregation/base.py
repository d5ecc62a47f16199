"""The one interface every aggregator implements, and what the aggregators share.

An aggregator is a fold over the updates of one round, fed piece by piece as each
update streams in (``begin`` → ``add``\\* → ``commit``, then ``finalize`` once). It
has no undo: when an update's stream turns out invalid (hash mismatch, non-finite
value, ...), the caller never commits it and instead discards the whole aggregator
and re-folds the round's valid updates from scratch. That keeps every fold simple
and makes the result a function of the committed updates in their log order only.

Determinism: every kernel is elementwise or reduces in a fixed order over fixed
block boundaries (never over how the stream happened to be chunked), and nothing
uses BLAS, threads or set/dict iteration order, so the same updates in the same
order give a bit-identical model on any machine with the same numpy (reductions
use numpy's pairwise summation, whose order is fixed by the array length).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from roundlog.arrays import ArrayPiece, NamedArrays, StreamError, little_endian, wire_dtype
from roundlog.domain.events import ArraySpec

#: Elements per block of float64 scratch work (512 KiB): a block's scratch, update and
#: accumulator slices stay in L2 (measured in bench/bench_fold.py; 32k-64k is the sweet spot).
BLOCK = 1 << 16

#: Dtype kinds an aggregator folds: floats, and integers (rounded half to even on emission).
AGGREGABLE_KINDS = "fiu"

#: The fixed grid over which ``DeltaNorm`` sums squares. Part of the definition of a clipped
#: model's bits (unlike ``BLOCK``, a speed knob): changing it breaks bit-for-bit replay of old logs.
NORM_BLOCK = 1 << 16

F64 = np.float64


class AggregatorConfigError(ValueError):
    """An unknown aggregator, an unknown or invalid kwarg, or optimizer state that does not fit."""


class NonFiniteAggregate(ValueError):
    """``finalize`` of a fold that defers the finiteness check found that an update was not finite.

    The caller finds the culprits (``check_piece`` over each committed update), rejects
    them and re-folds the others, as for any invalid update.
    """


class NothingToAggregate(ValueError):
    """``finalize`` without a committed update, or with a total weight of 0."""


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The new model (base model's names, shapes and dtypes) and the optimizer state to carry, if any."""

    arrays: list[tuple[str, NDArray[Any]]]
    state: list[tuple[str, NDArray[np.float64]]] | None
    updates: int
    total_weight: float


class Aggregator(Protocol):
    """One instance per round; see the module docstring for the contract."""

    def begin(self, weight: float, scale: float = 1.0) -> None:
        """A new update with its weight; ``scale`` is the norm-clipping factor applied to (update - base)."""

    def add(self, piece: ArrayPiece) -> None:
        """Fold one piece of the current update, in stream order; non-finite values raise first."""

    def commit(self) -> None:
        """The current update is complete and valid."""

    def finalize(self) -> AggregateResult:
        """The new model and optimizer state; the aggregator is spent afterwards."""


@dataclass(frozen=True, eq=False)
class BaseModel:
    """The round's base model as flat little-endian arrays (views of the caller's arrays when possible)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    flat: tuple[NDArray[Any], ...]

    @classmethod
    def of(cls, arrays: NamedArrays) -> BaseModel:
        names = tuple(name for name, _ in arrays)
        if len(set(names)) != len(names):
            raise AggregatorConfigError(f"base model array names must be unique: {list(names)}")
        for name, array in arrays:
            if array.dtype.kind not in AGGREGABLE_KINDS:
                raise AggregatorConfigError(
                    f"base model array {name!r} is {array.dtype}: aggregators fold float and integer arrays"
                )
        return cls(
            names=names,
            shapes=tuple(tuple(int(d) for d in array.shape) for _, array in arrays),
            flat=tuple(little_endian(array).reshape(-1) for _, array in arrays),
        )

    def emit(self, index: int, values: NDArray[np.float64]) -> NDArray[Any]:
        """Float64 results as array ``index`` of the new model (``values`` may be overwritten)."""
        return to_dtype(values, self.flat[index].dtype).reshape(self.shapes[index])


#: What a family makes of its validated kwargs: a constructor taking the base model and optimizer state.
Builder = Callable[[BaseModel, NamedArrays | None], Aggregator]


def to_dtype(values: NDArray[np.float64], dtype: np.dtype[Any]) -> NDArray[Any]:
    """Float64 results in a model's dtype; integers are rounded half to even and clipped to the dtype's range.

    ``values`` may be overwritten.
    """
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        np.rint(values, out=values)
        np.clip(values, info.min, info.max, out=values)
    return values.astype(dtype)


def check_piece(piece: ArrayPiece, base: BaseModel, *, finite: bool = True) -> None:
    """A piece must fit the base model's layout and (unless the fold checks it itself) be finite."""
    if not 0 <= piece.index < len(base.flat):
        raise StreamError(
            "shape_mismatch", f"array #{piece.index}: the base model has {len(base.flat)} arrays"
        )
    expected = base.flat[piece.index]
    values = piece.values
    if values.dtype != expected.dtype:
        raise StreamError(
            "dtype_mismatch",
            f"{base.names[piece.index]} is {values.dtype.str}, expected {expected.dtype.str}",
        )
    if values.ndim != 1 or piece.start < 0 or piece.start + len(values) > len(expected):
        raise StreamError(
            "shape_mismatch",
            f"{base.names[piece.index]}: elements {piece.start}..{piece.start + values.size} "
            f"of {len(expected)}",
        )
    if finite and values.dtype.kind == "f" and not all_finite(values):
        raise_non_finite(piece, base)


def raise_non_finite(piece: ArrayPiece, base: BaseModel) -> None:
    """Name the first non-finite value of a piece whose folded values were not all finite."""
    name, bad = base.names[piece.index], np.flatnonzero(~np.isfinite(piece.values))
    if not len(bad):
        raise StreamError("non_finite", f"{name}: weighted values overflow float64")
    first = int(bad[0])
    raise StreamError("non_finite", f"{name}[{piece.start + first}] (flat) is {piece.values[first]}")


def all_finite(values: NDArray[np.floating[Any]]) -> bool:
    """Whether no value is NaN or infinite.

    NaN propagates through max and min and an infinity is an extreme, so two SIMD
    reductions decide it; they read a cold piece faster than ``isfinite().all()``,
    and this read is the fold's one pass over the update that the bound does not have.
    """
    return not len(values) or bool(
        np.isfinite(np.maximum.reduce(values)) and np.isfinite(np.minimum.reduce(values))
    )


#: Name prefix of a partial's arrays on the tensors topic: ``sum/<base array name>``.
PARTIAL_PREFIX = "sum/"


@dataclass(frozen=True, eq=False)
class Partial:
    """One shard's fold of a sharded round: float64 Σ wᵢ·xᵢ per base array (flat), Σ wᵢ and the count.

    Partials add: the reduce absorbs them in shard order into a fresh fold and finalizes it, so a
    sharded model differs from the unsharded one only by the order of its float64 additions.
    """

    sums: list[NDArray[np.float64]]
    total_weight: float
    updates: int

    def arrays(self, base: BaseModel) -> list[tuple[str, NDArray[np.float64]]]:
        """The sums as named arrays in the base model's shapes, to store on the tensors topic."""
        return [
            (PARTIAL_PREFIX + name, values.reshape(shape))
            for name, shape, values in zip(base.names, base.shapes, self.sums, strict=True)
        ]

    @staticmethod
    def check_specs(specs: Sequence[ArraySpec], base: BaseModel) -> None:
        """A stored partial holds the base model's arrays as float64 ``sum/<name>``; StreamError if not."""
        names = [(PARTIAL_PREFIX + n, shape) for n, shape in zip(base.names, base.shapes, strict=True)]
        found = [(spec.name, tuple(spec.shape)) for spec in specs]
        if found != names or any(wire_dtype(spec.dtype) != F64 for spec in specs):
            raise StreamError("shape_mismatch", f"a partial must hold float64 {names}, not {specs}")


@runtime_checkable
class Shardable(Aggregator, Protocol):
    """An aggregator whose fold is a weighted sum: a shard ends in ``partial``, the reduce
    ``absorb`` s every shard's partial in shard order into a fresh one, then ``finalize`` s it."""

    def partial(self) -> Partial:
        """The committed updates' sums (NonFiniteAggregate if one held a NaN or an infinity); spends it."""

    def absorb(self, partial: Partial) -> None:
        """Add a shard's partial; only more partials and ``finalize`` may follow."""

    def absorb_piece(self, piece: ArrayPiece) -> None:
        """Add a piece of a shard's sums as they stream in (the sums of array ``piece.index``)."""

    def absorb_count(self, total_weight: float, updates: int) -> None:
        """Add the weight and update count of a shard whose sums were absorbed piece by piece."""


class Fold(Aggregator):
    """Lifecycle and bookkeeping shared by every aggregator; subclasses fold pieces and finalize."""

    #: a fold that checks finiteness itself (at finalize) saves a pass over every piece
    checks_finite_itself = False

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.updates = 0
        self.total_weight = 0.0
        self._open = False
        self._spent = False
        self._weight = 0.0
        self._scale = 1.0

    def begin(self, weight: float, scale: float = 1.0) -> None:
        if self._open or self._spent:
            raise RuntimeError("begin() while an update is open or after finalize()")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        if not (math.isfinite(scale) and 0 < scale <= 1):
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        self._open, self._weight, self._scale = True, float(weight), float(scale)

    def add(self, piece: ArrayPiece) -> None:
        if not self._open:
            raise RuntimeError("add() outside begin()/commit()")
        check_piece(piece, self.base, finite=not self.checks_finite_itself)
        self._fold(piece)

    def commit(self) -> None:
        if not self._open:
            raise RuntimeError("commit() without begin()")
        self._commit()
        self._open = False
        self.updates += 1
        self.total_weight += self._weight

    def finalize(self) -> AggregateResult:
        if self._open or self._spent:
            raise RuntimeError("finalize() while an update is open, or twice")
        if self.updates == 0:
            raise NothingToAggregate("no update was committed")
        self._spent = True
        return self._finalize()

    @abstractmethod
    def _fold(self, piece: ArrayPiece) -> None: ...

    def _commit(self) -> None:
        """Hook for folds that record something per committed update."""

    @abstractmethod
    def _finalize(self) -> AggregateResult: ...


def clipped(values: NDArray[Any], base: NDArray[Any], scale: float, out: NDArray[np.float64]) -> None:
    """``out = base + scale * (values - base)`` in float64: the update with its delta clipped."""
    np.subtract(values, base, out=out, dtype=F64)
    np.multiply(out, scale, out=out)
    np.add(out, base, out=out, dtype=F64)


class DeltaNorm:
    """L2 norm of (update - base), fed the update's pieces in stream order.

    Squares are summed per ``NORM_BLOCK`` of each array (not per piece), then the block
    sums in order, so the value does not depend on how the stream was chunked.
    """

    def __init__(self, base: NamedArrays) -> None:
        self._base = BaseModel.of(base)
        self._scratch = np.empty(NORM_BLOCK, dtype=F64)
        self._filled = 0
        self._sum = 0.0

    def add(self, piece: ArrayPiece) -> None:
        check_piece(piece, self._base)
        base = self._base.flat[piece.index]
        pos, end = 0, len(piece.values)
        while pos < end:
            start = piece.start + pos
            block_end = min((start // NORM_BLOCK + 1) * NORM_BLOCK, len(base))
            count = min(end - pos, block_end - start)
            scratch = self._scratch[self._filled : self._filled + count]
            np.subtract(piece.values[pos : pos + count], base[start : start + count], out=scratch, dtype=F64)
            np.multiply(scratch, scratch, out=scratch)
            self._filled += count
            pos += count
            if start + count == block_end:
                self._flush()

    def _flush(self) -> None:
        self._sum += float(np.add.reduce(self._scratch[: self._filled]))
        self._filled = 0

    @property
    def value(self) -> float:
        self._flush()
        return math.sqrt(self._sum)


class Params:
    """Reads an aggregator's kwargs, validating each; ``done`` rejects the ones nobody read."""

    def __init__(self, aggregator: str, kwargs: Mapping[str, object]) -> None:
        self._aggregator = aggregator
        self._kwargs = dict(kwargs)
        self._read: set[str] = set()

    def _error(self, key: str, message: str) -> AggregatorConfigError:
        return AggregatorConfigError(f"{self._aggregator}: {key} {message}")

    def _get(self, key: str) -> object:
        self._read.add(key)
        return self._kwargs.get(key)

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float,
        high: float = math.inf,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        """A finite number in the interval from ``low`` to ``high``, each end closed unless said open."""
        value = self.optional_number(key, low=low, high=high, low_open=low_open, high_open=high_open)
        return default if value is None else value

    def optional_number(
        self,
        key: str,
        *,
        low: float,
        high: float = math.inf,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float | None:
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._error(key, f"must be a number, got {type(value).__name__} {value!r}")
        number = float(value)
        below = number <= low if low_open else number < low
        above = number >= high if high_open else number > high
        if not math.isfinite(number) or below or above:
            interval = (
                f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
            )
            raise self._error(key, f"must be in {interval}, got {value!r}")
        return number

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._error(key, f"must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: str, options: Sequence[str]) -> str:
        value = self._get(key)
        if value is None:
            return default
        if value not in options:
            raise self._error(key, f"must be one of {', '.join(options)}; got {value!r}")
        return str(value)

    def max_norm(self) -> float | None:
        """The L2 clipping bound every aggregator accepts; the caller applies it via ``begin(scale=...)``."""
        return self.optional_number("max_norm", low=0.0, low_open=True)

    def done(self) -> None:
        unknown = sorted(set(self._kwargs) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise AggregatorConfigError(f"{self._aggregator}: unknown kwargs {unknown}; accepted: {known}")


def max_norm(kwargs: Mapping[str, object]) -> float | None:
    """The clipping bound of an aggregator's kwargs (validated), or None when updates are not clipped."""
    return Params("aggregator", kwargs).max_norm()


def needs_norm(kwargs: Mapping[str, object]) -> bool:
    """Whether the caller must measure each update's ``DeltaNorm`` before folding it."""
    return max_norm(kwargs) is not None


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor that brings (update - base) to an L2 norm of at most ``max_norm``: min(1, max_norm/norm)."""
    if not math.isfinite(norm):
        raise ValueError(f"norm must be finite, got {norm}")
    return 1.0 if norm <= max_norm else max_norm / norm
