"""The walking skeleton: a scripted session through the real broker, folded back.

It stands in for the federated demo until the roles exist: the script plays the
coordinator and three clients, every event goes through Kafka, and the states it
prints come from folding the topic again, not from the script.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from roundlog.bus import Topics, create_topics, make_consumer, make_producer, publish
from roundlog.clock import utc_now
from roundlog.config import Settings
from roundlog.domain.events import (
    ClientsAssigned,
    Event,
    ModelStaged,
    RoundConfig,
    RoundRequested,
    RoundTimedOut,
    SessionStarted,
    Task,
    UpdateReceived,
    ValidationReceived,
    derived_id,
)
from roundlog.domain.session import Session
from roundlog.roles.stream import PartitionFold, refold
from roundlog.tensors import write_tensors

CLIENTS = ("alice", "bob", "carol")


def run(settings: Settings) -> int:
    return asyncio.run(_run(settings))


async def _run(settings: Settings) -> int:
    console = Console()
    topics = Topics.from_prefix(settings.topic_prefix)
    await create_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        session_id = str(uuid.uuid4())
        await _play_session(producer, topics, session_id)
    finally:
        await producer.stop()
    console.print(f"session {session_id}: events produced, folding them back from {topics.events}")
    session = await _fold_back(settings, topics, session_id)
    table = Table("round", "task", "state", "assigned", "accepted / results", "fail reason")
    for r in session.rounds_in_order():
        received = len(r.accepted) if r.task == Task.TRAINING else len(r.results)
        table.add_row(str(r.round_no), r.task, r.state, str(len(r.assigned)), str(received), r.fail_reason)
    console.print(table)
    return 0


async def _play_session(producer: AIOKafkaProducer, topics: Topics, session_id: str) -> None:
    """A training round that closes at buffer_size 2 and refuses a straggler, then a validation round."""
    model = [("weights", np.zeros((8, 4), np.float32)), ("bias", np.zeros(4, np.float32))]
    model_id = derived_id("demo-model", session_id)
    model_ref = await write_tensors(producer, topics.tensors, model_id, model)
    config = RoundConfig(round_timeout=30, buffer_size=2)
    ids: dict[str, Any] = {"session_id": session_id}
    events: list[Event] = [
        SessionStarted(
            **_stamp(),
            **ids,
            rounds=1,
            initial_model_id=model_id,
            initial_model=model_ref,
            round_config=config,
        )
    ]
    for task, round_id in ((Task.TRAINING, "train-1"), (Task.VALIDATION, "validate-1")):
        deadline = utc_now() + timedelta(seconds=config.round_timeout)
        on_round: dict[str, Any] = {**ids, "round_id": f"{session_id}/{round_id}"}
        events += [
            RoundRequested(**_stamp(), **on_round, round_no=1, task=task, model_id=model_id, config=config),
            ModelStaged(
                **_stamp(), **on_round, model_id=model_id, sha256=model_ref.sha256, nbytes=model_ref.nbytes
            ),
            ClientsAssigned(
                **_stamp(),
                **on_round,
                client_ids=CLIENTS,
                deadline=deadline,
                task=task,
                model_id=model_id,
                model=model_ref,
                config=config,
            ),
        ]
        for n, client in enumerate(CLIENTS):
            if task == Task.TRAINING:
                update_id = str(uuid.uuid4())
                update = [(name, array + np.float32(n)) for name, array in model]
                ref = await write_tensors(producer, topics.tensors, update_id, update)
                events.append(
                    UpdateReceived(
                        **_stamp(),
                        **on_round,
                        client_id=client,
                        update_id=update_id,
                        num_examples=100,
                        tensor=ref,
                    )
                )
            elif n < 2:
                events.append(
                    ValidationReceived(
                        **_stamp(),
                        **on_round,
                        client_id=client,
                        model_id=model_id,
                        num_examples=50,
                        metrics={},
                    )
                )
        events.append(RoundTimedOut(**_stamp(), **on_round, deadline=deadline))
    await publish(producer, topics, events)


def _stamp() -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "occurred_at": utc_now()}


async def _fold_back(settings: Settings, topics: Topics, session_id: str) -> Session:
    """Fold the session's partition from the broker: the printed states come from the log."""
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topics.events, p) for p in consumer.partitions_for_topic(topics.events) or ()
        ]
        fold = PartitionFold(-1)
        for tp, end in (await consumer.end_offsets(partitions)).items():
            fold = PartitionFold(tp.partition)
            await refold(consumer, topics.events, fold, 0, end)
            if session_id in fold.ledger.sessions:
                return fold.ledger.sessions[session_id]
    finally:
        await consumer.stop()
    raise RuntimeError(f"session {session_id} is not on {topics.events}")
