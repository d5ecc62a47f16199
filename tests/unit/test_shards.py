"""Sharded aggregation: K shards fold their part of a round into partial weighted sums, one reduce
adds them in shard order and finalizes. Checked against the published formulas (computed here in
plain numpy), against the unsharded fold (bit for bit at K = 1, within the stated float64 bound
otherwise), and for the misuse the API refuses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roundlog.aggregation import (
    SHARDABLE,
    AggregateResult,
    NonFiniteAggregate,
    clip_scale,
    make_shardable,
    max_norm,
)
from roundlog.aggregation.base import BaseModel, DeltaNorm, Partial
from roundlog.arrays import NamedArrays, StreamError, specs_of

from tests.unit.test_aggregators import (
    aggregate,
    close,
    flat,
    identical,
    model,
    pieces,
    random_cuts,
    ref_fedavgm,
    ref_fedopt,
    ref_weighted_mean,
    state_part,
    updates_of,
)


def sharded(
    name: str,
    base: NamedArrays,
    updates: Sequence[NamedArrays],
    weights: Sequence[float],
    shard_of: Sequence[int],
    shards: int,
    kwargs: Mapping[str, object] | None = None,
    state: NamedArrays | None = None,
) -> AggregateResult:
    """Each shard folds its updates in order into a partial; the reduce absorbs them in shard order."""
    kwargs = kwargs or {}
    bound = max_norm(kwargs)
    partials = []
    for shard in range(shards):
        fold = make_shardable(name, kwargs, base, state)
        for update, weight, owner in zip(updates, weights, shard_of, strict=True):
            if owner != shard:
                continue
            scale = 1.0
            if bound is not None:
                norm = DeltaNorm(base)
                for piece in pieces(update):
                    norm.add(piece)
                scale = clip_scale(norm.value, bound)
            fold.begin(weight, scale)
            for piece in pieces(update):
                fold.add(piece)
            fold.commit()
        partials.append(fold.partial())
    reduce = make_shardable(name, kwargs, base, state)
    for partial in partials:
        reduce.absorb(partial)
    return reduce.finalize()


def test_the_shardable_aggregators_are_the_weighted_sum_family() -> None:
    assert {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"} == SHARDABLE


@settings(max_examples=25, deadline=None)
@given(
    count=st.integers(1, 7),
    shards=st.integers(1, 6),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_sharded_fedavg_is_the_example_weighted_mean(
    count: int, shards: int, seed: int, data: st.DataObject
) -> None:
    base = model(seed)
    updates = updates_of(base, count, seed=seed + 1)
    weights = data.draw(st.lists(st.integers(1, 10_000), min_size=count, max_size=count))
    owners = data.draw(st.lists(st.integers(0, shards - 1), min_size=count, max_size=count))
    result = sharded("fedavg", base, updates, [float(w) for w in weights], owners, shards)
    close(result.arrays, ref_weighted_mean(base, updates, [float(w) for w in weights]))
    assert result.updates == count and result.total_weight == sum(weights)


@pytest.mark.parametrize("bound", [None, 0.05])
def test_sharded_clipping_is_the_published_clipped_mean(bound: float | None) -> None:
    base = model(3)
    updates = updates_of(base, 5, seed=4, spread=0.3)
    weights = [3.0, 1.0, 4.0, 1.0, 5.0]
    result = sharded(
        "fedavg", base, updates, weights, [1, 0, 1, 2, 0], 3, {"max_norm": bound} if bound else {}
    )
    close(result.arrays, ref_weighted_mean(base, updates, weights, bound))


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_sharded_fedopt_steps_from_the_reduced_mean_across_rounds(kind: str) -> None:
    hyper = {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}
    if kind == "fedadagrad":
        del hyper["beta_2"]
    base, state = model(0), None
    x = flat(base)
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t in range(1, 4):
        updates = updates_of(base, 4, seed=10 * t)
        weights = [5.0, 2.0, 9.0 * t, 1.0]
        result = sharded(kind, base, updates, weights, [0, 3, 1, 0], 4, hyper, state)
        mean = ref_weighted_mean(base, updates, weights)
        x, m, v = ref_fedopt(
            kind, x, mean, m, v, t, eta=hyper["eta"], beta_1=hyper["beta_1"],
            beta_2=hyper.get("beta_2", 0.0), tau=hyper["tau"], bias_correction=False,
        )  # fmt: skip
        close(result.arrays, x)
        np.testing.assert_allclose(state_part(result, "v"), v, rtol=1e-10, atol=1e-15)
        base, state = result.arrays, result.state


def test_sharded_fedavgm_is_server_momentum() -> None:
    base = model(1)
    updates = updates_of(base, 3, seed=2)
    weights = [1.0, 2.0, 3.0]
    result = sharded(
        "fedavgm", base, updates, weights, [1, 1, 0], 2, {"server_learning_rate": 0.5, "server_momentum": 0.9}
    )
    want, _ = ref_fedavgm(
        flat(base), ref_weighted_mean(base, updates, weights), np.zeros(len(flat(base))), 0.5, 0.9
    )
    close(result.arrays, want)


@pytest.mark.parametrize("name", sorted(SHARDABLE))
def test_one_shard_is_the_unsharded_fold_bit_for_bit(name: str) -> None:
    base = model(5, dtype="<f4")
    updates = updates_of(base, 4, seed=6)
    weights = [7.0, 1.0, 3.0, 2.0]
    assert identical(
        sharded(name, base, updates, weights, [0] * 4, 1), aggregate(name, base, updates, weights)
    )


@settings(max_examples=30, deadline=None)
@given(count=st.integers(2, 40), shards=st.integers(2, 8), seed=st.integers(0, 10_000), data=st.data())
def test_a_sharded_mean_is_within_the_stated_bound_of_the_unsharded_one(
    count: int, shards: int, seed: int, data: st.DataObject
) -> None:
    """docs/aggregation.md: |sharded - unsharded| <= 2(n-1)·u·Σwᵢ|xᵢ|/Σwᵢ + 2u·|mean|, u = 2⁻⁵³."""
    base = model(seed)  # float64 arrays: the bound is on the float64 mean, before any narrower cast
    updates = updates_of(base, count, seed=seed + 1, spread=10.0)
    weights = [float(w) for w in data.draw(st.lists(st.integers(1, 10**6), min_size=count, max_size=count))]
    owners = data.draw(st.lists(st.integers(0, shards - 1), min_size=count, max_size=count))
    got = flat(sharded("fedavg", base, updates, weights, owners, shards).arrays)
    want = flat(aggregate("fedavg", base, updates, weights).arrays)
    u = 2.0**-53
    magnitude = np.sum([w * np.abs(flat(x)) for w, x in zip(weights, updates, strict=True)], axis=0) / sum(
        weights
    )
    assert np.all(np.abs(got - want) <= 2 * (count - 1) * u * magnitude + 2 * u * np.abs(want))


def test_a_partial_with_a_nan_is_refused_so_its_culprit_can_be_found() -> None:
    base = model(0)
    bad = [(name, np.full_like(a, np.nan)) for name, a in base]
    fold = make_shardable("fedavg", {}, base)
    fold.begin(1.0)
    for piece in pieces(bad):
        fold.add(piece)
    fold.commit()
    with pytest.raises(NonFiniteAggregate):
        fold.partial()


def test_a_fold_is_either_a_shard_or_a_reduce() -> None:
    base = model(0)
    (update,) = updates_of(base, 1)
    shard = make_shardable("fedavg", {}, base)
    partial = shard.partial()  # an empty shard is a partial of nothing
    assert partial.updates == 0 and partial.total_weight == 0.0
    with pytest.raises(RuntimeError):
        shard.partial()
    reduce = make_shardable("fedavg", {}, base)
    reduce.absorb(partial)
    reduce.begin(1.0)
    for piece in pieces(update):
        reduce.add(piece)
    with pytest.raises(RuntimeError):
        reduce.commit()


def test_a_partial_is_stored_as_float64_sums_named_after_the_base_and_must_fit_it() -> None:
    base = model(2)
    layout = BaseModel.of(base)
    sums = [np.arange(a.size, dtype=np.float64) for _, a in base]
    arrays = Partial(sums, 12.5, 3).arrays(layout)
    assert [name for name, _ in arrays] == [f"sum/{name}" for name, _ in base]
    specs = specs_of(arrays)
    Partial.check_specs(specs, layout)
    with pytest.raises(StreamError):
        Partial.check_specs(specs[:-1], layout)
    with pytest.raises(StreamError):
        Partial.check_specs(specs_of([(n, a.astype(np.float32)) for n, a in arrays]), layout)


def test_a_partial_absorbed_in_streamed_pieces_is_the_partial_absorbed_whole() -> None:
    base = model(4)
    updates = updates_of(base, 3, seed=5)
    shard = make_shardable("fedavg", {}, base)
    for update in updates:
        shard.begin(2.0)
        for piece in pieces(update):
            shard.add(piece)
        shard.commit()
    partial = shard.partial()
    whole, streamed = make_shardable("fedavg", {}, base), make_shardable("fedavg", {}, base)
    whole.absorb(partial)
    for piece in pieces(partial.arrays(BaseModel.of(base)), random_cuts(9)):
        streamed.absorb_piece(piece)
    streamed.absorb_count(partial.total_weight, partial.updates)
    assert identical(whole.finalize(), streamed.finalize())
