"""How a session chains its rounds: follow_up asks for each next event, deterministically."""

from __future__ import annotations

from roundlog.domain.decide import follow_up
from roundlog.domain.events import Event, RoundRequested, SessionFinished, Task
from roundlog.domain.ledger import Ledger
from roundlog.domain.round import RoundState
from roundlog.domain.session import Session, SessionState

from tests.builders import Script, uid


def run_session(script: Script, ledger: Ledger, outcome_of: dict[int, str]) -> list[Event]:
    """Plays the coordinator and two clients: follow_up decides, the script answers each round.

    ``outcome_of[round_no]`` is "aggregate" (default) or "fail" for training rounds.
    """
    asked: list[Event] = []
    session = ledger.sessions[script.session_id]
    while (next_event := follow_up(session)) is not None:
        asked.append(next_event)
        assert ledger.apply(next_event).applied
        if isinstance(next_event, SessionFinished):
            break
        rid, model = next_event.round_id, next_event.model_id
        events: list[Event] = [
            script.staged(rid, model),
            script.assigned(rid, ("a", "b")),
        ]
        if next_event.task == Task.VALIDATION:
            events += [
                script.validation("a", rid, model),
                script.validation("b", rid, model),
            ]
        elif outcome_of.get(next_event.round_no, "aggregate") == "fail":
            events += [script.timed_out(rid)]
        else:
            new_model = f"m{next_event.round_no}"
            events += [
                script.update("a", rid),
                script.update("b", rid),
                script.aggregated(rid, (uid("a", rid), uid("b", rid)), new_model, parent=model),
            ]
        for event in events:
            assert ledger.apply(event).applied, event
    return asked


def plan_of(asked: list[Event]) -> list[tuple[int, str, str] | str]:
    return [
        (e.round_no, e.task.value, e.model_id)
        if isinstance(e, RoundRequested)
        else f"finished ok={e.succeeded}"
        for e in asked
        if isinstance(e, (RoundRequested, SessionFinished))
    ]


def started(script: Script, ledger: Ledger, **options: object) -> Session:
    ledger.apply(script.started(**options))  # type: ignore[arg-type]
    return ledger.sessions[script.session_id]


def test_each_round_trains_on_the_model_of_the_previous_one() -> None:
    script, ledger = Script(), Ledger()
    session = started(script, ledger, rounds=3)
    asked = run_session(script, ledger, {})
    assert plan_of(asked) == [
        (1, "training", "m0"),
        (2, "training", "m1"),
        (3, "training", "m2"),
        "finished ok=True",
    ]
    assert session.state == SessionState.COMPLETED
    assert session.rounds_done == 3 and session.latest_model_id == "m3"


def test_a_validation_round_follows_each_training_round_when_asked() -> None:
    script, ledger = Script(), Ledger()
    started(script, ledger, rounds=2, validate_each_round=True)
    asked = run_session(script, ledger, {})
    assert plan_of(asked) == [
        (1, "training", "m0"),
        (1, "validation", "m1"),
        (2, "training", "m1"),
        (2, "validation", "m2"),
        "finished ok=True",
    ]


def test_a_failed_round_stops_the_session_by_default() -> None:
    script, ledger = Script(), Ledger()
    session = started(script, ledger, rounds=3)
    asked = run_session(script, ledger, {2: "fail"})
    assert plan_of(asked) == [
        (1, "training", "m0"),
        (2, "training", "m1"),
        "finished ok=False",
    ]
    assert session.state == SessionState.FAILED
    assert "too_few_updates" in session.finished.reason  # type: ignore[union-attr]


def test_a_session_may_go_on_after_a_failed_round_on_the_last_good_model() -> None:
    script, ledger = Script(), Ledger()
    session = started(script, ledger, rounds=3, stop_on_failure=False)
    asked = run_session(script, ledger, {2: "fail"})
    assert plan_of(asked) == [
        (1, "training", "m0"),
        (2, "training", "m1"),
        (3, "training", "m1"),
        "finished ok=False",
    ]
    assert session.rounds_done == 2 and session.latest_model_id == "m3"


def test_follow_ups_are_the_same_events_when_asked_twice() -> None:
    script, ledger = Script(), Ledger()
    session = started(script, ledger, rounds=2)
    first = follow_up(session)
    assert first == follow_up(session)
    assert first is not None
    ledger.apply(first)
    assert follow_up(session) is None, "nothing more while round 1 is open"
    assert ledger.apply(first).refusal is not None, "the re-emitted request changes nothing"
    assert session.rounds[first.round_id].state == RoundState.REQUESTED  # type: ignore[union-attr]


def test_an_inference_round_asked_from_outside_does_not_move_the_plan() -> None:
    script, ledger = Script(), Ledger()
    session = started(script, ledger, rounds=2)
    first = follow_up(session)
    assert isinstance(first, RoundRequested)
    ledger.apply(first)
    ledger.apply(script.requested("extra", Task.INFERENCE, round_no=7))
    for event in (script.staged("extra"), script.assigned("extra", ("a",)), script.prediction("a", "extra")):
        assert ledger.apply(event).applied
    assert session.rounds["extra"].state == RoundState.COMPLETED
    assert follow_up(session) is None, "round 1 is still open; the finished inference round changes nothing"
