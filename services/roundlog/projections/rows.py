"""From folded records to the rows one batch writes. Pure: no I/O, so a live projection and a
replay derive the same rows from the same log by construction.

The projector folds each record first, then hands this module what it saw: the entry, the
machine's ``Outcome`` and the session the event touched (held on to even when the event
finished it, so its final state is still at hand). Sessions and rounds are written from the
fold's state, once per batch however many of their events the batch holds; the other tables
get one row per event.

A record whose event id was already projected is a re-emission: when the machine refuses it,
it writes nothing at all; when it applies it (the same id in another session) its audit rows
(``events``, ``round_updates``) are not written twice, since the id is their key.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from roundlog.codec import DecodeError, event_to_json, event_type_name, json_double, json_text
from roundlog.domain.events import (
    ANSWER_TASKS,
    ClientHeartbeat,
    ClientsAssigned,
    Event,
    KeyRegistered,
    KeyRevoked,
    ModelImported,
    PredictionReceived,
    RoundAggregated,
    ShardAggregated,
    TensorRef,
    UpdateReceived,
    UpdateRejected,
    ValidationReceived,
)
from roundlog.domain.round import Round, RoundState
from roundlog.domain.rules import SIGNING_REASONS, Reason, Refusal
from roundlog.domain.session import Outcome, Session, SessionState
from roundlog.roles.stream import HEAD_BYTES, Entry

ACCEPTED, REJECTED = "accepted", "rejected"

#: Column order of the rows COPY writes into ``events`` and ``round_updates``.
EVENT_COLUMNS = (
    "partition",
    "offset",
    "event_id",
    "type",
    "session_id",
    "round_id",
    "client_id",
    "occurred_at",
    "outcome",
    "payload",
    "key_id",
)
UPDATE_COLUMNS = (
    "event_id",
    "update_id",
    "session_id",
    "round_id",
    "client_id",
    "num_examples",
    "status",
    "reject_reason",
    "reject_detail",
    "metrics",
    "sha256",
    "nbytes",
    "received_at",
)

_RESULTS = tuple(ANSWER_TASKS)


class Folded(NamedTuple):
    """One decoded record of the events topic after the fold (a tuple: one is made per event)."""

    entry: Entry
    event: Event
    outcome: Outcome
    #: the session the event belongs to, if the ledger knows it (also when this event finished it)
    session: Session | None
    #: the event as JSON, the text the ``events`` row stores
    text: str


@dataclass(frozen=True)
class Rejection:
    """A record kept aside in ``rejected_events`` and on the dead-letter topic."""

    topic: str
    entry: Entry
    reason: str
    detail: str
    #: what the record decoded to, if it did (storable: see ``storable``)
    event: Event | None = None

    def row(self) -> dict[str, Any]:
        event = self.event
        return {
            "topic": self.topic,
            "partition": self.entry.partition,
            "offset": self.entry.offset,
            "raw_size": len(self.entry.value),
            "reason": self.reason,
            "detail": self.detail.replace("\x00", "\\x00"),
            "head": self.entry.value[:HEAD_BYTES],
            "key": self.entry.key,
            "event_id": getattr(event, "event_id", None),
            "type": event_type_name(event) if event is not None else None,
            "session_id": getattr(event, "session_id", None),
            "round_id": getattr(event, "round_id", None),
            "occurred_at": getattr(event, "occurred_at", None),
            "key_id": _key_id(self.entry),
        }


WRONG_TOPIC = "wrong_topic"
#: Refusals of a record nobody vouches for, or that is not in its session's place: kept in
#: ``rejected_events`` and on the dead-letter topic only, claiming no event id and no row.
_KEPT_ASIDE = SIGNING_REASONS | {Reason.WRONG_PARTITION}


def _key_id(entry: Entry) -> str | None:
    """The key a record claims to be signed by (verified where the fold applied it under
    ``ROUNDLOG_AUTH=signed``); the claim is kept for refused records too."""
    return entry.seal.key_id[:200] if entry.seal is not None else None


def storable(event: Event, text: str | None = None) -> tuple[Event, str]:
    """The event as PostgreSQL can hold it, with its JSON text (``text``, if the decoder wrote it).

    Text and JSONB cannot hold a NUL character, so NULs become U+FFFD, in the event itself
    before it is folded: every row derived from it is then storable, and a fold that runs
    this same step (live or restored) takes the same decisions.
    """
    if text is None:
        text = json_text(event_to_json(event))
    if "\\u0000" not in text:
        return event, text
    clean: Event = _without_nul(event)
    return clean, json_text(event_to_json(clean))


def _without_nul(value: Any) -> Any:
    if isinstance(value, enum.Enum):  # a StrEnum is a str too; its symbols come from the schema
        return value
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, tuple):
        return tuple(_without_nul(v) for v in value)
    if isinstance(value, Mapping):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: _without_nul(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    return value


def _strict_json(text: str) -> Any:
    """A JSON text as a JSONB value; text that JSONB cannot hold (NaN, \\u0000) stays a string."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError:
        return text
    return text if "\\u0000" in text else value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _tensor(ref: TensorRef) -> dict[str, Any]:
    return {
        "key": ref.key,
        "partition": ref.partition,
        "first_offset": ref.first_offset,
        "last_offset": ref.last_offset,
        "chunks": ref.chunks,
    }


def _layout(ref: TensorRef) -> list[dict[str, Any]]:
    return [{"name": a.name, "dtype": a.dtype, "shape": list(a.shape)} for a in ref.arrays]


def _model_row(
    model_id: str, origin: str, ref: TensorRef, created_at: datetime, **extra: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model_id": model_id,
        "origin": origin,
        "name": None,
        "parent_model_id": None,
        "session_id": None,
        "round_id": None,
        "sha256": ref.sha256,
        "nbytes": ref.nbytes,
        "layout": _layout(ref),
        "tensor": _tensor(ref),
        "optimizer_state": None,
        "n_updates": None,
        "created_at": created_at,
    }
    row.update(extra)
    return row


def session_row(session: Session, partition: int) -> dict[str, Any]:
    started, finished = session.started, session.finished
    config = event_to_json(started)["round_config"]
    config["aggregator_kwargs"] = _strict_json(started.round_config.aggregator_kwargs)
    return {
        "session_id": session.session_id,
        "name": started.name,
        "state": session.state.value,
        "partition": partition,
        "rounds_total": started.rounds,
        "rounds_done": session.rounds_done,
        "config": config,
        "validate_each_round": started.validate_each_round,
        "stop_on_failure": started.stop_on_failure,
        "initial_model_id": started.initial_model_id,
        "latest_model_id": session.latest_model_id,
        "final_model_id": (finished.final_model_id or None) if finished else None,
        "succeeded": finished.succeeded if finished else None,
        "finish_reason": (finished.reason or None) if finished else None,
        "started_at": session.changed_at[SessionState.RUNNING],
        "completed_at": session.changed_at.get(SessionState.COMPLETED),
        "failed_at": session.changed_at.get(SessionState.FAILED),
    }


def round_row(round_: Round, received: int) -> dict[str, Any]:
    """The round as the fold sees it; ``received`` counts this batch's results, the writer adds it up."""
    config, aggregated = round_.config, round_.aggregated
    n_accepted = len(round_.accepted) - len(round_.unusable) + len(round_.results)
    total_weight = (
        aggregated.total_weight
        if aggregated is not None
        else float(sum(update.num_examples for update in round_.usable_updates))
    )
    at = round_.changed_at
    return {
        "round_id": round_.round_id,
        "session_id": round_.session_id,
        "round_no": round_.round_no,
        "task": round_.task.value,
        "state": round_.state.value,
        "base_model_id": round_.base_model_id,
        "new_model_id": aggregated.model_id if aggregated else None,
        "fail_reason": round_.fail_reason or None,
        "timed_out": round_.timed_out,
        "buffer_size": config.buffer_size,
        "clients_required": config.clients_required,
        "max_clients": config.max_clients,
        "min_updates": config.min_updates,
        "round_timeout": config.round_timeout,
        "aggregator": config.aggregator,
        "aggregator_kwargs": _strict_json(config.aggregator_kwargs),
        "deadline": round_.deadline,
        "closed_by_event": round_.closed_by or None,
        "n_assigned": len(round_.assigned),
        "n_received": received,
        "n_accepted": n_accepted,
        "n_rejected": received - n_accepted,
        "total_weight": total_weight,
        "time_model_load": aggregated.time_model_load if aggregated else None,
        "time_aggregation": aggregated.time_aggregation if aggregated else None,
        **{f"{state.value}_at": at.get(state) for state in RoundState},
        "shards": config.shards,
    }


@dataclass
class BatchRows:
    """Every row change of one batch, collected in log order and deduplicated by key."""

    events_topic: str
    #: event ids the ``events`` table already holds; grows with this batch's
    seen_event_ids: set[str] = field(default_factory=set)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    round_updates: list[tuple[Any, ...]] = field(default_factory=list)
    update_flips: list[dict[str, Any]] = field(default_factory=list)
    assignments: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: reports of clients assigned in an earlier batch: (round_id, client_id) -> reported_at
    reports: dict[tuple[str, str], datetime] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    validations: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the key registry's changes, in log order
    registrations: list[dict[str, Any]] = field(default_factory=list)
    revocations: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    #: shard partials of sharded rounds
    partials: list[dict[str, Any]] = field(default_factory=list)
    #: rows of the sessions and rounds the batch touched, as they stand at ``snapshot``
    session_rows: list[dict[str, Any]] = field(default_factory=list)
    round_rows: list[dict[str, Any]] = field(default_factory=list)
    _sessions: dict[str, tuple[Session, int]] = field(default_factory=dict)
    _rounds: dict[str, tuple[Round, int]] = field(default_factory=dict)

    # --- what the projector reports --------------------------------------------------------------

    def undecodable(self, topic: str, entry: Entry, error: DecodeError) -> None:
        self.rejections.append(Rejection(topic, entry, error.reason, error.detail))

    def misplaced(self, topic: str, entry: Entry, event: Event) -> None:
        self.rejections.append(
            Rejection(
                topic, entry, WRONG_TOPIC, f"{event_type_name(event)} does not belong on {topic}", event
            )
        )

    def refused(self, topic: str, entry: Entry, event: Event, refusal: Refusal) -> None:
        """A decoded record the rules refuse outside any fold (a heartbeat on the clients topic)."""
        self.rejections.append(Rejection(topic, entry, refusal.reason.value, refusal.detail, event))

    def heartbeat(self, beat: ClientHeartbeat, entry: Entry) -> None:
        """Only the latest heartbeat counts, so the clients table needs no fold and survives compaction."""
        last = self.clients.get(beat.client_id)
        if last is None or beat.occurred_at > last["last_seen"]:
            self.clients[beat.client_id] = {
                "client_id": beat.client_id,
                "roles": [role.value for role in beat.roles],
                "labels": dict(beat.labels),
                "last_seen": beat.occurred_at,
                "key_id": _key_id(entry),
            }

    def audited(self, entry: Entry, event: Event, text: str, outcome: str) -> bool:
        """The ``events`` row, unless the id is there already; True when written."""
        if event.event_id in self.seen_event_ids:
            return False
        self.seen_event_ids.add(event.event_id)
        self.events.append(
            (
                entry.partition,
                entry.offset,
                event.event_id,
                event_type_name(event),
                getattr(event, "session_id", None),
                getattr(event, "round_id", None),
                getattr(event, "client_id", None),
                event.occurred_at,
                outcome,
                text,
                _key_id(entry),
            )
        )
        return True

    def folded(self, item: Folded) -> None:
        event, outcome, refusal = item.event, item.outcome, item.outcome.refusal
        if refusal is not None and refusal.reason in _KEPT_ASIDE:
            # Kept aside like a record on the wrong topic, against its session. It claims no event id
            # (ids are derived, so anyone can predict them): the same event sent again to its
            # session's partition, or by its true author, projects as news, and no forger's record
            # takes the ``events`` and ``round_updates`` rows (and the authors) of a real event.
            self.rejections.append(
                Rejection(self.events_topic, item.entry, refusal.reason.value, refusal.detail, event)
            )
            return
        if refusal is not None and (
            refusal.reason == Reason.DUPLICATE_EVENT or event.event_id in self.seen_event_ids
        ):
            return
        first = self.audited(item.entry, event, item.text, refusal.reason.value if refusal else "applied")
        if refusal is not None:
            self.rejections.append(
                Rejection(self.events_topic, item.entry, refusal.reason.value, refusal.detail, event)
            )
        session = item.session
        if session is not None and item.outcome.round_id is not None:
            round_ = session.rounds[item.outcome.round_id]
            received = int(isinstance(event, _RESULTS))
            _, before = self._rounds.get(round_.round_id, (round_, 0))
            self._rounds[round_.round_id] = (round_, before + received)
        if session is not None and outcome.applied:
            self._sessions[session.session_id] = (session, item.entry.partition)
        if isinstance(event, UpdateReceived) and first:
            self.round_updates.append(
                (
                    event.event_id,
                    event.update_id,
                    event.session_id,
                    event.round_id,
                    event.client_id,
                    event.num_examples,
                    REJECTED if refusal else ACCEPTED,
                    refusal.reason.value if refusal else None,
                    refusal.detail if refusal else None,
                    json_text(_metrics(event.metrics)),
                    event.tensor.sha256,
                    event.tensor.nbytes,
                    event.occurred_at,
                )
            )
        if refusal is None:
            self._applied(item.entry, event, session)

    def _applied(self, entry: Entry, event: Event, session: Session | None) -> None:
        if isinstance(event, ClientHeartbeat):
            self.heartbeat(event, entry)
        elif isinstance(event, KeyRegistered):
            self.registrations.append(
                {
                    "key_id": event.key_id,
                    "roles": [role.value for role in event.roles],
                    "client_id": event.client_id or None,
                    "name": event.name,
                    "at": event.occurred_at,
                }
            )
        elif isinstance(event, KeyRevoked):
            self.revocations.append({"key_id": event.key_id, "at": event.occurred_at, "reason": event.reason})
        elif isinstance(event, ModelImported):
            self._model(
                _model_row(event.model_id, "imported", event.tensor, event.occurred_at, name=event.name)
            )
        elif isinstance(event, ClientsAssigned):
            for client_id in dict.fromkeys(event.client_ids):
                self.assignments[(event.round_id, client_id)] = {
                    "round_id": event.round_id,
                    "client_id": client_id,
                    "assigned_at": event.occurred_at,
                    "reported_at": None,
                }
        elif isinstance(event, _RESULTS):
            self._reported(event.round_id, event.client_id, event.occurred_at)
            if isinstance(event, ValidationReceived):
                self.validations.append({**_result_row(event), "num_examples": event.num_examples})
            elif isinstance(event, PredictionReceived):
                self.predictions.append({**_result_row(event), "summary": event.summary})
        elif isinstance(event, UpdateRejected):
            self.update_flips.append(
                {
                    "update_id": event.update_id,
                    "round_id": event.round_id,
                    "reason": event.reason,
                    "detail": event.detail or None,
                }
            )
        elif isinstance(event, ShardAggregated):
            self.partials.append(
                {
                    "round_id": event.round_id,
                    "shard": event.shard,
                    "session_id": event.session_id,
                    "shards": event.shards,
                    "n_updates": len(event.update_ids),
                    "update_ids": list(event.update_ids),
                    "total_weight": event.total_weight,
                    "sha256": event.partial.sha256,
                    "nbytes": event.partial.nbytes,
                    "tensor": _tensor(event.partial),
                    "event_id": event.event_id,
                    "created_at": event.occurred_at,
                }
            )
        elif isinstance(event, RoundAggregated) and session is not None:
            self._model(
                _model_row(
                    event.model_id,
                    "aggregated",
                    event.tensor,
                    event.occurred_at,
                    parent_model_id=session.rounds[event.round_id].base_model_id,
                    session_id=event.session_id,
                    round_id=event.round_id,
                    optimizer_state=dataclasses.asdict(event.optimizer_state)
                    if event.optimizer_state
                    else None,
                    n_updates=len(event.update_ids),
                )
            )

    def _model(self, row: dict[str, Any]) -> None:
        self.models.setdefault(row["model_id"], row)

    def _reported(self, round_id: str, client_id: str, at: datetime) -> None:
        assigned = self.assignments.get((round_id, client_id))
        if assigned is not None:
            assigned["reported_at"] = assigned["reported_at"] or at
        else:
            self.reports.setdefault((round_id, client_id), at)

    # --- what the writer reads -----------------------------------------------------------------

    def snapshot(self) -> None:
        """Take the touched sessions' and rounds' rows now: the fold moves on with the next batch."""
        self.session_rows = [
            session_row(session, partition) for session, partition in self._sessions.values()
        ]
        self.round_rows = [round_row(round_, received) for round_, received in self._rounds.values()]


def _metrics(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """Metrics as JSON holds them (non-finite values spelled as strings, as in the payload)."""
    return {name: json_double(value) for name, value in metrics.items()}


def _result_row(event: ValidationReceived | PredictionReceived) -> dict[str, Any]:
    return {
        "round_id": event.round_id,
        "client_id": event.client_id,
        "session_id": event.session_id,
        "model_id": event.model_id,
        "metrics": _metrics(event.metrics),
        "received_at": event.occurred_at,
        "event_id": event.event_id,
    }
