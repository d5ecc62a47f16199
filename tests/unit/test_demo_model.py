"""The demo's numpy model learns digits: locally, and federated over the demo's non-IID split."""

from __future__ import annotations

import itertools

import numpy as np

from roundlog.demo import Model, Shard, evaluate, initial_model, local_sgd, split_digits


def fedavg(updates: list[tuple[Model, int]]) -> Model:
    """Example-weighted mean, written out here rather than taken from roundlog.aggregation."""
    total = sum(n for _, n in updates)
    mean: Model = []
    for i, (name, first) in enumerate(updates[0][0]):
        acc = np.zeros(first.shape, np.float64)
        for arrays, n in updates:
            acc += n * arrays[i][1].astype(np.float64)
        mean.append((name, (acc / total).astype(np.float32)))
    return mean


def test_the_split_is_skewed_disjoint_and_complete() -> None:
    trains, tests = split_digits(10, seed=0)
    sizes = [len(s.y) for s in trains]
    assert sum(sizes) + sum(len(s.y) for s in tests) == 1797
    assert max(sizes) > 2 * min(sizes), "Dirichlet label skew gives unequal shards"
    label_share = np.array([np.bincount(s.y, minlength=10) / len(s.y) for s in trains])
    assert label_share.max() > 0.3, "some client is dominated by a few labels"
    rows = {tuple(row) for s in trains + tests for row in s.x}
    assert len(rows) > 1700  # (digits has a few duplicate images)
    assert split_digits(10, seed=0)[0][3].y.tolist() == trains[3].y.tolist()


def test_local_sgd_learns_on_pooled_data() -> None:
    trains, tests = split_digits(4, seed=1)
    pooled = Shard(np.concatenate([s.x for s in trains]), np.concatenate([s.y for s in trains]))
    held_out = Shard(np.concatenate([s.x for s in tests]), np.concatenate([s.y for s in tests]))
    model = initial_model()
    before = evaluate(model, held_out)["accuracy"]
    model = local_sgd(model, pooled, np.random.default_rng(0))
    assert [(n, a.dtype, a.shape) for n, a in model] == [(n, a.dtype, a.shape) for n, a in initial_model()]
    assert before < 0.15 and evaluate(model, held_out)["accuracy"] > 0.9


def test_federated_rounds_on_the_demo_split_raise_accuracy_every_round() -> None:
    """What `roundlog demo` shows by default: 10 clients, one straggler left out, 5 rounds of FedAvg."""
    trains, tests = split_digits(10, seed=0)
    held_out = Shard(np.concatenate([s.x for s in tests]), np.concatenate([s.y for s in tests]))
    rngs = [np.random.default_rng([0, k]) for k in range(10)]
    model, accuracies = initial_model(), []
    for _ in range(5):
        updates = [
            (local_sgd(model, shard, rng), len(shard.y)) for shard, rng in zip(trains, rngs, strict=True)
        ]
        model = fedavg(updates[:9])
        accuracies.append(evaluate(model, held_out)["accuracy"])
    assert all(later > earlier for earlier, later in itertools.pairwise(accuracies)), accuracies
    assert accuracies[-1] > 0.85
