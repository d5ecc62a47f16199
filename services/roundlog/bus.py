"""Kafka plumbing: topic names, topic creation, and producer/consumer factories.

The factories fix the settings every role must agree on: acks=all, idempotent
producers where the broker has them (``Settings.kafka_idempotence``; Tansu has no
InitProducerId) but no transactions (exactly-once comes from database-stored
offsets and deterministic ids instead), no auto-commit, and size limits that
carry one tensor chunk plus its key and headers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.partitioner import murmur2

from roundlog.codec import encode
from roundlog.config import ConfigError, Settings
from roundlog.domain.events import ClientHeartbeat, Event, RegistryEvent, derived_id, partition_key
from roundlog.domain.validation import MAX_CHUNK_BYTES
from roundlog.keys import Signer

#: Payload bytes per record on the tensors topic: the most the contract allows.
TENSOR_CHUNK_BYTES = MAX_CHUNK_BYTES
#: Largest record (chunk + key + headers) and largest producer batch roundlog writes.
MAX_RECORD_BYTES = 2 * 1024 * 1024
#: Topic-level ``max.message.bytes``: a batch of MAX_RECORD_BYTES plus framing. A stock
#: Kafka broker's default (~1 MiB) is just too small for a full chunk with headers.
TOPIC_MAX_MESSAGE_BYTES = MAX_RECORD_BYTES + 64 * 1024

_INFINITE_RETENTION = {"retention.ms": "-1", "retention.bytes": "-1"}


@dataclass(frozen=True)
class Topics:
    """The four topic names under one prefix."""

    events: str
    tensors: str
    clients: str
    deadletter: str

    @classmethod
    def from_prefix(cls, prefix: str) -> Topics:
        return cls(
            events=f"{prefix}.events",
            tensors=f"{prefix}.tensors",
            clients=f"{prefix}.clients",
            deadletter=f"{prefix}.deadletter",
        )

    def all(self) -> tuple[str, ...]:
        return (self.events, self.tensors, self.clients, self.deadletter)


#: The broker stamps each record with its own clock: the time the fold compares ``occurred_at``
#: with (clock skew) and hears heartbeats at is then not the producer's to choose. Apache Kafka
#: honours it; Tansu keeps the producer's timestamp.
_BROKER_TIME = {"message.timestamp.type": "LogAppendTime"}


def _new_topics(topics: Topics, partitions: int, replication_factor: int) -> list[NewTopic]:
    # With acks=all, an event is acknowledged once two replicas hold it (one, unreplicated).
    size = {
        "max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES),
        "min.insync.replicas": str(min(2, replication_factor)),
    }
    configs = {
        topics.events: {**_INFINITE_RETENTION, **_BROKER_TIME, **size},
        topics.tensors: {**_INFINITE_RETENTION, **size},
        topics.clients: {"cleanup.policy": "compact", **_BROKER_TIME, **size},
        topics.deadletter: {**_INFINITE_RETENTION, **_BROKER_TIME, **size},
    }
    return [
        NewTopic(name, partitions, replication_factor, topic_configs=config)
        for name, config in configs.items()
    ]


async def create_topics(settings: Settings) -> dict[str, bool]:
    """Create roundlog's topics; existing ones are left as they are.

    Returns each topic name with whether this call created it. Replication is
    min(3, brokers) so a single-node broker (Tansu, a dev Kafka) works as is.
    """
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        brokers = len((await admin.describe_cluster())["brokers"])
        wanted = _new_topics(Topics.from_prefix(settings.topic_prefix), settings.partitions, min(3, brokers))
        created: dict[str, bool] = {}
        # One request per topic: some clients raise TopicAlreadyExistsError for the whole
        # request instead of reporting error 36 per topic, which would hide the others.
        for topic in wanted:
            try:
                response = await admin.create_topics([topic])
            except TopicAlreadyExistsError:
                created[topic.name] = False
                continue
            for name, code, *rest in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise for_code(code)(f"creating topic {name}: {rest[0] if rest else ''}")
                created[name] = code == 0
        return created
    finally:
        await admin.close()


@functools.lru_cache(maxsize=65536)
def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a key (Java's, aiokafka's): the murmur2 hash
    of its UTF-8 bytes, sign bit cleared, modulo the partition count. Other clients' defaults
    (librdkafka's, Go's) hash differently, so a producer outside roundlog states the partition."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


class Producer(AIOKafkaProducer):
    """An AIOKafkaProducer that knows the key this process signs its events with."""

    def __init__(self, *, signer: Signer | None, must_sign: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.signer = signer
        self.must_sign = must_sign

    def seal(self, value: bytes) -> list[tuple[str, bytes]] | None:
        """The signature headers for an event record; refuses loudly to send unsigned where the fold
        would refuse every event (``ROUNDLOG_AUTH=signed`` without ``ROUNDLOG_KEY_FILE``)."""
        if self.signer is not None:
            return self.signer.headers(value)
        if self.must_sign:
            raise ConfigError(
                "ROUNDLOG_AUTH=signed: set ROUNDLOG_KEY_FILE to this process's key (`roundlog keys create`)"
            )
        return None


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    """A producer for roundlog's topics (call inside a running event loop, then ``await start()``);
    it signs events with ``settings.key_file`` when one is set."""
    kwargs: dict[str, Any] = {
        **settings.kafka_client_kwargs(),
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotence,
        "max_request_size": MAX_RECORD_BYTES,
        "max_batch_size": MAX_RECORD_BYTES,
        "linger_ms": 5,
        **overrides,
    }
    if kwargs.get("transactional_id"):
        raise ValueError("transactions are not used: exactly-once comes from stored offsets and event ids")
    signer = Signer.from_file(settings.key_file) if settings.key_file else None
    return Producer(signer=signer, must_sign=settings.auth, **kwargs)


class Consumer(AIOKafkaConsumer):
    """An AIOKafkaConsumer whose ``end_offsets`` is the true high watermark on every broker.

    Tansu answers ListOffsets(latest) with the base offset of the partition's last record
    batch plus one, which falls short when that batch holds several records. A fetch at that
    offset returns the last batch and the real high watermark, so the answer is checked by a
    fetch through a short-lived group-less consumer; on Apache Kafka both agree.
    """

    def __init__(self, *topics: str, probe_kwargs: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*topics, **kwargs)
        self._probe_kwargs = probe_kwargs

    async def topic_partitions(self, *topics: str) -> list[TopicPartition]:
        """Every partition of ``topics``, from fresh cluster metadata; a missing topic is an error.

        ``partitions_for_topic`` knows only the topics this consumer has assigned or subscribed
        (Apache Kafka answers a metadata request for those alone), so it cannot be asked first.
        """
        cluster = await self._client.fetch_all_metadata()
        tps = []
        for topic in topics:
            partitions = cluster.partitions_for_topic(topic)
            if not partitions:
                raise RuntimeError(f"topic {topic} does not exist: run `roundlog topics create`")
            tps += [TopicPartition(topic, p) for p in sorted(partitions)]
        return tps

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        reported: dict[TopicPartition, int] = await super().end_offsets(list(partitions))
        nonempty = [tp for tp, end in reported.items() if end > 0]
        if not nonempty:
            return reported
        probe = AIOKafkaConsumer(**self._probe_kwargs)
        await probe.start()
        try:
            probe.assign(nonempty)
            for tp in nonempty:
                probe.seek(tp, reported[tp] - 1)
            pending = set(nonempty)
            while pending:
                batch = await probe.getmany(*pending, timeout_ms=1000)
                for tp in batch:
                    highwater = probe.highwater(tp)
                    reported[tp] = max(reported[tp], highwater if highwater is not None else 0)
                    pending.discard(tp)
        finally:
            await probe.stop()
        return reported


def group_instance_id(settings: Settings, group_id: str) -> str | None:
    """The static member id of this process in ``group_id``: ROUNDLOG_INSTANCE_ID plus the role
    (the group's name after the prefix), so ``--role all`` gives each of its groups its own id."""
    if settings.instance_id is None:
        return None
    return f"{settings.instance_id}.{group_id.removeprefix(settings.topic_prefix + '.')}"


def make_consumer(settings: Settings, group_id: str | None = None, **overrides: Any) -> Consumer:
    """A consumer that never auto-commits: each role decides where its offsets live.

    A group member is static when ``settings.instance_id`` is set: a process restarted under
    the same id gets its partitions back at once, instead of after the session timeout that
    frees the dead member's. It then no longer leaves the group when it stops (aiokafka sends
    no LeaveGroup for static members), so a member removed for good is noticed only after the
    session timeout.
    """
    connection = settings.kafka_client_kwargs()
    kwargs: dict[str, Any] = {
        **connection,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 2 * TOPIC_MAX_MESSAGE_BYTES,
        "fetch_max_bytes": 64 * 1024 * 1024,
        **overrides,
    }
    if group_id is not None:
        timeout = settings.group_session_timeout_ms
        kwargs = {
            "session_timeout_ms": timeout,
            "rebalance_timeout_ms": timeout,
            "heartbeat_interval_ms": max(100, timeout // 3),
            "group_instance_id": group_instance_id(settings, group_id),
            **kwargs,
        }
    return Consumer(probe_kwargs={**connection, "enable_auto_commit": False}, **kwargs)


async def publish(producer: Producer, topics: Topics, events: Iterable[Event]) -> None:
    """Send events to their topic, signed, keyed so each session's events keep their order on one
    partition."""
    sent = []
    for event in events:
        value = encode(event)
        topic = topics.clients if isinstance(event, ClientHeartbeat) else topics.events
        key = partition_key(event).encode()
        sent.append(await producer.send(topic, value, key=key, headers=producer.seal(value)))
    for future in sent:
        await future


async def publish_everywhere(producer: Producer, topics: Topics, event: RegistryEvent) -> int:
    """Write a registry event to every events partition, so each partition's fold learns it at a
    position of its own log. Each copy gets its own id (ids are unique across the log); returns
    how many partitions were written."""
    partitions = sorted(await producer.partitions_for(topics.events))
    sent = []
    for partition in partitions:
        copy = dataclasses.replace(event, event_id=derived_id(event.event_id, "partition", str(partition)))
        value = encode(copy)
        key = partition_key(copy).encode()
        sent.append(
            await producer.send(
                topics.events, value, key=key, partition=partition, headers=producer.seal(value)
            )
        )
    for future in sent:
        await future
    return len(partitions)


async def read_from_end(consumer: Consumer, *topics: str) -> None:
    """Assign every partition of ``topics`` to a group-less consumer, positioned at their true ends."""
    tps = await consumer.topic_partitions(*topics)
    consumer.assign(tps)
    for tp, end in (await consumer.end_offsets(tps)).items():
        consumer.seek(tp, end)
