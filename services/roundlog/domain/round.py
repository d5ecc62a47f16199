"""The round machine: one round folded from its ordered events.

Every decision the design gives the fold lives in ``ROUND_RULES``: whether an
update is accepted, when the round closes, when a timeout fails it. Nothing here
reads a clock; the deadline is an event like any other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from roundlog.domain.events import (
    ANSWER_TASKS,
    Answer,
    ClientsAssigned,
    ModelStaged,
    PredictionReceived,
    RoundAggregated,
    RoundConfig,
    RoundFailed,
    RoundRequested,
    RoundTimedOut,
    ShardAggregated,
    Task,
    UpdateReceived,
    UpdateRejected,
    ValidationReceived,
    shard_of,
    update_id_for,
)
from roundlog.domain.rules import (
    Branch,
    Condition,
    Effect,
    Guard,
    Reason,
    Refusal,
    Rule,
    index,
)


class RoundState(enum.StrEnum):
    REQUESTED = "requested"
    STAGED = "staged"
    COLLECTING = "collecting"
    CLOSED = "closed"
    AGGREGATED = "aggregated"
    FAILED = "failed"
    COMPLETED = "completed"


TERMINAL = frozenset({RoundState.AGGREGATED, RoundState.FAILED, RoundState.COMPLETED})

Result = ValidationReceived | PredictionReceived


@dataclass
class Round:
    """What the log says about one round so far."""

    round_id: str
    session_id: str
    round_no: int
    task: Task
    base_model_id: str
    config: RoundConfig
    state: RoundState = RoundState.REQUESTED
    assigned: frozenset[str] = frozenset()
    deadline: datetime | None = None
    #: accepted training updates by update id, in log order: the aggregation order
    accepted: dict[str, UpdateReceived] = field(default_factory=dict)
    #: accepted updates whose tensors the aggregator refused, with the reason
    unusable: dict[str, str] = field(default_factory=dict)
    #: validation or prediction results by client, in log order
    results: dict[str, Result] = field(default_factory=dict)
    #: clients with an accepted update or a recorded result: a second answer is a duplicate
    reporters: set[str] = field(default_factory=set)
    timed_out: bool = False
    aggregated: RoundAggregated | None = None
    fail_reason: str = ""
    changed_at: dict[RoundState, datetime] = field(default_factory=dict)
    #: sha256 of the staged base model: what assignments hand out and results must be computed on
    model_sha256: str = ""
    #: the event that ended the collection (the update that filled the buffer, a timeout, ...)
    closed_by: str = ""
    #: a sharded round's partials by shard, as they arrive (see ``ShardAggregated``)
    partials: dict[int, ShardAggregated] = field(default_factory=dict)

    @classmethod
    def requested(cls, event: RoundRequested) -> Round:
        return cls(
            round_id=event.round_id,
            session_id=event.session_id,
            round_no=event.round_no,
            task=event.task,
            base_model_id=event.model_id,
            config=event.config,
            changed_at={RoundState.REQUESTED: event.occurred_at},
        )

    @property
    def buffer_target(self) -> int:
        """Accepted updates that close the round: buffer_size, capped at the assigned clients."""
        n_assigned = len(self.assigned)
        if self.config.buffer_size < 0:
            return n_assigned
        return min(self.config.buffer_size, n_assigned)

    @property
    def usable_updates(self) -> list[UpdateReceived]:
        return [u for uid, u in self.accepted.items() if uid not in self.unusable]

    @property
    def shards(self) -> int:
        return self.config.shards

    def shard_updates(self, shard: int) -> list[UpdateReceived]:
        """The usable accepted updates shard ``shard`` folds, in log order."""
        return [u for u in self.usable_updates if shard_of(u, self.shards) == shard]

    @property
    def reducible(self) -> bool:
        """Every shard's partial is in: the reduce may run."""
        return len(self.partials) == self.shards

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL

    def overweight_updates(self) -> list[UpdateReceived]:
        """Usable updates holding more than ``max_weight_share`` of the usable total: left out at close."""
        usable = self.usable_updates
        cap = self.config.max_weight_share * sum(u.num_examples for u in usable)
        return [u for u in usable if u.num_examples > cap]


# --- guards -------------------------------------------------------------------------------------


def _model_matches(r: Round, e: ModelStaged) -> Refusal | None:
    if e.model_id != r.base_model_id:
        return Refusal(Reason.WRONG_MODEL, f"staged {e.model_id}, round is on {r.base_model_id}")
    return None


def _hands_out_staged_model(r: Round, e: ClientsAssigned) -> Refusal | None:
    if e.model_id != r.base_model_id or e.model.sha256 != r.model_sha256:
        return Refusal(
            Reason.WRONG_MODEL,
            f"assigns {e.model_id} (sha256 {e.model.sha256[:12]}), round staged {r.base_model_id} "
            f"(sha256 {r.model_sha256[:12]})",
        )
    return None


def _trained_on_round_model(r: Round, e: UpdateReceived) -> Refusal | None:
    if e.base_model_sha256 and e.base_model_sha256 != r.model_sha256:
        return Refusal(
            Reason.WRONG_MODEL,
            f"trained from model sha256 {e.base_model_sha256[:12]}, round staged {r.model_sha256[:12]}",
        )
    return None


def _enough_clients(r: Round, e: ClientsAssigned) -> Refusal | None:
    needed = max(1, r.config.clients_required)
    if len(set(e.client_ids)) < needed:
        return Refusal(
            Reason.TOO_FEW_CLIENTS,
            f"{len(set(e.client_ids))} assigned, {needed} required",
        )
    return None


def _task_is(task: Task) -> Guard:
    def guard(r: Round, e: object) -> Refusal | None:
        if r.task != task:
            return Refusal(Reason.WRONG_TASK, f"{type(e).__name__} in a {r.task} round")
        return None

    return guard


def _assigned(r: Round, e: UpdateReceived | Result) -> Refusal | None:
    if e.client_id not in r.assigned:
        return Refusal(Reason.NOT_ASSIGNED, f"client {e.client_id} was not assigned to this round")
    return None


def _own_update_id(r: Round, e: UpdateReceived) -> Refusal | None:
    """Update ids derive from round and client, so no client can take another's id first."""
    expected = update_id_for(r.round_id, e.client_id)
    if e.update_id != expected:
        return Refusal(
            Reason.FOREIGN_UPDATE_ID,
            f"update {e.update_id} from {e.client_id}: its id in this round is {expected}",
        )
    return None


def _weight_allowed(r: Round, e: UpdateReceived) -> Refusal | None:
    if e.num_examples > r.config.max_num_examples:
        return Refusal(
            Reason.WEIGHT_LIMIT,
            f"num_examples {e.num_examples} above the session's max_num_examples {r.config.max_num_examples}",
        )
    return None


def _first_from_client(r: Round, e: UpdateReceived | Result) -> Refusal | None:
    if e.client_id in r.reporters:
        return Refusal(Reason.DUPLICATE, f"client {e.client_id} already reported in this round")
    return None


def _on_round_model(r: Round, e: Result) -> Refusal | None:
    if e.model_id != r.base_model_id or (e.model_sha256 and e.model_sha256 != r.model_sha256):
        return Refusal(
            Reason.WRONG_MODEL,
            f"result for {e.model_id} (sha256 {e.model_sha256[:12] or 'not stated'}), round is on "
            f"{r.base_model_id} (sha256 {r.model_sha256[:12]})",
        )
    return None


def _folds_accepted_updates(r: Round, e: RoundAggregated) -> Refusal | None:
    usable = {u.update_id for u in r.usable_updates}
    foreign = [uid for uid in e.update_ids if uid not in usable]
    if foreign:
        return Refusal(
            Reason.UNKNOWN_UPDATE,
            f"aggregate folds updates the round did not accept: {foreign}",
        )
    if e.parent_model_id != r.base_model_id:
        return Refusal(
            Reason.WRONG_MODEL,
            f"aggregate of {e.parent_model_id}, round is on {r.base_model_id}",
        )
    return None


def _reduces_every_shard(r: Round, e: RoundAggregated) -> Refusal | None:
    """A sharded round's aggregate is the reduce of its partials: all of them, in shard order."""
    if r.shards == 1:
        return None
    if not r.reducible:
        return Refusal(Reason.ILLEGAL, f"{len(r.partials)} of {r.shards} shards have reported")
    expected = tuple(uid for k in range(r.shards) for uid in r.partials[k].update_ids)
    if e.update_ids != expected:
        return Refusal(Reason.ILLEGAL, "aggregate's updates are not its partials' in shard order")
    return None


def _covers_its_shard(r: Round, e: ShardAggregated) -> Refusal | None:
    if r.shards == 1 or e.shards != r.shards or not 0 <= e.shard < r.shards:
        return Refusal(Reason.ILLEGAL, f"shard {e.shard} of {e.shards}; the round has {r.shards} shards")
    if e.shard in r.partials:
        return Refusal(Reason.DUPLICATE, f"shard {e.shard} has already reported")
    expected = tuple(u.update_id for u in r.shard_updates(e.shard))
    if e.update_ids != expected:
        return Refusal(
            Reason.UNKNOWN_UPDATE,
            f"shard {e.shard} folded {len(e.update_ids)} updates, "
            f"not its {len(expected)} usable ones in log order",
        )
    return None


def _rejectable(r: Round, e: UpdateRejected) -> Refusal | None:
    if e.update_id not in r.accepted:
        return Refusal(Reason.UNKNOWN_UPDATE, f"update {e.update_id} was never accepted")
    if e.update_id in r.unusable:
        return Refusal(Reason.DUPLICATE, f"update {e.update_id} was already rejected")
    if r.aggregated is not None and e.update_id in r.aggregated.update_ids:
        return Refusal(Reason.ILLEGAL, f"update {e.update_id} is already part of the aggregate")
    if any(e.update_id in partial.update_ids for partial in r.partials.values()):
        return Refusal(Reason.ILLEGAL, f"update {e.update_id} is already part of a shard's partial")
    return None


# --- effects ------------------------------------------------------------------------------------


def _stage(r: Round, e: ModelStaged) -> None:
    r.model_sha256 = e.sha256


def _assign(r: Round, e: ClientsAssigned) -> None:
    r.assigned = frozenset(e.client_ids)
    r.deadline = e.deadline


def _accept_update(r: Round, e: UpdateReceived) -> None:
    r.accepted[e.update_id] = e
    r.reporters.add(e.client_id)


def _record_result(r: Round, e: Result) -> None:
    r.results[e.client_id] = e
    r.reporters.add(e.client_id)


def _mark_unusable(r: Round, e: UpdateRejected) -> None:
    r.unusable[e.update_id] = e.reason


def _time_out(r: Round, _e: RoundTimedOut) -> None:
    r.timed_out = True
    if not (_timeout_closes(r) or _timeout_completes(r)):
        r.fail_reason = "too_few_updates"


def _record_aggregate(r: Round, e: RoundAggregated) -> None:
    r.aggregated = e


def _record_partial(r: Round, e: ShardAggregated) -> None:
    r.partials[e.shard] = e


def _record_failure(r: Round, e: RoundFailed) -> None:
    r.fail_reason = e.reason


# --- conditions ---------------------------------------------------------------------------------


def _buffer_full(r: Round) -> bool:
    return len(r.accepted) >= r.buffer_target


def _all_reported(r: Round) -> bool:
    return len(r.results) >= len(r.assigned)


def _enough_updates(r: Round) -> bool:
    return len(r.accepted) >= r.config.min_updates


def _enough_results(r: Round) -> bool:
    return len(r.results) >= r.config.min_updates


def _is_training(r: Round) -> bool:
    return r.task == Task.TRAINING


def _timeout_closes(r: Round) -> bool:
    return _is_training(r) and _enough_updates(r)


def _timeout_completes(r: Round) -> bool:
    return not _is_training(r) and _enough_results(r)


S = RoundState
_COLLECTED = (S.CLOSED, S.AGGREGATED, S.FAILED, S.COMPLETED)
_BEFORE_COLLECTING = (S.REQUESTED, S.STAGED)
_RESULTS = tuple(ANSWER_TASKS)


def _receive(
    event: type[Answer],
    guards: tuple[Guard, ...],
    effect: Effect,
    done: Condition,
    label: str,
) -> Rule[RoundState]:
    """A result arriving while collecting: admitted by the guards, then maybe the last one needed."""
    task = ANSWER_TASKS[event]
    finished = S.CLOSED if task == Task.TRAINING else S.COMPLETED
    return Rule(
        S.COLLECTING,
        event,
        guards=(_task_is(task), _assigned, *guards),
        effect=effect,
        branches=(Branch(finished, done, label), Branch(S.COLLECTING)),
    )


ROUND_RULES: tuple[Rule[RoundState], ...] = (
    Rule(S.REQUESTED, ModelStaged, guards=(_model_matches,), effect=_stage, branches=(Branch(S.STAGED),)),
    Rule(S.REQUESTED, RoundFailed, effect=_record_failure, branches=(Branch(S.FAILED),)),
    Rule(
        S.STAGED,
        ClientsAssigned,
        guards=(_hands_out_staged_model, _enough_clients),
        effect=_assign,
        branches=(Branch(S.COLLECTING),),
    ),
    Rule(S.STAGED, RoundFailed, effect=_record_failure, branches=(Branch(S.FAILED),)),
    _receive(
        UpdateReceived,
        (_first_from_client, _own_update_id, _trained_on_round_model, _weight_allowed),
        _accept_update,
        _buffer_full,
        "buffer full",
    ),
    _receive(
        ValidationReceived,
        (_on_round_model, _first_from_client),
        _record_result,
        _all_reported,
        "all reported",
    ),
    _receive(
        PredictionReceived,
        (_on_round_model, _first_from_client),
        _record_result,
        _all_reported,
        "all reported",
    ),
    Rule(
        S.COLLECTING,
        RoundTimedOut,
        effect=_time_out,
        branches=(
            Branch(S.CLOSED, _timeout_closes, "enough updates"),
            Branch(S.COMPLETED, _timeout_completes, "enough results"),
            Branch(S.FAILED, label="too few updates"),
        ),
    ),
    Rule(S.COLLECTING, RoundFailed, effect=_record_failure, branches=(Branch(S.FAILED),)),
    Rule(
        S.CLOSED,
        RoundAggregated,
        guards=(_folds_accepted_updates, _reduces_every_shard),
        effect=_record_aggregate,
        branches=(Branch(S.AGGREGATED),),
    ),
    Rule(
        S.CLOSED,
        ShardAggregated,
        guards=(_covers_its_shard,),
        effect=_record_partial,
        branches=(Branch(S.CLOSED),),
    ),
    Rule(S.CLOSED, RoundFailed, effect=_record_failure, branches=(Branch(S.FAILED),)),
    *(
        Rule(
            s,
            UpdateRejected,
            guards=(_rejectable,),
            effect=_mark_unusable,
            branches=(Branch(s),),
        )
        for s in (S.COLLECTING, S.CLOSED, S.AGGREGATED, S.FAILED)
    ),
    *(Rule(s, e, refuse=Reason.LATE) for s in _COLLECTED for e in _RESULTS),
    *(Rule(s, e, refuse=Reason.EARLY) for s in _BEFORE_COLLECTING for e in _RESULTS),
    *(Rule(s, RoundTimedOut, refuse=Reason.STALE) for s in _COLLECTED),
    *(Rule(s, ShardAggregated, refuse=Reason.EARLY) for s in (*_BEFORE_COLLECTING, S.COLLECTING)),
    *(Rule(s, ShardAggregated, refuse=Reason.STALE) for s in (S.AGGREGATED, S.FAILED, S.COMPLETED)),
)

ROUND_TABLE = index(ROUND_RULES)
