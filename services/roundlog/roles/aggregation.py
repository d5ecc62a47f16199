"""Folding a round's streamed updates into its next model, driven by the event log.

``LogAggregation`` applies events to a partition's ledger and, for each training round,
folds every accepted update's tensors as it streams in; when the machine closes the
round it finalizes and hands the outcome to a ``Sink``. The aggregator role's sink
writes the model and emits events; the audit's sink only compares hashes. Both run
this same code, which is why a replayed model is bit-identical to the live one.

A sharded round (``config.shards`` K > 1) is folded in K units, one per shard: a unit
folds its shard's updates and, at close, hands its partial weighted sum to the sink
(``ShardAggregated``). Once every partial is in the log, the reduce reads them, adds them
in shard order and finalizes. Which units an instance folds is its choice: the aggregator
role reduces and folds unsharded rounds, the shard workers fold the shards they hold, the
audit folds everything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from roundlog.aggregation import (
    AggregateResult,
    Aggregator,
    AggregatorConfigError,
    DeltaNorm,
    NonFiniteAggregate,
    NothingToAggregate,
    Partial,
    Shardable,
    clip_scale,
    make_aggregator,
    make_shardable,
    max_norm,
)
from roundlog.aggregation.base import BaseModel, check_piece
from roundlog.arrays import ArrayPiece, NamedArrays, Reassembler, StreamError, specs_of
from roundlog.domain.events import (
    ArraySpec,
    Event,
    ShardAggregated,
    Task,
    TensorRef,
    UpdateReceived,
    shard_of,
)
from roundlog.domain.round import Round, RoundState
from roundlog.domain.session import Outcome, Session
from roundlog.observability import FOLD_BYTES
from roundlog.roles.stream import Entry, PartitionFold
from roundlog.tensors import TensorReader, check_layout

#: The unit that reduces a sharded round's partials (shards are 0 .. K-1; an unsharded round's one
#: unit is shard 0, whose shard_of is 0 for every update).
REDUCE = -1
#: (session id, round id, shard): round ids come from outside and need not be unique
UnitKey = tuple[str, str, int]
#: Whether this instance folds shard ``shard`` of a round of ``shards`` shards (> 1).
ShardFilter = Callable[[int, int], bool]


def every_shard(shard: int, shards: int) -> bool:
    return True


def no_shard(shard: int, shards: int) -> bool:
    return False


def _key(round_: Round, shard: int) -> UnitKey:
    return (round_.session_id, round_.round_id, shard)


def _fresh_aggregator(
    round_: Round, kwargs: dict[str, object], base: NamedArrays, state: NamedArrays | None
) -> Aggregator:
    name = round_.config.aggregator
    if round_.shards > 1:
        return make_shardable(name, kwargs, base, state)
    return make_aggregator(name, kwargs, base, state)


@dataclass
class RoundAggregation:
    """One unit of a training round's fold in progress: the whole round, one shard, or the reduce."""

    session: Session
    round: Round
    shard: int
    base: NamedArrays
    base_specs: tuple[ArraySpec, ...]
    kwargs: dict[str, object]
    state: NamedArrays | None
    aggregator: Aggregator
    folded: list[UpdateReceived] = field(default_factory=list)
    load_seconds: float = 0.0
    fold_seconds: float = 0.0

    @property
    def round_id(self) -> str:
        return self.round.round_id

    @property
    def sharded(self) -> bool:
        return self.round.shards > 1

    def fresh_aggregator(self) -> Aggregator:
        return _fresh_aggregator(self.round, self.kwargs, self.base, self.state)

    @property
    def shardable(self) -> Shardable:
        assert isinstance(self.aggregator, Shardable), "a sharded round's units fold weighted sums"
        return self.aggregator


@dataclass(frozen=True)
class Unusable:
    """An accepted update whose tensors cannot be folded."""

    update: UpdateReceived
    error: StreamError


@dataclass(frozen=True)
class Closed:
    """A closed round's result: the aggregate, or why there is none (a RoundFailed reason)."""

    aggregation: RoundAggregation | None
    result: AggregateResult | None
    fail_reason: str = ""
    detail: str = ""


class Sink(Protocol):
    async def unusable(self, session: Session, round_: Round, rejection: Unusable) -> None: ...

    async def closed(self, session: Session, round_: Round, outcome: Closed) -> None: ...

    async def partial(self, aggregation: RoundAggregation, partial: Partial) -> None:
        """A shard of a sharded round is folded: ``aggregation.folded`` went into ``partial``."""


class LogAggregation:
    """The tensor side of the fold: open rounds of the partitions this process holds.

    ``shards`` says which shards of sharded rounds this instance folds; ``reduces``, whether it
    folds unsharded rounds and reduces sharded ones (the aggregator role's part).
    """

    def __init__(
        self, reader: TensorReader, sink: Sink, shards: ShardFilter = no_shard, reduces: bool = True
    ) -> None:
        self._reader = reader
        self._sink = sink
        self._shards = shards
        self._reduces = reduces
        self._open: dict[UnitKey, RoundAggregation] = {}
        self._broken: dict[UnitKey, Closed] = {}
        self._partition_of: dict[UnitKey, int] = {}
        #: each round's base model and optimizer state, loaded once for all its units here
        self._bases: dict[tuple[str, str], tuple[NamedArrays, NamedArrays | None]] = {}

    async def apply(self, fold: PartitionFold, entry: Entry, event: Event) -> Outcome:
        """Fold one event; an accepted update is folded now, a closed round finalized now."""
        outcome = fold.apply(entry.offset, event, entry.logged_at, entry.seal)
        if not outcome.applied or outcome.round_id is None:
            return outcome
        session = fold.ledger.sessions.get(getattr(event, "session_id", ""))
        round_ = session.rounds.get(outcome.round_id) if session else None
        if session is None or round_ is None or round_.task != Task.TRAINING:
            return outcome
        if isinstance(event, UpdateReceived):
            shard = shard_of(event, round_.shards)
            if self._folds(round_, shard):
                await self._fold(fold.partition, session, round_, shard, event)
        if outcome.after == RoundState.CLOSED and outcome.before != RoundState.CLOSED:
            await self._close(fold.partition, session, round_)
        if isinstance(event, ShardAggregated) and self._reduces and round_.reducible:
            await self._reduce(fold.partition, session, round_)
        if round_.is_terminal:
            self._forget_round(round_)
        return outcome

    async def resume(self, fold: PartitionFold) -> None:
        """After a silent re-fold: fold the open rounds' accepted updates again, and close the closed ones.

        Units still open (shards this instance kept through a rebalance) are complete already, and
        shards whose partial is in the log are done: neither is folded again.
        """
        already = set(self._open)
        for session in fold.ledger.sessions.values():
            for round_ in session.rounds_in_order():
                if round_.task != Task.TRAINING or round_.state not in (
                    RoundState.COLLECTING,
                    RoundState.CLOSED,
                ):
                    continue
                for update in round_.accepted.values():
                    shard = shard_of(update, round_.shards)
                    if self._refolds(round_, shard, already):
                        await self._fold(fold.partition, session, round_, shard, update)
                if round_.state == RoundState.CLOSED:
                    await self._close(fold.partition, session, round_)
                    if round_.shards > 1 and self._reduces and round_.reducible:
                        await self._reduce(fold.partition, session, round_)

    def forget_partition(self, partition: int) -> None:
        for key in [k for k, p in self._partition_of.items() if p == partition]:
            self._forget(key)

    def forget_unheld(self) -> None:
        """Drop the units of shards this instance no longer folds (``resume`` then opens the new ones)."""
        for key in list(self._partition_of):
            unit = self._open.get(key)
            if unit is None or (unit.sharded and not self._shards(unit.shard, unit.round.shards)):
                self._forget(key)

    def _refolds(self, round_: Round, shard: int, already: set[UnitKey]) -> bool:
        """Whether ``resume`` folds this unit's updates: one of ours, not done, not kept open."""
        return (
            self._folds(round_, shard) and shard not in round_.partials and _key(round_, shard) not in already
        )

    def _folds(self, round_: Round, shard: int) -> bool:
        if round_.shards == 1:
            return self._reduces
        return self._shards(shard, round_.shards)

    def _forget_round(self, round_: Round) -> None:
        for key in [k for k in self._partition_of if k[:2] == (round_.session_id, round_.round_id)]:
            self._forget(key)

    def _forget(self, key: UnitKey) -> None:
        self._open.pop(key, None)
        self._broken.pop(key, None)
        self._partition_of.pop(key, None)
        if not any(k[:2] == key[:2] for k in self._partition_of):
            self._bases.pop(key[:2], None)

    async def _aggregation(
        self, partition: int, session: Session, round_: Round, shard: int
    ) -> RoundAggregation | None:
        """The unit's fold, opened on first use: loads the base model and the optimizer state."""
        key = _key(round_, shard)
        if key in self._open:
            return self._open[key]
        if key in self._broken:
            return None
        self._partition_of[key] = partition
        started = time.perf_counter()
        base_ref = session.models.get(round_.base_model_id)
        if base_ref is None:
            self._broken[key] = Closed(None, None, "model_missing", f"{round_.base_model_id} unknown")
            return None
        try:
            base, state = await self._base(session, round_, base_ref)
            kwargs = json.loads(round_.config.aggregator_kwargs)
            aggregator = _fresh_aggregator(round_, kwargs, base, state)
        except StreamError as error:
            self._broken[key] = Closed(None, None, "model_missing", str(error))
            return None
        except AggregatorConfigError as error:
            self._broken[key] = Closed(None, None, "aggregation_failed", str(error))
            return None
        aggregation = RoundAggregation(
            session,
            round_,
            shard,
            base,
            specs_of(base),
            kwargs,
            state,
            aggregator,
            load_seconds=time.perf_counter() - started,
        )
        self._open[key] = aggregation
        return aggregation

    async def _base(
        self, session: Session, round_: Round, base_ref: TensorRef
    ) -> tuple[NamedArrays, NamedArrays | None]:
        """The round's base model and optimizer state: read once however many of its units run here
        (aggregators only read them)."""
        key = (round_.session_id, round_.round_id)
        if key not in self._bases:
            base = await self._reader.arrays(base_ref)
            state_ref = session.optimizer_state
            state = await self._reader.arrays(state_ref) if state_ref is not None else None
            self._bases[key] = (base, state)
        return self._bases[key]

    async def _fold(
        self, partition: int, session: Session, round_: Round, shard: int, update: UpdateReceived
    ) -> None:
        aggregation = await self._aggregation(partition, session, round_, shard)
        if aggregation is None or update.update_id in round_.unusable:
            return
        started = time.perf_counter()
        try:
            check_layout(update.tensor, aggregation.base_specs)
        except StreamError as error:
            await self._sink.unusable(session, round_, Unusable(update, error))
            return
        try:
            await self._fold_into(aggregation, update)
        except StreamError as error:
            await self._sink.unusable(session, round_, Unusable(update, error))
            await self._refold(aggregation, aggregation.folded)
        else:
            aggregation.folded.append(update)
        aggregation.fold_seconds += time.perf_counter() - started

    async def _fold_into(self, aggregation: RoundAggregation, update: UpdateReceived) -> None:
        """Stream one update into the aggregator; a flaw in its bytes raises StreamError before commit."""
        scale = 1.0
        bound = max_norm(aggregation.kwargs)
        if bound is not None:
            norm = DeltaNorm(aggregation.base)
            await self._stream(update.tensor, norm.add)
            scale = clip_scale(norm.value, bound)
        aggregation.aggregator.begin(float(update.num_examples), scale)
        await self._stream(update.tensor, aggregation.aggregator.add)
        aggregation.aggregator.commit()

    async def _stream(self, ref: TensorRef, take: Callable[[ArrayPiece], None]) -> None:
        reassembler = Reassembler(ref.arrays)
        async for chunk in self._reader.chunks(ref):
            FOLD_BYTES.inc(len(chunk))
            for piece in reassembler.feed(chunk):
                take(piece)
        reassembler.finish(ref.sha256)

    async def _close(self, partition: int, session: Session, round_: Round) -> None:
        """The machine closed the round: finalize it (unsharded), or each shard this instance folds."""
        if round_.shards == 1:
            if self._reduces:
                await self._finalize(partition, session, round_)
            return
        for shard in range(round_.shards):
            if self._shards(shard, round_.shards) and shard not in round_.partials:
                await self._finish_shard(partition, session, round_, shard)

    async def _finalize(self, partition: int, session: Session, round_: Round) -> None:
        aggregation = await self._aggregation(partition, session, round_, 0)
        if aggregation is None:
            await self._sink.closed(session, round_, self._broken[_key(round_, 0)])
            return
        started = time.perf_counter()
        await self._leave_out_overweight(session, round_, aggregation)
        try:
            try:
                result = aggregation.aggregator.finalize()
            except NonFiniteAggregate:
                await self._drop_non_finite(session, round_, aggregation)
                result = aggregation.aggregator.finalize()
        except NothingToAggregate as error:
            await self._sink.closed(session, round_, Closed(aggregation, None, "no_valid_update", str(error)))
            return
        except NonFiniteAggregate as error:  # finite updates whose weighted sum overflows float64
            await self._sink.closed(
                session, round_, Closed(aggregation, None, "non_finite_aggregate", str(error))
            )
            return
        aggregation.fold_seconds += time.perf_counter() - started
        await self._sink.closed(session, round_, Closed(aggregation, result))

    async def _finish_shard(self, partition: int, session: Session, round_: Round, shard: int) -> None:
        """A shard's part of a closed round: its partial weighted sum (an empty shard's is zeros)."""
        aggregation = await self._aggregation(partition, session, round_, shard)
        if aggregation is None:
            await self._sink.closed(session, round_, self._broken[_key(round_, shard)])
            return
        await self._leave_out_overweight(session, round_, aggregation)
        try:
            partial = aggregation.shardable.partial()
        except NonFiniteAggregate:
            await self._drop_non_finite(session, round_, aggregation)
            partial = aggregation.shardable.partial()
        await self._sink.partial(aggregation, partial)
        self._forget(_key(round_, shard))  # its memory goes now, not when the round is aggregated

    async def _reduce(self, partition: int, session: Session, round_: Round) -> None:
        """Every shard has reported: add the partials in shard order and finalize, once."""
        aggregation = await self._aggregation(partition, session, round_, REDUCE)
        if aggregation is None:
            await self._sink.closed(session, round_, self._broken[_key(round_, REDUCE)])
            return
        started = time.perf_counter()
        layout, reduce = BaseModel.of(aggregation.base), aggregation.shardable
        try:
            for shard in range(round_.shards):  # each partial streams in: never one whole in memory
                logged = round_.partials[shard]
                Partial.check_specs(logged.partial.arrays, layout)
                await self._stream(logged.partial, reduce.absorb_piece)
                reduce.absorb_count(logged.total_weight, len(logged.update_ids))
                aggregation.folded += [round_.accepted[uid] for uid in logged.update_ids]
            result = aggregation.aggregator.finalize()
        except StreamError as error:
            await self._sink.closed(session, round_, Closed(aggregation, None, "partial_missing", str(error)))
            return
        except NothingToAggregate as error:
            await self._sink.closed(session, round_, Closed(aggregation, None, "no_valid_update", str(error)))
            return
        except NonFiniteAggregate as error:  # finite partials whose sum overflows float64
            await self._sink.closed(
                session, round_, Closed(aggregation, None, "non_finite_aggregate", str(error))
            )
            return
        aggregation.fold_seconds += time.perf_counter() - started
        await self._sink.closed(session, round_, Closed(aggregation, result))

    async def _leave_out_overweight(
        self, session: Session, round_: Round, aggregation: RoundAggregation
    ) -> None:
        """The weight-share policy, decided by the closed round's accepted weights alone."""
        heavy = {u.update_id for u in round_.overweight_updates()}
        if not heavy & {u.update_id for u in aggregation.folded}:
            return
        share = round_.config.max_weight_share
        for update in aggregation.folded:
            if update.update_id in heavy:
                error = StreamError(
                    "weight_share", f"{update.num_examples} examples are more than {share:g} of the round"
                )
                await self._sink.unusable(session, round_, Unusable(update, error))
        await self._refold(aggregation, [u for u in aggregation.folded if u.update_id not in heavy])

    async def _refold(self, aggregation: RoundAggregation, updates: list[UpdateReceived]) -> None:
        """The aggregator has no undo: start over from the updates that stay."""
        aggregation.folded = updates
        aggregation.aggregator = aggregation.fresh_aggregator()
        for update in updates:
            await self._fold_into(aggregation, update)

    async def _drop_non_finite(self, session: Session, round_: Round, aggregation: RoundAggregation) -> None:
        """The rare path of folds that check finiteness once per round: find the culprits, fold the rest."""
        base = BaseModel.of(aggregation.base)
        kept = []
        for update in aggregation.folded:
            try:
                await self._stream(update.tensor, lambda piece: check_piece(piece, base))
            except StreamError as error:
                await self._sink.unusable(session, round_, Unusable(update, error))
            else:
                kept.append(update)
        await self._refold(aggregation, kept)
