"""Static group membership: every role SIGKILLed mid-session and restarted at once under its
instance id resumes, and the session ends as if nothing happened. How fast is for
bench/bench_recovery.py; here only what it does."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
from collections import Counter

import pytest

from roundlog.bus import Topics, group_instance_id
from roundlog.config import ConfigError, Settings
from roundlog.domain.events import RoundAggregated, SessionFinished
from roundlog.projections.schema import upgrade
from roundlog.replay import replay

from tests.integration.harness import (
    caught_up,
    clients,
    first_aggregate,
    fold_log,
    role_process,
    start_sessions,
    stop_process,
    wait_until_finished,
)

ROUNDS = 3
ROLES = ("coordinator", "aggregator", "projector")


def test_each_role_of_a_process_gets_its_own_instance_id() -> None:
    settings = Settings.from_env(
        {
            "ROUNDLOG_KAFKA_BOOTSTRAP": "kafka:9092",
            "ROUNDLOG_DATABASE_URL": "postgresql://db/roundlog",
            "ROUNDLOG_TOPIC_PREFIX": "fl",
            "ROUNDLOG_INSTANCE_ID": "roundlog-projector-0",
        }
    )
    assert settings.env()["ROUNDLOG_INSTANCE_ID"] == "roundlog-projector-0"
    assert group_instance_id(settings, "fl.projector") == "roundlog-projector-0.projector"
    assert group_instance_id(settings, "fl.aggregator") == "roundlog-projector-0.aggregator"
    assert group_instance_id(dataclasses.replace(settings, instance_id=None), "fl.projector") is None


@pytest.mark.parametrize("value", ["pod 0", "a/b", "x" * 201])
def test_malformed_instance_ids_are_refused(value: str) -> None:
    env = {"ROUNDLOG_KAFKA_BOOTSTRAP": "k:9092", "ROUNDLOG_DATABASE_URL": "postgresql://db/x"}
    with pytest.raises(ConfigError, match="ROUNDLOG_INSTANCE_ID"):
        Settings.from_env({**env, "ROUNDLOG_INSTANCE_ID": value})


async def test_every_role_killed_and_restarted_under_its_instance_id_resumes(
    topics: tuple[Settings, Topics], database_url: str
) -> None:
    settings = dataclasses.replace(topics[0], database_url=database_url)
    names = topics[1]
    await asyncio.to_thread(upgrade, database_url)

    def start(role: str) -> subprocess.Popen[bytes]:
        return role_process(settings, role, ROUNDLOG_INSTANCE_ID=f"{role}-0")

    roles = {role: start(role) for role in ROLES}
    try:
        async with clients(settings, 3):
            [session] = await start_sessions(settings, names, 1, rounds=ROUNDS, round_timeout=60)
            await first_aggregate(settings, names)  # mid-session: every group has formed
            for role in ROLES:
                roles[role].send_signal(signal.SIGKILL)
                roles[role].wait()
                roles[role] = start(role)
            await wait_until_finished(settings, names, {session}, timeout=180)
        await caught_up(settings, names)
    finally:
        for process in roles.values():
            stop_process(process)

    applied = [event for event, outcome in await fold_log(settings, names) if outcome.applied]
    [finished] = [e for e in applied if isinstance(e, SessionFinished)]
    assert finished.session_id == session and finished.succeeded, finished.reason
    aggregated = Counter(e.round_id for e in applied if isinstance(e, RoundAggregated))
    assert len(aggregated) == ROUNDS and set(aggregated.values()) == {1}
    report = await replay(settings, "recovery_replay")
    assert report.identical, report.render()
