"""A session's events fold on its own partition: one found elsewhere is refused as ``wrong_partition``,
naming where it belongs, instead of passing for news of a session that partition never saw."""

from __future__ import annotations

import dataclasses

import pytest

from roundlog.domain.events import (
    ClientHeartbeat,
    Event,
    KeyRegistered,
    KeyRevoked,
    ModelImported,
    SessionStarted,
    partition_key,
)
from roundlog.domain.rules import Reason
from roundlog.roles.stream import PartitionFold, placement_refusal

from tests.contract.make_vectors import sample_events
from tests.unit.test_vectors import KAFKA_MURMUR2

EVENTS = sample_events()
SESSIONLESS = (ClientHeartbeat, ModelImported, KeyRegistered, KeyRevoked)


def home(key: str, partitions: int) -> int:
    """Kafka's rule, from a murmur2 published by Kafka (not roundlog's own hash)."""
    return (KAFKA_MURMUR2[key] & 0x7FFFFFFF) % partitions


@pytest.mark.parametrize("event", EVENTS, ids=[type(e).__name__ for e in EVENTS])
def test_session_events_are_refused_anywhere_but_their_sessions_partition(event: Event) -> None:
    partitions = 6
    owner = next(p for p in range(partitions) if placement_refusal(event, p, partitions) is None)
    for partition in range(partitions):
        refusal = placement_refusal(event, partition, partitions)
        if isinstance(event, SESSIONLESS) or partition == owner:
            assert refusal is None
        else:
            assert refusal is not None and refusal.reason == Reason.WRONG_PARTITION
            assert f"partition {owner} of 6, not {partition}" in refusal.detail
            assert partition_key(event) in refusal.detail


@pytest.mark.parametrize("key", sorted(KAFKA_MURMUR2))
def test_the_owning_partition_is_kafkas_default_partitioners(key: str) -> None:
    started = next(e for e in EVENTS if isinstance(e, SessionStarted))
    for partitions in (6, 12):
        event = dataclasses.replace(started, session_id=key)
        assert placement_refusal(event, home(key, partitions), partitions) is None


def test_a_misplaced_event_moves_the_offset_and_touches_no_session() -> None:
    started = next(e for e in EVENTS if isinstance(e, SessionStarted))
    partitions = 12
    wrong = (home_of(started, partitions) + 1) % partitions
    fold = PartitionFold(wrong, partitions=partitions)
    outcome = fold.apply(41, started)
    assert outcome.refusal is not None and outcome.refusal.reason == Reason.WRONG_PARTITION
    assert fold.next_offset == 42 and fold.ledger.sessions == {} and fold.session_starts == {}
    right = PartitionFold(home_of(started, partitions), partitions=partitions)
    assert right.apply(0, started).applied


def test_a_fold_without_the_topics_partition_count_checks_no_placement() -> None:
    started = next(e for e in EVENTS if isinstance(e, SessionStarted))
    assert PartitionFold(5).apply(0, started).applied


def home_of(event: Event, partitions: int) -> int:
    return next(p for p in range(partitions) if placement_refusal(event, p, partitions) is None)
