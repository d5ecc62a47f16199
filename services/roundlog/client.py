"""The client SDK: a federated client you plug your training into, and producer helpers for services.

A ``FederatedClient`` heartbeats its roles, waits for the ``ClientsAssigned`` that names
it, fetches the base model from the tensors topic, runs your function off the event loop
and submits the result as events. Everything it produces carries deterministic ids (per
round, client and kind), so a retried submission is recognisably the same one.

Your functions get the model as named arrays and the round's ``RoundConfig``; each
returns a tuple that ends with its metrics (a mapping of names to numbers):

- ``train(arrays, config) -> (arrays, num_examples, metrics)``: the updated model, with
  the same names, dtypes and shapes, and the example count that weighs it;
- ``validate(arrays, config) -> (num_examples, metrics)``: the model measured on local data;
- ``predict(arrays, config) -> (summary, metrics)``: an inference round's result.

They run in a worker thread (``asyncio.to_thread``), so they may block; an exception is
logged and the round goes on without this client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsFloat

from aiokafka.structs import ConsumerRecord

from roundlog.arrays import NamedArrays, sha256_of
from roundlog.bus import (
    Producer,
    Topics,
    make_consumer,
    make_producer,
    publish,
    publish_everywhere,
    read_from_end,
)
from roundlog.clock import utc_now
from roundlog.codec import decode
from roundlog.config import Settings
from roundlog.domain.authority import seal_problem
from roundlog.domain.decide import round_request
from roundlog.domain.events import (
    ClientHeartbeat,
    ClientRole,
    ClientsAssigned,
    Event,
    KeyRegistered,
    KeyRevoked,
    KeyRole,
    ModelImported,
    PredictionReceived,
    RoundConfig,
    SessionStarted,
    Task,
    TensorRef,
    UpdateReceived,
    ValidationReceived,
    answer_event_id,
    derived_id,
    update_id_for,
)
from roundlog.domain.validation import event_problem
from roundlog.keys import create_key_file
from roundlog.roles.stream import seal_of
from roundlog.tensors import TensorReader, write_tensors

log = logging.getLogger("roundlog.client")

#: Metric values may be any number type (numpy scalars included); they are sent as doubles.
Metrics = Mapping[str, SupportsFloat]
TrainFn = Callable[[NamedArrays, RoundConfig], tuple[NamedArrays, int, Metrics]]
ValidateFn = Callable[[NamedArrays, RoundConfig], tuple[int, Metrics]]
PredictFn = Callable[[NamedArrays, RoundConfig], tuple[str, Metrics]]

#: How long one poll of the events topic waits, which bounds how late ``stop`` is noticed.
POLL_MS = 200


class FederatedClient:
    """One federated client: plug in ``train``, ``validate`` and/or ``predict``, then ``await run(stop)``.

    Roles follow from the functions given: ``train`` makes a trainer, ``validate`` or
    ``predict`` a validator. ``delay`` holds every finished training update that many
    seconds before submitting it, to simulate a straggler; answers to validation and
    inference rounds are never delayed.
    """

    def __init__(
        self,
        settings: Settings,
        client_id: str,
        *,
        train: TrainFn | None = None,
        validate: ValidateFn | None = None,
        predict: PredictFn | None = None,
        heartbeat_every: float = 2.0,
        labels: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        if train is None and validate is None and predict is None:
            raise ValueError("a client needs at least one of train, validate and predict")
        self.settings = settings
        self.client_id = client_id
        self.topics = Topics.from_prefix(settings.topic_prefix)
        self.heartbeat_every = heartbeat_every
        self.labels = dict(labels or {})
        self.delay = delay
        self._train, self._validate, self._predict = train, validate, predict
        self._answered: set[str] = set()
        self._inflight: set[asyncio.Task[None]] = set()

    @property
    def roles(self) -> tuple[ClientRole, ...]:
        roles = [ClientRole.TRAINER] if self._train is not None else []
        if self._validate is not None or self._predict is not None:
            roles.append(ClientRole.VALIDATOR)
        return tuple(roles)

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat and answer assignments until ``stop`` is set; work already started is finished.

        The first heartbeat goes out only once the events topic is read from its end, so
        no assignment made after the coordinator first sees this client can be missed.
        """
        producer = make_producer(self.settings)
        events = make_consumer(self.settings)
        # tensors carry a sha256 over the whole stream, so the per-batch CRC pass is redundant
        tensors = make_consumer(self.settings, check_crcs=False)
        await producer.start()
        await events.start()
        await tensors.start()
        try:
            await read_from_end(events, self.topics.events)
            reader = TensorReader(tensors, self.topics.tensors)
            fetching = asyncio.Lock()  # the reader's consumer reads one blob at a time
            beats = asyncio.create_task(self._heartbeat(producer, stop))
            try:
                while not stop.is_set():
                    if beats.done():
                        beats.result()  # a heartbeat that failed must not leave the client silently unseen
                    batch = await events.getmany(timeout_ms=POLL_MS)
                    for records in batch.values():
                        for record in records:
                            if (job := self._assignment(record)) is not None:
                                self._answered.add(job.event_id)
                                self._spawn(self._answer(producer, reader, fetching, job))
            finally:
                beats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beats
                await asyncio.gather(*self._inflight)
        finally:
            await tensors.stop()
            await events.stop()
            await producer.stop()

    def _assignment(self, record: ConsumerRecord[bytes, bytes]) -> ClientsAssigned | None:
        """A new assignment of this client in ``record``, or None.

        It is read before any fold judged it, so it may be forged: one whose signature does not
        hold is dropped where events are signed, and every answer states the sha256 of the model
        it was computed on, so an answer to a forged assignment is refused (``wrong_model``).
        Assignments are told apart by event id, not round: a forged one answered first does not
        keep the round's own from being answered.
        """
        value = record.value or b""
        event = decode(value)
        if not (isinstance(event, ClientsAssigned) and self.client_id in event.client_ids):
            return None
        if event.event_id in self._answered:  # a re-emitted assignment
            return None
        if self.settings.auth and seal_problem(seal_of(record.headers, value)) is not None:
            log.warning(
                "%s: ignoring an assignment of round %s with no valid signature",
                self.client_id,
                event.round_id,
            )
            return None
        return event

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _heartbeat(self, producer: Producer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            beat = ClientHeartbeat(
                event_id=str(uuid.uuid4()),
                occurred_at=utc_now(),
                client_id=self.client_id,
                roles=self.roles,
                labels=self.labels,
            )
            await publish(producer, self.topics, [beat])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.heartbeat_every)

    async def _answer(
        self, producer: Producer, reader: TensorReader, fetching: asyncio.Lock, job: ClientsAssigned
    ) -> None:
        """Fetch the round's model, run the user's function for its task and submit the result."""
        try:
            if self._function_for(job.task) is None:
                log.warning("%s: no function for %s round %s", self.client_id, job.task, job.round_id)
                return
            async with fetching:
                model = await reader.arrays(job.model)
            event = await self._result(producer, job, model)
            await publish(producer, self.topics, [event])
            log.info("%s: answered %s round %s", self.client_id, job.task, job.round_id)
        except Exception:
            log.exception("%s: %s round %s failed", self.client_id, job.task, job.round_id)

    def _function_for(self, task: Task) -> Callable[..., Any] | None:
        functions = {
            Task.TRAINING: self._train,
            Task.VALIDATION: self._validate,
            Task.INFERENCE: self._predict,
        }
        return functions[task]

    async def _result(self, producer: Producer, job: ClientsAssigned, model: NamedArrays) -> Event:
        """The answer to ``job``, stating the sha256 of the model it was computed on (the reader
        checked the bytes against it), so an answer to a forged assignment cannot pass for one to
        the round's own."""
        ids: dict[str, Any] = {
            "event_id": answer_event_id(job.round_id, self.client_id, job.task),
            "session_id": job.session_id,
            "round_id": job.round_id,
            "client_id": self.client_id,
        }
        if job.task == Task.TRAINING:
            assert self._train is not None
            arrays, num_examples, metrics = await asyncio.to_thread(self._train, model, job.config)
            if self.delay > 0:
                await asyncio.sleep(self.delay)
            update_id = update_id_for(job.round_id, self.client_id)
            ref = await write_tensors(producer, self.topics.tensors, update_id, arrays)
            return UpdateReceived(
                **ids,
                occurred_at=utc_now(),
                update_id=update_id,
                num_examples=int(num_examples),
                metrics=_floats(metrics),
                tensor=ref,
                base_model_sha256=job.model.sha256,
            )
        if job.task == Task.VALIDATION:
            assert self._validate is not None
            num_examples, metrics = await asyncio.to_thread(self._validate, model, job.config)
            return ValidationReceived(
                **ids,
                occurred_at=utc_now(),
                model_id=job.model_id,
                num_examples=int(num_examples),
                metrics=_floats(metrics),
                model_sha256=job.model.sha256,
            )
        assert self._predict is not None
        summary, metrics = await asyncio.to_thread(self._predict, model, job.config)
        return PredictionReceived(
            **ids,
            occurred_at=utc_now(),
            model_id=job.model_id,
            summary=summary,
            metrics=_floats(metrics),
            model_sha256=job.model.sha256,
        )


def _floats(metrics: Metrics) -> dict[str, float]:
    """Metrics as plain floats: numpy scalars such as float32 are not Avro doubles."""
    return {str(name): float(value) for name, value in metrics.items()}


# --- producer helpers for any service --------------------------------------------------------------


async def import_model(
    producer: Producer, topics: Topics, arrays: NamedArrays, name: str = ""
) -> tuple[str, TensorRef]:
    """Store a model's chunks and announce it; the id derives from its bytes, so re-importing is a no-op."""
    model_id = derived_id("model", sha256_of(arrays))
    ref = await write_tensors(producer, topics.tensors, model_id, arrays)
    imported = ModelImported(
        event_id=derived_id(model_id, "imported"),
        occurred_at=utc_now(),
        model_id=model_id,
        name=name,
        tensor=ref,
    )
    await publish(producer, topics, [imported])
    return model_id, ref


async def start_session(
    producer: Producer,
    topics: Topics,
    *,
    model_id: str,
    model: TensorRef,
    rounds: int,
    config: RoundConfig,
    validate_each_round: bool = False,
    stop_on_failure: bool = True,
    name: str = "",
) -> str:
    """Start a session of ``rounds`` training rounds on a stored model; returns the new session id.

    A session the fold would refuse raises ``ValueError`` here instead of vanishing in the log.
    """
    session_id = str(uuid.uuid4())
    started = SessionStarted(
        event_id=derived_id(session_id, "started"),
        occurred_at=utc_now(),
        session_id=session_id,
        name=name,
        rounds=rounds,
        initial_model_id=model_id,
        initial_model=model,
        round_config=config,
        validate_each_round=validate_each_round,
        stop_on_failure=stop_on_failure,
    )
    _refuse_malformed(started)
    await publish(producer, topics, [started])
    return session_id


async def request_round(
    producer: Producer,
    topics: Topics,
    *,
    session_id: str,
    round_no: int,
    task: Task,
    model_id: str,
    config: RoundConfig,
) -> str:
    """Ask a running session for a round on one of its models; returns the round id.

    The ids are the ones the coordinator derives for the same round, so asking twice, or
    asking for a round the session's plan also asks for, is one request.
    """
    requested = round_request(session_id, round_no, task, model_id, config, utc_now())
    _refuse_malformed(requested)
    await publish(producer, topics, [requested])
    return requested.round_id


async def register_key(
    producer: Producer,
    topics: Topics,
    key_id: str,
    roles: tuple[KeyRole, ...],
    client_id: str = "",
    name: str = "",
) -> int:
    """Let a key sign in ``roles`` (as ``client_id``, for a client key), from now on in every
    partition. ``producer`` must sign with the operator key. Returns the partitions written."""
    registered = KeyRegistered(
        event_id=str(uuid.uuid4()),
        occurred_at=utc_now(),
        key_id=key_id,
        roles=roles,
        client_id=client_id,
        name=name,
    )
    _refuse_malformed(registered)
    return await publish_everywhere(producer, topics, registered)


async def revoke_key(producer: Producer, topics: Topics, key_id: str, reason: str = "") -> int:
    """Withdraw a key: its events after this point of each partition are refused."""
    revoked = KeyRevoked(event_id=str(uuid.uuid4()), occurred_at=utc_now(), key_id=key_id, reason=reason)
    _refuse_malformed(revoked)
    return await publish_everywhere(producer, topics, revoked)


@dataclass(frozen=True)
class SignedDeployment:
    """Settings for each party of a deployment whose events are signed: the operator, the roles
    (one key for coordinator and aggregator), and each client (its own key)."""

    operator: Settings
    roles: Settings
    clients: Mapping[str, Settings]


async def provision_keys(settings: Settings, folder: Path, client_ids: Sequence[str]) -> SignedDeployment:
    """Create an operator key, a roles key and a key per client in ``folder``, register them in the
    log, and switch signing on: a whole signed deployment, e.g. for the demo or a test."""
    operator_file = folder / "operator.pem"
    signed = dataclasses.replace(settings, auth=True, operator_key=create_key_file(operator_file))
    operator = dataclasses.replace(signed, key_file=str(operator_file))
    roles = dataclasses.replace(signed, key_file=str(folder / "roles.pem"))
    clients = {
        c: dataclasses.replace(signed, key_file=str(folder / f"client-{n}.pem"))
        for n, c in enumerate(client_ids)
    }
    producer = make_producer(operator)
    await producer.start()
    try:
        topics = Topics.from_prefix(settings.topic_prefix)
        roles_key = create_key_file(Path(str(roles.key_file)))
        await register_key(
            producer, topics, roles_key, (KeyRole.COORDINATOR, KeyRole.AGGREGATOR), name="roles"
        )
        for client_id, client in clients.items():
            key_id = create_key_file(Path(str(client.key_file)))
            await register_key(
                producer, topics, key_id, (KeyRole.CLIENT,), client_id=client_id, name=client_id
            )
    finally:
        await producer.stop()
    return SignedDeployment(operator, roles, clients)


def _refuse_malformed(event: Event) -> None:
    """An event the fold would refuse raises ``ValueError`` here instead of vanishing in the log."""
    refusal = event_problem(event)
    if refusal is not None:
        raise ValueError(refusal.detail)
