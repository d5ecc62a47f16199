"""What a session asks for next, as events: the chaining rules of a session.

``follow_up`` is pure and deterministic: the same session state gives the same
events with the same ids and times, so a coordinator that emits them twice after a
crash emits the same events twice, and the second copy changes nothing.
"""

from __future__ import annotations

from datetime import datetime

from roundlog.domain.events import RoundConfig, RoundRequested, SessionFinished, Task, derived_id
from roundlog.domain.round import Round, RoundState
from roundlog.domain.session import Session


def round_id_for(session_id: str, round_no: int, task: Task) -> str:
    return derived_id(session_id, "round", str(round_no), task)


def round_request(
    session_id: str, round_no: int, task: Task, model_id: str, config: RoundConfig, occurred_at: datetime
) -> RoundRequested:
    """A round request with the ids every requester derives alike, so asking twice is one request."""
    round_id = round_id_for(session_id, round_no, task)
    return RoundRequested(
        event_id=derived_id(round_id, "requested"),
        occurred_at=occurred_at,
        session_id=session_id,
        round_id=round_id,
        round_no=round_no,
        task=task,
        model_id=model_id,
        config=config,
    )


def request_round(
    session: Session, round_no: int, task: Task, model_id: str, after: Round | None
) -> RoundRequested:
    """The session's plan asks for a round when the round it follows ended."""
    config = session.started.round_config
    return round_request(session.session_id, round_no, task, model_id, config, _moment(session, after))


def follow_up(session: Session) -> RoundRequested | SessionFinished | None:
    """The next event the session's own plan calls for, or None while a round is still open."""
    if session.is_terminal:
        return None
    # Inference rounds stand outside the plan: anyone may ask for one on any of the session's models.
    rounds = [r for r in session.rounds_in_order() if r.task != Task.INFERENCE]
    if not rounds:
        return request_round(session, 1, Task.TRAINING, session.started.initial_model_id, None)
    last = rounds[-1]
    if not last.is_terminal:
        return None
    if last.task == Task.TRAINING and last.state == RoundState.FAILED and session.started.stop_on_failure:
        return _finish(
            session,
            last,
            succeeded=False,
            reason=f"round {last.round_no} failed: {last.fail_reason}",
        )
    if (
        last.task == Task.TRAINING
        and last.state == RoundState.AGGREGATED
        and session.started.validate_each_round
    ):
        return request_round(session, last.round_no, Task.VALIDATION, session.latest_model_id, last)
    if last.round_no < session.started.rounds:
        return request_round(session, last.round_no + 1, Task.TRAINING, session.latest_model_id, last)
    failed = [r.round_no for r in rounds if r.task == Task.TRAINING and r.state == RoundState.FAILED]
    reason = f"rounds {failed} failed" if failed else ""
    return _finish(session, last, succeeded=not failed, reason=reason)


def _finish(session: Session, last: Round, *, succeeded: bool, reason: str) -> SessionFinished:
    return SessionFinished(
        event_id=derived_id(session.session_id, "finished"),
        occurred_at=_moment(session, last),
        session_id=session.session_id,
        succeeded=succeeded,
        reason=reason,
        final_model_id=session.latest_model_id,
    )


def _moment(session: Session, after: Round | None) -> datetime:
    """A follow-up happens when the round it follows ended: a time taken from the log, not a clock."""
    if after is None:
        return session.started.occurred_at
    return after.changed_at[after.state]
