"""Signed events, as the fold enforces them: who may produce which event, and every way to fail.

Signatures are made here with ``cryptography`` directly over the documented message (context,
key id, newline, record value), not with roundlog's signer, so the wire rule is checked too.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from roundlog.codec import encode
from roundlog.domain.authority import Authority, Seal
from roundlog.domain.events import (
    ANSWER_TASKS,
    ClientHeartbeat,
    ClientRole,
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
    derived_id,
)
from roundlog.domain.ledger import Ledger
from roundlog.domain.liveness import Liveness
from roundlog.domain.rules import Reason
from roundlog.keys import Signer
from roundlog.roles.stream import PartitionFold, seal_of

from tests.builders import T0, Script, every_event, uid

#: The specification: what each role may sign (the registry events are the operator key's alone).
MAY_PRODUCE: dict[KeyRole, set[type[Event]]] = {
    KeyRole.OPERATOR: {ModelImported, SessionStarted, RoundRequested},
    KeyRole.COORDINATOR: {
        RoundRequested,
        ModelStaged,
        ClientsAssigned,
        RoundTimedOut,
        RoundFailed,
        SessionFinished,
    },
    KeyRole.AGGREGATOR: {RoundAggregated, ShardAggregated, UpdateRejected, RoundFailed},
    KeyRole.CLIENT: {UpdateReceived, ValidationReceived, PredictionReceived, ClientHeartbeat},
}


class Key:
    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.id = raw.hex()

    def seal(self, event: Event, claimed_id: str | None = None) -> Seal:
        """The documented signature: Ed25519 over b"roundlog.v1 event\\n" + key id + b"\\n" + value."""
        value = encode(event)
        key_id = claimed_id or self.id
        signature = self.private.sign(b"roundlog.v1 event\n" + key_id.encode() + b"\n" + value)
        return Seal(key_id, signature, value)


def registered(key: Key, *roles: KeyRole, client_id: str = "", at: int = 0) -> KeyRegistered:
    return KeyRegistered(
        event_id=f"reg-{key.id[:8]}-{at}",
        occurred_at=T0 + timedelta(milliseconds=at),
        key_id=key.id,
        roles=roles,
        client_id=client_id,
    )


def revoked(key: Key, at: int = 0) -> KeyRevoked:
    return KeyRevoked(
        event_id=f"rev-{key.id[:8]}-{at}", occurred_at=T0 + timedelta(milliseconds=at), key_id=key.id
    )


@pytest.fixture
def operator() -> Key:
    return Key()


def authority_with(operator: Key, key: Key, *roles: KeyRole, client_id: str = "") -> Authority:
    authority = Authority(operator.id)
    event = registered(key, *roles, client_id=client_id)
    assert authority.check(event, operator.seal(event)) is None
    assert authority.register(event) is None
    return authority


@pytest.mark.parametrize("role", list(KeyRole))
@pytest.mark.parametrize("event", every_event(Script(answer_ids=True)), ids=lambda e: type(e).__name__)
def test_a_role_signs_exactly_the_events_it_produces(operator: Key, role: KeyRole, event: Event) -> None:
    key = Key()
    client_id = "alice" if role == KeyRole.CLIENT else ""
    authority = authority_with(operator, key, role, client_id=client_id)
    refusal = authority.check(event, key.seal(event))
    # a client's heartbeats count on the clients topic only: the fold here reads the events topic
    if type(event) in MAY_PRODUCE[role] and not isinstance(event, ClientHeartbeat):
        assert refusal is None
    else:
        assert refusal is not None and refusal.reason == Reason.NOT_PERMITTED, refusal


@pytest.mark.parametrize("event", every_event(Script(answer_ids=True)), ids=lambda e: type(e).__name__)
def test_the_operator_key_itself_signs_what_an_operator_does(operator: Key, event: Event) -> None:
    refusal = Authority(operator.id).check(event, operator.seal(event))
    if type(event) in MAY_PRODUCE[KeyRole.OPERATOR]:
        assert refusal is None
    else:
        assert refusal is not None and refusal.reason == Reason.NOT_PERMITTED


def _tampered(seal: Seal) -> Seal:
    return Seal(seal.key_id, seal.signature, seal.value[:-1] + bytes([seal.value[-1] ^ 1]))


FORGERIES: list[tuple[str, Any, Reason]] = [
    ("no headers", lambda key, other, event: None, Reason.UNSIGNED),
    (
        "value changed after signing",
        lambda key, other, event: _tampered(key.seal(event)),
        Reason.BAD_SIGNATURE,
    ),
    # another key's signature under the registered key's id
    (
        "signed by another key",
        lambda key, other, event: other.seal(event, claimed_id=key.id),
        Reason.BAD_SIGNATURE,
    ),
    (
        "signature cut short",
        lambda key, other, event: Seal(key.id, key.seal(event).signature[:32], encode(event)),
        Reason.BAD_SIGNATURE,
    ),
    (
        "key id not a key",
        lambda key, other, event: Seal("zz" * 32, b"\0" * 64, encode(event)),
        Reason.BAD_SIGNATURE,
    ),
    ("unregistered key", lambda key, other, event: other.seal(event), Reason.UNKNOWN_KEY),
]


@pytest.mark.parametrize(("case", "seal", "reason"), FORGERIES, ids=[c for c, _, _ in FORGERIES])
@pytest.mark.parametrize("event", every_event(Script(answer_ids=True)), ids=lambda e: type(e).__name__)
def test_forged_events_of_every_type_are_refused_with_their_reason(
    operator: Key, case: str, seal: Any, reason: Reason, event: Event
) -> None:
    key, other = Key(), Key()
    # a key that may produce everything, so only the forgery can be the reason
    authority = authority_with(operator, key, *KeyRole, client_id="alice")
    refusal = authority.check(event, seal(key, other, event))
    assert refusal is not None and refusal.reason == reason, refusal


@pytest.mark.parametrize(
    "event",
    [e for e in every_event(Script(answer_ids=True)) if type(e) in MAY_PRODUCE[KeyRole.CLIENT]],
    ids=lambda e: type(e).__name__,
)
def test_a_client_cannot_speak_for_another(operator: Key, event: Event) -> None:
    bob = Key()
    authority = authority_with(operator, bob, KeyRole.CLIENT, client_id="bob")
    refusal = authority.check(event, bob.seal(event))  # every event here is alice's
    assert refusal is not None and refusal.reason == Reason.NOT_PERMITTED
    assert "bob" in refusal.detail and "alice" in refusal.detail


@pytest.mark.parametrize(
    "event",
    [e for e in every_event(Script(answer_ids=True)) if type(e) in MAY_PRODUCE[KeyRole.CLIENT]],
    ids=lambda e: type(e).__name__,
)
def test_a_client_signs_no_event_id_but_its_answers_own(operator: Key, event: Event) -> None:
    """Ids are derived, so predictable: a client's answer under another event's id (here the
    round's aggregate's) would reserve it, and the real event would then be a duplicate."""
    alice = Key()
    authority = authority_with(operator, alice, KeyRole.CLIENT, client_id="alice")
    squatting = dataclasses.replace(event, event_id=derived_id("r1", "aggregated"))
    refusal = authority.check(squatting, alice.seal(squatting))
    assert refusal is not None and refusal.reason == Reason.NOT_PERMITTED
    if not isinstance(event, ClientHeartbeat):
        assert answer_event_id("r1", "alice", ANSWER_TASKS[type(event)]) in refusal.detail
        assert authority.check(event, alice.seal(event)) is None  # under its own id


def test_only_the_operator_key_changes_the_registry(operator: Key) -> None:
    admin, newcomer = Key(), Key()
    authority = authority_with(operator, admin, *KeyRole, client_id="alice")
    for event in (registered(newcomer, KeyRole.COORDINATOR), revoked(admin)):
        refusal = authority.check(event, admin.seal(event))
        assert refusal is not None and refusal.reason == Reason.NOT_PERMITTED
        refusal = authority.check(event, newcomer.seal(event))
        assert refusal is not None and refusal.reason == Reason.NOT_PERMITTED


def test_roundlogs_signer_makes_headers_the_fold_accepts(operator: Key, tmp_path: Any) -> None:
    from roundlog.keys import create_key_file

    key_id = create_key_file(tmp_path / "client.pem")
    signer = Signer.from_file(tmp_path / "client.pem")
    event = Script(answer_ids=True).update("alice")
    value = encode(event)
    seal = seal_of(signer.headers(value), value)
    assert seal is not None and seal.key_id == key_id
    authority = Authority(operator.id)
    registration = registered_id(key_id)
    authority.register(registration)
    assert authority.check(event, seal) is None
    assert (tmp_path / "client.pem").stat().st_mode & 0o777 == 0o600


def registered_id(key_id: str) -> KeyRegistered:
    return KeyRegistered(
        event_id="reg", occurred_at=T0, key_id=key_id, roles=(KeyRole.CLIENT,), client_id="alice"
    )


class SignedLog:
    """A ledger under a registry, fed sealed events in log order."""

    def __init__(self, operator: Key) -> None:
        self.operator = operator
        self.log: list[tuple[Event, Seal | None]] = []

    def add(self, event: Event, key: Key | None) -> None:
        self.log.append((event, key.seal(event) if key is not None else None))

    def fold(self) -> list[tuple[str, Reason | None]]:
        ledger = Ledger(authority=Authority(self.operator.id))
        outcomes = []
        for event, seal in self.log:
            outcome = ledger.apply(event, seal=seal)
            outcomes.append((event.event_id, outcome.refusal.reason if outcome.refusal else None))
        return outcomes


def test_a_revocation_takes_effect_at_its_log_position_and_replays_alike(operator: Key) -> None:
    s = Script(answer_ids=True)
    coordinator, alice, bob = Key(), Key(), Key()
    log = SignedLog(operator)
    log.add(registered(coordinator, KeyRole.COORDINATOR), operator)
    log.add(registered(alice, KeyRole.CLIENT, client_id="alice"), operator)
    log.add(registered(bob, KeyRole.CLIENT, client_id="bob"), operator)
    log.add(s.started(), operator)
    log.add(s.requested(), coordinator)
    log.add(s.staged(), coordinator)
    log.add(s.assigned(clients=("alice", "bob", "carol")), coordinator)
    before = s.update("alice")
    log.add(before, alice)
    log.add(revoked(bob, at=1), operator)
    after = s.update("bob")
    log.add(after, bob)
    again = registered(bob, KeyRole.CLIENT, client_id="bob", at=2)
    log.add(again, operator)

    outcomes = dict(log.fold())
    assert outcomes[before.event_id] is None
    assert outcomes[after.event_id] == Reason.REVOKED_KEY
    assert outcomes[again.event_id] == Reason.REVOKED_KEY  # a revoked key stays revoked
    assert all(
        reason is None
        for event_id, reason in outcomes.items()
        if event_id not in {after.event_id, again.event_id}
    )
    assert log.fold() == log.fold()  # a replay folds the same sealed log to the same answers


def test_a_key_registered_later_speaks_only_from_then_on(operator: Key) -> None:
    s = Script()
    log = SignedLog(operator)
    coordinator = Key()
    log.add(s.started(), operator)
    early = s.requested()
    log.add(early, coordinator)
    log.add(registered(coordinator, KeyRole.COORDINATOR), operator)
    late = s.staged()
    log.add(late, coordinator)
    outcomes = dict(log.fold())
    assert outcomes[early.event_id] == Reason.UNKNOWN_KEY
    assert outcomes[late.event_id] == Reason.UNKNOWN_ROUND  # past the registry: its round was never requested


def test_without_an_authority_nothing_is_checked() -> None:
    s = Script()
    ledger = Ledger()
    assert ledger.apply(s.started()).applied and ledger.apply(s.requested()).applied


def test_sampling_counts_a_client_only_under_a_key_that_speaks_for_it(operator: Key) -> None:
    alice, mallory = Key(), Key()
    authority = authority_with(operator, alice, KeyRole.CLIENT, client_id="alice")
    s, live = Script(), Liveness()
    ttl = timedelta(seconds=10)
    live.heard(s.heartbeat("alice"), T0, alice.id)
    # a later heartbeat for alice under another (valid, unregistered) key must not displace hers
    live.heard(s.heartbeat("alice"), T0 + timedelta(seconds=5), mallory.id)
    live.heard(s.heartbeat("mallory"), T0 + timedelta(seconds=5), mallory.id)
    assert live.live(T0 + timedelta(seconds=6), ttl, ClientRole.TRAINER, authority.speaks_for) == ["alice"]
    assert live.live(T0 + timedelta(seconds=6), ttl, ClientRole.TRAINER) == ["alice", "mallory"]
    authority.revoke(revoked(alice))
    assert live.live(T0 + timedelta(seconds=6), ttl, ClientRole.TRAINER, authority.speaks_for) == []


def test_a_fold_restarted_at_its_replay_point_judges_every_later_event_alike(operator: Key) -> None:
    """The restart contract with a registry: for every cut of the log, a fold rebuilt from the replay
    point the full fold reports then decides every later event as the full fold does."""
    coordinator, alice, bob = Key(), Key(), Key()
    s1, s2 = Script("s1", answer_ids=True), Script("s2", answer_ids=True)
    log: list[tuple[Event, Seal]] = []

    def add(event: Event, key: Key) -> None:
        log.append((event, key.seal(event)))

    add(registered(coordinator, KeyRole.COORDINATOR), operator)
    add(registered(alice, KeyRole.CLIENT, client_id="a"), operator)
    add(s1.started(), operator)
    add(s1.requested(), coordinator)
    add(registered(bob, KeyRole.CLIENT, client_id="b", at=1), operator)
    add(s1.staged(), coordinator)
    add(s1.assigned(clients=("a", "b")), coordinator)
    add(s1.update("a"), alice)
    add(s1.update("b"), bob)
    add(s1.aggregated(update_ids=(uid("a"), uid("b"))), coordinator)  # not an aggregator: refused
    add(s1.failed(), coordinator)
    add(s1.finished(), coordinator)
    # a refresh restates every key; alice's is then revoked
    add(registered(coordinator, KeyRole.COORDINATOR, at=2), operator)
    add(registered(alice, KeyRole.CLIENT, client_id="a", at=2), operator)
    add(registered(bob, KeyRole.CLIENT, client_id="b", at=2), operator)
    add(s2.started(), operator)
    add(s2.requested(), coordinator)
    add(revoked(alice, at=3), operator)
    add(s2.staged(), coordinator)
    add(s2.assigned(clients=("a", "b")), coordinator)
    add(s2.update("a"), alice)  # revoked
    add(s2.update("b"), bob)
    add(registered(alice, KeyRole.CLIENT, client_id="a", at=4), operator)  # stays revoked

    def fold(start: int, stop: int, fold: PartitionFold | None = None) -> tuple[PartitionFold, list[Any]]:
        fold = fold or PartitionFold(0, Ledger(authority=Authority(operator.id)))
        outcomes = [fold.apply(n, *log[n][:1], None, log[n][1]) for n in range(start, stop)]
        return fold, [(o.refusal.reason if o.refusal else None) for o in outcomes]

    _, whole = fold(0, len(log))
    assert whole.count(None) < len(log)  # some refusals, so agreeing is not trivial
    for cut in range(len(log) + 1):
        full, _ = fold(0, cut)
        restarted, _ = fold(full.replay_from, cut)
        restarted.next_offset = cut
        _, after = fold(cut, len(log), restarted)
        assert after == whole[cut:], f"restarted at {full.replay_from} for cut {cut}"
    # past the refresh, the replay point no longer reaches back to the first registrations
    full, _ = fold(0, len(log))
    assert full.replay_from >= 12
