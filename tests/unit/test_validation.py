"""Every field a role computes with is bounded where the event enters the fold: one row per rule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from datetime import timedelta

import pytest

from roundlog.domain.events import ArraySpec, ClientRole, Event, RoundConfig
from roundlog.domain.ledger import Ledger
from roundlog.domain.liveness import Liveness
from roundlog.domain.rules import Reason
from roundlog.domain.validation import MAX_CLOCK_SKEW, config_problem, event_problem

from tests.builders import T0, Script, tensor_ref

R = Reason
Make = Callable[[Script], Event]


def _ref(**changes: object) -> Callable[[Script], Event]:
    """An update whose TensorRef has ``changes``."""
    return lambda s: dataclasses.replace(
        s.update("a"), tensor=dataclasses.replace(tensor_ref("k"), **changes)
    )


def _spec(**changes: object) -> Callable[[Script], Event]:
    spec = dataclasses.replace(ArraySpec(name="w", dtype="float32", shape=(2, 2)), **changes)
    return _ref(arrays=(spec,))


def _config(**changes: object) -> Callable[[Script], Event]:
    return lambda s: s.requested(**changes)


def _session_config(**changes: object) -> Callable[[Script], Event]:
    """A SessionStarted whose round config has ``changes``: refused at session start, not at a round's end."""
    return lambda s: dataclasses.replace(s.started(), round_config=dataclasses.replace(s.config, **changes))


MALFORMED: list[tuple[str, Make, Reason]] = [
    ("negative num_examples", lambda s: dataclasses.replace(s.update("a"), num_examples=-5), R.WEIGHT_LIMIT),
    ("zero num_examples", lambda s: dataclasses.replace(s.update("a"), num_examples=0), R.WEIGHT_LIMIT),
    (
        "num_examples of 2**62",
        lambda s: dataclasses.replace(s.update("a"), num_examples=2**62),
        R.WEIGHT_LIMIT,
    ),
    ("a negative first offset", _ref(first_offset=-1), R.INVALID_TENSOR_REF),
    ("the last offset before the first", _ref(first_offset=5, last_offset=4), R.INVALID_TENSOR_REF),
    ("a negative partition", _ref(partition=-1), R.INVALID_TENSOR_REF),
    ("more chunks than offsets", _ref(chunks=2), R.INVALID_TENSOR_REF),
    ("no chunk", _ref(chunks=0), R.INVALID_TENSOR_REF),
    ("nbytes that are not the arrays' size", _ref(nbytes=17), R.INVALID_TENSOR_REF),
    ("a sha256 that is not hex", _ref(sha256="z" * 64), R.INVALID_TENSOR_REF),
    ("a shape of 2**40 elements", _spec(shape=(2**20, 2**20)), R.INVALID_TENSOR_REF),
    ("a negative dimension", _spec(shape=(-2, -2)), R.INVALID_TENSOR_REF),
    ("an unknown dtype", _spec(dtype="float33"), R.INVALID_TENSOR_REF),
    ("an object dtype", _spec(dtype="O"), R.INVALID_TENSOR_REF),
    ("a big-endian dtype", _spec(dtype=">f4"), R.INVALID_TENSOR_REF),
    (
        "repeated array names",
        _ref(arrays=(ArraySpec(name="w", dtype="u1", shape=(8,)),) * 2),
        R.INVALID_TENSOR_REF,
    ),
    (
        "more bytes than 1 MiB chunks can hold",
        _ref(arrays=(ArraySpec(name="w", dtype="u1", shape=(2 << 20,)),), nbytes=2 << 20),
        R.INVALID_TENSOR_REF,
    ),
    ("a round timeout of 1e12 s", _config(round_timeout=1e12), R.INVALID_CONFIG),
    ("a NaN round timeout", _config(round_timeout=math.nan), R.INVALID_CONFIG),
    ("an infinite round timeout", _config(round_timeout=math.inf), R.INVALID_CONFIG),
    ("an unknown aggregator", _config(aggregator="fedmagic"), R.INVALID_CONFIG),
    ("an unknown aggregator kwarg", _config(aggregator_kwargs='{"lr": 1}'), R.INVALID_CONFIG),
    (
        "an out-of-range aggregator kwarg",
        _config(aggregator="fedadam", aggregator_kwargs='{"eta": -1}'),
        R.INVALID_CONFIG,
    ),
    ("a weight policy of 0 examples", _config(max_num_examples=0), R.INVALID_CONFIG),
    ("a weight share above 1", _config(max_weight_share=1.5), R.INVALID_CONFIG),
    ("round_no 0", lambda s: s.requested(round_no=0), R.INVALID_FIELD),
    ("a session of 0 rounds", lambda s: s.started(rounds=0), R.INVALID_CONFIG),
    ("a session of median in 2 shards", _session_config(aggregator="median", shards=2), R.INVALID_CONFIG),
    (
        "a session of trimmed_mean in 3 shards",
        _session_config(aggregator="trimmed_mean", shards=3),
        R.INVALID_CONFIG,
    ),
    (
        "a deadline before the assignment",
        lambda s: dataclasses.replace(s.assigned(), deadline=T0 - timedelta(seconds=1)),
        R.INVALID_FIELD,
    ),
    (
        "a deadline past 30 days",
        lambda s: dataclasses.replace(s.assigned(), deadline=T0 + timedelta(days=31)),
        R.INVALID_FIELD,
    ),
    ("an empty event id", lambda s: dataclasses.replace(s.update("a"), event_id=""), R.INVALID_FIELD),
    ("an empty client id", lambda s: dataclasses.replace(s.heartbeat("a"), client_id=""), R.INVALID_FIELD),
    (
        "a negative total weight",
        lambda s: dataclasses.replace(s.aggregated(), total_weight=-1.0),
        R.INVALID_FIELD,
    ),
]


@pytest.mark.parametrize(("case", "make", "reason"), MALFORMED, ids=[c for c, _, _ in MALFORMED])
def test_a_malformed_event_is_refused_with_its_reason(case: str, make: Make, reason: Reason) -> None:
    refusal = event_problem(make(Script()))
    assert refusal is not None, case
    assert refusal.reason == reason


@pytest.mark.parametrize(
    "make",
    [
        lambda s: s.started(),
        lambda s: s.requested(),
        lambda s: s.assigned(),
        lambda s: s.update("a"),
        lambda s: s.validation("a"),
        lambda s: s.aggregated(),
        lambda s: s.heartbeat("a"),
        _ref(arrays=(), nbytes=0),  # an empty model still has its one empty chunk
    ],
)
def test_well_formed_events_pass(make: Make) -> None:
    assert event_problem(make(Script())) is None


def test_the_fold_refuses_a_malformed_event_and_stays_as_it_was() -> None:
    s, ledger = Script(), Ledger()
    for event in (s.started(), s.requested(), s.staged(), s.assigned()):
        assert ledger.apply(event).applied
    outcome = ledger.apply(dataclasses.replace(s.update("a"), num_examples=-1))
    assert outcome.refusal is not None and outcome.refusal.reason == R.WEIGHT_LIMIT
    assert ledger.sessions["s1"].rounds["r1"].accepted == {}
    assert ledger.apply(s.update("a")).applied  # the honest update of the same client still counts


def test_an_event_dated_after_the_logs_time_is_refused_as_clock_skew() -> None:
    event = Script().started()
    assert event_problem(event, logged_at=event.occurred_at - MAX_CLOCK_SKEW) is None
    refusal = event_problem(event, logged_at=event.occurred_at - MAX_CLOCK_SKEW - timedelta(milliseconds=1))
    assert refusal is not None and refusal.reason == R.CLOCK_SKEW
    assert event_problem(event, logged_at=event.occurred_at + timedelta(days=365)) is None  # late is fine


def test_config_problem_names_the_field() -> None:
    problem = config_problem(RoundConfig(aggregator="fedadam", aggregator_kwargs='{"beta_1": 2}'))
    assert problem is not None and "beta_1" in problem
    assert config_problem(RoundConfig()) is None


def test_liveness_follows_the_time_a_heartbeat_was_heard_not_the_time_it_claims() -> None:
    s, live = Script(), Liveness()
    ttl = timedelta(seconds=10)
    forged = dataclasses.replace(s.heartbeat("mallory"), occurred_at=T0.replace(year=9000))
    live.heard(forged, at=T0)
    live.heard(s.heartbeat("alice"), at=T0)
    assert live.live(T0 + ttl, ttl, ClientRole.TRAINER) == ["alice", "mallory"]
    assert live.live(T0 + ttl + timedelta(seconds=1), ttl, ClientRole.TRAINER) == []  # forged or not
    live.heard(s.heartbeat("mallory"), at=T0 + timedelta(seconds=20))  # a real heartbeat is never stale
    assert live.live(T0 + timedelta(seconds=25), ttl, ClientRole.TRAINER) == ["mallory"]
    live.heard(s.heartbeat("mallory"), at=T0)  # heard earlier (a re-read): changes nothing
    assert live.live(T0 + timedelta(seconds=25), ttl, ClientRole.TRAINER) == ["mallory"]
    assert live.live(T0 + timedelta(seconds=25), ttl, ClientRole.VALIDATOR) == []


def test_a_heartbeat_heard_while_the_coordinator_decides_counts() -> None:
    """The coordinator takes ``now``, then awaits its emits; every heartbeat it hears meanwhile is
    later than that ``now`` and must not make its client look absent (a round failed for too few
    clients when all four clients' last heartbeats came in during one such pass)."""
    s, live = Script(), Liveness()
    live.heard(s.heartbeat("alice"), at=T0 + timedelta(milliseconds=300))
    assert live.live(T0, timedelta(seconds=10), ClientRole.TRAINER) == ["alice"]


def test_silence_from_every_client_at_once_is_a_stall_for_as_long_as_patience_lasts() -> None:
    """A broker failing over holds every heartbeat back; the round should wait for the clients
    topic, not fail for want of clients (a fault test's round failed with 0 live trainers)."""
    s, live = Script(), Liveness()
    ttl, patience = timedelta(seconds=10), timedelta(seconds=60)
    assert not live.stalled(T0, ttl, patience)  # never heard anyone: nothing went quiet
    live.heard(s.heartbeat("alice"), at=T0)
    live.heard(s.heartbeat("bob"), at=T0 + timedelta(seconds=4))
    assert not live.stalled(T0 + timedelta(seconds=12), ttl, patience)  # bob still talks: alice left
    assert live.live(T0 + timedelta(seconds=15), ttl, ClientRole.TRAINER) == []
    assert live.stalled(T0 + timedelta(seconds=15), ttl, patience)
    assert live.stalled(T0 + timedelta(seconds=74), ttl, patience)
    assert not live.stalled(T0 + timedelta(seconds=75), ttl, patience)  # patience spent: they are gone


def test_the_weight_share_policy_leaves_out_the_updates_above_their_share_of_the_closed_round() -> None:
    s, ledger = Script(config=RoundConfig(round_timeout=60, buffer_size=-1, max_weight_share=0.5)), Ledger()
    for event in (s.started(), s.requested(max_weight_share=0.5), s.staged(), s.assigned()):
        assert ledger.apply(event).applied
    weights = {"a": 10, "b": 10, "c": 30}  # c holds 30/50 = 0.6 of the round, above its 0.5
    for client, n in weights.items():
        assert ledger.apply(dataclasses.replace(s.update(client), num_examples=n)).applied
    round_ = ledger.sessions["s1"].rounds["r1"]
    assert [u.client_id for u in round_.overweight_updates()] == ["c"]
    assert dataclasses.replace(round_, config=RoundConfig()).overweight_updates() == []  # 1.0: no cap
