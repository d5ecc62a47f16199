"""The event types of the log: one frozen dataclass per Avro schema in ``schemas/``.

Field names and types mirror the schemas one to one, so the codec can convert a
decoded Avro record into these classes by name. Times are timezone-aware UTC
datetimes with millisecond precision (Avro ``timestamp-millis``).
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

#: Namespace of every deterministic id roundlog derives (UUIDv5).
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "roundlog.v1")


_NAMESPACE_BYTES = ID_NAMESPACE.bytes
#: A UUIDv5's variant digit (RFC 4122: bits 10xx) for each hex digit of the SHA-1 there.
_VARIANT = {f"{n:x}": f"{n & 0x3 | 0x8:x}" for n in range(16)}


def derived_id(*parts: str) -> str:
    """A deterministic id, so a re-emission after a crash is recognisably the same.

    ``str(uuid.uuid5(ID_NAMESPACE, "/".join(parts)))``, spelled from the SHA-1's hex digits
    (version digit 5, variant digit looked up) without building a ``UUID``, a third of the
    cost: the fold checks one of these for every update.
    """
    h = hashlib.sha1(_NAMESPACE_BYTES + "/".join(parts).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


class Task(enum.StrEnum):
    TRAINING = "training"
    VALIDATION = "validation"
    INFERENCE = "inference"


class ClientRole(enum.StrEnum):
    TRAINER = "trainer"
    VALIDATOR = "validator"


class KeyRole(enum.StrEnum):
    """What a registered signing key may do (a key may hold several roles)."""

    OPERATOR = "operator"
    COORDINATOR = "coordinator"
    AGGREGATOR = "aggregator"
    CLIENT = "client"


def update_id_for(round_id: str, client_id: str) -> str:
    """The one id a client's update in a round may have (also its tensors key): nobody else can claim it."""
    return derived_id(round_id, "client", client_id, "update")


def answer_event_id(round_id: str, client_id: str, task: Task) -> str:
    """The event id of a client's answer to a round: a resubmission is a duplicate event, not news,
    and (where events are signed) the only id a client's answer may carry."""
    return derived_id(round_id, "client", client_id, task.value)


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """How a round runs; the defaults are FEDn's, except the weight policy (roundlog's own)."""

    round_timeout: float = 180.0
    buffer_size: int = -1
    clients_required: int = 1
    max_clients: int = -1
    min_updates: int = 1
    aggregator: str = "fedavg"
    aggregator_kwargs: str = "{}"
    #: the most examples one update may claim; a larger claim is refused, not clipped
    max_num_examples: int = 1_000_000_000
    #: the largest share of a closed round's total weight one update may hold (1.0: no limit)
    max_weight_share: float = 1.0
    #: aggregation shards of a training round (see ``ShardAggregated``); 1: one aggregator folds all
    shards: int = 1


@dataclass(frozen=True, kw_only=True)
class ArraySpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class TensorRef:
    """Where the chunks of one list of named arrays live on the tensors topic."""

    key: str
    partition: int
    first_offset: int
    last_offset: int
    chunks: int
    nbytes: int
    sha256: str
    arrays: tuple[ArraySpec, ...]


@dataclass(frozen=True, kw_only=True)
class ModelImported:
    """A model brought in from outside (a file, a service), so sessions can start from it."""

    event_id: str
    occurred_at: datetime
    model_id: str
    name: str = ""
    tensor: TensorRef


@dataclass(frozen=True, kw_only=True)
class SessionStarted:
    event_id: str
    occurred_at: datetime
    session_id: str
    name: str = ""
    rounds: int
    initial_model_id: str
    initial_model: TensorRef
    round_config: RoundConfig
    validate_each_round: bool = False
    stop_on_failure: bool = True


@dataclass(frozen=True, kw_only=True)
class RoundRequested:
    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    round_no: int
    task: Task
    model_id: str
    config: RoundConfig


@dataclass(frozen=True, kw_only=True)
class ModelStaged:
    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    model_id: str
    sha256: str
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class ClientsAssigned:
    """Everything an assigned client needs to do its part, so it reads one event, not the session."""

    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    client_ids: tuple[str, ...]
    deadline: datetime
    task: Task
    model_id: str
    model: TensorRef
    config: RoundConfig


@dataclass(frozen=True, kw_only=True)
class UpdateReceived:
    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    client_id: str
    update_id: str
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    tensor: TensorRef
    #: the sha256 of the model the update was trained from ("" not stated): a forged assignment's
    #: model cannot pass for the round's
    base_model_sha256: str = ""


@dataclass(frozen=True, kw_only=True)
class UpdateRejected:
    """An update the machine accepted whose tensors the aggregator could not fold."""

    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    client_id: str
    update_id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class ValidationReceived:
    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    client_id: str
    model_id: str
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: the sha256 of the model validated ("" not stated)
    model_sha256: str = ""


@dataclass(frozen=True, kw_only=True)
class PredictionReceived:
    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    client_id: str
    model_id: str
    summary: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: the sha256 of the model predicted with ("" not stated)
    model_sha256: str = ""


@dataclass(frozen=True, kw_only=True)
class RoundTimedOut:
    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    deadline: datetime


@dataclass(frozen=True, kw_only=True)
class RoundAggregated:
    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    model_id: str
    parent_model_id: str
    tensor: TensorRef
    optimizer_state: TensorRef | None = None
    update_ids: tuple[str, ...]
    total_weight: float
    time_model_load: float = 0.0
    time_aggregation: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ShardAggregated:
    """One shard's part of a sharded training round: the float64 weighted sum of its updates.

    A closed round with ``config.shards`` K > 1 is folded by K shards; shard k folds, in log
    order, the usable accepted updates whose chunks sit on a tensors partition p with
    p mod K = k (``shard_of``). The reduce adds the K partials in shard order and finalizes.
    """

    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    shard: int
    shards: int
    #: the updates folded, in log order
    update_ids: tuple[str, ...]
    total_weight: float
    #: the weighted sums, one float64 array ``sum/<name>`` per base model array, in its shape
    partial: TensorRef


def shard_of(update: UpdateReceived, shards: int) -> int:
    """The shard that folds ``update``: a function of the log alone, and of where its bytes are,
    so a shard reads its own tensors partitions only."""
    return update.tensor.partition % shards


@dataclass(frozen=True, kw_only=True)
class RoundFailed:
    event_id: str
    occurred_at: datetime
    session_id: str
    round_id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class SessionFinished:
    event_id: str
    occurred_at: datetime
    session_id: str
    succeeded: bool
    reason: str = ""
    final_model_id: str = ""


@dataclass(frozen=True, kw_only=True)
class ClientHeartbeat:
    event_id: str
    occurred_at: datetime
    client_id: str
    roles: tuple[ClientRole, ...]
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class KeyRegistered:
    """The operator lets a key sign events in the given roles; written to every events partition."""

    event_id: str
    occurred_at: datetime
    key_id: str
    roles: tuple[KeyRole, ...]
    client_id: str = ""
    name: str = ""


@dataclass(frozen=True, kw_only=True)
class KeyRevoked:
    """The operator withdraws a key: its events after this one, in each partition, are refused."""

    event_id: str
    occurred_at: datetime
    key_id: str
    reason: str = ""


RoundEvent = (
    RoundRequested
    | ModelStaged
    | ClientsAssigned
    | UpdateReceived
    | UpdateRejected
    | ValidationReceived
    | PredictionReceived
    | RoundTimedOut
    | RoundAggregated
    | ShardAggregated
    | RoundFailed
)
SessionEvent = SessionStarted | SessionFinished
RegistryEvent = KeyRegistered | KeyRevoked
Event = SessionEvent | RoundEvent | ClientHeartbeat | ModelImported | RegistryEvent

#: Every event class, in the order of the design's table; the codec maps them to schemas by name.
EVENT_TYPES: tuple[type[Event], ...] = (
    ModelImported,
    SessionStarted,
    RoundRequested,
    ModelStaged,
    ClientsAssigned,
    UpdateReceived,
    UpdateRejected,
    ValidationReceived,
    PredictionReceived,
    RoundTimedOut,
    RoundAggregated,
    ShardAggregated,
    RoundFailed,
    SessionFinished,
    ClientHeartbeat,
    KeyRegistered,
    KeyRevoked,
)


#: A client's answers to a round, and the task each answers: its event id and its round's rules
#: derive from it.
Answer = UpdateReceived | ValidationReceived | PredictionReceived
ANSWER_TASKS: dict[type[Answer], Task] = {
    UpdateReceived: Task.TRAINING,
    ValidationReceived: Task.VALIDATION,
    PredictionReceived: Task.INFERENCE,
}


def partition_key(event: Event) -> str:
    """Events of one session share a partition; heartbeats are keyed by client, imports by model,
    registry events (copied to every partition) by key."""
    if isinstance(event, ClientHeartbeat):
        return event.client_id
    if isinstance(event, ModelImported):
        return event.model_id
    if isinstance(event, KeyRegistered | KeyRevoked):
        return event.key_id
    return event.session_id
