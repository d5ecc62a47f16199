"""Aggregators: folds of a round's streamed updates into the next model (see ``base`` for the contract).

``make_aggregator`` is the one way in: it validates the aggregator's name, kwargs and
optimizer state with clear ``AggregatorConfigError`` s. Every aggregator accepts
``max_norm`` (L2 clipping of update - base): the caller measures each update with
``DeltaNorm`` when ``needs_norm(kwargs)`` and passes ``clip_scale(norm, max_norm)``
to ``begin``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from roundlog.aggregation.base import (
    AggregateResult,
    Aggregator,
    AggregatorConfigError,
    BaseModel,
    Builder,
    DeltaNorm,
    NonFiniteAggregate,
    NothingToAggregate,
    Params,
    Partial,
    Shardable,
    clip_scale,
    max_norm,
    needs_norm,
)
from roundlog.aggregation.fedavg import fedavg
from roundlog.aggregation.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from roundlog.aggregation.robust import median, trimmed_mean
from roundlog.arrays import NamedArrays

__all__ = [
    "AGGREGATORS",
    "SHARDABLE",
    "AggregateResult",
    "Aggregator",
    "AggregatorConfigError",
    "DeltaNorm",
    "NonFiniteAggregate",
    "NothingToAggregate",
    "Partial",
    "Shardable",
    "check_config",
    "clip_scale",
    "make_aggregator",
    "make_shardable",
    "max_norm",
    "needs_norm",
]

#: Each family reads and validates its kwargs, and says how to build it.
_FAMILIES: dict[str, Callable[[Params], Builder]] = {
    "fedavg": fedavg,
    "fedavgm": fedavgm,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fedadagrad": fedadagrad,
    "median": median,
    "trimmed_mean": trimmed_mean,
}
_STATEFUL = frozenset({"fedavgm", "fedadam", "fedyogi", "fedadagrad"})
#: The aggregators that fold a float64 weighted sum and finalize from it alone: a round of theirs
#: can be split into shards whose partial sums add up (the robust ones need every update at once).
SHARDABLE = frozenset({"fedavg", *_STATEFUL})

#: Every aggregator name, sorted.
AGGREGATORS = tuple(sorted(_FAMILIES))


def _validated(name: str, kwargs: Mapping[str, object]) -> Builder:
    if name not in _FAMILIES:
        raise AggregatorConfigError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
    params = Params(name, kwargs)
    params.max_norm()  # every aggregator accepts it; the caller applies it through begin(scale=...)
    build = _FAMILIES[name](params)
    params.done()
    return build


def make_shardable(
    name: str, kwargs: Mapping[str, object], base: NamedArrays, state: NamedArrays | None = None
) -> Shardable:
    """A fresh aggregator for one shard, or the reduce, of a sharded round (see ``Shardable``)."""
    if name not in SHARDABLE:
        raise AggregatorConfigError(f"{name} cannot be sharded; choose one of {', '.join(sorted(SHARDABLE))}")
    aggregator = make_aggregator(name, kwargs, base, state)
    assert isinstance(aggregator, Shardable)
    return aggregator


def check_config(name: str, kwargs: Mapping[str, object]) -> None:
    """Raise ``AggregatorConfigError`` for an unknown aggregator or bad kwargs, before any model exists:
    a session is refused at its start, not at the end of its first round."""
    _validated(name, kwargs)


def make_aggregator(
    name: str, kwargs: Mapping[str, object], base: NamedArrays, state: NamedArrays | None = None
) -> Aggregator:
    """A fresh aggregator for one round on ``base``; ``state`` is the previous round's optimizer state.

    Everything is validated before any memory is committed. Server optimizers
    (fedavgm, fedadam, fedyogi, fedadagrad) start from fresh moments without ``state``;
    the others keep no state and refuse one, so a session that switches aggregators
    cannot silently drop or misapply its optimizer state.
    """
    build = _validated(name, kwargs)
    if state is not None and name not in _STATEFUL:
        raise AggregatorConfigError(f"{name} keeps no optimizer state, but a state was given")
    return build(BaseModel.of(base), state)
