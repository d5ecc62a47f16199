"""Scale-out, proven: two aggregators and two projectors share the partitions, one of each is SIGKILLed.

Four sessions run at once over the group's members. Afterwards every round has taken effect
exactly once, every model equals a single-process re-fold of the same log bit for bit, and
the projections equal a clean single-process replay of the whole log. The deployment signs
its events (ROUNDLOG_AUTH=signed): every party has its own registered key, and every fold,
the replay's included, checks every signature.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections import Counter
from pathlib import Path

from roundlog.audit import verify_models
from roundlog.bus import Topics
from roundlog.client import provision_keys
from roundlog.clock import utc_now
from roundlog.config import Settings
from roundlog.domain.events import RoundAggregated, SessionFinished
from roundlog.domain.rules import Reason
from roundlog.projections.schema import upgrade
from roundlog.replay import replay

from tests.integration.harness import (
    caught_up,
    client_ids,
    clients,
    first_aggregate,
    fold_log,
    role_process,
    start_sessions,
    stop_process,
    wait_until_finished,
)

AUTH_REASONS = {
    Reason.UNSIGNED,
    Reason.BAD_SIGNATURE,
    Reason.UNKNOWN_KEY,
    Reason.REVOKED_KEY,
    Reason.NOT_PERMITTED,
}
SESSIONS = 4
ROUNDS = 3


async def test_two_of_each_role_share_the_work_and_survive_a_kill(
    topics: tuple[Settings, Topics], database_url: str, tmp_path: Path
) -> None:
    names = topics[1]
    await asyncio.to_thread(upgrade, database_url)
    signed = await provision_keys(
        dataclasses.replace(topics[0], database_url=database_url), tmp_path, client_ids(4)
    )
    settings = signed.roles
    roles = {
        "coordinator": [role_process(settings, "coordinator")],
        "aggregator": [role_process(settings, "aggregator") for _ in range(2)],
        "projector": [role_process(settings, "projector") for _ in range(2)],
    }
    try:
        # training takes a while, so every session is still running when the kills come
        async with clients(settings, 4, train_seconds=1.0, signed=signed):
            sessions = set(
                await start_sessions(signed.operator, names, SESSIONS, rounds=ROUNDS, round_timeout=60)
            )
            # mid-run: the first model is out, so the groups have formed and rounds are under way
            await first_aggregate(settings, names)
            for role in ("aggregator", "projector"):
                roles[role][0].send_signal(signal.SIGKILL)
                roles[role][0].wait()
            killed_at = utc_now()
            await wait_until_finished(settings, names, sessions, timeout=240)
        await caught_up(settings, names)
    finally:
        for processes in roles.values():
            for process in processes:
                stop_process(process)

    folded = await fold_log(settings, names)
    applied = [event for event, outcome in folded if outcome.applied]
    finished = [e for e in applied if isinstance(e, SessionFinished)]
    assert all(e.occurred_at > killed_at for e in finished), "the kills came before any session ended"
    # every event the parties sent was signed by a key that may send it
    assert not [
        (e, o.refusal) for e, o in folded if o.refusal is not None and o.refusal.reason in AUTH_REASONS
    ]
    assert {e.session_id for e in finished} == sessions and all(e.succeeded for e in finished), [
        e.reason for e in finished if not e.succeeded
    ]
    per_round = Counter((e.session_id, e.round_id) for e in applied if isinstance(e, RoundAggregated))
    assert len(per_round) == SESSIONS * ROUNDS and set(per_round.values()) == {1}

    audit = await verify_models(settings)
    assert audit.rounds_checked == SESSIONS * ROUNDS and audit.ok, audit.mismatches

    report = await replay(settings, "scale_out_replay")
    assert report.identical, report.render()
