"""Readable event scripts for tests: each call is the next event of a session, one second later."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

from roundlog.domain.events import (
    ArraySpec,
    ClientHeartbeat,
    ClientRole,
    ClientsAssigned,
    Event,
    ModelImported,
    ModelStaged,
    PredictionReceived,
    RoundAggregated,
    RoundConfig,
    RoundFailed,
    RoundRequested,
    RoundTimedOut,
    SessionFinished,
    SessionStarted,
    ShardAggregated,
    Task,
    TensorRef,
    UpdateReceived,
    UpdateRejected,
    ValidationReceived,
    answer_event_id,
    update_id_for,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def uid(client: str, round_id: str = "r1") -> str:
    """The update id the fold expects of ``client`` in ``round_id``."""
    return update_id_for(round_id, client)


def tensor_ref(key: str) -> TensorRef:
    return TensorRef(
        key=key,
        partition=0,
        first_offset=0,
        last_offset=0,
        chunks=1,
        nbytes=16,
        sha256="0" * 64,
        arrays=(ArraySpec(name="w", dtype="float32", shape=(2, 2)),),
    )


class Script:
    """Builds the events of one session with distinct ids and increasing times."""

    def __init__(
        self, session_id: str = "s1", config: RoundConfig | None = None, answer_ids: bool = False
    ) -> None:
        """``answer_ids``: clients' answers carry the event id their round, client and task give,
        the only one a signed deployment accepts from a client (``answer_event_id``)."""
        self.session_id = session_id
        self.answer_ids = answer_ids
        self.config = config or RoundConfig(round_timeout=60, buffer_size=2)
        self._ticks = itertools.count(1)
        self._ids = itertools.count(1)
        #: the model each round was staged with: its assignment hands that one out
        self._staged: dict[str, str] = {}

    def _stamp(self) -> dict[str, object]:
        return {
            "event_id": f"{self.session_id}-e{next(self._ids)}",
            "occurred_at": T0 + timedelta(seconds=next(self._ticks)),
            "session_id": self.session_id,
        }

    def _answer_stamp(self, round_id: str, client: str, task: Task) -> dict[str, object]:
        stamp = self._stamp()
        if self.answer_ids:
            stamp["event_id"] = answer_event_id(round_id, client, task)
        return stamp

    def started(self, rounds: int = 1, model_id: str = "m0", **options: object) -> SessionStarted:
        return SessionStarted(
            **self._stamp(),
            rounds=rounds,
            initial_model_id=model_id,
            initial_model=tensor_ref(model_id),
            round_config=self.config,
            **options,
        )  # type: ignore[arg-type]

    def requested(
        self,
        round_id: str = "r1",
        task: Task = Task.TRAINING,
        model_id: str = "m0",
        round_no: int = 1,
        **config: object,
    ) -> RoundRequested:
        cfg = RoundConfig(**{**self.config.__dict__, **config})  # type: ignore[arg-type]
        return RoundRequested(
            **self._stamp(),
            round_id=round_id,
            round_no=round_no,
            task=task,
            model_id=model_id,
            config=cfg,
        )  # type: ignore[arg-type]

    def staged(self, round_id: str = "r1", model_id: str = "m0") -> ModelStaged:
        self._staged[round_id] = model_id
        return ModelStaged(
            **self._stamp(),
            round_id=round_id,
            model_id=model_id,
            sha256="0" * 64,
            nbytes=16,
        )  # type: ignore[arg-type]

    def assigned(self, round_id: str = "r1", clients: tuple[str, ...] = ("a", "b", "c")) -> ClientsAssigned:
        stamp = self._stamp()
        return ClientsAssigned(
            **stamp,
            round_id=round_id,
            client_ids=clients,
            deadline=stamp["occurred_at"] + timedelta(hours=1),  # type: ignore[operator]
            task=Task.TRAINING,
            model_id=self._staged.get(round_id, "m0"),
            model=tensor_ref(self._staged.get(round_id, "m0")),
            config=self.config,
        )  # type: ignore[arg-type]

    def update(
        self, client: str, round_id: str = "r1", update_id: str | None = None, partition: int = 0
    ) -> UpdateReceived:
        """``partition``: the tensors partition its chunks are on, which decides its shard."""
        update_id = update_id or uid(client, round_id)
        return UpdateReceived(
            **self._answer_stamp(round_id, client, Task.TRAINING),
            round_id=round_id,
            client_id=client,
            update_id=update_id,
            num_examples=10,
            tensor=dataclasses.replace(tensor_ref(update_id), partition=partition),
        )  # type: ignore[arg-type]

    def partial(
        self, shard: int, shards: int, update_ids: tuple[str, ...], round_id: str = "r1"
    ) -> ShardAggregated:
        return ShardAggregated(
            **self._stamp(),
            round_id=round_id,
            shard=shard,
            shards=shards,
            update_ids=update_ids,
            total_weight=10.0 * len(update_ids),
            partial=tensor_ref(f"{round_id}-shard-{shard}"),
        )  # type: ignore[arg-type]

    def rejected(self, client: str, round_id: str = "r1", reason: str = "non_finite") -> UpdateRejected:
        return UpdateRejected(
            **self._stamp(),
            round_id=round_id,
            client_id=client,
            update_id=uid(client, round_id),
            reason=reason,
        )  # type: ignore[arg-type]

    def validation(self, client: str, round_id: str = "r1", model_id: str = "m0") -> ValidationReceived:
        return ValidationReceived(
            **self._answer_stamp(round_id, client, Task.VALIDATION),
            round_id=round_id,
            client_id=client,
            model_id=model_id,
            num_examples=5,
            metrics={"acc": 0.5},
        )  # type: ignore[arg-type]

    def prediction(self, client: str, round_id: str = "r1", model_id: str = "m0") -> PredictionReceived:
        return PredictionReceived(
            **self._answer_stamp(round_id, client, Task.INFERENCE),
            round_id=round_id,
            client_id=client,
            model_id=model_id,
        )  # type: ignore[arg-type]

    def timed_out(self, round_id: str = "r1") -> RoundTimedOut:
        return RoundTimedOut(**self._stamp(), round_id=round_id, deadline=T0 + timedelta(hours=1))  # type: ignore[arg-type]

    def aggregated(
        self,
        round_id: str = "r1",
        update_ids: tuple[str, ...] = (),
        model_id: str = "m1",
        parent: str = "m0",
    ) -> RoundAggregated:
        return RoundAggregated(
            **self._stamp(),
            round_id=round_id,
            model_id=model_id,
            parent_model_id=parent,
            tensor=tensor_ref(model_id),
            update_ids=update_ids,
            total_weight=10.0 * len(update_ids),
        )  # type: ignore[arg-type]

    def failed(self, round_id: str = "r1", reason: str = "model_missing") -> RoundFailed:
        return RoundFailed(**self._stamp(), round_id=round_id, reason=reason)  # type: ignore[arg-type]

    def finished(self, succeeded: bool = True) -> SessionFinished:
        return SessionFinished(**self._stamp(), succeeded=succeeded)  # type: ignore[arg-type]

    def heartbeat(self, client: str, *roles: ClientRole) -> ClientHeartbeat:
        stamp = self._stamp()
        del stamp["session_id"]
        return ClientHeartbeat(**stamp, client_id=client, roles=roles or (ClientRole.TRAINER,))  # type: ignore[arg-type]


def every_event(s: Script) -> list[Event]:
    """One event of each type a party can produce (registry events aside), in a plausible order."""
    return [
        ModelImported(
            event_id=f"{s.session_id}-import", occurred_at=T0, model_id="m0", tensor=tensor_ref("m0")
        ),
        s.started(),
        s.requested(),
        s.staged(),
        s.assigned(clients=("alice",)),
        s.update("alice"),
        s.rejected("alice"),
        s.validation("alice"),
        s.prediction("alice"),
        s.timed_out(),
        s.aggregated(),
        s.partial(0, 2, ()),
        s.failed(),
        s.finished(),
        s.heartbeat("alice"),
    ]
