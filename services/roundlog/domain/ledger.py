"""The whole log folded: every open session and the clients' last heartbeats.

This is the one fold every role runs. It is total: any event, in any order,
duplicates and nonsense included, yields a well-defined ledger and an Outcome.

A session leaves the ledger when it finishes (only its id stays), so memory follows
the open sessions and a role can restart its fold at the first event of the oldest
open session, its replay point. A fold restarted there agrees with one from offset 0
on every event but a SessionStarted re-sent after its session finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from roundlog.domain.events import (
    ClientHeartbeat,
    ClientRole,
    Event,
    ModelImported,
    SessionFinished,
    SessionStarted,
)
from roundlog.domain.rules import Reason, Refusal
from roundlog.domain.session import Outcome, Session, SessionState, config_problem


@dataclass
class Ledger:
    sessions: dict[str, Session] = field(default_factory=dict)
    heartbeats: dict[str, ClientHeartbeat] = field(default_factory=dict)
    #: ids of finished sessions, so a stray SessionStarted cannot start one again
    finished: set[str] = field(default_factory=set)

    def apply(self, event: Event) -> Outcome:
        if isinstance(event, ClientHeartbeat):
            return self._heartbeat(event)
        if isinstance(event, ModelImported):
            return Outcome()
        session = self.sessions.get(event.session_id)
        if session is not None:
            outcome = session.apply(event)
            if isinstance(event, SessionFinished) and outcome.applied:
                del self.sessions[event.session_id]
                self.finished.add(event.session_id)
            return outcome
        if event.session_id in self.finished:
            return Outcome(Refusal(Reason.SESSION_FINISHED, f"session {event.session_id} has finished"))
        if isinstance(event, SessionStarted):
            return self._start(event)
        return Outcome(Refusal(Reason.UNKNOWN_SESSION, f"session {event.session_id} is not running"))

    def _start(self, event: SessionStarted) -> Outcome:
        if event.rounds < 1:
            return Outcome(Refusal(Reason.INVALID_CONFIG, f"rounds must be >= 1, got {event.rounds}"))
        problem = config_problem(event.round_config)
        if problem is not None:
            return Outcome(Refusal(Reason.INVALID_CONFIG, problem))
        self.sessions[event.session_id] = Session.start(event)
        return Outcome(before=None, after=SessionState.RUNNING)

    def _heartbeat(self, event: ClientHeartbeat) -> Outcome:
        last = self.heartbeats.get(event.client_id)
        if last is not None and last.occurred_at > event.occurred_at:
            return Outcome(
                Refusal(
                    Reason.STALE,
                    f"heartbeat older than the last one of {event.client_id}",
                )
            )
        self.heartbeats[event.client_id] = event
        return Outcome()

    def live_clients(self, now: datetime, ttl: timedelta, role: ClientRole) -> list[str]:
        """Clients in ``role`` heard from within ``ttl`` before ``now``, sorted: sampling is reproducible."""
        return sorted(
            client_id
            for client_id, beat in self.heartbeats.items()
            if role in beat.roles and now - beat.occurred_at <= ttl
        )
