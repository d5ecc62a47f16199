"""Operations plumbing over real connections: HTTP scrapes, a real broker, a real ``roundlog serve``."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from roundlog import observability
from roundlog.bus import Topics, make_consumer, make_producer
from roundlog.config import ConfigError, Settings
from roundlog.observability import Liveness, OpsSettings


def get(url: str) -> tuple[int, str, bytes]:
    """Status, content type and body of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def health(port: int) -> tuple[int, dict[str, Any]]:
    status, content_type, body = get(f"http://127.0.0.1:{port}/healthz")
    assert content_type == "application/json"
    return status, json.loads(body)


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics scrape, parsed by prometheus_client's own parser."""
    status, _, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_health_follows_role_heartbeats() -> None:
    liveness = Liveness()
    async with await observability.serve_health(0, liveness, host="127.0.0.1") as server:
        assert server.port != 0
        status, body = health(server.port)
        assert (status, body) == (503, {"status": "unavailable", "roles": {}})

        with liveness.track("aggregator", stale_after=0.3):
            status, body = health(server.port)
            assert status == 200 and body["status"] == "ok" and body["roles"]["aggregator"]["alive"]
            await asyncio.sleep(0.4)
            status, body = health(server.port)
            assert status == 503 and body["roles"]["aggregator"]["running"]
            liveness.beat("aggregator")
            assert health(server.port)[0] == 200

        status, body = health(server.port)
        assert status == 503 and body["roles"]["aggregator"] == {
            "alive": False,
            "running": False,
            "seconds_since_heartbeat": body["roles"]["aggregator"]["seconds_since_heartbeat"],
        }
        assert get(f"http://127.0.0.1:{server.port}/")[0] == 404


async def test_metrics_scrape_shows_what_roles_counted() -> None:
    role = "test-metrics"
    async with await observability.serve_health(0, Liveness(), host="127.0.0.1") as server:
        before = samples(server.port)
        observability.EVENTS.labels(role, "UpdateReceived").inc(3)
        observability.REJECTED.labels(role, "late").inc()
        observability.EMITTED.labels(role, "RoundAggregated").inc()
        observability.FOLD_BYTES.inc(4096)
        observability.PROJECTION_BATCH_SECONDS.observe(0.02)
        after = samples(server.port)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("roundlog_events_processed_total", role=role, type="UpdateReceived") == 3
    assert delta("roundlog_events_rejected_total", role=role, reason="late") == 1
    assert delta("roundlog_events_emitted_total", role=role, type="RoundAggregated") == 1
    assert delta("roundlog_fold_bytes_total") == 4096
    assert delta("roundlog_projection_batch_seconds_count") == 1
    assert delta("roundlog_projection_batch_seconds_bucket", le="0.025") == 1
    assert any(name == "roundlog_build_info" for name, _ in after)
    assert any(name == "process_resident_memory_bytes" for name, _ in after)


def test_every_roundlog_metric_says_what_it_means() -> None:
    families = [f for f in observability.REGISTRY.collect() if f.name.startswith("roundlog_")]
    assert {f.name for f in families} >= {
        "roundlog_events_processed",
        "roundlog_events_rejected",
        "roundlog_events_emitted",
        "roundlog_consumer_lag",
        "roundlog_fold_bytes",
        "roundlog_projection_batch_seconds",
        "roundlog_build",
        "roundlog_up",
    }
    assert all(len(f.documentation) > 30 for f in families)


def lag_gauge(role: str, topic: str, partition: int) -> float | None:
    labels = {"role": role, "topic": topic, "partition": str(partition)}
    return observability.REGISTRY.get_sample_value("roundlog_consumer_lag", labels)


async def test_lag_per_assigned_partition(topics: tuple[Settings, Topics]) -> None:
    settings, names = topics
    producer = make_producer(settings)
    await producer.start()
    try:
        for partition, count in ((0, 5), (1, 3)):
            for _ in range(count):
                await producer.send_and_wait(names.events, b"record", partition=partition)
    finally:
        await producer.stop()

    role = "test-lag"
    p0, p1 = TopicPartition(names.events, 0), TopicPartition(names.events, 1)
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        consumer.assign([p0, p1])
        consumer.seek(p0, 2)
        consumer.seek(p1, 0)
        assert await observability.lag_probe(consumer, names.events, role) == {0: 3, 1: 3}
        assert lag_gauge(role, names.events, 0) == 3

        consumer.assign([p0])  # partition 1 went to another member: its gauge must go
        consumer.seek(p0, 5)
        async with observability.lag_watch(consumer, names.events, role, interval=0.05):
            await asyncio.sleep(0.5)
            assert lag_gauge(role, names.events, 0) == 0
            assert lag_gauge(role, names.events, 1) is None
        assert lag_gauge(role, names.events, 0) is None
    finally:
        await consumer.stop()


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_json_log_lines_carry_the_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    observability.configure_logging("INFO", json=True)
    log = logging.getLogger("roundlog.test")
    log.debug("not at INFO")
    log.info("round %s closed", "r1", extra={"session_id": "s1", "round_id": "r1", "partition": 4})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"round_id": "r2"})

    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first.pop("time").endswith("+00:00")
    assert first == {
        "level": "INFO",
        "logger": "roundlog.test",
        "message": "round r1 closed",
        "session_id": "s1",
        "round_id": "r1",
        "partition": 4,
    }
    assert second["round_id"] == "r2" and "ValueError: boom" in second["exception"]


@pytest.mark.usefixtures("root_logging")
def test_text_log_lines_carry_the_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    observability.configure_logging("INFO", json=False)
    logging.getLogger("roundlog.test").warning("late update", extra={"session_id": "s1", "round_id": "r1"})
    assert stream.getvalue().rstrip().endswith("WARNING roundlog.test: late update session_id=s1 round_id=r1")


@pytest.mark.parametrize(
    "env",
    [
        {"ROUNDLOG_METRICS_PORT": "http"},
        {"ROUNDLOG_METRICS_PORT": "70000"},
        {"ROUNDLOG_LOG_FORMAT": "xml"},
        {"ROUNDLOG_LOG_LEVEL": "LOUD"},
        {"ROUNDLOG_HEALTH_STALE_SECONDS": "0"},
        {"ROUNDLOG_HEALTH_STALE_SECONDS": "nan"},
    ],
)
def test_malformed_ops_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        OpsSettings.from_env(env)


def test_ops_settings_defaults() -> None:
    assert OpsSettings.from_env({}) == OpsSettings(
        metrics_port=9400, log_format="text", log_level="INFO", stale_after=60.0
    )


async def test_serve_answers_health_and_metrics_on_its_port(
    topics: tuple[Settings, Topics], tmp_path: Path
) -> None:
    settings, _ = topics
    port = free_port()
    env = {**os.environ, **settings.env(), "ROUNDLOG_METRICS_PORT": str(port), "ROUNDLOG_LOG_FORMAT": "json"}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "roundlog", "serve", "--role", "aggregator"], env=env, stderr=log_file
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                status, body = health(port)
            except urllib.error.URLError:
                status, body = 0, {}
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert (status, body["roles"]["aggregator"]["alive"]) == (200, True)
        scraped = samples(port)
        assert scraped[("roundlog_up", (("role", "aggregator"),))] == 1
        assert any(name == "roundlog_build_info" for name, _ in scraped)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("serving /metrics") and line["port"] == port for line in lines)


async def test_a_role_waiting_on_its_group_beats_unless_held() -> None:
    """``beating`` keeps a role alive through a long ``getmany`` (a rebalance), not through a hang."""
    role, held = "test-beating", False

    async def rebalance() -> str:
        await asyncio.sleep(0.8)
        return "batch"

    with observability.LIVENESS.track(role, stale_after=0.3):
        assert await observability.beating(role, rebalance(), alive=lambda: not held, every=0.05) == "batch"
        assert observability.LIVENESS.status()[role]["alive"]
        held = True  # e.g. a rebalance callback stuck on a database lock
        assert await observability.beating(role, rebalance(), alive=lambda: not held, every=0.05) == "batch"
        assert not observability.LIVENESS.status()[role]["alive"]
