"""The aggregator role: consume the events, fold accepted updates as they arrive, emit each new model.

Restart-safe by construction: the group's committed offset of a partition is its replay
point (the first event of its oldest open session), so after a crash or a rebalance the
role re-folds the log from there, folds the open rounds' updates again and emits what is
missing. Emitted events have deterministic ids, so an emission repeated after a crash is
the same event, and the fold ignores the second copy.
"""

from __future__ import annotations

import asyncio
import logging

from roundlog import observability as obs
from roundlog.arrays import sha256_of
from roundlog.clock import utc_now
from roundlog.config import Settings
from roundlog.domain.events import Event, RoundAggregated, RoundFailed, UpdateRejected, derived_id
from roundlog.domain.round import Round
from roundlog.domain.session import Outcome, Session
from roundlog.roles.aggregation import Closed, LogAggregation, Unusable
from roundlog.roles.base import FoldingRole
from roundlog.roles.stream import Entry, PartitionFold
from roundlog.tensors import TensorReader, write_tensors

log = logging.getLogger("roundlog.aggregator")


def model_id_of(round_id: str) -> str:
    return derived_id(round_id, "model")


class EmittingSink:
    """Writes each new model to the tensors topic and announces it on the events topic."""

    def __init__(self, role: FoldingRole) -> None:
        self._role = role

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


class AggregatorRole(FoldingRole):
    """One member of the aggregator group: consume -> fold updates -> emit models -> commit."""

    role = "aggregator"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.aggregation = LogAggregation(
            TensorReader(self.reader_consumer, self.topics.tensors), EmittingSink(self)
        )

    async def apply(self, fold: PartitionFold, entry: Entry, event: Event) -> Outcome:
        return await self.aggregation.apply(fold, entry, event)

    async def resume(self, fold: PartitionFold) -> None:
        await self.aggregation.resume(fold)

    def forget(self, partition: int) -> None:
        self.aggregation.forget_partition(partition)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    await AggregatorRole(settings).run(stop)
