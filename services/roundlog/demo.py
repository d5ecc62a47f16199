"""``roundlog demo``: federated training of a digits classifier through the whole stack.

Everything runs in this process but talks only through the broker and PostgreSQL: the
coordinator, aggregator and projector roles, and N simulated ``FederatedClient`` s, each
holding a non-IID shard of scikit-learn's digits (Dirichlet label skew) and a slice of a
held-out test set. A session of training rounds, each followed by a validation round,
trains a multinomial logistic regression; the progress lines come from folding the log
live, the summary from SQL, and the run ends with a replay of the projections and a
re-fold of every aggregated model.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
import uvloop
from numpy.typing import NDArray
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sklearn.datasets import load_digits  # type: ignore[import-untyped]

from roundlog.arrays import NamedArrays
from roundlog.audit import verify_models
from roundlog.bus import Consumer, Topics, create_topics, make_consumer, make_producer, read_from_end
from roundlog.client import FederatedClient, Metrics, import_model, provision_keys, start_session
from roundlog.codec import DecodeError, decode
from roundlog.config import Settings
from roundlog.domain.events import RoundConfig, SessionFinished, Task, UpdateReceived, ValidationReceived
from roundlog.domain.ledger import Ledger
from roundlog.domain.round import Round, RoundState
from roundlog.domain.rules import Reason
from roundlog.domain.session import Outcome, Session
from roundlog.domain.validation import config_problem
from roundlog.projections.schema import upgrade
from roundlog.replay import replay
from roundlog.roles import aggregator, coordinator, projector

# --- the model: multinomial logistic regression on 8x8 digits, in numpy -------------------------

FEATURES, CLASSES = 64, 10
#: Local SGD per round, tuned so that FedAvg over 10 skewed shards gains accuracy every round.
LEARNING_RATE, LOCAL_EPOCHS, BATCH_SIZE = 0.05, 10, 16
#: Dirichlet concentration of each class over the clients: small means strongly non-IID.
DIRICHLET_ALPHA = 0.5
TEST_FRACTION = 0.2

Model = list[tuple[str, NDArray[np.float32]]]


@dataclass(frozen=True)
class Shard:
    """Images (flattened, scaled to [0, 1]) and their labels."""

    x: NDArray[np.float64]
    y: NDArray[np.int64]


def split_digits(clients: int, seed: int) -> tuple[list[Shard], list[Shard]]:
    """Per client: a training shard with Dirichlet label skew, and an equal slice of one held-out test set.

    The test slices partition the test set, so the example-weighted mean of the clients'
    accuracies is exactly the global model's accuracy on the whole test set.
    """
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in range(CLASSES):
        members = rng.permutation(train[y[train] == label])
        shares = rng.dirichlet(np.full(clients, DIRICHLET_ALPHA))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.extend(chunk.tolist())
    shards = [Shard(x[sorted(p)], y[sorted(p)]) for p in parts]
    return shards, [Shard(x[s], y[s]) for s in np.array_split(test, clients)]


def initial_model() -> Model:
    return [
        ("weights", np.zeros((FEATURES, CLASSES), np.float32)),
        ("bias", np.zeros(CLASSES, np.float32)),
    ]


def _probabilities(arrays: NamedArrays, x: NDArray[np.float64]) -> NDArray[np.float64]:
    weights, bias = (np.asarray(a, np.float64) for _, a in arrays)
    logits = x @ weights + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    probabilities: NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def local_sgd(arrays: NamedArrays, shard: Shard, rng: np.random.Generator) -> Model:
    """``LOCAL_EPOCHS`` of minibatch SGD on the cross-entropy, in float64; returns float32 like the model."""
    weights, bias = (np.array(a, np.float64) for _, a in arrays)
    onehot = np.eye(CLASSES)[shard.y]
    for _ in range(LOCAL_EPOCHS):
        order = rng.permutation(len(shard.y))
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            error = (_probabilities([("w", weights), ("b", bias)], shard.x[batch]) - onehot[batch]) / len(
                batch
            )
            weights -= LEARNING_RATE * shard.x[batch].T @ error
            bias -= LEARNING_RATE * error.sum(axis=0)
    return [("weights", weights.astype(np.float32)), ("bias", bias.astype(np.float32))]


def evaluate(arrays: NamedArrays, shard: Shard) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the model on a shard."""
    probabilities = _probabilities(arrays, shard.x)
    picked = probabilities[np.arange(len(shard.y)), shard.y]
    return {
        "accuracy": float((probabilities.argmax(axis=1) == shard.y).mean()),
        "loss": float(-np.log(np.maximum(picked, 1e-12)).mean()),
    }


class DigitsClient:
    """What one simulated client knows: its shards and its own random stream (so runs repeat)."""

    def __init__(self, train: Shard, test: Shard, rng: np.random.Generator) -> None:
        self.train_shard, self.test_shard, self.rng = train, test, rng

    def train(self, arrays: NamedArrays, config: RoundConfig) -> tuple[NamedArrays, int, Metrics]:
        model = local_sgd(arrays, self.train_shard, self.rng)
        return model, len(self.train_shard.y), evaluate(model, self.train_shard)

    def validate(self, arrays: NamedArrays, config: RoundConfig) -> tuple[int, Metrics]:
        return len(self.test_shard.y), evaluate(arrays, self.test_shard)


# --- the run ---------------------------------------------------------------------------------------

ROUND_TIMEOUT = 30.0
#: A straggler sits this long on each update: well after the others have closed the round.
STRAGGLER_DELAY = 3.0
#: Every role, run in this process as ``roundlog serve --role all`` would.
ROLES = (coordinator.run, aggregator.run, projector.run)


@dataclass(frozen=True)
class Options:
    clients: int = 10
    rounds: int = 5
    aggregator: str = "fedavg"
    stragglers: int = 1
    seed: int = 0
    #: every party signs its events with its own key, and the fold checks them (ROUNDLOG_AUTH=signed)
    signed: bool = False
    #: aggregation shards per training round (see ``RoundConfig.shards``)
    shards: int = 1

    def __post_init__(self) -> None:
        if self.clients < 1 or self.rounds < 1:
            raise ValueError(f"clients and rounds must be >= 1, got {self.clients} and {self.rounds}")
        if not 0 <= self.stragglers < self.clients:
            raise ValueError(f"stragglers must be in [0, clients), got {self.stragglers} of {self.clients}")
        problem = config_problem(RoundConfig(aggregator=self.aggregator, shards=self.shards))
        if problem is not None:
            raise ValueError(problem)


def run(settings: Settings, options: Options | None = None) -> int:
    """The whole demo; 0 when the session succeeded and the audit agrees with the log."""
    options = options or Options()
    upgrade(settings.database_url)
    # piped into a file or a CI log, rich would cut the tables at 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=120)
    return uvloop.run(_run(settings, options, console))


async def _run(settings: Settings, options: Options, console: Console) -> int:
    await create_topics(settings)
    client_ids = [f"client-{k + 1:02d}" for k in range(options.clients)]
    with contextlib.ExitStack() as cleanup:
        if not options.signed:
            return await _demo(settings, settings, {c: settings for c in client_ids}, options, console)
        folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="roundlog-keys-")))
        signed = await provision_keys(settings, folder, client_ids)
        console.print(
            f"signed events: operator key {signed.operator.operator_key}, one key for the roles and one "
            f"per client in {folder}, registered in the log"
        )
        return await _demo(signed.operator, signed.roles, signed.clients, options, console)


async def _demo(
    operator: Settings,
    settings: Settings,
    client_settings: Mapping[str, Settings],
    options: Options,
    console: Console,
) -> int:
    """The demo proper: ``operator`` starts the session, the roles run as ``settings``."""
    topics = Topics.from_prefix(settings.topic_prefix)
    engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
    trains, tests = split_digits(options.clients, options.seed)
    console.print(
        f"digits: {sum(len(s.y) for s in trains)} training images over {options.clients} clients "
        f"(Dirichlet alpha={DIRICHLET_ALPHA}, shard sizes {[len(s.y) for s in trains]}), "
        f"{sum(len(s.y) for s in tests)} held-out test images; {options.stragglers} straggler(s)"
    )
    roles_stop, clients_stop = asyncio.Event(), asyncio.Event()
    roles = [asyncio.create_task(role(settings, roles_stop)) for role in ROLES]
    fleet = _fleet(client_settings, options, trains, tests)
    clients = [asyncio.create_task(c.run(clients_stop)) for c in fleet]
    follower = make_consumer(settings)
    await follower.start()
    try:
        await _wait_for_clients(engine, [c.client_id for c in fleet], roles)
        session_id, session = await _train(operator, topics, options, follower, roles, console)
        clients_stop.set()
        await asyncio.gather(*clients)
        await _wait_projected(settings, topics, follower, engine, roles)
    finally:
        clients_stop.set()
        roles_stop.set()
        await asyncio.gather(*clients, *roles, return_exceptions=True)
        await follower.stop()
    try:
        accuracies = _summary(engine, session_id, console)
    finally:
        engine.dispose()
    if any(later <= earlier for earlier, later in itertools.pairwise(accuracies)):
        console.print(f"[yellow]accuracy did not rise every round: {accuracies}")
    return 0 if session.finished and session.finished.succeeded and await _audit(settings, console) else 1


def _fleet(
    client_settings: Mapping[str, Settings], options: Options, trains: list[Shard], tests: list[Shard]
) -> list[FederatedClient]:
    fleet = []
    for k, ((client_id, settings), train, test) in enumerate(
        zip(client_settings.items(), trains, tests, strict=True)
    ):
        digits = DigitsClient(train, test, np.random.default_rng([options.seed, k]))
        straggler = k >= options.clients - options.stragglers
        fleet.append(
            FederatedClient(
                settings,
                client_id,
                train=digits.train,
                validate=digits.validate,
                labels={"straggler": "yes"} if straggler else {},
                delay=STRAGGLER_DELAY if straggler else 0.0,
            )
        )
    return fleet


def _check(roles: Sequence[asyncio.Task[None]]) -> None:
    """A role that stopped on its own has failed: surface its error instead of waiting forever."""
    for task in roles:
        if task.done():
            task.result()
            raise RuntimeError("a role stopped before the demo ended")


async def _wait_for_clients(
    engine: sa.Engine, client_ids: list[str], roles: Sequence[asyncio.Task[None]]
) -> None:
    """Start the session only once every client's heartbeat is through the log (seen by the projector)."""
    query = sa.text("SELECT count(*) FROM clients WHERE client_id = ANY(:ids)")
    async with asyncio.timeout(60):
        while await asyncio.to_thread(_scalar, engine, query, ids=client_ids) < len(client_ids):
            _check(roles)
            await asyncio.sleep(0.2)


def _scalar(engine: sa.Engine, query: sa.TextClause, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(query, params).scalar()


async def _train(
    settings: Settings,
    topics: Topics,
    options: Options,
    follower: Consumer,
    roles: Sequence[asyncio.Task[None]],
    console: Console,
) -> tuple[str, Session]:
    """Import the initial model, start the session and follow it to its end."""
    await read_from_end(follower, topics.events)
    producer = make_producer(settings)
    await producer.start()
    try:
        model_id, model = await import_model(producer, topics, initial_model(), name="digits-logreg")
        config = RoundConfig(
            round_timeout=ROUND_TIMEOUT,
            buffer_size=options.clients - options.stragglers,
            clients_required=options.clients - options.stragglers,
            aggregator=options.aggregator,
            shards=options.shards,
        )
        session_id = await start_session(
            producer,
            topics,
            model_id=model_id,
            model=model,
            rounds=options.rounds,
            config=config,
            validate_each_round=True,
            name="digits demo",
        )
    finally:
        await producer.stop()
    console.print(f"session {session_id}: {options.rounds} rounds of {options.aggregator}, model {model_id}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("rounds", total=2 * options.rounds)
        async with asyncio.timeout(2 * options.rounds * ROUND_TIMEOUT + 60):
            session = await _follow(follower, session_id, roles, progress, bar)
    return session_id, session


async def _follow(
    consumer: Consumer, session_id: str, roles: Sequence[asyncio.Task[None]], progress: Progress, bar: Any
) -> Session:
    """Fold the session's events as they come and print each round as it ends."""
    ledger, session = Ledger(), None
    while session is None or not session.is_terminal:
        _check(roles)
        for records in (await consumer.getmany(timeout_ms=200)).values():
            for record in records:
                event = decode(record.value or b"")
                if isinstance(event, DecodeError) or getattr(event, "session_id", None) != session_id:
                    continue
                outcome = ledger.apply(event)
                session = session or ledger.sessions.get(session_id)
                if session is None:
                    continue
                line = _progress_line(session, event, outcome)
                if line:
                    progress.console.print(line)
                if (
                    outcome.changed_state
                    and outcome.round_id
                    and session.rounds[outcome.round_id].is_terminal
                ):
                    progress.advance(bar)
    return session


def _progress_line(session: Session, event: object, outcome: Outcome) -> str | None:
    if isinstance(event, SessionFinished) and outcome.applied:
        verdict = "[green]succeeded" if event.succeeded else f"[red]failed: {event.reason}"
        return f"session {verdict}[/], final model {event.final_model_id}"
    if isinstance(event, UpdateReceived) and outcome.refusal is not None:
        if outcome.refusal.reason == Reason.LATE:
            round_no = session.rounds[event.round_id].round_no
            return f"  [yellow]{event.client_id} is late for round {round_no}: its update is rejected[/]"
        return None
    if not (outcome.changed_state and outcome.round_id):
        return None
    round_ = session.rounds[outcome.round_id]
    if not round_.is_terminal:
        return None
    head = f"round {round_.round_no} {round_.task:<10}"
    took = _seconds(round_.changed_at[RoundState.REQUESTED], round_.changed_at[round_.state])
    if round_.state == RoundState.FAILED:
        return f"{head} [red]failed: {round_.fail_reason}[/] after {took:.1f}s"
    if round_.task == Task.TRAINING:
        return (
            f"{head} {len(round_.usable_updates)}/{len(round_.assigned)} updates folded, "
            f"aggregated in {took:.1f}s"
        )
    metrics = _weighted(round_)
    return (
        f"{head} [bold]accuracy {metrics.get('accuracy', float('nan')):.4f}[/]  "
        f"loss {metrics.get('loss', float('nan')):.3f}  ({len(round_.results)} clients) in {took:.1f}s"
    )


def _weighted(round_: Round) -> dict[str, float]:
    """The example-weighted mean of each metric over a validation round's results."""
    results = [r for r in round_.results.values() if isinstance(r, ValidationReceived)]
    total = sum(r.num_examples for r in results)
    names = {name for r in results for name in r.metrics}
    return {name: sum(r.metrics.get(name, 0.0) * r.num_examples for r in results) / total for name in names}


def _seconds(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


async def _wait_projected(
    settings: Settings,
    topics: Topics,
    consumer: Consumer,
    engine: sa.Engine,
    roles: Sequence[asyncio.Task[None]],
) -> None:
    """Wait until the projector has written everything the log holds now, so SQL tells the whole story."""
    tps = await consumer.topic_partitions(topics.events, topics.clients)
    ends = await consumer.end_offsets(tps)
    query = sa.text("SELECT topic, partition, next_offset FROM projector_offsets WHERE consumer = :consumer")
    async with asyncio.timeout(60):
        while True:
            _check(roles)
            rows = await asyncio.to_thread(_rows, engine, query, consumer=projector.consumer_name(settings))
            done = {(row.topic, row.partition): row.next_offset for row in rows}
            if all(done.get((tp.topic, tp.partition), 0) >= end for tp, end in ends.items()):
                return
            await asyncio.sleep(0.2)


def _rows(engine: sa.Engine, query: sa.TextClause, **params: Any) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(query, params))


_ROUNDS_SQL = sa.text(
    """
    SELECT t.round_no, t.task, t.state, t.n_assigned, t.n_accepted, t.n_rejected, t.total_s,
           sum((v.metrics->>'accuracy')::float8 * v.num_examples) / NULLIF(sum(v.num_examples), 0) AS accuracy
    FROM round_timeline t LEFT JOIN validations v USING (round_id)
    WHERE t.session_id = :session_id
    GROUP BY t.round_id, t.round_no, t.task, t.state, t.n_assigned, t.n_accepted, t.n_rejected, t.total_s
    ORDER BY t.round_no, t.task <> 'training'
    """
)
_REJECTIONS_SQL = sa.text(
    """
    SELECT reject_reason, count(*) AS n, string_agg(DISTINCT client_id, ', ') AS clients
    FROM round_updates WHERE session_id = :session_id AND status = 'rejected'
    GROUP BY reject_reason ORDER BY reject_reason
    """
)


def _summary(engine: sa.Engine, session_id: str, console: Console) -> list[float]:
    """The session as PostgreSQL has it; returns the validation accuracies in round order."""
    table = Table(title="the session in PostgreSQL (round_timeline, validations)", box=box.SIMPLE_HEAD)
    for column in ("round", "task", "state", "assigned", "accepted", "rejected", "seconds", "accuracy"):
        table.add_column(column, justify="left" if column in ("task", "state") else "right")
    accuracies: list[float] = []
    for row in _rows(engine, _ROUNDS_SQL, session_id=session_id):
        if row.accuracy is not None:
            accuracies.append(row.accuracy)
        table.add_row(
            str(row.round_no),
            row.task,
            row.state,
            str(row.n_assigned),
            str(row.n_accepted),
            str(row.n_rejected),
            f"{row.total_s:.2f}" if row.total_s is not None else "",
            f"{row.accuracy:.4f}" if row.accuracy is not None else "",
        )
    console.print(table)
    for row in _rows(engine, _REJECTIONS_SQL, session_id=session_id):
        console.print(f"rejected updates: {row.n} {row.reject_reason} ({row.clients})")
    return accuracies


async def _audit(settings: Settings, console: Console) -> bool:
    """``roundlog replay --verify-models``: the projections and every model, rebuilt from the log."""
    report = await replay(settings, "replay")
    console.print(report.render())
    audit = await verify_models(settings)
    verdict = "[green]all match[/]" if audit.ok else f"[red]{len(audit.mismatches)} mismatches[/]"
    partials = f" and {audit.partials_checked} shard partials" if audit.partials_checked else ""
    console.print(
        f"verified {audit.rounds_checked} aggregated models{partials} by re-folding the log: {verdict}"
    )
    for mismatch in audit.mismatches:
        console.print(f"  round {mismatch.round_id}: {mismatch.detail}")
    if audit.signatures_verified is not None:
        console.print(
            f"verified {audit.signatures_verified} signatures again; {audit.signatures_refused} records "
            "were unsigned or badly signed and refused"
        )
    return report.identical and audit.ok
