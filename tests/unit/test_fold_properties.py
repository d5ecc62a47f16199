"""Properties of the fold over arbitrary logs: duplicates, garbage and any order included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from roundlog.domain.events import Event, Task, UpdateReceived
from roundlog.domain.ledger import Ledger
from roundlog.domain.round import TERMINAL, RoundState

from tests.builders import Script, uid

SESSIONS = ("s1", "s2")
ROUNDS = ("r1", "r2", "r3")
CLIENTS = ("a", "b", "c", "d")
MODELS = ("m0", "m1")
KINDS = (
    "started",
    "requested",
    "staged",
    "assigned",
    "update",
    "update_reusing_id",
    "validation",
    "prediction",
    "rejected",
    "timed_out",
    "aggregated",
    "failed",
    "finished",
    "repeat",
)

Move = tuple[str, str, str, str, str, int]

noise = st.tuples(
    st.sampled_from(KINDS),
    st.sampled_from(SESSIONS),
    st.sampled_from(ROUNDS),
    st.sampled_from(CLIENTS),
    st.sampled_from(MODELS),
    st.integers(min_value=-1, max_value=4),
)


def happy_path(sid: str, n_clients: int, buffer_size: int) -> list[Move]:
    """A session that trains, validates and predicts, so random noise lands in every state."""
    moves: list[Move] = [("started", sid, "r1", "a", "m0", 2)]
    for rid in ROUNDS:
        moves += [
            ("requested", sid, rid, "a", "m0", buffer_size),
            ("staged", sid, rid, "a", "m0", 0),
            ("assigned", sid, rid, "a", "m0", n_clients),
        ]
        kind = {"r1": "update", "r2": "validation", "r3": "prediction"}[rid]
        moves += [(kind, sid, rid, c, "m0", 0) for c in CLIENTS]
        moves += [("timed_out", sid, rid, "a", "m0", 0)]
    moves += [
        ("rejected", sid, "r1", "a", "m0", 0),
        ("aggregated", sid, "r1", "a", "m0", 2),
        ("finished", sid, "r1", "a", "m0", 1),
    ]
    return moves


@st.composite
def moves(draw: st.DrawFn) -> list[Move]:
    """Two happy sessions, partly dropped, shuffled locally and salted with noise and repeats."""
    plan: list[Move] = []
    for sid in SESSIONS:
        plan += happy_path(sid, draw(st.integers(0, 4)), draw(st.sampled_from([-1, 1, 2, 3, 9])))
    kept = [m for m in plan if draw(st.integers(0, 9)) > 0]
    for _ in range(draw(st.integers(0, 6))):
        if len(kept) > 1:
            i = draw(st.integers(0, len(kept) - 2))
            kept[i], kept[i + 1] = kept[i + 1], kept[i]
    for position, move in draw(st.lists(st.tuples(st.integers(0, len(kept)), noise), max_size=20)):
        kept.insert(position, move)
    return kept


def build_log(plan: list[Move]) -> list[Event]:
    """Turns moves into events; the same plan always gives the same log."""
    scripts = {sid: Script(sid) for sid in SESSIONS}
    log: list[Event] = []
    for kind, sid, rid, client, model, n in plan:
        if kind == "repeat":
            if log:
                log.append(log[n % len(log)])
        else:
            log.append(make_event(scripts[sid], kind, rid, client, model, n))
    return log


def make_event(s: Script, kind: str, rid: str, client: str, model: str, n: int) -> Event:
    task = (Task.TRAINING, Task.VALIDATION, Task.INFERENCE)[ROUNDS.index(rid)]
    match kind:
        case "started":
            return s.started(rounds=max(n, 0), model_id=model)
        case "requested":
            return s.requested(rid, task, model, buffer_size=n if n != 0 else 1, min_updates=max(n, 1))
        case "staged":
            return s.staged(rid, model)
        case "assigned":
            return s.assigned(rid, CLIENTS[: max(n, 0)])
        case "update":
            return s.update(client, rid)
        case "update_reusing_id":
            return s.update(client, rid, update_id=uid(CLIENTS[n % 4], rid))
        case "validation":
            return s.validation(client, rid, model)
        case "prediction":
            return s.prediction(client, rid, model)
        case "rejected":
            return s.rejected(client, rid)
        case "timed_out":
            return s.timed_out(rid)
        case "aggregated":
            return s.aggregated(rid, tuple(uid(c, rid) for c in CLIENTS[: max(n, 0)]), parent=model)
        case "failed":
            return s.failed(rid)
        case _:
            return s.finished(succeeded=n > 0)


def fold(log: list[Event]) -> Ledger:
    ledger = Ledger()
    for event in log:
        ledger.apply(event)
    return ledger


@settings(max_examples=400, deadline=None)
@given(moves())
def test_the_fold_is_total_and_deterministic(plan: list[Move]) -> None:
    log = build_log(plan)
    assert fold(log) == fold(log)


@settings(max_examples=400, deadline=None)
@given(moves())
def test_invariants_hold_after_every_event(plan: list[Move]) -> None:
    ledger = Ledger()
    ended: dict[tuple[str, str], RoundState] = {}
    for event in build_log(plan):
        session = ledger.sessions.get(getattr(event, "session_id", ""))
        round_ = session.rounds.get(getattr(event, "round_id", "")) if session else None
        state_before = round_.state if round_ else None
        outcome = ledger.apply(event)

        if isinstance(event, UpdateReceived) and outcome.applied:
            assert state_before == RoundState.COLLECTING, "an update is accepted only while collecting"
        for session in ledger.sessions.values():
            for r in session.rounds.values():
                clients = [u.client_id for u in r.accepted.values()]
                assert len(clients) == len(set(clients)), "one accepted update per client"
                assert set(clients) <= set(r.assigned), "only assigned clients are accepted"
                if r.assigned:
                    assert len(r.accepted) <= r.buffer_target, "never more than buffer_size accepted"
                key = (session.session_id, r.round_id)
                if key in ended:
                    assert r.state == ended[key], "terminal states stay terminal"
                elif r.state in TERMINAL:
                    ended[key] = r.state
