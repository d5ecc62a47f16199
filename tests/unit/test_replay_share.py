"""How replay shares the partitions out over its processes."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from roundlog.replay import share_out


def tp(partition: int, topic: str = "events") -> TopicPartition:
    return TopicPartition(topic, partition)


def test_the_largest_partitions_go_first_each_to_the_lightest_group() -> None:
    ends = {tp(0): 50, tp(1): 40, tp(2): 30, tp(3): 20, tp(4): 0, tp(0, "clients"): 10}
    groups = share_out(ends, 2)
    # by hand: 50 -> A, 40 -> B, 30 -> B (40 < 50), 20 -> A (50 < 70), 10 -> A or B at 70 each: A
    assert groups == [
        {tp(0): 50, tp(3): 20, tp(0, "clients"): 10, tp(4): 0},
        {tp(1): 40, tp(2): 30},
    ]


def test_never_more_groups_than_partitions_with_records() -> None:
    assert share_out({tp(0): 5, tp(1): 0}, 4) == [{tp(0): 5, tp(1): 0}]
    assert share_out({tp(0): 0}, 4) == [{tp(0): 0}]


@given(
    counts=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=24),
    jobs=st.integers(min_value=1, max_value=8),
)
def test_every_partition_lands_in_exactly_one_group(counts: list[int], jobs: int) -> None:
    ends = {tp(p): n for p, n in enumerate(counts)}
    groups = share_out(ends, jobs)
    merged = [item for group in groups for item in group.items()]
    assert sorted(merged) == sorted(ends.items())
    assert 1 <= len(groups) <= jobs and all(groups)
