"""What folding one event costs as rounds grow: a round of C clients, for C from 10 to 5,000.

Pure CPU, in this process: the domain fold (``Ledger.apply``) of one session of one training
round with C distinct assigned clients (request, staging, assignment, C updates, aggregate),
built by bench_projector.py's ``session``. The bound, measured in the same run, is the same
fold of 10-client rounds (as many one-round sessions as make 5,000 events): a fold whose
per-event cost does not grow with the round stays near 1x. Rounds of thousands of clients are
ordinary in cross-device federated learning.
Each figure is the best of several repeats, the sizes interleaved.

    .venv/bin/python bench/bench_round_size.py [--sizes 10,100,1000,5000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import gc
import time

from bench_projector import session
from machine import describe

from roundlog.domain.events import Event
from roundlog.domain.ledger import Ledger


def fold_seconds(events: list[Event]) -> float:
    ledger = Ledger()
    started = time.perf_counter()
    for event in events:
        ledger.apply(event)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,5000")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    logs = {size: list(session(0, rounds=1, clients=size, population=size)) for size in sizes}
    bound = [
        event for n in range(5_000 // 16 + 1) for event in session(n, rounds=1, clients=10, population=10)
    ]
    logs[0] = bound
    best = dict.fromkeys(logs, float("inf"))
    gc.disable()  # the fold's own cost, not the collector's view of the logs held here
    for _ in range(args.repeats):
        for size, events in logs.items():
            best[size] = min(best[size], fold_seconds(events) / len(events))
    print(describe())
    print(f"bound: 10-client rounds, {len(bound):,} events: {best[0] * 1e6:.1f} us per event")
    print(f"{'clients per round':>18} {'events':>7} {'us per event':>13} {'/ bound':>8}")
    for size in sizes:
        print(f"{size:>18,} {len(logs[size]):>7,} {best[size] * 1e6:>13.1f} {best[size] / best[0]:>7.2f}x")


if __name__ == "__main__":
    main()
