"""A training round opened straight in the log, for benchmarks that time one role, not the coordinator."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from roundlog.clock import utc_now
from roundlog.domain.events import (
    ClientsAssigned,
    Event,
    ModelStaged,
    RoundConfig,
    RoundRequested,
    SessionStarted,
    Task,
    TensorRef,
    UpdateReceived,
    update_id_for,
)


def collecting_round(
    model_id: str, model: TensorRef, clients: tuple[str, ...]
) -> tuple[str, str, list[Event]]:
    """Session id, round id, and the events that leave a one-round session collecting from ``clients``."""
    sid, rid, now = str(uuid.uuid4()), str(uuid.uuid4()), utc_now()
    config = RoundConfig(buffer_size=-1, round_timeout=3600)
    ids = {"session_id": sid, "round_id": rid}
    return (
        sid,
        rid,
        [
            SessionStarted(
                event_id=str(uuid.uuid4()),
                occurred_at=now,
                session_id=sid,
                rounds=1,
                initial_model_id=model_id,
                initial_model=model,
                round_config=config,
            ),
            RoundRequested(
                event_id=str(uuid.uuid4()),
                occurred_at=now,
                round_no=1,
                task=Task.TRAINING,
                model_id=model_id,
                config=config,
                **ids,
            ),
            ModelStaged(
                event_id=str(uuid.uuid4()),
                occurred_at=now,
                model_id=model_id,
                sha256=model.sha256,
                nbytes=model.nbytes,
                **ids,
            ),
            ClientsAssigned(
                event_id=str(uuid.uuid4()),
                occurred_at=now,
                client_ids=clients,
                deadline=now + timedelta(hours=1),
                task=Task.TRAINING,
                model_id=model_id,
                model=model,
                config=config,
                **ids,
            ),
        ],
    )


def updates(sid: str, rid: str, clients: Sequence[str], tensors: Sequence[TensorRef]) -> list[UpdateReceived]:
    """Each client's update of the round, weighted 100 + i % 7, pointing at ``tensors[i]``."""
    now = utc_now()
    return [
        UpdateReceived(
            event_id=str(uuid.uuid4()),
            occurred_at=now,
            session_id=sid,
            round_id=rid,
            client_id=name,
            update_id=update_id_for(rid, name),
            num_examples=100 + i % 7,
            tensor=tensor,
        )
        for i, (name, tensor) in enumerate(zip(clients, tensors, strict=True))
    ]
