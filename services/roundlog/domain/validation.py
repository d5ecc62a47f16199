"""What a well-formed event is: bounds on every field, checked where an event enters the fold.

The log is permanent, so a record that crashes a role crashes it after every restart and
every replay. Every field a role later computes with (weights, timeouts, offsets, shapes,
sizes, times) is therefore checked here first, as a pure rule with a reason: a malformed
event is refused by the fold itself, identically in every role and in every replay, and
nothing downstream meets a value it cannot handle.
"""

from __future__ import annotations

import functools
import json
import math
import re
from datetime import datetime, timedelta

from roundlog.aggregation import SHARDABLE, AggregatorConfigError, check_config
from roundlog.arrays import StreamError, declared_nbytes
from roundlog.domain.events import (
    ClientHeartbeat,
    ClientsAssigned,
    Event,
    KeyRegistered,
    KeyRevoked,
    KeyRole,
    ModelImported,
    ModelStaged,
    RoundAggregated,
    RoundConfig,
    RoundRequested,
    SessionStarted,
    ShardAggregated,
    TensorRef,
    UpdateReceived,
    ValidationReceived,
)
from roundlog.domain.rules import Reason, Refusal

#: Longest round a config may ask for (30 days): a deadline beyond it is a mistake or an attack.
MAX_ROUND_TIMEOUT_S = 30 * 24 * 3600.0
#: Most rounds a session may plan.
MAX_ROUNDS = 1_000_000
#: Most aggregation shards a round may ask for.
MAX_SHARDS = 1024
#: Largest ``num_examples`` a policy may allow: float64 sums of weights stay exact below 2**53.
MAX_NUM_EXAMPLES = 2**53
#: Largest model or update a TensorRef may declare (64 GiB).
MAX_TENSOR_BYTES = 1 << 36
#: Largest payload of one chunk on the tensors topic (the contract's 1 MiB; bus writes chunks this size).
MAX_CHUNK_BYTES = 1 << 20
#: How far an event's own time may run ahead of the time the log gave it.
MAX_CLOCK_SKEW = timedelta(minutes=5)

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: A key id: the raw Ed25519 public key in lowercase hex.
KEY_ID = re.compile(r"[0-9a-f]{64}")


class Invalid(ValueError):
    """A field out of bounds; carries the refusal the fold reports."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.refusal = Refusal(reason, detail)


@functools.lru_cache(maxsize=256)
def config_problem(config: RoundConfig) -> str | None:
    """Why a round config cannot run, or None. Checked where the config enters the log, i.e.
    on every round's request and assignment: a session's rounds repeat one config, parsed once."""
    timeout = config.round_timeout
    if not (math.isfinite(timeout) and 0 < timeout <= MAX_ROUND_TIMEOUT_S):
        return f"round_timeout must be > 0 and <= {MAX_ROUND_TIMEOUT_S:.0f} s (30 days), got {timeout}"
    if config.buffer_size == 0 or config.buffer_size < -1:
        return f"buffer_size must be -1 (all assigned) or >= 1, got {config.buffer_size}"
    if config.max_clients == 0 or config.max_clients < -1:
        return f"max_clients must be -1 (all live) or >= 1, got {config.max_clients}"
    if config.clients_required < 0:
        return f"clients_required must be >= 0, got {config.clients_required}"
    if config.min_updates < 1:
        return f"min_updates must be >= 1, got {config.min_updates}"
    if not 1 <= config.max_num_examples <= MAX_NUM_EXAMPLES:
        return f"max_num_examples must be in [1, 2**53], got {config.max_num_examples}"
    share = config.max_weight_share
    if not (math.isfinite(share) and 0 < share <= 1):
        return f"max_weight_share must be in (0, 1], got {share}"
    try:
        kwargs = json.loads(config.aggregator_kwargs)
    except ValueError as error:
        return f"aggregator_kwargs is not JSON: {error}"
    if not isinstance(kwargs, dict):
        return "aggregator_kwargs must be a JSON object"
    try:
        check_config(config.aggregator, kwargs)
    except AggregatorConfigError as error:
        return str(error)
    if not 1 <= config.shards <= MAX_SHARDS:
        return f"shards must be in [1, {MAX_SHARDS}], got {config.shards}"
    if config.shards > 1 and config.aggregator not in SHARDABLE:
        return (
            f"{config.aggregator} cannot be sharded: only the weighted-sum aggregators "
            f"({', '.join(sorted(SHARDABLE))}) combine partial results"
        )
    return None


def event_problem(event: Event, logged_at: datetime | None = None) -> Refusal | None:
    """Why ``event`` is malformed, or None. ``logged_at`` is when the log took the record (the
    broker's timestamp), a time its producer's clock does not decide; without it times are not
    checked against anything."""
    try:
        if logged_at is not None and event.occurred_at - logged_at > MAX_CLOCK_SKEW:
            raise Invalid(
                Reason.CLOCK_SKEW,
                f"occurred_at {event.occurred_at.isoformat()} is more than {MAX_CLOCK_SKEW} after the "
                f"log's time {logged_at.isoformat()}",
            )
        if not event.event_id:
            raise Invalid(Reason.INVALID_FIELD, "event_id is empty")
        _check_fields(event)
    except Invalid as invalid:
        return invalid.refusal
    return None


def tensor_ref_problem(ref: TensorRef) -> str | None:
    """Why a TensorRef cannot point at a readable stream of its arrays, or None.

    On the hot path (every update): details are only formatted for a reference that fails.
    """
    span = ref.last_offset - ref.first_offset + 1
    if not ref.key:
        return "empty key"
    if ref.partition < 0 or not 0 <= ref.first_offset <= ref.last_offset:
        return f"partition {ref.partition}, offsets {ref.first_offset}..{ref.last_offset}"
    if not 1 <= ref.chunks <= span:
        return f"{ref.chunks} chunks in {span} offsets"
    if _SHA256.fullmatch(ref.sha256) is None:
        return f"sha256 {ref.sha256[:80]!r} is not 64 hex digits"
    if len({spec.name for spec in ref.arrays}) != len(ref.arrays):
        return "array names repeat"
    try:
        declared = declared_nbytes(ref.arrays)
    except StreamError as error:
        return error.detail
    if declared > MAX_TENSOR_BYTES:
        return f"the arrays hold {declared} bytes, more than {MAX_TENSOR_BYTES}"
    if ref.nbytes != declared:
        return f"nbytes {ref.nbytes}, the arrays hold {declared}"
    if ref.chunks < -(-ref.nbytes // MAX_CHUNK_BYTES):
        return f"{ref.nbytes} bytes cannot fit {ref.chunks} chunks of at most {MAX_CHUNK_BYTES}"
    return None


# --- the checks, one per event type that carries numbers ----------------------------------------


def _require(ok: bool, detail: str, reason: Reason = Reason.INVALID_FIELD) -> None:
    if not ok:
        raise Invalid(reason, detail)


def _check_config(config: RoundConfig) -> None:
    problem = config_problem(config)
    _require(problem is None, str(problem), Reason.INVALID_CONFIG)


def _check_ref(ref: TensorRef, what: str) -> None:
    problem = tensor_ref_problem(ref)
    if problem is not None:
        raise Invalid(Reason.INVALID_TENSOR_REF, f"{what}: {problem}")


def _check_session_started(e: SessionStarted) -> None:
    _require(bool(e.session_id), "session_id is empty")
    _require(
        1 <= e.rounds <= MAX_ROUNDS,
        f"rounds must be in [1, {MAX_ROUNDS}], got {e.rounds}",
        Reason.INVALID_CONFIG,
    )
    _check_ref(e.initial_model, "initial_model")
    _check_config(e.round_config)


def _check_clients_assigned(e: ClientsAssigned) -> None:
    _require(all(e.client_ids), "an assigned client id is empty")
    longest = timedelta(seconds=MAX_ROUND_TIMEOUT_S)
    _require(
        timedelta(0) <= e.deadline - e.occurred_at <= longest,
        f"deadline {e.deadline.isoformat()} is not within 30 days after {e.occurred_at.isoformat()}",
    )
    _check_ref(e.model, "model")
    _check_config(e.config)


def _check_update(e: UpdateReceived) -> None:
    if not (e.client_id and e.update_id):
        raise Invalid(Reason.INVALID_FIELD, "client_id or update_id is empty")
    if not 1 <= e.num_examples <= MAX_NUM_EXAMPLES:
        raise Invalid(Reason.WEIGHT_LIMIT, f"num_examples must be in [1, 2**53], got {e.num_examples}")
    _check_ref(e.tensor, "tensor")


def _check_aggregated(e: RoundAggregated) -> None:
    _require(math.isfinite(e.total_weight) and e.total_weight >= 0, f"total_weight {e.total_weight}")
    _require(
        all(math.isfinite(t) and t >= 0 for t in (e.time_model_load, e.time_aggregation)),
        "timings must be finite and >= 0",
    )
    _check_ref(e.tensor, "tensor")
    if e.optimizer_state is not None:
        _check_ref(e.optimizer_state, "optimizer_state")


def _check_partial(e: ShardAggregated) -> None:
    _require(1 <= e.shards <= MAX_SHARDS and 0 <= e.shard < e.shards, f"shard {e.shard} of {e.shards}")
    _require(math.isfinite(e.total_weight) and e.total_weight >= 0, f"total_weight {e.total_weight}")
    _check_ref(e.partial, "partial")


def _check_key_id(key_id: str) -> None:
    _require(KEY_ID.fullmatch(key_id) is not None, f"key_id {key_id[:80]!r} is not 64 lowercase hex digits")


def _check_fields(event: Event) -> None:
    match event:
        case ModelImported():
            _require(bool(event.model_id), "model_id is empty")
            _check_ref(event.tensor, "tensor")
        case SessionStarted():
            _check_session_started(event)
        case RoundRequested():
            _require(bool(event.round_id), "round_id is empty")
            _require(
                1 <= event.round_no <= MAX_ROUNDS,
                f"round_no must be in [1, {MAX_ROUNDS}], got {event.round_no}",
            )
            _check_config(event.config)
        case ModelStaged():
            _require(0 <= event.nbytes <= MAX_TENSOR_BYTES, f"nbytes {event.nbytes}")
        case ClientsAssigned():
            _check_clients_assigned(event)
        case UpdateReceived():
            _check_update(event)
        case ValidationReceived() if not 0 <= event.num_examples <= MAX_NUM_EXAMPLES:
            detail = f"num_examples must be in [0, 2**53], got {event.num_examples}"
            raise Invalid(Reason.WEIGHT_LIMIT, detail)
        case RoundAggregated():
            _check_aggregated(event)
        case ShardAggregated():
            _check_partial(event)
        case ClientHeartbeat():
            _require(bool(event.client_id), "client_id is empty")
        case KeyRegistered():
            _check_key_id(event.key_id)
            _require(bool(event.roles), "a key needs at least one role")
            _require(
                (KeyRole.CLIENT in event.roles) == bool(event.client_id),
                "a client key names its client_id, and only a client key does",
            )
        case KeyRevoked():
            _check_key_id(event.key_id)
