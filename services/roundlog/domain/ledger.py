"""The whole log folded: every open session.

This is the one fold every role runs. It is total: any event, in any order,
duplicates and nonsense included, yields a well-defined ledger and an Outcome. A
malformed event (a field out of bounds, see ``validation``) is refused before it
reaches a session, so no role ever computes with it.

When the deployment signs its events, an ``Authority`` checks each record's seal and folds
the key registry before anything else looks at the event (see ``authority``).

A session leaves the ledger when it finishes (only its id stays), so memory follows
the open sessions and a role can restart its fold at the first event of the oldest
open session, its replay point. A fold restarted there agrees with one from offset 0
on every event but a SessionStarted re-sent after its session finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from roundlog.domain.authority import Authority, Seal
from roundlog.domain.events import (
    ClientHeartbeat,
    Event,
    KeyRegistered,
    KeyRevoked,
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
    #: the signature rule and key registry; None where the deployment does not sign (nothing checked)
    authority: Authority | None = None

    def apply(self, event: Event, logged_at: datetime | None = None, seal: Seal | None = None) -> Outcome:
        """Fold one event; ``logged_at`` is the log's time for its record (see ``event_problem``),
        ``seal`` its claimed author (see ``authority``)."""
        if self.authority is not None and (refusal := self.authority.check(event, seal)) is not None:
            return Outcome(refusal)
        refusal = event_problem(event, logged_at)
        if refusal is not None:
            return Outcome(refusal)
        if isinstance(event, KeyRegistered | KeyRevoked):
            return self._registry(event)
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

    def _registry(self, event: KeyRegistered | KeyRevoked) -> Outcome:
        if self.authority is None:
            return Outcome()  # unsigned deployments keep the registry as a record only
        if isinstance(event, KeyRegistered):
            return Outcome(self.authority.register(event))
        return Outcome(self.authority.revoke(event))

    def _start(self, event: SessionStarted) -> Outcome:
        self.sessions[event.session_id] = Session.start(event)
        return Outcome(before=None, after=SessionState.RUNNING)
