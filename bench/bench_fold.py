"""In-memory aggregation fold of a 25M-parameter float32 update, against numpy's own bound.

The bound is measured in the same run on the same arrays: ``np.add(acc64, x32, out=acc64)``
over each whole array, i.e. the cheapest possible "add a float32 update into a float64
accumulator". FedAvg checks finiteness once per round, on the sums (a NaN or an infinity
never leaves a float64 sum), so the per-update fold has no check pass. The fold gets the
update as the tensor transport delivers it: 1 MiB chunks turned into element-aligned pieces
by the Reassembler (done before timing: this measures the fold, not hashing). Goal: fedavg
(weighted) >= 0.8 of the bound. fedadam and median are reported over a few updates, fold plus
finalize, against the bound for the same number of updates. Each figure is the best of
several repeats, bound and fold interleaved so they share the machine's conditions.

    .venv/bin/python bench/bench_fold.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from machine import describe

from roundlog.aggregation import Aggregator, make_aggregator
from roundlog.aggregation.base import all_finite
from roundlog.arrays import ArrayPiece, NamedArrays, Reassembler, raw_chunks, specs_of

CHUNK = 1 << 20
# 25,000,000 float32 parameters in a few arrays of the sizes a real model has.
SHAPES = {"embed": (4096, 4096), "dense": (2000, 4096), "head": (30_000,), "bias": (784,)}


def model(seed: int) -> NamedArrays:
    rng = np.random.default_rng(seed)
    return [(name, rng.standard_normal(shape, dtype=np.float32)) for name, shape in SHAPES.items()]


def pieces_of(arrays: NamedArrays) -> list[ArrayPiece]:
    reassembler = Reassembler(specs_of(arrays))
    return [piece for chunk in raw_chunks(arrays, CHUNK) for piece in reassembler.feed(bytes(chunk))]


def fold(aggregator: Aggregator, pieces: list[ArrayPiece], weight: float) -> None:
    aggregator.begin(weight)
    for piece in pieces:
        aggregator.add(piece)
    aggregator.commit()


def seconds(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def line(label: str, best: float, megabytes: float, ratio: float | None = None) -> None:
    tail = "" if ratio is None else f"  ratio {ratio:.2f}"
    print(f"{label:<44} {best * 1e3:8.1f} ms {megabytes / best:8.0f} MB/s{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--updates", type=int, default=4, help="updates folded for fedadam and median")
    args = parser.parse_args()
    print(describe())

    base = model(0)
    updates = [pieces_of(model(1 + k)) for k in range(args.updates)]
    update = updates[0]
    megabytes = sum(a.nbytes for _, a in base) / 1e6
    print(
        f"update: {sum(a.size for _, a in base):,} float32 parameters in {len(base)} arrays, "
        f"{len(update)} pieces of <= 1 MiB; best of {args.repeats}"
    )

    # The bound and the folds, interleaved; every accumulator is touched once before timing.
    xs = [a.reshape(-1) for _, a in model(1)]
    accs = [np.zeros(x.size) for x in xs]

    def bound() -> None:
        for acc, x in zip(accs, xs, strict=True):
            np.add(acc, x, out=acc)

    def check_sums() -> None:
        for acc in accs:
            all_finite(acc)

    fedavg = make_aggregator("fedavg", {}, base)
    timed: dict[str, Callable[[], Any]] = {
        "bound": bound,
        "weighted": lambda: fold(fedavg, update, 3.0),
        "unweighted": lambda: fold(fedavg, update, 1.0),
        "check": check_sums,
    }
    best = dict.fromkeys(timed, float("inf"))
    for action in timed.values():
        action()
    for _ in range(args.repeats):
        for key, action in timed.items():
            best[key] = min(best[key], seconds(action))
    ratio = best["bound"] / best["weighted"]
    line("bound: np.add(acc64, x32, out=acc64)", best["bound"], megabytes)
    line("fedavg fold, weight 3.0", best["weighted"], megabytes, ratio)
    print(f"  goal >= 0.8 of the bound: {'met' if ratio >= 0.8 else 'NOT met'}")
    line("  + once per round: finiteness of the sums", best["check"], megabytes)
    line(
        "fedavg fold, weight 1.0 (no multiply)",
        best["unweighted"],
        megabytes,
        best["bound"] / best["unweighted"],
    )

    for name in ("fedadam", "median"):
        best_run = float("inf")
        for _ in range(max(2, args.repeats // 3)):
            aggregator = make_aggregator(name, {}, base)

            def run(aggregator: Aggregator = aggregator) -> None:
                for k, pieces in enumerate(updates):
                    fold(aggregator, pieces, 1.0 + k)
                aggregator.finalize()

            best_run = min(best_run, seconds(run))
        label = f"{name}, {len(updates)} updates, fold + finalize"
        line(label, best_run, len(updates) * megabytes, len(updates) * best["bound"] / best_run)

    chunks = [bytes(c) for c in raw_chunks(model(1), CHUNK)]

    def reassemble() -> None:
        reassembler = Reassembler(specs_of(base))
        for chunk in chunks:
            reassembler.feed(chunk)

    line("for reference: Reassembler incl. sha256", min(seconds(reassemble) for _ in range(3)), megabytes)


if __name__ == "__main__":
    main()
