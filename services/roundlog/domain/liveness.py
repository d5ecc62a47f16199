"""Which clients are live: heartbeats timed by a clock the clients do not control.

A client's heartbeat says when it was sent (``occurred_at``), but a claimed time must
never decide: a heartbeat dated in the future would keep a client live forever and make
its real heartbeats look stale. Liveness is therefore kept on the time the log or the
coordinator gave each heartbeat (``heard_at``), and a later heartbeat always counts.

Where events are signed, heartbeats are kept per signing key: whether a key may speak for
a client is the registry's answer at the moment of sampling (``admits``), and a heartbeat
signed by some other key must not displace the client's own.

Silence from every client at once is read as a stall of the clients topic (a broker paused
or failing over holds every heartbeat back), not as a fleet that died together: ``stalled``
lets the coordinator wait for the stream to speak again rather than fail rounds for want of
clients it cannot hear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from roundlog.domain.events import ClientHeartbeat, ClientRole


@dataclass(frozen=True)
class Heard:
    roles: tuple[ClientRole, ...]
    at: datetime


@dataclass
class Liveness:
    #: (client id, the key that signed its heartbeat, "" unsigned) -> its last heartbeat
    last_heard: dict[tuple[str, str], Heard] = field(default_factory=dict)

    def heard(self, beat: ClientHeartbeat, at: datetime, key_id: str = "") -> None:
        """Note a heartbeat received at ``at`` (a trusted time); an older one changes nothing."""
        last = self.last_heard.get((beat.client_id, key_id))
        if last is None or at >= last.at:
            self.last_heard[(beat.client_id, key_id)] = Heard(beat.roles, at)

    def live(
        self,
        now: datetime,
        ttl: timedelta,
        role: ClientRole,
        admits: Callable[[str, str], bool] | None = None,
    ) -> list[str]:
        """Clients in ``role`` heard within ``ttl`` before ``now``, sorted: sampling is reproducible.

        One heard after ``now`` is live too: the coordinator keeps hearing heartbeats while it
        decides with a ``now`` taken a moment before (``at`` is a trusted time, never a claim).
        ``admits(key_id, client_id)`` says whether a key may speak for a client (None: any may).
        """
        return sorted(
            {
                client_id
                for (client_id, key_id), heard in self.last_heard.items()
                if role in heard.roles
                and now - heard.at <= ttl
                and (admits is None or admits(key_id, client_id))
            }
        )

    def stalled(self, now: datetime, ttl: timedelta, patience: timedelta) -> bool:
        """Whether no client at all has been heard for longer than ``ttl`` but not yet ``ttl +
        patience``: clients were heard before, so the stream went quiet rather than never spoke."""
        if not self.last_heard:
            return False
        silence = now - max(heard.at for heard in self.last_heard.values())
        return ttl < silence <= ttl + patience
