"""Every failure a user can cause is one line on stderr and a non-zero exit, never a traceback.

Most cases run ``main`` in-process (environment by monkeypatch, stderr by capsys); the ones that
meet an unreachable broker run ``python -m roundlog`` instead, because what aiokafka logs reaches
a user's stderr only through the process's own logging set-up. Servers are the real embedded
ones, or a closed loopback port where a server must be missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from roundlog.bus import Topics, make_consumer, make_producer
from roundlog.cli import main
from roundlog.client import import_model, start_session
from roundlog.config import Settings
from roundlog.domain.events import RoundConfig
from roundlog.projections.schema import upgrade
from roundlog.roles import projector

from tests.integration.harness import GROUP_SESSION_MS
from tests.integration.test_cli_models import projected
from tests.servers import fresh_database, fresh_topics


def closed_port() -> int:
    """A loopback port nothing listens on: bound by the OS, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_line(code: int, stderr: str, *words: str) -> str:
    """Assert a failed command printed exactly one line on stderr, holding ``words``; return it."""
    assert "Traceback" not in stderr, stderr
    assert code != 0, f"exit 0, stderr: {stderr!r}"
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


async def fails(capsys: pytest.CaptureFixture[str], *argv: str, words: tuple[str, ...]) -> str:
    """Run ``roundlog argv`` in-process (in a thread: it runs its own event loop) and check its line."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    return one_line(code, capsys.readouterr().err, *words)


async def fails_as_process(env: dict[str, str], *argv: str, words: tuple[str, ...]) -> str:
    """Run ``python -m roundlog argv`` with ``env`` over the test's environment and check its line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "roundlog", *argv),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, stderr = await process.communicate()
    assert process.returncode is not None
    return one_line(process.returncode, stderr.decode(), *words)


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Both servers at closed ports, in the environment: a command that reaches one says so."""
    env = {
        "ROUNDLOG_KAFKA_BOOTSTRAP": f"127.0.0.1:{closed_port()}",
        "ROUNDLOG_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@dataclasses.dataclass(frozen=True)
class Seeded:
    settings: Settings
    topics: Topics
    model_id: str
    session_id: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def seeded_servers(stack: Settings) -> AsyncIterator[Seeded]:
    """Topics and a database of this module's own, holding one model and one running session, as
    the projector wrote them. Made once (it waits for a projector): no test here may change them."""
    with fresh_database(stack) as url:
        base = dataclasses.replace(stack, database_url=url, group_session_timeout_ms=GROUP_SESSION_MS)
        async with fresh_topics(base) as (settings, names):
            upgrade(url)
            producer = make_producer(settings)
            await producer.start()
            try:
                model_id, ref = await import_model(producer, names, [("w", np.ones(3, np.float32))], "m")
                session_id = await start_session(
                    producer, names, model_id=model_id, model=ref, rounds=2, config=RoundConfig()
                )
            finally:
                await producer.stop()
            stop = asyncio.Event()
            task = asyncio.create_task(projector.run(settings, stop))
            try:
                await projected(settings, "SELECT 1 FROM sessions WHERE session_id = :s", s=session_id)
            finally:
                stop.set()
                await task
            yield Seeded(settings, names, model_id, session_id)


@pytest.fixture
def seeded(seeded_servers: Seeded, monkeypatch: pytest.MonkeyPatch) -> Seeded:
    """The seeded servers, named in the environment."""
    for variable, value in seeded_servers.settings.env().items():
        monkeypatch.setenv(variable, value)
    return seeded_servers


async def events_end(settings: Settings, names: Topics) -> int:
    """How many records the events topic holds: whether a command produced anything."""
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(await consumer.topic_partitions(names.events))
        return sum(ends.values())
    finally:
        await consumer.stop()


# --- servers missing ---------------------------------------------------------------------------

ANY_ID = "0aac75d2"
SESSION_START = ("session", "start", "--model", ANY_ID, "--rounds", "1")
ROUND_REQUEST = ("round", "request", "--session", ANY_ID, "--task", "training", "--model", ANY_ID)


@pytest.mark.parametrize(
    "argv",
    [
        ("status",),
        ("status", "--session", ANY_ID),
        ("model", "export", ANY_ID, "{tmp}/out.npz"),
        SESSION_START,
        ROUND_REQUEST,
        ("db", "upgrade"),
        ("db", "downgrade", "--to", "base"),
        ("replay",),
    ],
    ids=" ".join,
)
async def test_an_unreachable_postgresql_is_one_line(
    argv: tuple[str, ...], nowhere: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = tuple(a.format(tmp=tmp_path) for a in argv)
    words = ("cannot connect to PostgreSQL", "Connection refused", "ROUNDLOG_DATABASE_URL")
    await fails(capsys, *argv, words=words)


@pytest.mark.parametrize(
    "argv",
    [("topics", "create"), ("model", "import", "{tmp}/m.npz"), ("tail",), ("tail", "--from-beginning")],
    ids=" ".join,
)
async def test_an_unreachable_broker_is_one_line_at_once(
    argv: tuple[str, ...], nowhere: dict[str, str], tmp_path: Path
) -> None:
    np.savez(tmp_path / "m.npz", w=np.ones(3))
    argv = tuple(a.format(tmp=tmp_path) for a in argv)
    started = time.monotonic()
    words = (f"cannot reach the Kafka broker at {nowhere['ROUNDLOG_KAFKA_BOOTSTRAP']}", "is it running")
    await fails_as_process(nowhere, *argv, words=words)
    assert time.monotonic() - started < 10, "a closed port is refused at once: no retrying"


@pytest.mark.parametrize(
    "argv",
    [
        ("session", "start", "--model", "{model}", "--rounds", "1"),
        ("round", "request", "--session", "{session}", "--task", "training", "--model", "{model}"),
        ("model", "export", "{model}", "{tmp}/out.npz"),
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
async def test_an_unreachable_broker_is_one_line_after_a_database_lookup(
    argv: tuple[str, ...], seeded: Seeded, tmp_path: Path
) -> None:
    bootstrap = f"127.0.0.1:{closed_port()}"
    argv = tuple(a.format(model=seeded.model_id, session=seeded.session_id, tmp=tmp_path) for a in argv)
    env = {"ROUNDLOG_KAFKA_BOOTSTRAP": bootstrap}  # the database stays the seeded one
    await fails_as_process(env, *argv, words=(f"cannot reach the Kafka broker at {bootstrap}",))
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("ROUNDLOG_DATABASE_URL", "not a url", ("ROUNDLOG_DATABASE_URL must be a PostgreSQL URL",)),
        ("ROUNDLOG_DATABASE_URL", "mysql://x", ("must be a PostgreSQL URL", "not 'mysql://x'")),
        ("ROUNDLOG_DATABASE_URL", "sqlite://", ("must be a PostgreSQL URL", "sqlite")),
        ("ROUNDLOG_KAFKA_BOOTSTRAP", "127.0.0.1:ninety", ("ROUNDLOG_KAFKA_BOOTSTRAP must be host:port",)),
    ],
)
async def test_a_malformed_server_address_is_one_line(
    variable: str,
    value: str,
    words: tuple[str, ...],
    nowhere: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    commands = [("status",), ("topics", "create")]
    if variable == "ROUNDLOG_DATABASE_URL":  # the db commands read no other server's address
        commands.append(("db", "upgrade"))
    for argv in commands:
        await fails(capsys, *argv, words=words)


@pytest.mark.parametrize(
    "argv", [("db", "upgrade"), ("db", "downgrade", "--to", "base"), ("ui",)], ids=" ".join
)
async def test_commands_that_only_touch_the_tables_need_no_broker_address(
    argv: tuple[str, ...],
    nowhere: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("ROUNDLOG_KAFKA_BOOTSTRAP")
    # They go on to the database (closed here) instead of asking for the broker's address.
    await fails(capsys, *argv, words=("cannot connect to PostgreSQL", "ROUNDLOG_DATABASE_URL"))
    await fails(capsys, "status", words=("ROUNDLOG_KAFKA_BOOTSTRAP not set",))


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        # no java or mvn: Apache Kafka cannot run, and nothing is left behind
        (("up", "--broker", "kafka"), {"PATH": "/nonexistent"}, ("needs java and mvn on PATH",)),
        (("demo", "--broker", "kafka"), {"PATH": "/nonexistent"}, ("needs java and mvn on PATH",)),
        (("up", "--brokers", "3"), {}, ("--brokers 3", "--broker kafka")),
        (("up", "--broker", "kafka", "--brokers", "0"), {}, ("--brokers 0",)),
    ],
)
async def test_a_broker_that_cannot_start_is_one_line(
    argv: tuple[str, ...], env: dict[str, str], words: tuple[str, ...]
) -> None:
    # both servers unset, so `up` would start them
    await fails_as_process(
        {"ROUNDLOG_KAFKA_BOOTSTRAP": "", "ROUNDLOG_DATABASE_URL": "", **env}, *argv, words=words
    )


async def test_a_database_url_with_a_password_is_not_echoed(
    nowhere: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUNDLOG_DATABASE_URL", "mysql://me:hunter2@db.example/x")
    line = await fails(capsys, "status", words=("must be a PostgreSQL URL", "me:***@db.example"))
    assert "hunter2" not in line


# --- files ---------------------------------------------------------------------------------------


def write_npz(kind: str, path: Path) -> None:
    match kind:
        case "text":
            path.write_text("w = [1, 2, 3]\n")
        case "npy":
            np.save(path.with_suffix(".npy"), np.ones(3))
            path.with_suffix(".npy").rename(path)
        case "empty":
            np.savez(path)
        case "object":
            np.savez(path, w=np.ones(3), meta=np.array([{"lr": 0.1}], dtype=object))
        case "strings":
            np.savez(path, w=np.ones(3), labels=np.array(["cat", "dog"]))
        case "records":
            np.savez(path, w=np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]))


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("missing", ("m.npz: No such file or directory",)),
        ("text", ("m.npz is not an .npz file",)),
        ("npy", ("m.npz is not an .npz file",)),
        ("empty", ("m.npz holds no arrays",)),
        ("object", ("array 'meta' is not numeric", "Object arrays")),
        ("strings", ("array 'labels' has dtype <U3", "only bool, integer, float and complex")),
        ("records", ("array 'w' has dtype [('a', '<f4'), ('b', '<i4')]",)),
    ],
)
async def test_a_bad_npz_is_refused_before_the_broker_is_contacted(
    kind: str,
    words: tuple[str, ...],
    nowhere: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "m.npz"
    write_npz(kind, path)
    # the broker is at a closed port: a file that got past the checks would fail differently
    await fails(capsys, "model", "import", str(path), words=words)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("{tmp}/missing/out.npz", ("cannot write", "missing: No such file or directory")),
        ("{tmp}", ("it is a directory",)),
        ("{tmp}/file/out.npz", ("file: Not a directory",)),
        ("/sys/roundlog-test.npz", ("/sys: Permission denied",)),  # even for root
    ],
)
async def test_export_to_an_unwritable_path_is_refused_before_anything_is_fetched(
    target: str,
    words: tuple[str, ...],
    nowhere: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_text("")
    # both servers are at closed ports: the path is judged before either is asked
    await fails(capsys, "model", "export", ANY_ID, target.format(tmp=tmp_path), words=words)


# --- the database's schema -----------------------------------------------------------------------


UNKNOWN_REVISIONS = [
    (("db", "upgrade", "--to", "nope"), ("Can't locate revision identified by 'nope'", "0001")),
    (("db", "downgrade", "--to", "nope"), ("Can't locate revision identified by 'nope'", "head, base")),
    (("db", "downgrade", "--to", "-5"), ("Relative revision -5", "0001")),
]


@pytest.mark.parametrize(
    ("argv", "words"), UNKNOWN_REVISIONS, ids=[" ".join(a) for a, _ in UNKNOWN_REVISIONS]
)
async def test_an_unknown_revision_is_one_line(
    argv: tuple[str, ...],
    words: tuple[str, ...],
    database_url: str,
    nowhere: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ROUNDLOG_DATABASE_URL", database_url)
    await fails(capsys, *argv, words=words)


@pytest.mark.parametrize(
    "argv",
    [
        ("status",),
        ("status", "--session", ANY_ID),
        ("model", "export", ANY_ID, "{tmp}/out.npz"),
        SESSION_START,
        ROUND_REQUEST,
        ("replay",),
    ],
    ids=" ".join,
)
async def test_commands_before_db_upgrade_say_to_run_it(
    argv: tuple[str, ...],
    topics: tuple[Settings, Topics],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in dataclasses.replace(topics[0], database_url=database_url).env().items():
        monkeypatch.setenv(name, value)
    argv = tuple(a.format(tmp=tmp_path) for a in argv)
    await fails(capsys, *argv, words=("does not exist", "run `roundlog db upgrade` first"))


# --- round settings ------------------------------------------------------------------------------

BAD_SETTINGS = [
    (("--aggregator", "fedsomething"), ("unknown aggregator 'fedsomething'", "fedavg")),
    (("--aggregator", "fedadam", "--aggregator-kwargs", '{"etaa": 0.1}'), ("unknown kwargs ['etaa']",)),
    (("--aggregator", "fedadam", "--aggregator-kwargs", '{"eta": -1}'), ("eta must be",)),
    (("--aggregator", "trimmed_mean", "--aggregator-kwargs", '{"beta": 0.7}'), ("beta",)),
    (("--aggregator-kwargs", "{eta: 1}"), ("aggregator_kwargs is not JSON",)),
    (("--round-timeout", "inf"), ("round_timeout must be",)),
    (("--round-timeout", "nan"), ("round_timeout must be",)),
    (("--round-timeout", "1e12"), ("round_timeout must be",)),
    (("--buffer-size", "0"), ("buffer_size must be",)),
]


BAD_SETTINGS_IDS = [" ".join(flags) for flags, _ in BAD_SETTINGS]


@pytest.mark.parametrize(("flags", "words"), BAD_SETTINGS, ids=BAD_SETTINGS_IDS)
async def test_session_start_refuses_bad_settings_before_producing(
    flags: tuple[str, ...], words: tuple[str, ...], seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await events_end(seeded.settings, seeded.topics)
    argv = ("session", "start", "--model", seeded.model_id, "--rounds", "1", *flags)
    await fails(capsys, *argv, words=words)
    assert await events_end(seeded.settings, seeded.topics) == before, "nothing was produced"


@pytest.mark.parametrize(("flags", "words"), BAD_SETTINGS, ids=BAD_SETTINGS_IDS)
async def test_round_request_refuses_bad_settings_before_producing(
    flags: tuple[str, ...], words: tuple[str, ...], seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await events_end(seeded.settings, seeded.topics)
    argv = ("round", "request", "--session", seeded.session_id, "--task", "training")
    await fails(capsys, *argv, "--model", seeded.model_id, *flags, words=words)
    assert await events_end(seeded.settings, seeded.topics) == before, "nothing was produced"
