"""Which clients are live: heartbeats timed by a clock the clients do not control.

A client's heartbeat says when it was sent (``occurred_at``), but a claimed time must
never decide: a heartbeat dated in the future would keep a client live forever and make
its real heartbeats look stale. Liveness is therefore kept on the time the log or the
coordinator gave each heartbeat (``heard_at``), and a later heartbeat always counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from roundlog.domain.events import ClientHeartbeat, ClientRole


@dataclass(frozen=True)
class Heard:
    roles: tuple[ClientRole, ...]
    at: datetime


@dataclass
class Liveness:
    last_heard: dict[str, Heard] = field(default_factory=dict)

    def heard(self, beat: ClientHeartbeat, at: datetime) -> None:
        """Note a heartbeat received at ``at`` (a trusted time); an older one changes nothing."""
        last = self.last_heard.get(beat.client_id)
        if last is None or at >= last.at:
            self.last_heard[beat.client_id] = Heard(beat.roles, at)

    def live(self, now: datetime, ttl: timedelta, role: ClientRole) -> list[str]:
        """Clients in ``role`` heard within ``ttl`` before ``now``, sorted: sampling is reproducible.

        One heard after ``now`` is live too: the coordinator keeps hearing heartbeats while it
        decides with a ``now`` taken a moment before (``at`` is a trusted time, never a claim).
        """
        return sorted(
            client_id
            for client_id, heard in self.last_heard.items()
            if role in heard.roles and now - heard.at <= ttl
        )
