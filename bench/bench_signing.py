"""What a signature costs per event (``ROUNDLOG_AUTH=signed``), against what every event already costs.

Pure CPU, in this process: no broker, no database. The bound, measured in the same run on the
same records, is the codec: every event is encoded once by its producer and decoded by every
role that reads it. Against it, per event:

- sign: ``Signer.headers(value)``, what a producer adds to each record it sends;
- read headers: ``seal_of(headers, value)``, what ``Entry.of`` adds to each record it reads;
- verify: ``seal_problem(seal)``, the Ed25519 check every role makes of every record it folds;
- the fold: ``PartitionFold.apply`` of the whole log, built by ``PartitionFold.for_settings``
  unsigned and signed (an ``Authority`` whose registry holds every key, registered by
  ``KeyRegistered`` events the operator key signed, folded before the clock starts).

The log: sessions of R training rounds with C assigned clients each (request, staging,
assignment, C updates, aggregate; every other round a late update, refused by the session
rules in both folds): the metadata mix of bench_projector.py, but with the update ids the
fold derives, so that every event but the late updates is applied. Each event is signed by
the key of the role that produces it (operator, coordinator, aggregator, one key per client),
loaded from key files as a deployment does. Each figure is the best (and the median) of
several repeats, the steps interleaved so they share the machine's conditions.

    .venv/bin/python bench/bench_signing.py [--events 10000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from machine import describe

from roundlog.codec import decode, encode
from roundlog.config import Settings
from roundlog.domain.authority import Seal, seal_problem
from roundlog.domain.events import (
    ArraySpec,
    ClientsAssigned,
    Event,
    KeyRegistered,
    KeyRole,
    ModelStaged,
    RoundAggregated,
    RoundConfig,
    RoundRequested,
    SessionFinished,
    SessionStarted,
    Task,
    TensorRef,
    UpdateReceived,
    update_id_for,
)
from roundlog.keys import Signer, create_key_file
from roundlog.roles.stream import PartitionFold, seal_of

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CLIENTS = 500


def ref(key: str) -> TensorRef:
    return TensorRef(
        key=key,
        partition=0,
        first_offset=0,
        last_offset=3,
        chunks=4,
        nbytes=4_000_000,
        sha256="ab" * 32,
        arrays=(ArraySpec(name="dense", dtype="float32", shape=(1000, 1000)),),
    )


def client_name(n: int) -> str:
    return f"client-{n:03d}"


def session(n: int, rounds: int, clients: int) -> Iterator[tuple[KeyRole, Event]]:
    """One session, valid by construction, each event with the role that produces it."""
    sid = f"session-{n:06d}"
    ticks = iter(range(1, 10**6))

    def stamp() -> dict[str, Any]:
        return {"event_id": f"{sid}-{next(ticks)}", "occurred_at": T0 + timedelta(seconds=n + next(ticks))}

    config = RoundConfig(round_timeout=60.0, buffer_size=-1)
    model = f"{sid}-m0"
    yield (
        KeyRole.OPERATOR,
        SessionStarted(
            **stamp(),
            session_id=sid,
            rounds=rounds,
            initial_model_id=model,
            initial_model=ref(model),
            round_config=config,
        ),
    )
    for k in range(1, rounds + 1):
        rid = f"{sid}-r{k}"
        ids: dict[str, Any] = {"session_id": sid, "round_id": rid}
        names = tuple(client_name((n * 7 + k + i) % CLIENTS) for i in range(clients))
        yield (
            KeyRole.COORDINATOR,
            RoundRequested(**stamp(), **ids, round_no=k, task=Task.TRAINING, model_id=model, config=config),
        )
        yield (
            KeyRole.COORDINATOR,
            ModelStaged(**stamp(), **ids, model_id=model, sha256="ab" * 32, nbytes=4_000_000),
        )
        yield (
            KeyRole.COORDINATOR,
            ClientsAssigned(
                **stamp(),
                **ids,
                client_ids=names,
                deadline=T0 + timedelta(days=1),
                task=Task.TRAINING,
                model_id=model,
                model=ref(model),
                config=config,
            ),
        )
        updates = [update_id_for(rid, c) for c in names]
        for client, uid in zip(names, updates, strict=True):
            yield (
                KeyRole.CLIENT,
                UpdateReceived(
                    **stamp(),
                    **ids,
                    client_id=client,
                    update_id=uid,
                    num_examples=100 + k,
                    metrics={"loss": 0.5, "accuracy": 0.8},
                    tensor=ref(uid),
                ),
            )
        new = f"{sid}-m{k}"
        yield (
            KeyRole.AGGREGATOR,
            RoundAggregated(
                **stamp(),
                **ids,
                model_id=new,
                parent_model_id=model,
                tensor=ref(new),
                update_ids=tuple(updates),
                total_weight=float(clients * (100 + k)),
            ),
        )
        if k % 2 == 0:  # a straggler: late, refused by the round (signed or not)
            yield (
                KeyRole.CLIENT,
                UpdateReceived(
                    **stamp(),
                    **ids,
                    client_id=names[0],
                    update_id=updates[0],
                    num_examples=1,
                    tensor=ref("late"),
                ),
            )
        model = new
    yield (
        KeyRole.COORDINATOR,
        SessionFinished(**stamp(), session_id=sid, succeeded=True, final_model_id=model),
    )


def log(events: int, rounds: int, clients: int) -> list[tuple[KeyRole, Event]]:
    out: list[tuple[KeyRole, Event]] = []
    n = 0
    while len(out) < events:
        out.extend(session(n, rounds, clients))
        n += 1
    return out


class Keys:
    """The deployment's keys, as files ``roundlog keys create`` would write, and their registry."""

    def __init__(self, directory: Path) -> None:
        def load(name: str) -> Signer:
            path = directory / f"{name}.pem"
            create_key_file(path)
            return Signer.from_file(path)

        self.operator = load("operator")
        self.coordinator = load("coordinator")
        self.aggregator = load("aggregator")
        self.clients = {client_name(n): load(client_name(n)) for n in range(CLIENTS)}

    def author(self, role: KeyRole, event: Event) -> Signer:
        if role == KeyRole.CLIENT:
            assert isinstance(event, UpdateReceived)  # the one client event of this log
            return self.clients[event.client_id]
        return {
            KeyRole.OPERATOR: self.operator,
            KeyRole.COORDINATOR: self.coordinator,
            KeyRole.AGGREGATOR: self.aggregator,
        }[role]

    def registry(self) -> list[KeyRegistered]:
        """A ``KeyRegistered`` for every key but the operator's, which the settings name."""
        holders = [(self.coordinator, KeyRole.COORDINATOR, ""), (self.aggregator, KeyRole.AGGREGATOR, "")]
        holders += [(signer, KeyRole.CLIENT, name) for name, signer in self.clients.items()]
        return [
            KeyRegistered(
                event_id=f"register-{signer.key_id[:16]}",
                occurred_at=T0,
                key_id=signer.key_id,
                roles=(role,),
                client_id=client_id,
            )
            for signer, role, client_id in holders
        ]


def settings(operator_key: str | None) -> Settings:
    """Settings that only name the signing rule: nothing here connects to the servers."""
    return Settings(
        kafka_bootstrap="unused:9092",
        database_url="postgresql://unused/unused",
        auth=operator_key is not None,
        operator_key=operator_key,
    )


Record = tuple[Event, datetime, Seal]


def fold_setup(rule: Settings, registry: list[Record], signed: bool) -> Callable[[], PartitionFold]:
    """A fresh fold of partition 0 with the registry already folded (not timed)."""

    def setup() -> PartitionFold:
        fold = PartitionFold.for_settings(0, None, rule)
        for offset, (event, logged_at, seal) in enumerate(registry):
            outcome = fold.apply(offset, event, logged_at, seal if signed else None)
            assert outcome.applied, outcome.refusal
        return fold

    return setup


def fold_all(fold: PartitionFold, records: list[Record], first: int, signed: bool) -> Counter[str]:
    """Fold the log; how many events each refusal reason stopped (``applied``: none)."""
    counts: Counter[str] = Counter()
    for offset, (event, logged_at, seal) in enumerate(records, first):
        refusal = fold.apply(offset, event, logged_at, seal if signed else None).refusal
        counts[refusal.reason if refusal else "applied"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(describe())

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        keys = Keys(Path(directory))
    authored = log(args.events, args.rounds, args.clients)
    registry_events = keys.registry()

    def record(signer: Signer, event: Event) -> Record:
        """The event as a role reads it: logged when it occurred, with the seal its headers carry."""
        value = encode(event)
        seal = seal_of(signer.headers(value), value)
        assert seal is not None
        return event, event.occurred_at, seal

    registry = [record(keys.operator, e) for e in registry_events]
    records = [record(keys.author(role, event), event) for role, event in authored]
    values = [seal.value for _, _, seal in records]
    authors = [keys.author(role, event) for role, event in authored]
    headers = [signer.headers(value) for signer, value in zip(authors, values, strict=True)]
    seals = [seal for _, _, seal in records]
    events = [event for event, _, _ in records]
    n = len(records)
    print(
        f"log: {n:,} events ({args.rounds} rounds x {args.clients} clients per session, "
        f"{sum(map(len, values)) / n:.0f} bytes per record on average), {len(keys.clients) + 3} keys, "
        f"{len(registry)} KeyRegistered; built, encoded and signed in {time.perf_counter() - started:.1f}s"
    )

    unsigned, signed = settings(None), settings(keys.operator.key_id)
    first = len(registry)
    # What each fold did, checked once: signing must change no outcome, only add its cost.
    outcomes = {
        flag: fold_all(fold_setup(rule, registry, flag)(), records, first, flag)
        for flag, rule in ((False, unsigned), (True, signed))
    }
    assert outcomes[False] == outcomes[True], outcomes
    print(
        "fold outcomes, unsigned and signed alike: "
        + ", ".join(f"{k} {v:,}" for k, v in outcomes[True].items())
    )
    assert all(seal_problem(seal) is None for seal in seals)

    def none() -> None:
        return None

    steps: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {
        "encode": (none, lambda _: [encode(e) for e in events]),
        "decode": (none, lambda _: [decode(v) for v in values]),
        "sign": (none, lambda _: [s.headers(v) for s, v in zip(authors, values, strict=True)]),
        "read headers": (none, lambda _: [seal_of(h, v) for h, v in zip(headers, values, strict=True)]),
        "verify": (none, lambda _: [seal_problem(s) for s in seals]),
        "fold unsigned": (
            fold_setup(unsigned, registry, False),
            lambda fold: fold_all(fold, records, first, False),
        ),
        "fold signed": (
            fold_setup(signed, registry, True),
            lambda fold: fold_all(fold, records, first, True),
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (setup, run) in steps.items():
            state = setup()
            gc.collect()
            start = time.perf_counter()
            run(state)
            times[name].append((time.perf_counter() - start) / n * 1e6)

    best = {name: min(ts) for name, ts in times.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for table in (best, median):
        table["encode + decode"] = table["encode"] + table["decode"]
        table["fold: added by signing"] = table["fold signed"] - table["fold unsigned"]
    codec, fold = best["encode + decode"], best["fold unsigned"]

    print(f"\nus per event, best and median of {args.repeats}; ratios of the best")
    print(f"{'step':<44} {'best':>8} {'median':>8} {'/ codec':>8} {'/ fold':>8}")
    rows = [
        ("encode (codec.encode)", "encode"),
        ("decode (codec.decode)", "decode"),
        ("bound: encode + decode", "encode + decode"),
        ("sign (Signer.headers)", "sign"),
        ("read headers (seal_of)", "read headers"),
        ("verify (seal_problem)", "verify"),
        ("fold, unsigned (PartitionFold.apply)", "fold unsigned"),
        ("fold, signed (Authority with the registry)", "fold signed"),
        ("fold: added by signing (signed - unsigned)", "fold: added by signing"),
    ]
    for label, key in rows:
        print(
            f"{label:<44} {best[key]:8.1f} {median[key]:8.1f} "
            f"{best[key] / codec:8.2f} {best[key] / fold:8.2f}"
        )

    # A deployment of coordinator, aggregator and projector: each role decodes and folds every
    # event of the events topic; its producer encodes and signs it once.
    roles = 3
    plain = best["encode"] + roles * best["decode"]
    added = best["sign"] + roles * (best["read headers"] + best["fold: added by signing"])
    print(
        f"\nper event, {roles} roles folding it: sign once + {roles} x (read headers + verify in the fold) "
        f"= {added:.0f} us, against encode once + {roles} x decode = {plain:.0f} us ({added / plain:.2f}x)"
    )


if __name__ == "__main__":
    main()
