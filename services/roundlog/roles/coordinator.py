"""The coordinator role: it brings time and the outside world into the log.

After each batch it looks at every open session's state and emits what that state
calls for: stage the model of a requested round, assign live clients to a staged one,
time out a collecting one whose deadline passed, request the next round or finish the
session (``decide.follow_up``). Reacting to state rather than to single events makes a
restart trivial: re-fold the log from the replay point, look at the states, act.
Emitted events have deterministic ids, so an action repeated after a crash is ignored
by every fold.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from datetime import datetime, timedelta

from aiokafka import TopicPartition

from roundlog.arrays import StreamError
from roundlog.bus import Consumer, make_consumer
from roundlog.clock import utc_now
from roundlog.config import Settings
from roundlog.domain.authority import seal_problem
from roundlog.domain.decide import follow_up
from roundlog.domain.events import (
    ClientHeartbeat,
    ClientRole,
    ClientsAssigned,
    Event,
    ModelStaged,
    RoundFailed,
    RoundTimedOut,
    Task,
    derived_id,
)
from roundlog.domain.liveness import Liveness
from roundlog.domain.round import Round, RoundState
from roundlog.domain.session import Outcome, Session
from roundlog.domain.validation import event_problem
from roundlog.roles.base import FoldingRole
from roundlog.roles.stream import Entry, PartitionFold, read_range
from roundlog.tensors import TensorReader

log = logging.getLogger("roundlog.coordinator")

#: How long after its last heartbeat a client still counts as live.
DEFAULT_CLIENT_TTL = timedelta(seconds=10)


def _heard_at(entry: Entry) -> datetime:
    """When a heartbeat was heard: the log's time, never later than now, so a producer-set record
    timestamp (on brokers that do not append log time) cannot keep a client live for ever."""
    now = utc_now()
    return now if entry.logged_at is None else min(entry.logged_at, now)


def _ms(moment: datetime) -> datetime:
    """Events carry millisecond times; computed ones are cut to fit."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


class CoordinatorRole(FoldingRole):
    role = "coordinator"

    def __init__(self, settings: Settings, client_ttl: timedelta = DEFAULT_CLIENT_TTL) -> None:
        super().__init__(settings)
        self.client_ttl = client_ttl
        self.heartbeat_consumer: Consumer = make_consumer(settings)
        self.clients = Liveness()
        self.hearing: asyncio.Task[None] | None = None
        #: ids this process has emitted and not yet seen back, so it does not emit them twice
        self.emitted: set[str] = set()
        #: rounds already told to wait for a silent clients topic (logged once each)
        self.waiting_for_heartbeats: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        await self.heartbeat_consumer.start()
        try:
            # Every client's last heartbeat is known before any round is assigned: a coordinator
            # that started (or restarted) a moment ago must not fail a round for too few clients.
            ends = await self._hear_until_now()
            self.hearing = asyncio.create_task(self._follow_heartbeats(ends))
            try:
                await super().run(stop)
            finally:
                self.hearing.cancel()
                await asyncio.gather(self.hearing, return_exceptions=True)  # its consumer stops next
        finally:
            await self.heartbeat_consumer.stop()

    async def apply(self, fold: PartitionFold, entry: Entry, event: Event) -> Outcome:
        self.emitted.discard(event.event_id)
        return fold.apply(entry.offset, event, entry.logged_at, entry.seal)

    async def after_batch(self) -> None:
        if self.hearing is not None and self.hearing.done():
            self.hearing.result()  # it only ends by failing: deaf, every client would look absent
            raise RuntimeError("the heartbeat follower stopped")
        await self._act()

    async def _hear_until_now(self) -> dict[TopicPartition, int]:
        """Read the clients topic (compacted: every client's last heartbeat) up to its end as of now."""
        tps = await self.heartbeat_consumer.topic_partitions(self.topics.clients)
        ends = await self.heartbeat_consumer.end_offsets(tps)
        for tp, end in ends.items():
            async for entry in read_range(self.heartbeat_consumer, tp.topic, tp.partition, 0, end):
                self._hear(entry)
        return ends

    async def _follow_heartbeats(self, ends: dict[TopicPartition, int]) -> None:
        """Keep hearing heartbeats from where ``_hear_until_now`` stopped, until cancelled."""
        self.heartbeat_consumer.assign(list(ends))
        for tp, end in ends.items():
            self.heartbeat_consumer.seek(tp, end)
        while True:
            for records in (await self.heartbeat_consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    self._hear(Entry.of(record))

    def _hear(self, entry: Entry) -> None:
        beat = entry.decoded
        if not isinstance(beat, ClientHeartbeat) or event_problem(beat, entry.logged_at):
            return
        if self.settings.auth and seal_problem(entry.seal) is not None:
            return  # whether its key may speak for the client is asked at sampling, per partition
        self.clients.heard(beat, _heard_at(entry), entry.seal.key_id if entry.seal else "")

    # --- what each state calls for ----------------------------------------------------------------

    async def _act(self) -> None:
        now = utc_now()
        for fold in list(self.folds.values()):
            for session in list(fold.ledger.sessions.values()):
                actions: list[Event] = []
                for round_ in session.rounds_in_order():
                    action = await self._round_action(fold, session, round_, now)
                    if action is not None:
                        actions.append(action)
                if (next_step := follow_up(session)) is not None:
                    actions.append(next_step)
                await self._emit([a for a in actions if a.event_id not in self.emitted])

    async def _emit(self, events: list[Event]) -> None:
        if events:
            await self.emit(events)
            self.emitted.update(e.event_id for e in events)

    async def _round_action(
        self, fold: PartitionFold, session: Session, round_: Round, now: datetime
    ) -> Event | None:
        ids = {"session_id": session.session_id, "round_id": round_.round_id}
        if round_.state in (RoundState.REQUESTED, RoundState.STAGED) and self._answered(round_):
            return None
        if round_.state == RoundState.REQUESTED:
            return await self._stage(session, round_, now)
        if round_.state == RoundState.STAGED:
            return self._assign(fold, session, round_, now)
        if round_.state == RoundState.COLLECTING and round_.deadline is not None and now >= round_.deadline:
            return RoundTimedOut(
                event_id=derived_id(round_.round_id, "timed-out"),
                occurred_at=now,
                deadline=round_.deadline,
                **ids,
            )
        return None

    def _answered(self, round_: Round) -> bool:
        """Whether this process already emitted the step of a requested or staged round."""
        steps = ("staged", "failed") if round_.state == RoundState.REQUESTED else ("assigned", "failed")
        return any(derived_id(round_.round_id, step) in self.emitted for step in steps)

    async def _stage(self, session: Session, round_: Round, now: datetime) -> Event:
        """The base model must be one the session knows, and its bytes must hash to its sha256."""
        ids = {"session_id": session.session_id, "round_id": round_.round_id}
        ref = session.models.get(round_.base_model_id)
        if ref is None:
            detail = (
                f"model {round_.base_model_id} is neither the session's initial model nor an aggregate of it"
            )
        else:
            try:
                await TensorReader(self.reader_consumer, self.topics.tensors).arrays(ref)
            except StreamError as error:
                detail = f"model {round_.base_model_id} is unreadable: {error}"
            else:
                return ModelStaged(
                    event_id=derived_id(round_.round_id, "staged"),
                    occurred_at=now,
                    model_id=round_.base_model_id,
                    sha256=ref.sha256,
                    nbytes=ref.nbytes,
                    **ids,
                )
        return RoundFailed(
            event_id=derived_id(round_.round_id, "failed"),
            occurred_at=now,
            reason="model_missing",
            detail=detail,
            **ids,
        )

    def _assign(self, fold: PartitionFold, session: Session, round_: Round, now: datetime) -> Event | None:
        """Sample up to max_clients live clients of the round's role, or fail the round for too few,
        unless every client fell silent at once: then wait, up to the round's timeout, for the
        clients topic to speak again. Where events are signed, a client counts only if its
        heartbeat's key may speak for it here."""
        ids = {"session_id": session.session_id, "round_id": round_.round_id}
        role = ClientRole.TRAINER if round_.task == Task.TRAINING else ClientRole.VALIDATOR
        authority = fold.ledger.authority
        live = self.clients.live(now, self.client_ttl, role, authority.speaks_for if authority else None)
        config = round_.config
        if len(live) < max(1, config.clients_required):
            if self.clients.stalled(now, self.client_ttl, timedelta(seconds=config.round_timeout)):
                if round_.round_id not in self.waiting_for_heartbeats:
                    self.waiting_for_heartbeats.add(round_.round_id)
                    log.warning(
                        "no client heard for %s: round %s waits for heartbeats",
                        self.client_ttl,
                        round_.round_id,
                    )
                return None
            return RoundFailed(
                event_id=derived_id(round_.round_id, "failed"),
                occurred_at=now,
                reason="too_few_clients",
                detail=f"{len(live)} live {role}s, {config.clients_required} required",
                **ids,
            )
        wanted = len(live) if config.max_clients < 0 else min(config.max_clients, len(live))
        chosen = tuple(sorted(random.Random(round_.round_id).sample(live, wanted)))
        model = session.models[round_.base_model_id]
        return ClientsAssigned(
            event_id=derived_id(round_.round_id, "assigned"),
            occurred_at=now,
            client_ids=chosen,
            deadline=_ms(now + timedelta(seconds=config.round_timeout)),
            task=round_.task,
            model_id=round_.base_model_id,
            model=model,
            config=config,
            **ids,
        )


async def run(settings: Settings, stop: asyncio.Event) -> None:
    ttl = timedelta(
        seconds=float(os.environ.get("ROUNDLOG_CLIENT_TTL_S", DEFAULT_CLIENT_TTL.total_seconds()))
    )
    await CoordinatorRole(settings, ttl).run(stop)
