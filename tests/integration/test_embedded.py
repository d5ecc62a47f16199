"""The embedded stack, `roundlog up`, `roundlog topics create` and the wheel, against real servers.

Process checks read /proc: a pid counts as gone once it no longer exists or is a zombie.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import sqlalchemy as sa
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from roundlog.bus import TENSOR_CHUNK_BYTES, Topics, create_topics, make_consumer, make_producer
from roundlog.cli import main
from roundlog.config import Settings
from roundlog.embedded import DATABASE_VAR, KAFKA_VAR, EmbeddedStack, stack_settings

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def postgres_processes(database_url: str) -> tuple[Path, list[int]]:
    """The embedded server's temp folder, and its postmaster with the postmaster's children."""
    pgdata = Path(sa.make_url(database_url).query["host"])  # type: ignore[arg-type]
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    return pgdata.parent, [postmaster, *children(postmaster)]


def assert_gone(pids: Iterable[int], folder: Path) -> None:
    pids = list(pids)
    assert eventually(lambda: not any(alive(pid) for pid in pids)), [p for p in pids if alive(p)]
    assert eventually(lambda: not folder.exists()), f"{folder} left behind"


async def round_trip(settings: Settings) -> None:
    """An event and a full tensor chunk with headers go through the broker and come back."""
    await create_topics(settings)
    topics = Topics.from_prefix(settings.topic_prefix)
    chunk = os.urandom(TENSOR_CHUNK_BYTES)
    producer = make_producer(settings)
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(topics.events, b"event", key=b"session"),
            await producer.send_and_wait(topics.tensors, chunk, key=b"update", headers=[("seq", b"0")] * 8),
        ]
    finally:
        await producer.stop()
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        received = []
        for meta in sent:
            tp = TopicPartition(meta.topic, meta.partition)
            consumer.assign([tp])
            consumer.seek(tp, meta.offset)
            received.append(await asyncio.wait_for(consumer.getone(), 10))
    finally:
        await consumer.stop()
    assert [(r.key, r.value) for r in received] == [(b"session", b"event"), (b"update", chunk)]
    assert list(received[1].headers) == [("seq", b"0")] * 8


def select_one(database_url: str) -> int:
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("select 1")).scalar_one())
    finally:
        engine.dispose()


async def test_embedded_stack_answers_then_leaves_nothing() -> None:
    started = time.monotonic()
    with EmbeddedStack() as stack:
        print(f"embedded stack up in {time.monotonic() - started:.2f}s")
        settings = Settings.from_env(stack.env())
        await round_trip(settings)
        assert select_one(settings.database_url) == 1
        assert stack.root is not None
        folder, postgres = postgres_processes(settings.database_url)
        assert folder == stack.root
        pids = [*stack.pids().values(), *postgres]
        assert set(stack.pids()) == {"tansu", "postgres", "watchdog"}
    assert_gone(pids, folder)


def test_stack_settings_uses_the_servers_the_environment_names(stack: Settings) -> None:
    before = set(children(os.getpid()))
    with stack_settings(stack.env()) as settings:
        assert settings == stack
        assert set(children(os.getpid())) == before


def test_stack_settings_starts_only_what_is_missing(stack: Settings) -> None:
    with stack_settings({KAFKA_VAR: stack.kafka_bootstrap}) as settings:
        assert settings.kafka_bootstrap == stack.kafka_bootstrap
        assert settings.database_url != stack.database_url
        assert select_one(settings.database_url) == 1
        folder, postgres = postgres_processes(settings.database_url)
    assert_gone(postgres, folder)


async def start_roundlog_up(*options: str, lines: int = 2) -> tuple[asyncio.subprocess.Process, Settings]:
    """``roundlog up OPTIONS`` with neither server named; the settings of the ``lines`` it prints."""
    env = {k: v for k, v in os.environ.items() if k not in (KAFKA_VAR, DATABASE_VAR)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roundlog", "up", *options, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    printed = {}
    for _ in range(lines):
        line = (await asyncio.wait_for(proc.stdout.readline(), 180)).decode()
        name, _, value = line.strip().partition("=")
        printed[name] = value
    assert {KAFKA_VAR, DATABASE_VAR} <= set(printed), printed
    return proc, Settings.from_env(printed)


async def test_roundlog_up_serves_until_sigterm() -> None:
    proc, settings = await start_roundlog_up()
    try:
        await round_trip(settings)
        assert select_one(settings.database_url) == 1
        folder, postgres = postgres_processes(settings.database_url)
        pids = [*children(proc.pid), *postgres]
        assert len(pids) >= 4  # tansu, watchdog, postmaster and its workers
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    assert_gone(pids, folder)


async def test_sigkill_of_roundlog_up_takes_its_servers_down() -> None:
    proc, settings = await start_roundlog_up()
    folder, postgres = postgres_processes(settings.database_url)
    pids = [*children(proc.pid), *postgres]
    assert len(pids) >= 4  # tansu, watchdog, postmaster and its workers
    proc.kill()
    await proc.wait()
    assert_gone(pids, folder)


async def test_topics_create_twice_is_a_noop_the_second_time(
    stack: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings.from_env({**stack.env(), "ROUNDLOG_TOPIC_PREFIX": f"test-{uuid.uuid4().hex[:12]}"})
    for name, value in settings.env().items():
        monkeypatch.setenv(name, value)
    names = Topics.from_prefix(settings.topic_prefix).all()

    assert await asyncio.to_thread(main, ["topics", "create"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"created {name}" for name in names]
    assert await asyncio.to_thread(main, ["topics", "create"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"exists  {name}" for name in names]

    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        # a broker of a multi-node cluster may answer before the new topics' metadata reached it
        for _ in range(50):
            described = await admin.describe_topics(list(names))
            if all(t["partitions"] for t in described):
                break
            await asyncio.sleep(0.2)
        assert [len(t["partitions"]) for t in described] == [settings.partitions] * len(names)
        await admin.delete_topics(list(names))
    finally:
        await admin.close()


def test_wheel_ships_schemas_migrations_and_the_kafka_pom(tmp_path: Path) -> None:
    """Build from a clean copy (no stale build/), with a probe migration version in a plain folder."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO / "services", src / "services", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    package = src / "services" / "roundlog"
    probe = package / "migrations" / "versions" / "0000_probe.py"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('"""A migration version the wheel must carry."""\n')

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        timeout=120,
    )
    (wheel,) = (tmp_path / "dist").glob("roundlog-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        entry_points = archive.read("roundlog-0.1.0.dist-info/entry_points.txt").decode()

    data = {
        f"roundlog/{path.relative_to(package).as_posix()}"
        for folder in ("schemas", "migrations", "kafka")
        for path in (package / folder).rglob("*")
        if path.is_file()
    }
    assert any(name.endswith(".avsc") for name in data)
    assert any(name.startswith("roundlog/schemas/history/") for name in data)
    assert "roundlog/kafka/pom.xml" in data  # `roundlog up --broker kafka` from an installed wheel
    assert data - shipped == set()
    assert "roundlog = roundlog.cli:main" in entry_points
