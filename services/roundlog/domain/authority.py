"""Who may say what: signatures checked, and the key registry folded at its log position.

Every record of a signed deployment carries, in its headers, the Ed25519 public key that
signed it (its key id, 64 hex digits) and a signature over ``SIGNING_CONTEXT``, the key id and
the exact record value. A signature is checked with the key it names, so checking needs no
registry; the registry decides whether that key may speak: it must be registered by the
operator key of the deployment (a ``KeyRegistered`` signed by it, in this same partition),
not revoked since, hold a role that produces the event's type and, for a client, be the
client the event speaks for. Registry events are folded like any other, so a key's
registration and revocation take effect at their log position, in the live fold and in
every replay alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from roundlog.domain.events import (
    ANSWER_TASKS,
    Answer,
    ClientHeartbeat,
    ClientsAssigned,
    Event,
    KeyRegistered,
    KeyRevoked,
    KeyRole,
    ModelImported,
    ModelStaged,
    PredictionReceived,
    RoundAggregated,
    RoundFailed,
    RoundRequested,
    RoundTimedOut,
    SessionFinished,
    SessionStarted,
    ShardAggregated,
    UpdateReceived,
    UpdateRejected,
    ValidationReceived,
    answer_event_id,
)
from roundlog.domain.rules import Reason, Refusal

#: Prefixed to what is signed, so a roundlog signature is never valid for anything else.
SIGNING_CONTEXT = b"roundlog.v1 event\n"
KEY_ID_HEX = 64
#: The record headers that carry the key id (ASCII hex) and the raw 64-byte signature.
KEY_HEADER, SIGNATURE_HEADER = "roundlog-key", "roundlog-signature"


#: The roles that may produce each event type. Registry events are the operator key's alone.
PRODUCERS: dict[type[Event], frozenset[KeyRole]] = {
    ModelImported: frozenset({KeyRole.OPERATOR}),
    SessionStarted: frozenset({KeyRole.OPERATOR}),
    RoundRequested: frozenset({KeyRole.OPERATOR, KeyRole.COORDINATOR}),
    ModelStaged: frozenset({KeyRole.COORDINATOR}),
    ClientsAssigned: frozenset({KeyRole.COORDINATOR}),
    UpdateReceived: frozenset({KeyRole.CLIENT}),
    UpdateRejected: frozenset({KeyRole.AGGREGATOR}),
    ValidationReceived: frozenset({KeyRole.CLIENT}),
    PredictionReceived: frozenset({KeyRole.CLIENT}),
    RoundTimedOut: frozenset({KeyRole.COORDINATOR}),
    RoundAggregated: frozenset({KeyRole.AGGREGATOR}),
    ShardAggregated: frozenset({KeyRole.AGGREGATOR}),
    RoundFailed: frozenset({KeyRole.COORDINATOR, KeyRole.AGGREGATOR}),
    SessionFinished: frozenset({KeyRole.COORDINATOR}),
    ClientHeartbeat: frozenset({KeyRole.CLIENT}),
}
#: Events a client key may produce only for the client it was registered as.
CLIENT_EVENTS = (UpdateReceived, ValidationReceived, PredictionReceived, ClientHeartbeat)


def _own_id_problem(event: Event) -> Refusal | None:
    """Event ids are derived, so anyone can predict the id of an event still to come, and the first
    event the fold applies under an id reserves it. A client, the least trusted signer, may therefore
    use no id but its answer's own: not another client's answer's, nor an aggregate's or an
    assignment's. Its heartbeats belong on the clients topic, where no fold reserves ids."""
    if isinstance(event, ClientHeartbeat):
        return Refusal(
            Reason.NOT_PERMITTED, "a client key's heartbeats go on the clients topic, not the events topic"
        )
    if not isinstance(event, Answer):
        return None
    task = ANSWER_TASKS[type(event)]
    expected = answer_event_id(event.round_id, event.client_id, task)
    if event.event_id != expected:
        return Refusal(
            Reason.NOT_PERMITTED,
            f"a client's {task.value} answer to round {event.round_id} has event id {expected}, "
            f"not {event.event_id}",
        )
    return None


@dataclass(frozen=True)
class Seal:
    """A record's claimed author, as its headers say: the key and its signature over ``value``."""

    key_id: str
    signature: bytes
    value: bytes


def signed_message(key_id: str, value: bytes) -> bytes:
    """The bytes an author signs for a record whose value is ``value``."""
    return SIGNING_CONTEXT + key_id.encode("ascii") + b"\n" + value


def seal_problem(seal: Seal | None) -> Refusal | None:
    """Why a record's signature does not hold, or None. Needs no registry: the key id is the key."""
    if seal is None:
        return Refusal(Reason.UNSIGNED, "no roundlog-key and roundlog-signature headers")
    try:
        public_key = Ed25519PublicKey.from_public_bytes(_key_bytes(seal.key_id))
        public_key.verify(seal.signature, signed_message(seal.key_id, seal.value))
    except (ValueError, InvalidSignature):
        shown = seal.key_id[:KEY_ID_HEX]
        return Refusal(Reason.BAD_SIGNATURE, f"the signature does not verify with key {shown!r}")
    return None


def _key_bytes(key_id: str) -> bytes:
    if len(key_id) != KEY_ID_HEX:
        raise ValueError(f"a key id is {KEY_ID_HEX} hex digits")
    return bytes.fromhex(key_id)


@dataclass(frozen=True)
class RegisteredKey:
    roles: frozenset[KeyRole]
    client_id: str
    revoked: bool = False


@dataclass
class Authority:
    """The registry of one partition as folded so far, under the deployment's operator key."""

    operator_key: str
    keys: dict[str, RegisteredKey] = field(default_factory=dict)

    def check(self, event: Event, seal: Seal | None) -> Refusal | None:
        """Why ``event`` may not enter the fold under this seal, or None."""
        if (problem := seal_problem(seal)) is not None:
            return problem
        assert seal is not None
        if isinstance(event, KeyRegistered | KeyRevoked) or seal.key_id == self.operator_key:
            if seal.key_id != self.operator_key:
                return Refusal(Reason.NOT_PERMITTED, "only the operator key may register or revoke keys")
            return self._permitted(event, frozenset({KeyRole.OPERATOR}), "the operator key")
        key = self.keys.get(seal.key_id)
        if key is None:
            return Refusal(Reason.UNKNOWN_KEY, f"key {seal.key_id} is not registered")
        if key.revoked:
            return Refusal(Reason.REVOKED_KEY, f"key {seal.key_id} was revoked")
        if (refusal := self._permitted(event, key.roles, f"key {seal.key_id}")) is not None:
            return refusal
        if isinstance(event, CLIENT_EVENTS) and event.client_id != key.client_id:
            return Refusal(
                Reason.NOT_PERMITTED,
                f"key {seal.key_id} speaks for client {key.client_id!r}, not {event.client_id!r}",
            )
        return _own_id_problem(event)

    @staticmethod
    def _permitted(event: Event, roles: frozenset[KeyRole], who: str) -> Refusal | None:
        if isinstance(event, KeyRegistered | KeyRevoked) or roles & PRODUCERS[type(event)]:
            return None
        wanted = ", ".join(sorted(PRODUCERS[type(event)]))
        return Refusal(
            Reason.NOT_PERMITTED,
            f"{who} holds {', '.join(sorted(roles)) or 'no role'}; {type(event).__name__} needs {wanted}",
        )

    def register(self, event: KeyRegistered) -> Refusal | None:
        """Add or re-role a key; a revoked key stays revoked (a new key is the way back)."""
        known = self.keys.get(event.key_id)
        if known is not None and known.revoked:
            return Refusal(
                Reason.REVOKED_KEY, f"key {event.key_id} was revoked and cannot be registered again"
            )
        self.keys[event.key_id] = RegisteredKey(frozenset(event.roles), event.client_id)
        return None

    def revoke(self, event: KeyRevoked) -> Refusal | None:
        """Withdraw a key; revoking it again restates the revocation (``roundlog keys refresh``)."""
        known = self.keys.get(event.key_id)
        if known is None:
            return Refusal(Reason.UNKNOWN_KEY, f"key {event.key_id} is not registered")
        self.keys[event.key_id] = RegisteredKey(known.roles, known.client_id, revoked=True)
        return None

    def speaks_for(self, key_id: str, client_id: str) -> bool:
        """Whether a heartbeat signed by ``key_id`` (its signature checked) may stand for ``client_id``."""
        key = self.keys.get(key_id)
        return (
            key is not None and not key.revoked and KeyRole.CLIENT in key.roles and key.client_id == client_id
        )
