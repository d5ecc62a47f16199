"""Every aggregator against its published formula, computed here the plain way.

References work on whole float64 vectors (the model's arrays concatenated) with
straightforward numpy, independently of the streaming folds under test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roundlog.aggregation import (
    AGGREGATORS,
    AggregateResult,
    AggregatorConfigError,
    DeltaNorm,
    NonFiniteAggregate,
    NothingToAggregate,
    clip_scale,
    make_aggregator,
    max_norm,
    needs_norm,
    robust,
)
from roundlog.arrays import ArrayPiece, NamedArrays, Reassembler, StreamError, specs_of

SHAPES = {"conv": (3, 5, 7), "bias": (7,), "scale": ()}
FEDOPT = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")

Cuts = Callable[[], int]


# ---------------------------------------------------------------- models and streaming


def model(seed: int, dtype: str = "<f8", shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> NamedArrays:
    rng = np.random.default_rng(seed)
    return [(name, np.asarray(rng.standard_normal(shape)).astype(dtype)) for name, shape in shapes.items()]


def updates_of(base: NamedArrays, count: int, seed: int = 100, spread: float = 0.1) -> list[NamedArrays]:
    rng = np.random.default_rng(seed)
    return [
        [(name, (a + spread * rng.standard_normal(a.shape)).astype(a.dtype)) for name, a in base]
        for _ in range(count)
    ]


def pieces(update: NamedArrays, cuts: Cuts | None = None) -> Iterator[ArrayPiece]:
    """The update as the transport delivers it: its raw stream cut into chunks, reassembled."""
    raw = b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for _, a in update)
    reassembler = Reassembler(specs_of(update))
    pos = 0
    while pos < len(raw):
        size = len(raw) if cuts is None else cuts()
        yield from reassembler.feed(raw[pos : pos + size])
        pos += size
    reassembler.finish(hashlib.sha256(raw).hexdigest())


def random_cuts(seed: int, small: int = 13, large: int = 20_000) -> Cuts:
    """Chunk sizes that split elements (1..small bytes) and cross arrays (up to ``large``)."""
    rng = np.random.default_rng(seed)
    return lambda: int(rng.integers(1, small + 1) if rng.random() < 0.5 else rng.integers(1, large + 1))


def aggregate(
    name: str,
    base: NamedArrays,
    updates: Sequence[NamedArrays],
    weights: list[float],
    kwargs: Mapping[str, object] | None = None,
    state: NamedArrays | None = None,
    cuts: Cuts | None = None,
) -> AggregateResult:
    """One round as the aggregator role runs it: norm first when clipping, then the fold."""
    kwargs = kwargs or {}
    aggregator = make_aggregator(name, kwargs, base, state)
    bound = max_norm(kwargs)
    for update, weight in zip(updates, weights, strict=True):
        scale = 1.0
        if bound is not None:
            norm = DeltaNorm(base)
            for piece in pieces(update, cuts):
                norm.add(piece)
            scale = clip_scale(norm.value, bound)
        aggregator.begin(weight, scale)
        for piece in pieces(update, cuts):
            aggregator.add(piece)
        aggregator.commit()
    return aggregator.finalize()


# ---------------------------------------------------------------- references (plain numpy, float64)


def flat(arrays: NamedArrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for _, a in arrays])


def ref_clipped(base: NamedArrays, update: NamedArrays, bound: float | None) -> np.ndarray:
    x, b = flat(update), flat(base)
    if bound is None:
        return x
    norm = np.sqrt(np.sum((x - b) ** 2))
    return x if norm <= bound else b + (bound / norm) * (x - b)


def ref_weighted_mean(
    base: NamedArrays, updates: list[NamedArrays], weights: list[float], bound: float | None = None
) -> np.ndarray:
    xs = [ref_clipped(base, u, bound) for u in updates]
    return np.sum([w * x for w, x in zip(weights, xs, strict=True)], axis=0) / sum(weights)


def ref_fedavgm(
    x: np.ndarray, mean: np.ndarray, m: np.ndarray, lr: float, mu: float
) -> tuple[np.ndarray, ...]:
    m = mu * m + (mean - x)
    return x + lr * m, m


def ref_fedopt(
    kind: str,
    x: np.ndarray,
    mean: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    *,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
    bias_correction: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reddi et al. 2021, Algorithm 2, as written in reference/peers.md."""
    delta = mean - x
    m = beta_1 * m + (1 - beta_1) * delta
    if kind == "fedadam":
        v = beta_2 * v + (1 - beta_2) * delta**2
    elif kind == "fedyogi":
        v = v - (1 - beta_2) * delta**2 * np.sign(v - delta**2)
    else:
        v = v + delta**2
    lr = eta * np.sqrt(1 - beta_2**t) / (1 - beta_1**t) if bias_correction else eta
    return x + lr * m / (np.sqrt(v) + tau), m, v


def ref_trimmed_mean(values: np.ndarray, beta: float) -> np.ndarray:
    n = len(values)
    cut = int(beta * n)
    return np.mean(np.sort(values, axis=0)[cut : n - cut], axis=0)


def close(got: NamedArrays, want: np.ndarray) -> None:
    np.testing.assert_allclose(flat(got), want, rtol=1e-10, atol=1e-12)


def state_part(result: AggregateResult, key: str) -> np.ndarray:
    assert result.state is not None
    return flat([(n, a) for n, a in result.state if n.startswith(f"{key}/")])


def identical(a: AggregateResult, b: AggregateResult) -> bool:
    def blob(arrays: NamedArrays | None) -> list[tuple[str, str, bytes]]:
        return [(n, x.dtype.str, x.tobytes()) for n, x in arrays or []]

    return blob(a.arrays) == blob(b.arrays) and blob(a.state) == blob(b.state)


# ---------------------------------------------------------------- FedAvg


@pytest.mark.parametrize("bound", [None, 0.05])
def test_fedavg_is_the_example_weighted_mean(bound: float | None) -> None:
    base = model(0)
    updates = updates_of(base, 4)
    weights = [10.0, 1.0, 3.0, 250.0]
    result = aggregate("fedavg", base, updates, weights, {} if bound is None else {"max_norm": bound})
    close(result.arrays, ref_weighted_mean(base, updates, weights, bound))
    assert result.state is None
    assert (result.updates, result.total_weight) == (4, 264.0)
    assert [name for name, _ in result.arrays] == list(SHAPES)
    assert [a.shape for _, a in result.arrays] == list(SHAPES.values())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), weights=st.lists(st.integers(1, 100_000), min_size=1, max_size=5))
def test_fedavg_of_identical_updates_is_that_update(seed: int, weights: list[int]) -> None:
    base = model(seed, "<f4")
    update = updates_of(base, 1, seed=seed + 1)[0]
    result = aggregate("fedavg", base, [update] * len(weights), [float(w) for w in weights])
    for (_, got), (_, want) in zip(result.arrays, update, strict=True):
        assert got.tobytes() == want.tobytes()


def test_fedavg_rejects_a_round_without_weight() -> None:
    base = model(0)
    with pytest.raises(NothingToAggregate):
        aggregate("fedavg", base, updates_of(base, 2), [0.0, 0.0])
    with pytest.raises(NothingToAggregate):
        make_aggregator("fedavg", {}, base).finalize()


# ---------------------------------------------------------------- server optimizers, over several rounds


@pytest.mark.parametrize(
    ("kind", "bias_correction"),
    [("fedadam", False), ("fedadam", True), ("fedyogi", False), ("fedyogi", True), ("fedadagrad", False)],
)
@pytest.mark.parametrize("initial_v", ["zeros", "tau_squared"])
def test_fedopt_follows_reddi_et_al_across_rounds(kind: str, bias_correction: bool, initial_v: str) -> None:
    hyper = {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}
    if kind == "fedadagrad":
        del hyper["beta_2"]
    kwargs: dict[str, object] = {**hyper, "initial_v": initial_v}
    if kind != "fedadagrad":
        kwargs["bias_correction"] = bias_correction
    beta_2 = hyper.get("beta_2", 0.0)

    base, state = model(0), None
    x = flat(base)
    m = np.zeros_like(x)
    v = np.full_like(x, hyper["tau"] ** 2 if initial_v == "tau_squared" else 0.0)
    for t in range(1, 4):
        updates = updates_of(base, 3, seed=10 * t)
        weights = [5.0, 2.0, 9.0 * t]
        result = aggregate(kind, base, updates, weights, kwargs, state)
        mean = ref_weighted_mean(base, updates, weights)
        x, m, v = ref_fedopt(
            kind,
            x,
            mean,
            m,
            v,
            t,
            eta=hyper["eta"],
            beta_1=hyper["beta_1"],
            beta_2=beta_2,
            tau=hyper["tau"],
            bias_correction=bias_correction,
        )
        close(result.arrays, x)
        np.testing.assert_allclose(state_part(result, "m"), m, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(state_part(result, "v"), v, rtol=1e-10, atol=1e-15)
        assert result.state is not None and result.state[-1][0] == "t" and float(result.state[-1][1]) == t
        base, state = result.arrays, result.state


def test_fedopt_defaults_are_flowers() -> None:
    base = model(0)
    updates = updates_of(base, 2)
    mean = ref_weighted_mean(base, updates, [1.0, 3.0])
    x, zeros = flat(base), np.zeros(len(flat(base)))
    defaults = {
        "fedadam": {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
        "fedyogi": {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
        "fedadagrad": {"eta": 0.1, "beta_1": 0.0, "beta_2": 0.0, "tau": 1e-3},
    }
    for kind, hyper in defaults.items():
        want, _, _ = ref_fedopt(kind, x, mean, zeros, zeros, 1, **hyper, bias_correction=False)
        close(aggregate(kind, base, updates, [1.0, 3.0]).arrays, want)


@pytest.mark.parametrize(("lr", "mu"), [(1.0, 0.0), (0.7, 0.9)])
def test_fedavgm_is_server_momentum_across_rounds(lr: float, mu: float) -> None:
    kwargs = {"server_learning_rate": lr, "server_momentum": mu}
    base, state = model(0), None
    x, m = flat(base), np.zeros(len(flat(base)))
    for t in range(1, 4):
        updates = updates_of(base, 2, seed=t)
        result = aggregate("fedavgm", base, updates, [1.0, 2.0], kwargs, state)
        x, m = ref_fedavgm(x, ref_weighted_mean(base, updates, [1.0, 2.0]), m, lr, mu)
        close(result.arrays, x)
        np.testing.assert_allclose(state_part(result, "m"), m, rtol=1e-10, atol=1e-15)
        base, state = result.arrays, result.state


def test_fedavgm_with_flower_defaults_is_fedavg() -> None:
    base = model(0)
    updates = updates_of(base, 3)
    close(
        aggregate("fedavgm", base, updates, [1.0, 2.0, 3.0]).arrays,
        ref_weighted_mean(base, updates, [1, 2, 3]),
    )


def test_fedopt_clips_updates_before_averaging() -> None:
    base = model(0)
    updates = updates_of(base, 3, spread=0.3)
    result = aggregate("fedadam", base, updates, [1.0, 1.0, 2.0], {"max_norm": 0.5})
    mean = ref_weighted_mean(base, updates, [1.0, 1.0, 2.0], bound=0.5)
    zeros = np.zeros(len(mean))
    want, _, _ = ref_fedopt(
        "fedadam",
        flat(base),
        mean,
        zeros,
        zeros,
        1,
        eta=0.1,
        beta_1=0.9,
        beta_2=0.99,
        tau=1e-3,
        bias_correction=False,
    )
    close(result.arrays, want)


# ---------------------------------------------------------------- robust aggregators


@pytest.mark.parametrize("count", [1, 4, 5])
@pytest.mark.parametrize("bound", [None, 0.2])
def test_median_is_coordinate_wise_and_unweighted(count: int, bound: float | None) -> None:
    base = model(0)
    updates = updates_of(base, count, spread=0.3)
    kwargs = {} if bound is None else {"max_norm": bound}
    result = aggregate("median", base, updates, [float(k + 1) ** 3 for k in range(count)], kwargs)
    want = np.median(np.stack([ref_clipped(base, u, bound) for u in updates]), axis=0)
    close(result.arrays, want)
    assert identical(result, aggregate("median", base, updates, [1.0] * count, kwargs))


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.45])
@pytest.mark.parametrize("count", [3, 6, 10])
def test_trimmed_mean_cuts_beta_at_each_end(beta: float, count: int) -> None:
    base = model(0)
    updates = updates_of(base, count, spread=0.5)
    result = aggregate("trimmed_mean", base, updates, [1.0] * count, {"beta": beta})
    close(result.arrays, ref_trimmed_mean(np.stack([flat(u) for u in updates]), beta))


def test_trimmed_mean_defaults_to_flowers_beta() -> None:
    base = model(0)
    updates = updates_of(base, 5, spread=0.5)
    close(
        aggregate("trimmed_mean", base, updates, [1.0] * 5).arrays,
        ref_trimmed_mean(np.stack([flat(u) for u in updates]), 0.2),
    )


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_robust_aggregators_reduce_in_bounded_blocks(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny memory budget means many column blocks: same bits as one block."""
    base = model(0)
    updates = updates_of(base, 5, spread=0.5)
    whole = aggregate(name, base, updates, [1.0] * 5, {"max_norm": 0.3})
    monkeypatch.setattr(robust, "BLOCK_BUDGET", 100)
    assert identical(aggregate(name, base, updates, [1.0] * 5, {"max_norm": 0.3}), whole)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), count=st.integers(1, 7), data=st.data())
def test_median_ignores_the_order_of_its_inputs(seed: int, count: int, data: st.DataObject) -> None:
    base = model(seed, "<f4")
    updates = updates_of(base, count, seed=seed)
    # A shared value, with both signs of zero, must not make the order show through.
    updates[0] = [(n, np.where(np.arange(a.size).reshape(a.shape) % 3 == 0, -0.0, a)) for n, a in updates[0]]
    if count > 1:
        updates[1] = [
            (n, np.where(np.arange(a.size).reshape(a.shape) % 3 == 0, 0.0, a)) for n, a in updates[1]
        ]
    order = data.draw(st.permutations(range(count)))
    shuffled = [updates[k] for k in order]
    for name in ("median", "trimmed_mean"):
        assert identical(
            aggregate(name, base, updates, [1.0] * count), aggregate(name, base, shuffled, [1.0] * count)
        )


# ---------------------------------------------------------------- properties every aggregator has


def mixed_model(seed: int) -> NamedArrays:
    """Several dtypes, and one array longer than a norm block, so chunks cross every kind of boundary."""
    rng = np.random.default_rng(seed)
    return [
        ("long", rng.standard_normal(70_001).astype("<f4")),
        ("w", rng.standard_normal((5, 3)).astype("<f8")),
        ("half", rng.standard_normal(9).astype("<f2")),
        ("steps", rng.integers(0, 1000, size=4).astype("<i4")),
        ("scalar", np.asarray(rng.standard_normal()).astype("<f4")),
    ]


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("bound", [None, 40.0])
def test_streaming_in_any_chunks_gives_the_same_bits_as_one_chunk(name: str, bound: float | None) -> None:
    base = mixed_model(0)
    updates = [
        [
            (n, (a + np.ones_like(a) * (k - 1) + np.arange(a.size).reshape(a.shape) % 7).astype(a.dtype))
            for n, a in base
        ]
        for k in range(3)
    ]
    kwargs = {} if bound is None else {"max_norm": bound}
    whole = aggregate(name, base, updates, [3.0, 1.0, 2.0], kwargs)
    assert identical(aggregate(name, base, updates, [3.0, 1.0, 2.0], kwargs, cuts=random_cuts(1)), whole)
    assert identical(
        aggregate(name, base, updates, [3.0, 1.0, 2.0], kwargs), whole
    )  # and again: deterministic


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("dtype", ["<f4", "<f2"])
def test_the_new_model_has_the_base_models_dtypes(name: str, dtype: str) -> None:
    base = model(0, dtype)
    updates = updates_of(base, 3)
    result = aggregate(name, base, updates, [1.0, 2.0, 3.0])
    assert [a.dtype.str for _, a in result.arrays] == [dtype] * len(SHAPES)
    if name == "fedavg":
        want = ref_weighted_mean(base, updates, [1.0, 2.0, 3.0]).astype(dtype)
        np.testing.assert_array_max_ulp(flat(result.arrays).astype(dtype), want, maxulp=1)
    if result.state is not None:
        assert all(a.dtype == np.float64 for _, a in result.state)


def test_integer_arrays_are_rounded_half_to_even() -> None:
    base = [("count", np.array([0, 0, 0], dtype=np.int64))]
    updates = [[("count", np.array([1, 2, 3]))], [("count", np.array([2, 3, 6]))]]
    result = aggregate("fedavg", base, updates, [1.0, 1.0])
    np.testing.assert_array_equal(result.arrays[0][1], [2, 2, 4])  # 1.5 → 2, 2.5 → 2, 4.5 → 4
    assert result.arrays[0][1].dtype == np.int64


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_never_reach_a_model(name: str, bad: float) -> None:
    """Either ``add`` refuses the piece, or (folds that check once per round) ``finalize`` refuses the sum."""
    base = model(0)
    good, poisoned = updates_of(base, 2)
    poisoned[0][1].reshape(-1)[-1] = bad
    aggregator = make_aggregator(name, {}, base)
    aggregator.begin(1.0)
    for piece in pieces(good):
        aggregator.add(piece)
    aggregator.commit()
    aggregator.begin(1.0)
    try:
        for piece in pieces(poisoned):
            aggregator.add(piece)
    except StreamError as error:
        assert error.reason == "non_finite"
        assert "conv[104]" in error.detail
    else:
        aggregator.commit()
        with pytest.raises(NonFiniteAggregate, match="conv"):
            aggregator.finalize()
    with pytest.raises(StreamError):
        DeltaNorm(base).add(next(pieces(poisoned)))


def test_folds_that_defer_the_check_are_the_fedavg_family() -> None:
    deferred = {name for name in AGGREGATORS if make_aggregator(name, {}, model(0)).checks_finite_itself}
    assert deferred == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}


def test_pieces_that_do_not_fit_the_base_model_are_rejected() -> None:
    base = model(0)
    aggregator = make_aggregator("fedavg", {}, base)
    aggregator.begin(1.0)
    cases = [
        (ArrayPiece(index=0, start=0, values=np.zeros(3, dtype="<f4")), "dtype_mismatch"),
        (ArrayPiece(index=1, start=5, values=np.zeros(3)), "shape_mismatch"),
        (ArrayPiece(index=3, start=0, values=np.zeros(1)), "shape_mismatch"),
    ]
    for piece, reason in cases:
        with pytest.raises(StreamError) as error:
            aggregator.add(piece)
        assert error.value.reason == reason


def test_the_fold_follows_begin_add_commit_finalize() -> None:
    base = model(0)
    aggregator = make_aggregator("fedavg", {}, base)
    piece = next(pieces(base))
    with pytest.raises(RuntimeError):
        aggregator.add(piece)
    with pytest.raises(ValueError, match="weight"):
        aggregator.begin(-1.0)
    with pytest.raises(ValueError, match="scale"):
        aggregator.begin(1.0, scale=0.0)
    aggregator.begin(1.0)
    with pytest.raises(RuntimeError):
        aggregator.begin(1.0)
    with pytest.raises(RuntimeError):
        aggregator.finalize()


# ---------------------------------------------------------------- clipping


def test_delta_norm_is_the_l2_norm_of_update_minus_base() -> None:
    base = mixed_model(0)
    update = mixed_model(1)
    norm = DeltaNorm(base)
    for piece in pieces(update, random_cuts(2)):
        norm.add(piece)
    np.testing.assert_allclose(norm.value, np.linalg.norm(flat(update) - flat(base)), rtol=1e-12)


def test_clip_scale_brings_the_norm_down_to_the_bound() -> None:
    assert clip_scale(0.0, 1.0) == 1.0
    assert clip_scale(1.0, 1.0) == 1.0
    assert clip_scale(4.0, 1.0) == 0.25
    with pytest.raises(ValueError):
        clip_scale(float("nan"), 1.0)


def test_needs_norm_only_when_clipping() -> None:
    assert not needs_norm({})
    assert not needs_norm({"max_norm": None})
    assert needs_norm({"max_norm": 10})
    assert max_norm({"max_norm": 2}) == 2.0


# ---------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("fedsgd", {}, "unknown aggregator 'fedsgd'; choose one of fedadagrad, fedadam"),
        ("fedavg", {"eta": 0.1}, r"fedavg: unknown kwargs \['eta'\]; accepted: max_norm"),
        ("fedadagrad", {"bias_correction": True}, r"unknown kwargs \['bias_correction'\]"),
        ("fedadam", {"eta": "0.1"}, "fedadam: eta must be a number, got str '0.1'"),
        ("fedadam", {"eta": True}, "eta must be a number"),
        ("fedadam", {"eta": 0}, r"fedadam: eta must be in \(0.0, inf\), got 0"),
        ("fedadam", {"tau": float("nan")}, "tau must be in"),
        ("fedyogi", {"beta_1": 1.0}, r"beta_1 must be in \[0.0, 1.0\), got 1.0"),
        ("fedyogi", {"beta_2": -0.1}, "beta_2 must be in"),
        ("fedadam", {"bias_correction": 1}, "bias_correction must be true or false"),
        ("fedadam", {"initial_v": "ones"}, "initial_v must be one of zeros, tau_squared"),
        ("fedavgm", {"server_momentum": 1.0}, "server_momentum must be in"),
        ("fedavgm", {"server_learning_rate": -1}, "server_learning_rate must be in"),
        ("trimmed_mean", {"beta": 0.5}, r"trimmed_mean: beta must be in \[0.0, 0.5\), got 0.5"),
        ("median", {"max_norm": 0}, r"median: max_norm must be in \(0.0, inf\)"),
        ("median", {"max_norm": "1"}, "max_norm must be a number"),
    ],
)
def test_kwargs_are_validated_with_clear_errors(name: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(AggregatorConfigError, match=message):
        make_aggregator(name, kwargs, model(0))


def test_optimizer_state_must_fit_the_model() -> None:
    base = model(0)
    state = aggregate("fedadam", base, updates_of(base, 1), [1.0]).state
    assert state is not None
    with pytest.raises(AggregatorConfigError, match="fedavg keeps no optimizer state"):
        make_aggregator("fedavg", {}, base, state)
    with pytest.raises(AggregatorConfigError, match=r"missing \['v/conv', 'v/bias', 'v/scale'\]"):
        make_aggregator("fedadam", {}, base, [(n, a) for n, a in state if not n.startswith("v/")])
    with pytest.raises(
        AggregatorConfigError, match=r"fedavgm: .* unexpected \['v/bias', 'v/conv', 'v/scale'\]$"
    ):
        make_aggregator("fedavgm", {}, base, state)
    reshaped = [(n, a.reshape(-1) if n == "m/conv" else a) for n, a in state]
    with pytest.raises(
        AggregatorConfigError, match=r"state m/conv is float64\[105\], expected float64\[3, 5, 7\]"
    ):
        make_aggregator("fedadam", {}, base, reshaped)
    narrowed = [(n, a.astype(np.float32) if n == "v/bias" else a) for n, a in state]
    with pytest.raises(AggregatorConfigError, match="state v/bias is float32"):
        make_aggregator("fedadam", {}, base, narrowed)
    with pytest.raises(AggregatorConfigError, match="state t must be"):
        make_aggregator("fedadam", {}, base, [*state[:-1], ("t", np.array(1.5))])


def test_the_base_model_must_be_numeric_with_unique_names() -> None:
    with pytest.raises(AggregatorConfigError, match="unique"):
        make_aggregator("fedavg", {}, [("x", np.zeros(2)), ("x", np.zeros(2))])
    with pytest.raises(AggregatorConfigError, match="complex128"):
        make_aggregator("fedavg", {}, [("x", np.zeros(2, dtype=complex))])
