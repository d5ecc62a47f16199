"""``roundlog up --broker kafka --brokers 3``: three Apache Kafka nodes that answer, roundlog's topics
replicated on all of them, and nothing left behind when it stops or dies."""

from __future__ import annotations

import asyncio
import signal

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from roundlog.bus import Topics
from roundlog.config import Settings

from tests.integration.test_embedded import (
    assert_gone,
    children,
    postgres_processes,
    round_trip,
    select_one,
    start_roundlog_up,
)


async def cluster_view(settings: Settings) -> tuple[int, dict[str, set[int]], dict[str, str]]:
    """The brokers the metadata lists; each events partition's replicas; the events topic's min ISR."""
    topics = Topics.from_prefix(settings.topic_prefix)
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        brokers = len((await admin.describe_cluster())["brokers"])
        [events] = await admin.describe_topics([topics.events])
        replicas = {str(p["partition"]): set(p["replicas"]) for p in events["partitions"]}
        [described] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics.events)])
        [(_, _, _, _, entries)] = described.resources
        configs = {name: value for name, value, *_ in entries}
        return brokers, replicas, configs
    finally:
        await admin.close()


async def test_three_nodes_answer_replicate_everything_and_go_away_on_sigterm() -> None:
    proc, settings = await start_roundlog_up("--broker", "kafka", "--brokers", "3", lines=3)
    try:
        assert settings.kafka_idempotence, "Apache Kafka has the idempotent producer"
        assert len(settings.kafka_bootstrap.split(",")) == 3
        await round_trip(settings)  # creates the topics, then an event and a full chunk go through
        brokers, replicas, configs = await cluster_view(settings)
        assert brokers == 3
        assert replicas and all(nodes == {1, 2, 3} for nodes in replicas.values()), replicas
        assert configs["min.insync.replicas"] == "2"
        assert configs["message.timestamp.type"] == "LogAppendTime"
        assert select_one(settings.database_url) == 1
        folder, postgres = postgres_processes(settings.database_url)
        pids = [*children(proc.pid), *postgres]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    assert_gone(pids, folder)


async def test_sigkill_of_roundlog_up_takes_every_jvm_down() -> None:
    proc, settings = await start_roundlog_up("--broker", "kafka", "--brokers", "3", lines=3)
    folder, postgres = postgres_processes(settings.database_url)
    pids = [*children(proc.pid), *postgres]
    assert len(pids) >= 5  # three JVMs, the watchdog, the postmaster
    proc.kill()
    await proc.wait()
    assert_gone(pids, folder)
