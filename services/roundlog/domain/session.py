"""The session machine: a session of N training rounds, chained on each other's models.

A session owns its rounds. Session events go through ``SESSION_RULES``; round events
are routed to their round's machine. Either way ``Session.apply`` returns an
``Outcome`` that says what changed or why nothing did.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from roundlog.domain.events import (
    RoundAggregated,
    RoundEvent,
    RoundRequested,
    SessionEvent,
    SessionFinished,
    SessionStarted,
    Task,
    TensorRef,
)
from roundlog.domain.round import ROUND_TABLE, Round, RoundState
from roundlog.domain.rules import Branch, Reason, Refusal, Rule, fire, index
from roundlog.domain.validation import config_problem


class SessionState(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    """What one event did: the state it moved (round or session), or why it was refused."""

    refusal: Refusal | None = None
    round_id: str | None = None
    before: str | None = None
    after: str | None = None

    @property
    def applied(self) -> bool:
        return self.refusal is None

    @property
    def changed_state(self) -> bool:
        return self.applied and self.before != self.after


@dataclass
class Session:
    started: SessionStarted
    state: SessionState = SessionState.RUNNING
    rounds: dict[str, Round] = field(default_factory=dict)
    #: training rounds that ended aggregated, and the model the last one produced
    rounds_done: int = 0
    latest_model_id: str = ""
    finished: SessionFinished | None = None
    #: every model this session can start a round on: its initial model and each aggregate
    models: dict[str, TensorRef] = field(default_factory=dict)
    #: the server optimizer's state after the last aggregated training round (FedOpt family)
    optimizer_state: TensorRef | None = None
    changed_at: dict[SessionState, datetime] = field(default_factory=dict)
    seen_event_ids: set[str] = field(default_factory=set)

    @classmethod
    def start(cls, event: SessionStarted) -> Session:
        return cls(
            started=event,
            latest_model_id=event.initial_model_id,
            models={event.initial_model_id: event.initial_model},
            changed_at={SessionState.RUNNING: event.occurred_at},
            seen_event_ids={event.event_id},
        )

    @property
    def session_id(self) -> str:
        return self.started.session_id

    @property
    def is_terminal(self) -> bool:
        return self.state != SessionState.RUNNING

    def apply(self, event: SessionEvent | RoundEvent) -> Outcome:
        """Fold one event of this session; a repeated event id changes nothing."""
        if event.event_id in self.seen_event_ids:
            return Outcome(
                Refusal(
                    Reason.DUPLICATE_EVENT,
                    f"event {event.event_id} was already applied",
                )
            )
        if isinstance(event, SessionStarted):
            outcome = Outcome(Refusal(Reason.ALREADY_EXISTS, f"session {self.session_id} already started"))
        elif isinstance(event, (RoundRequested, SessionFinished)):
            outcome = self._apply_session_rule(event)
        else:
            outcome = self._apply_round_event(event)
        if outcome.applied:
            self.seen_event_ids.add(event.event_id)
        return outcome

    def _apply_session_rule(self, event: RoundRequested | SessionFinished) -> Outcome:
        rule = SESSION_TABLE.get((self.state, type(event)))
        if rule is None:
            return Outcome(Refusal(Reason.ILLEGAL, f"{type(event).__name__} in a {self.state} session"))
        before = self.state
        target, refusal = fire(rule, self, event)
        if refusal is not None:
            return Outcome(refusal)
        assert target is not None
        if target != before:
            self.state = target
            self.changed_at[target] = event.occurred_at
        round_id = event.round_id if isinstance(event, RoundRequested) else None
        return Outcome(round_id=round_id, before=before, after=target)

    def _apply_round_event(self, event: RoundEvent) -> Outcome:
        round_ = self.rounds.get(event.round_id)
        if round_ is None:
            return Outcome(Refusal(Reason.UNKNOWN_ROUND, f"round {event.round_id} was never requested"))
        rule = ROUND_TABLE.get((round_.state, type(event)))
        if rule is None:
            illegal = Refusal(Reason.ILLEGAL, f"{type(event).__name__} in a {round_.state} round")
            return Outcome(illegal, round_id=round_.round_id)
        before = round_.state
        target, refusal = fire(rule, round_, event)
        if refusal is not None:
            return Outcome(refusal, round_id=round_.round_id)
        assert target is not None
        if target != before:
            round_.state = target
            round_.changed_at[target] = event.occurred_at
            if before == RoundState.COLLECTING:
                round_.closed_by = event.event_id
            if isinstance(event, RoundAggregated) and round_.task == Task.TRAINING:
                self.rounds_done += 1
                self.latest_model_id = event.model_id
                self.models[event.model_id] = event.tensor
                self.optimizer_state = event.optimizer_state
        return Outcome(round_id=round_.round_id, before=before, after=target)

    def rounds_in_order(self) -> list[Round]:
        """Rounds by number, a training round before the evaluation rounds on its model."""
        return sorted(self.rounds.values(), key=lambda r: (r.round_no, r.task != Task.TRAINING))


def _valid_round_request(s: Session, e: RoundRequested) -> Refusal | None:
    if e.round_id in s.rounds:
        return Refusal(Reason.ALREADY_EXISTS, f"round {e.round_id} was already requested")
    problem = config_problem(e.config)
    if problem is not None:
        return Refusal(Reason.INVALID_CONFIG, problem)
    return None


def _open_round(s: Session, e: RoundRequested) -> None:
    s.rounds[e.round_id] = Round.requested(e)


def _finish(s: Session, e: SessionFinished) -> None:
    s.finished = e


def _succeeded(s: Session) -> bool:
    return s.finished is not None and s.finished.succeeded


SESSION_RULES: tuple[Rule[SessionState], ...] = (
    Rule(
        SessionState.RUNNING,
        RoundRequested,
        guards=(_valid_round_request,),
        effect=_open_round,
        branches=(Branch(SessionState.RUNNING),),
    ),
    Rule(
        SessionState.RUNNING,
        SessionFinished,
        effect=_finish,
        branches=(
            Branch(SessionState.COMPLETED, _succeeded, "succeeded"),
            Branch(SessionState.FAILED),
        ),
    ),
)

SESSION_TABLE = index(SESSION_RULES)
