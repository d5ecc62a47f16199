"""The Kafka client's repeated messages: one per kind per window, with a count of the rest."""

from __future__ import annotations

import logging

from roundlog.observability import ClientRepeats


def record(name: str, msg: str, at: float, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    made.created = at
    return made


def test_a_burst_of_one_kind_shows_once_per_window_then_says_how_many_were_held() -> None:
    repeats = ClientRepeats(window=10.0)
    unable = "Unable connect to node with id %s: %s"
    shown = [
        r.getMessage()
        for r in (record("aiokafka", unable, 100.0 + t / 10, t % 3, "refused") for t in range(150))
        if repeats.filter(r)
    ]
    # 15 s of attempts every 0.1 s: the first, then the first after 10 s, which counts the 99 between
    assert shown == [
        "Unable connect to node with id 0: refused",
        "Unable connect to node with id 1: refused [99 more like it in the last 10 s]",
    ]


def test_kinds_loggers_and_levels_are_counted_apart_and_roundlog_is_never_held() -> None:
    repeats = ClientRepeats(window=10.0)
    records = [
        record("aiokafka", "Unable connect to node with id %s", 1.0, 2),
        record("aiokafka", "Unable connect to node with id %s", 1.1, 2),  # held
        record("aiokafka", "Failed fetch messages from %s", 1.2, 2),
        record("aiokafka.consumer.fetcher", "Failed fetch messages from %s", 1.3, 2),
        record("aiokafka.consumer.fetcher", "Failed fetch messages from %s", 1.4, 2, level=logging.WARNING),
        record("roundlog.aggregator", "replay point %d not committed", 1.5, 7),
        record("roundlog.aggregator", "replay point %d not committed", 1.6, 7),
    ]
    assert [repeats.filter(r) for r in records] == [True, False, True, True, True, True, True]
