"""What the aggregator writes: each new model, or shard's partial, to the tensors topic, announced
by an event with a deterministic id (so an emission repeated after a crash is the same event)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from roundlog import observability as obs
from roundlog.aggregation import Partial
from roundlog.aggregation.base import BaseModel
from roundlog.arrays import sha256_of
from roundlog.bus import Producer, Topics
from roundlog.clock import utc_now
from roundlog.domain.events import (
    Event,
    RoundAggregated,
    RoundFailed,
    ShardAggregated,
    UpdateRejected,
    derived_id,
)
from roundlog.domain.round import Round
from roundlog.domain.session import Session
from roundlog.roles.aggregation import Closed, RoundAggregation, Unusable
from roundlog.tensors import write_tensors

log = logging.getLogger("roundlog.aggregator")


def model_id_of(round_id: str) -> str:
    return derived_id(round_id, "model")


class Emitter(Protocol):
    """What a sink writes through: a producer, the topics, and ``emit`` for events."""

    producer: Producer
    topics: Topics

    async def emit(self, events: Sequence[Event]) -> None: ...


class EmittingSink:
    """Writes each new model, or shard's partial, to the tensors topic and announces it as an event."""

    def __init__(self, role: Emitter) -> None:
        self._role = role

    async def partial(self, aggregation: RoundAggregation, partial: Partial) -> None:
        round_, shard = aggregation.round, aggregation.shard
        partial_id = derived_id(round_.round_id, "shard", str(shard))
        arrays = partial.arrays(BaseModel.of(aggregation.base))
        ref = await write_tensors(self._role.producer, self._role.topics.tensors, partial_id, arrays)
        event = ShardAggregated(
            event_id=partial_id,
            occurred_at=utc_now(),
            session_id=round_.session_id,
            round_id=round_.round_id,
            shard=shard,
            shards=round_.shards,
            update_ids=tuple(u.update_id for u in aggregation.folded),
            total_weight=partial.total_weight,
            partial=ref,
        )
        await self._role.emit([event])
        log.info(
            "shard %d of %d folded: %d updates, weight %g",
            shard,
            round_.shards,
            partial.updates,
            partial.total_weight,
            extra={"session_id": round_.session_id, "round_id": round_.round_id},
        )

    async def unusable(self, session: Session, round_: Round, rejection: Unusable) -> None:
        update = rejection.update
        ids = {"session_id": session.session_id, "round_id": round_.round_id}
        log.warning("update %s is unusable: %s", update.update_id, rejection.error, extra=ids)
        event = UpdateRejected(
            event_id=derived_id(round_.round_id, "unusable", update.update_id),
            occurred_at=utc_now(),
            session_id=session.session_id,
            round_id=round_.round_id,
            client_id=update.client_id,
            update_id=update.update_id,
            reason=rejection.error.reason,
            detail=rejection.error.detail,
        )
        obs.REJECTED.labels("aggregator", rejection.error.reason).inc()
        await self._role.emit([event])

    async def closed(self, session: Session, round_: Round, outcome: Closed) -> None:
        if outcome.result is None or outcome.aggregation is None:
            ids = {"session_id": session.session_id, "round_id": round_.round_id}
            log.warning("round failed: %s %s", outcome.fail_reason, outcome.detail, extra=ids)
            failed = RoundFailed(
                event_id=derived_id(round_.round_id, "failed"),
                occurred_at=utc_now(),
                session_id=session.session_id,
                round_id=round_.round_id,
                reason=outcome.fail_reason,
                detail=outcome.detail,
            )
            await self._role.emit([failed])
            return
        result, aggregation = outcome.result, outcome.aggregation
        model_id = model_id_of(round_.round_id)
        producer, topic = self._role.producer, self._role.topics.tensors
        tensor = await write_tensors(producer, topic, model_id, result.arrays)
        state = None
        if result.state is not None:
            state_key = derived_id(round_.round_id, "optimizer-state")
            state = await write_tensors(producer, topic, state_key, result.state)
        aggregated = RoundAggregated(
            event_id=derived_id(round_.round_id, "aggregated"),
            occurred_at=utc_now(),
            session_id=session.session_id,
            round_id=round_.round_id,
            model_id=model_id,
            parent_model_id=round_.base_model_id,
            tensor=tensor,
            optimizer_state=state,
            update_ids=tuple(u.update_id for u in aggregation.folded),
            total_weight=result.total_weight,
            time_model_load=aggregation.load_seconds,
            time_aggregation=aggregation.fold_seconds,
        )
        await self._role.emit([aggregated])
        log.info(
            "round aggregated: %d updates, weight %g, model %s sha256 %s",
            result.updates,
            result.total_weight,
            model_id,
            sha256_of(result.arrays)[:12],
            extra={"session_id": session.session_id, "round_id": round_.round_id},
        )
