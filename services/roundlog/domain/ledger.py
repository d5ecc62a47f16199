"""The whole log folded: every open session.

This is the one fold every role runs. It is total: any event, in any order,
duplicates and nonsense included, yields a well-defined ledger and an Outcome. A
malformed event (a field out of bounds, see ``validation``) is refused before it
reaches a session, so no role ever computes with it.

A session leaves the ledger when it finishes (only its id stays), so memory follows
the open sessions and a role can restart its fold at the first event of the oldest
open session, its replay point. A fold restarted there agrees with one from offset 0
on every event but a SessionStarted re-sent after its session finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from roundlog.domain.events import (
    ClientHeartbeat,
    Event,
    ModelImported,
    SessionFinished,
    SessionStarted,
)
from roundlog.domain.rules import Reason, Refusal
from roundlog.domain.session import Outcome, Session, SessionState
from roundlog.domain.validation import event_problem


@dataclass
class Ledger:
    sessions: dict[str, Session] = field(default_factory=dict)
    #: ids of finished sessions, so a stray SessionStarted cannot start one again
    finished: set[str] = field(default_factory=set)

    def apply(self, event: Event, logged_at: datetime | None = None) -> Outcome:
        """Fold one event; ``logged_at`` is the log's time for its record (see ``event_problem``)."""
        refusal = event_problem(event, logged_at)
        if refusal is not None:
            return Outcome(refusal)
        if isinstance(event, ClientHeartbeat | ModelImported):
            return Outcome()  # liveness is the coordinator's (see ``liveness``), models are in tensors
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
        self.sessions[event.session_id] = Session.start(event)
        return Outcome(before=None, after=SessionState.RUNNING)
