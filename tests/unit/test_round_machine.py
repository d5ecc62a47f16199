"""The round machine, one row per transition and per refusal: the table of DESIGN.md as a test."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import replace

import pytest

from roundlog.domain.events import Event, RoundConfig, Task
from roundlog.domain.ledger import Ledger
from roundlog.domain.round import ROUND_RULES, RoundState
from roundlog.domain.rules import Reason

from tests.builders import Script, tensor_ref, uid

S = RoundState
Setup = Callable[[Script], list[Event]]
Step = Callable[[Script], Event]


def _collecting(s: Script, task: Task = Task.TRAINING, **config: object) -> list[Event]:
    return [s.started(), s.requested(task=task, **config), s.staged(), s.assigned()]


def _sharded(s: Script) -> list[Event]:
    """A closed round of 2 shards: a's chunks on tensors partition 0 (shard 0), b's on 3 (shard 1)."""
    return [*_collecting(s, shards=2), s.update("a", partition=0), s.update("b", partition=3)]


SETUPS: dict[str, Setup] = {
    "requested": lambda s: [s.started(), s.requested()],
    "staged": lambda s: [s.started(), s.requested(), s.staged()],
    "collecting": _collecting,
    "collecting, a reported": lambda s: [*_collecting(s), s.update("a")],
    "collecting, buffer 1": lambda s: _collecting(s, buffer_size=1),
    "collecting, buffer -1, a+b reported": lambda s: [
        *_collecting(s, buffer_size=-1),
        s.update("a"),
        s.update("b"),
    ],
    "collecting, buffer 9 of 3 assigned, a+b reported": lambda s: [
        *_collecting(s, buffer_size=9),
        s.update("a"),
        s.update("b"),
    ],
    "collecting, min_updates 2, a reported": lambda s: [
        *_collecting(s, min_updates=2),
        s.update("a"),
    ],
    "closed": lambda s: [*_collecting(s), s.update("a"), s.update("b")],
    "closed by timeout": lambda s: [*_collecting(s), s.update("a"), s.timed_out()],
    "aggregated": lambda s: [
        *_collecting(s),
        s.update("a"),
        s.update("b"),
        s.aggregated(update_ids=(uid("a"), uid("b"))),
    ],
    "closed, 2 shards": lambda s: _sharded(s),
    "closed, 2 shards, shard 0 reported": lambda s: [*_sharded(s), s.partial(0, 2, (uid("a"),))],
    "closed, 2 shards, both reported": lambda s: [
        *_sharded(s),
        s.partial(0, 2, (uid("a"),)),
        s.partial(1, 2, (uid("b"),)),
    ],
    "failed": lambda s: [s.started(), s.requested(), s.failed()],
    "validating": lambda s: _collecting(s, Task.VALIDATION),
    "validating, a+b reported": lambda s: [
        *_collecting(s, Task.VALIDATION),
        s.validation("a"),
        s.validation("b"),
    ],
    "predicting": lambda s: _collecting(s, Task.INFERENCE),
    "completed": lambda s: [
        *_collecting(s, Task.VALIDATION),
        s.validation("a"),
        s.validation("b"),
        s.validation("c"),
    ],
}

# (given, when, then: the state after, or the refusal's reason)
CASES: list[tuple[str, str, Step, S | Reason]] = [
    ("closed, 2 shards", "shard 0 reports its update", lambda s: s.partial(0, 2, (uid("a"),)), S.CLOSED),
    ("closed, 2 shards", "an empty shard's partial", lambda s: s.partial(1, 2, (uid("b"),)), S.CLOSED),
    (
        "closed, 2 shards",
        "a shard reports another shard's update",
        lambda s: s.partial(0, 2, (uid("a"), uid("b"))),
        Reason.UNKNOWN_UPDATE,
    ),
    (
        "closed, 2 shards",
        "a shard leaves its update out",
        lambda s: s.partial(0, 2, ()),
        Reason.UNKNOWN_UPDATE,
    ),
    ("closed, 2 shards", "a shard beyond its own count", lambda s: s.partial(2, 2, ()), Reason.INVALID_FIELD),
    ("closed, 2 shards", "a partial of another shard count", lambda s: s.partial(0, 3, ()), Reason.ILLEGAL),
    ("closed", "a partial in an unsharded round", lambda s: s.partial(0, 1, (uid("a"),)), Reason.ILLEGAL),
    (
        "closed, 2 shards, shard 0 reported",
        "shard 0 reports again",
        lambda s: s.partial(0, 2, (uid("a"),)),
        Reason.DUPLICATE,
    ),
    (
        "closed, 2 shards, shard 0 reported",
        "it is aggregated before every shard reported",
        lambda s: s.aggregated(update_ids=(uid("a"), uid("b"))),
        Reason.ILLEGAL,
    ),
    (
        "closed, 2 shards, shard 0 reported",
        "an update of a partial is found unusable",
        lambda s: s.rejected("a"),
        Reason.ILLEGAL,
    ),
    (
        "closed, 2 shards, shard 0 reported",
        "an update of a shard yet to report is found unusable",
        lambda s: s.rejected("b"),
        S.CLOSED,
    ),
    (
        "closed, 2 shards, both reported",
        "it is aggregated from its partials in shard order",
        lambda s: s.aggregated(update_ids=(uid("a"), uid("b"))),
        S.AGGREGATED,
    ),
    (
        "closed, 2 shards, both reported",
        "an aggregate lists the updates out of shard order",
        lambda s: s.aggregated(update_ids=(uid("b"), uid("a"))),
        Reason.ILLEGAL,
    ),
    ("requested", "a shard reports", lambda s: s.partial(0, 2, ()), Reason.EARLY),
    ("staged", "a shard reports", lambda s: s.partial(0, 2, ()), Reason.EARLY),
    ("collecting", "a shard reports", lambda s: s.partial(0, 2, ()), Reason.EARLY),
    ("aggregated", "a shard reports", lambda s: s.partial(0, 2, ()), Reason.STALE),
    ("failed", "a shard reports", lambda s: s.partial(0, 2, ()), Reason.STALE),
    ("completed", "a shard reports", lambda s: s.partial(0, 2, ()), Reason.STALE),
    ("requested", "the base model is staged", lambda s: s.staged(), S.STAGED),
    (
        "requested",
        "another model is staged",
        lambda s: s.staged(model_id="other"),
        Reason.WRONG_MODEL,
    ),
    ("requested", "the round fails", lambda s: s.failed(), S.FAILED),
    (
        "requested",
        "clients are assigned before staging",
        lambda s: s.assigned(),
        Reason.ILLEGAL,
    ),
    ("requested", "an update arrives", lambda s: s.update("a"), Reason.EARLY),
    ("requested", "a validation arrives", lambda s: s.validation("a"), Reason.EARLY),
    ("requested", "a prediction arrives", lambda s: s.prediction("a"), Reason.EARLY),
    ("requested", "the deadline passes", lambda s: s.timed_out(), Reason.ILLEGAL),
    ("staged", "clients are assigned", lambda s: s.assigned(), S.COLLECTING),
    (
        "staged",
        "an assignment hands out other bytes under the staged model's id",
        lambda s: replace(s.assigned(), model=replace(tensor_ref("m0"), sha256="f" * 64)),
        Reason.WRONG_MODEL,
    ),
    (
        "staged",
        "an assignment hands out another model",
        lambda s: replace(s.assigned(), model_id="m9", model=tensor_ref("m9")),
        Reason.WRONG_MODEL,
    ),
    (
        "staged",
        "no client is assigned",
        lambda s: s.assigned(clients=()),
        Reason.TOO_FEW_CLIENTS,
    ),
    ("staged", "an update arrives", lambda s: s.update("a"), Reason.EARLY),
    ("staged", "a validation arrives", lambda s: s.validation("a"), Reason.EARLY),
    ("staged", "a prediction arrives", lambda s: s.prediction("a"), Reason.EARLY),
    (
        "staged",
        "the round fails",
        lambda s: s.failed(reason="too_few_clients"),
        S.FAILED,
    ),
    ("staged", "it is aggregated", lambda s: s.aggregated(), Reason.ILLEGAL),
    ("collecting", "an assigned client reports", lambda s: s.update("a"), S.COLLECTING),
    (
        "collecting",
        "an unassigned client reports",
        lambda s: s.update("z"),
        Reason.NOT_ASSIGNED,
    ),
    (
        "collecting",
        "a validation arrives in a training round",
        lambda s: s.validation("a"),
        Reason.WRONG_TASK,
    ),
    (
        "collecting",
        "a prediction arrives in a training round",
        lambda s: s.prediction("a"),
        Reason.WRONG_TASK,
    ),
    (
        "collecting",
        "the deadline passes with no update",
        lambda s: s.timed_out(),
        S.FAILED,
    ),
    ("collecting", "the round fails", lambda s: s.failed(reason="operator"), S.FAILED),
    (
        "collecting",
        "it is aggregated before closing",
        lambda s: s.aggregated(),
        Reason.ILLEGAL,
    ),
    ("collecting", "the model is staged again", lambda s: s.staged(), Reason.ILLEGAL),
    (
        "collecting, a reported",
        "the buffer_size-th update arrives",
        lambda s: s.update("b"),
        S.CLOSED,
    ),
    (
        "collecting, a reported",
        "the same client reports again",
        lambda s: s.update("a", update_id="u2"),
        Reason.DUPLICATE,
    ),
    (
        "collecting, a reported",
        "another client reuses an update id",
        lambda s: s.update("b", update_id=uid("a")),
        Reason.FOREIGN_UPDATE_ID,
    ),
    (
        "collecting",
        "a client claims another client's id before it",
        lambda s: s.update("b", update_id=uid("a")),
        Reason.FOREIGN_UPDATE_ID,
    ),
    (
        "collecting",
        "an update claims more examples than the session allows",
        lambda s: dataclasses.replace(s.update("a"), num_examples=RoundConfig().max_num_examples + 1),
        Reason.WEIGHT_LIMIT,
    ),
    (
        "collecting, a reported",
        "the deadline passes with one update",
        lambda s: s.timed_out(),
        S.CLOSED,
    ),
    (
        "collecting, a reported",
        "the update is unusable",
        lambda s: s.rejected("a"),
        S.COLLECTING,
    ),
    (
        "collecting, a reported",
        "an unknown update is rejected",
        lambda s: s.rejected("b"),
        Reason.UNKNOWN_UPDATE,
    ),
    (
        "collecting, buffer 1",
        "the first update arrives",
        lambda s: s.update("a"),
        S.CLOSED,
    ),
    (
        "collecting, buffer -1, a+b reported",
        "the last assigned client reports",
        lambda s: s.update("c"),
        S.CLOSED,
    ),
    (
        "collecting, buffer 9 of 3 assigned, a+b reported",
        "all assigned have reported",
        lambda s: s.update("c"),
        S.CLOSED,
    ),
    (
        "collecting, min_updates 2, a reported",
        "the deadline passes below min_updates",
        lambda s: s.timed_out(),
        S.FAILED,
    ),
    ("closed", "a straggler reports", lambda s: s.update("c"), Reason.LATE),
    ("closed", "a validation arrives", lambda s: s.validation("a"), Reason.LATE),
    ("closed", "a prediction arrives", lambda s: s.prediction("a"), Reason.LATE),
    (
        "closed",
        "the aggregate arrives",
        lambda s: s.aggregated(update_ids=(uid("a"), uid("b"))),
        S.AGGREGATED,
    ),
    (
        "closed",
        "an aggregate folds a foreign update",
        lambda s: s.aggregated(update_ids=("u-x",)),
        Reason.UNKNOWN_UPDATE,
    ),
    (
        "closed",
        "an aggregate is built on another model",
        lambda s: s.aggregated(parent="mx"),
        Reason.WRONG_MODEL,
    ),
    ("closed", "the deadline passes", lambda s: s.timed_out(), Reason.STALE),
    (
        "collecting",
        "an update says it was trained from the staged model",
        lambda s: replace(s.update("a"), base_model_sha256="0" * 64),
        S.COLLECTING,
    ),
    (
        "collecting",
        "an update was trained from other bytes (a forged assignment's)",
        lambda s: replace(s.update("a"), base_model_sha256="f" * 64),
        Reason.WRONG_MODEL,
    ),
    (
        "validating",
        "a result was computed on other bytes",
        lambda s: replace(s.validation("a"), model_sha256="f" * 64),
        Reason.WRONG_MODEL,
    ),
    (
        "predicting",
        "a prediction was computed on other bytes",
        lambda s: replace(s.prediction("a"), model_sha256="f" * 64),
        Reason.WRONG_MODEL,
    ),
    (
        "closed",
        "aggregation fails",
        lambda s: s.failed(reason="no_valid_update"),
        S.FAILED,
    ),
    ("closed", "an accepted update is unusable", lambda s: s.rejected("a"), S.CLOSED),
    ("closed by timeout", "a straggler reports", lambda s: s.update("b"), Reason.LATE),
    (
        "closed by timeout",
        "the aggregate arrives",
        lambda s: s.aggregated(update_ids=(uid("a"),)),
        S.AGGREGATED,
    ),
    ("aggregated", "a straggler reports", lambda s: s.update("c"), Reason.LATE),
    ("aggregated", "a validation arrives", lambda s: s.validation("a"), Reason.LATE),
    ("aggregated", "a prediction arrives", lambda s: s.prediction("a"), Reason.LATE),
    ("aggregated", "the deadline passes", lambda s: s.timed_out(), Reason.STALE),
    ("aggregated", "the round fails", lambda s: s.failed(), Reason.ILLEGAL),
    (
        "aggregated",
        "a folded update is rejected",
        lambda s: s.rejected("a"),
        Reason.ILLEGAL,
    ),
    (
        "aggregated",
        "it is aggregated again",
        lambda s: s.aggregated(update_ids=(uid("a"),)),
        Reason.ILLEGAL,
    ),
    ("failed", "an update arrives", lambda s: s.update("a"), Reason.LATE),
    ("failed", "a validation arrives", lambda s: s.validation("a"), Reason.LATE),
    ("failed", "a prediction arrives", lambda s: s.prediction("a"), Reason.LATE),
    ("failed", "the deadline passes", lambda s: s.timed_out(), Reason.STALE),
    ("failed", "the round fails again", lambda s: s.failed(), Reason.ILLEGAL),
    (
        "failed",
        "an unknown update is rejected",
        lambda s: s.rejected("a"),
        Reason.UNKNOWN_UPDATE,
    ),
    ("validating", "a validator reports", lambda s: s.validation("a"), S.COLLECTING),
    (
        "validating",
        "a result for another model",
        lambda s: s.validation("a", model_id="m9"),
        Reason.WRONG_MODEL,
    ),
    (
        "validating",
        "an unassigned validator reports",
        lambda s: s.validation("z"),
        Reason.NOT_ASSIGNED,
    ),
    (
        "validating",
        "a training update arrives",
        lambda s: s.update("a"),
        Reason.WRONG_TASK,
    ),
    (
        "validating",
        "the deadline passes with no result",
        lambda s: s.timed_out(),
        S.FAILED,
    ),
    (
        "validating, a+b reported",
        "the last validator reports",
        lambda s: s.validation("c"),
        S.COMPLETED,
    ),
    (
        "validating, a+b reported",
        "a validator reports twice",
        lambda s: s.validation("a"),
        Reason.DUPLICATE,
    ),
    (
        "validating, a+b reported",
        "the deadline passes with results",
        lambda s: s.timed_out(),
        S.COMPLETED,
    ),
    ("predicting", "a client predicts", lambda s: s.prediction("a"), S.COLLECTING),
    (
        "predicting",
        "a validation arrives in an inference round",
        lambda s: s.validation("a"),
        Reason.WRONG_TASK,
    ),
    ("completed", "a late validation", lambda s: s.validation("a"), Reason.LATE),
    ("completed", "a training update", lambda s: s.update("a"), Reason.LATE),
    ("completed", "a late prediction", lambda s: s.prediction("a"), Reason.LATE),
    ("completed", "the deadline passes", lambda s: s.timed_out(), Reason.STALE),
    ("completed", "the round fails", lambda s: s.failed(), Reason.ILLEGAL),
]


def _round_state(ledger: Ledger) -> S:
    return ledger.sessions["s1"].rounds["r1"].state


@pytest.mark.parametrize(("given", "when", "step", "then"), CASES, ids=[f"{g}: {w}" for g, w, _, _ in CASES])
def test_transition(given: str, when: str, step: Step, then: S | Reason) -> None:
    script, ledger = Script(), Ledger()
    for event in SETUPS[given](script):
        assert ledger.apply(event).applied, f"setup '{given}' was refused at {event}"
    before = _round_state(ledger)
    outcome = ledger.apply(step(script))
    if isinstance(then, Reason):
        assert outcome.refusal is not None and outcome.refusal.reason == then
        assert _round_state(ledger) == before, "a refused event changes nothing"
    else:
        assert outcome.refusal is None, outcome.refusal
        assert _round_state(ledger) == then


def test_every_row_of_the_table_is_specified() -> None:
    """Each (state, event) row of ROUND_RULES appears in CASES, so the table and this spec agree."""
    specified = set()
    for given, _, step, _ in CASES:
        script, ledger = Script(), Ledger()
        for event in SETUPS[given](script):
            ledger.apply(event)
        specified.add((_round_state(ledger), type(step(script))))
    missing = {(r.source, r.event.__name__) for r in ROUND_RULES} - {(s, e.__name__) for s, e in specified}
    assert not missing


def test_a_repeated_event_changes_nothing() -> None:
    script, ledger = Script(), Ledger()
    events = [*_collecting(script), script.update("a")]
    for event in events:
        ledger.apply(event)
    outcome = ledger.apply(events[-1])
    assert outcome.refusal is not None and outcome.refusal.reason == Reason.DUPLICATE_EVENT
    assert list(ledger.sessions["s1"].rounds["r1"].accepted) == [uid("a")]


def test_events_of_unknown_sessions_and_rounds_are_refused() -> None:
    script, ledger = Script(), Ledger()
    assert ledger.apply(script.requested()).refusal.reason == Reason.UNKNOWN_SESSION  # type: ignore[union-attr]
    ledger.apply(script.started())
    assert ledger.apply(script.update("a", round_id="nope")).refusal.reason == Reason.UNKNOWN_ROUND  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"buffer_size": 0}, "buffer_size"),
        ({"round_timeout": 0}, "round_timeout"),
        ({"max_clients": 0}, "max_clients"),
        ({"min_updates": 0}, "min_updates"),
        ({"aggregator_kwargs": "{not json"}, "aggregator_kwargs"),
        ({"aggregator_kwargs": "[1]"}, "aggregator_kwargs"),
        ({"shards": 0}, "shards must be in [1, 1024]"),
        ({"shards": 1025}, "shards must be in [1, 1024]"),
        ({"shards": 2, "aggregator": "median"}, "median cannot be sharded"),
        ({"shards": 4, "aggregator": "trimmed_mean"}, "trimmed_mean cannot be sharded"),
    ],
)
def test_a_round_with_an_impossible_config_is_refused(config: dict[str, object], problem: str) -> None:
    script, ledger = Script(), Ledger()
    ledger.apply(script.started())
    outcome = ledger.apply(script.requested(**config))
    assert outcome.refusal is not None and outcome.refusal.reason == Reason.INVALID_CONFIG
    assert problem in outcome.refusal.detail
    assert "r1" not in ledger.sessions["s1"].rounds


def test_state_changes_are_stamped_with_the_event_time() -> None:
    script, ledger = Script(), Ledger()
    events = [*_collecting(script), script.update("a"), script.update("b")]
    for event in events:
        ledger.apply(event)
    changed_at = ledger.sessions["s1"].rounds["r1"].changed_at
    assert changed_at[S.REQUESTED] == events[1].occurred_at
    assert changed_at[S.COLLECTING] == events[3].occurred_at
    assert changed_at[S.CLOSED] == events[5].occurred_at
