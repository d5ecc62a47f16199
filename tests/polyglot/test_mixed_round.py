"""One session served by Python, Java and TypeScript clients at once, in a signed deployment.

The session is started with the CLI; two training rounds and a validation round after each run
over four clients in three languages, each signing with its own registered key. Every client
trains the same deterministic way (the model plus its own offset, weighted by its own example
count), so the test computes each aggregate itself, as the example-weighted mean of the published
FedAvg formula, and compares it with the model the aggregator wrote. The audit then re-folds every
model and re-verifies every signature.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from roundlog.bus import Topics, make_consumer
from roundlog.client import FederatedClient, SignedDeployment, provision_keys
from roundlog.config import Settings
from roundlog.domain.events import (
    RoundAggregated,
    RoundConfig,
    SessionFinished,
    UpdateReceived,
    ValidationReceived,
)
from roundlog.projections.schema import upgrade
from roundlog.tensors import read_tensors

from tests.integration.harness import caught_up, fold_log, role_process, stop_process, wait_until_finished
from tests.polyglot.conftest import JAVA_JAR, TS_TRAINER

#: client id → (language, offset it adds to every float, examples it claims). The offsets are
#: exact in float32, so every language's float32 sum is the same correctly rounded number.
CLIENTS: Mapping[str, tuple[str, float, int]] = {
    "py-0": ("python", 0.25, 100),
    "py-1": ("python", -0.5, 40),
    "java-0": ("java", 0.75, 120),
    "ts-0": ("typescript", 1.5, 80),
}
ROUNDS = 2


def initial_model() -> list[tuple[str, np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(7)
    return [
        ("dense/kernel", rng.standard_normal((32, 16)).astype(np.float32)),
        ("dense/bias", np.linspace(-1, 1, 16, dtype=np.float64)),
        ("step", np.array([3, 1, 4], dtype=np.int64)),
    ]


def trained(arrays: Sequence[tuple[str, np.ndarray[Any, Any]]], offset: float) -> list[tuple[str, Any]]:
    """The rule every client follows: floats move by ``offset`` in their own precision."""
    return [(name, a + a.dtype.type(offset) if a.dtype.kind == "f" else a.copy()) for name, a in arrays]


def fedavg(base: Sequence[tuple[str, np.ndarray[Any, Any]]], order: Sequence[str]) -> list[tuple[str, Any]]:
    """McMahan et al.'s weighted mean, sum(n_k * x_k) / sum(n_k), in float64, summed in ``order`` (the
    clients' updates in log order, as the aggregator adds them), so it is exact to the bit; floats
    rounded back to their dtype, integer arrays (all clients leave them be) unchanged."""
    total = sum(CLIENTS[c][2] for c in order)
    out = []
    for index, (name, array) in enumerate(base):
        acc = np.zeros(array.shape, dtype=np.float64)
        for client in order:
            _, offset, examples = CLIENTS[client]
            acc = acc + float(examples) * trained(base, offset)[index][1].astype(np.float64)
        out.append((name, (acc / total).astype(array.dtype) if array.dtype.kind == "f" else array))
    return out


def float_mean(arrays: Sequence[tuple[str, np.ndarray[Any, Any]]]) -> float:
    """The validators' metric: the mean of every float element of the model."""
    return float(
        np.concatenate([a.reshape(-1) for _, a in arrays if a.dtype.kind == "f"]).mean(dtype=np.float64)
    )


def python_client(settings: Settings, client_id: str) -> FederatedClient:
    _, offset, examples = CLIENTS[client_id]

    def train(arrays: Sequence[tuple[str, np.ndarray[Any, Any]]], config: RoundConfig) -> Any:
        return trained(arrays, offset), examples, {"loss": 1 / (1 + abs(offset)), "offset": offset}

    def validate(arrays: Sequence[tuple[str, np.ndarray[Any, Any]]], config: RoundConfig) -> Any:
        return examples, {"mean": float_mean(arrays), "accuracy": 0.5}

    return FederatedClient(settings, client_id, train=train, validate=validate, heartbeat_every=1.0)


def other_language_client(settings: Settings, client_id: str, log: Path) -> subprocess.Popen[bytes]:
    language, offset, examples = CLIENTS[client_id]
    args = ["--client-id", client_id, "--offset", str(offset), "--num-examples", str(examples)]
    command = ["java", "-jar", str(JAVA_JAR)] if language == "java" else ["node", str(TS_TRAINER)]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*command, *args], env={**os.environ, **settings.env()}, stderr=out, stdout=out
        )


def cli(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "roundlog", *args],
        env={**os.environ, **settings.env()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"roundlog {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture
def signed_topics(topics: tuple[Settings, Topics], database_url: str) -> Iterator[tuple[Settings, Topics]]:
    upgrade(database_url)
    yield dataclasses.replace(topics[0], database_url=database_url), topics[1]


async def test_python_java_and_typescript_clients_serve_one_session(
    signed_topics: tuple[Settings, Topics], tmp_path: Path, java_client: None, ts_client: None
) -> None:
    settings, names = signed_topics
    signed: SignedDeployment = await provision_keys(settings, tmp_path, list(CLIENTS))
    roles = [role_process(signed.roles, role) for role in ("coordinator", "aggregator", "projector")]
    logs = {c: tmp_path / f"{c}.log" for c in CLIENTS}
    others = [
        other_language_client(signed.clients[c], c, logs[c])
        for c, (lang, _, _) in CLIENTS.items()
        if lang != "python"
    ]
    stop = asyncio.Event()
    pythons = [python_client(signed.clients[c], c) for c, (lang, _, _) in CLIENTS.items() if lang == "python"]
    running = [asyncio.create_task(c.run(stop)) for c in pythons]
    try:
        np.savez(tmp_path / "initial.npz", **dict(initial_model()))
        model_id = cli(signed.operator, "model", "import", str(tmp_path / "initial.npz")).split()[-1]
        await caught_up(settings, names)  # the CLI finds the model in the projections
        session_id = cli(
            signed.operator,
            "session", "start", "--model", model_id, "--rounds", str(ROUNDS), "--validate-each-round",
            "--clients-required", str(len(CLIENTS)), "--buffer-size", "-1", "--round-timeout", "90",
        ).strip()  # fmt: skip
        await wait_until_finished(settings, names, {session_id}, timeout=300)
        await caught_up(settings, names)
    finally:
        stop.set()
        await asyncio.gather(*running)
        for process in [*others, *roles]:
            stop_process(process)
    client_logs = {c: log.read_text(errors="replace")[-3000:] for c, log in logs.items() if log.exists()}

    folded = await fold_log(signed.roles, names)
    refused = [(type(e).__name__, getattr(e, "client_id", ""), o.refusal) for e, o in folded if o.refusal]
    assert not refused, (refused, client_logs)
    applied = [e for e, o in folded if o.applied]
    (finished,) = [e for e in applied if isinstance(e, SessionFinished)]
    assert finished.succeeded, (finished.reason, client_logs)

    updates = [e for e in applied if isinstance(e, UpdateReceived)]
    assert sorted(e.client_id for e in updates) == sorted(list(CLIENTS) * ROUNDS)
    client_of = {e.update_id: e.client_id for e in updates}
    aggregates = [e for e in applied if isinstance(e, RoundAggregated)]
    assert len(aggregates) == ROUNDS

    consumer = make_consumer(settings)
    await consumer.start()
    try:
        base = initial_model()
        for aggregate in aggregates:
            model = await read_tensors(consumer, names.tensors, aggregate.tensor)
            order = [client_of[update_id] for update_id in aggregate.update_ids]
            for (name, got), (_, want) in zip(model, fedavg(base, order), strict=True):
                assert got.dtype == want.dtype and got.shape == want.shape, name
                np.testing.assert_array_equal(got, want, err_msg=name)
            base = model
            validations = [
                e for e in applied if isinstance(e, ValidationReceived) and e.model_id == aggregate.model_id
            ]
            assert sorted(e.client_id for e in validations) == sorted(CLIENTS)
            for validation in validations:
                assert validation.num_examples == CLIENTS[validation.client_id][2]
                assert validation.metrics["mean"] == pytest.approx(float_mean(model), rel=1e-9)
    finally:
        await consumer.stop()

    # exit 0 only when the rebuilt tables equal the live ones and every model re-folds to its sha256
    audit = cli(signed.roles, "replay", "--verify-models", "--schema", "mixed_replay")
    assert f"verified {ROUNDS} aggregated models: 0 mismatches" in audit, audit
    assert "0 records unsigned or badly signed" in audit, audit
