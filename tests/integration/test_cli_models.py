"""The model, session, round and status commands through the real stack and the projector."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from roundlog.bus import Topics
from roundlog.cli import main
from roundlog.config import Settings
from roundlog.projections.schema import upgrade
from roundlog.roles import projector

from tests.integration.harness import GROUP_SESSION_MS


@pytest.fixture
def shell(topics: tuple[Settings, Topics], database_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Fresh topics and projection tables, named in the environment as `roundlog up` would."""
    # a short group session timeout: on Tansu a first join waits about half of it
    settings = dataclasses.replace(
        topics[0], database_url=database_url, group_session_timeout_ms=GROUP_SESSION_MS
    )
    upgrade(database_url)
    for name, value in settings.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables, not a terminal: wide enough for whole ids
    return settings


@pytest.fixture
async def stack_env(shell: Settings) -> AsyncIterator[Settings]:
    """The shell's stack with a projector running."""
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(shell, stop))
    yield shell
    stop.set()
    await task


async def roundlog(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a command as the shell would (its own event loop, in a thread) and return what it printed."""
    capsys.readouterr()
    assert await asyncio.to_thread(main, list(argv)) == 0
    return capsys.readouterr().out


async def projected(settings: Settings, query: str, **params: Any) -> Any:
    """The first column of the first row once the projector has written it."""
    engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
    try:
        async with asyncio.timeout(30):
            while True:
                with engine.connect() as conn:
                    value = conn.execute(sa.text(query), params).scalar()
                if value is not None:
                    return value
                await asyncio.sleep(0.2)
    finally:
        engine.dispose()


def arrays() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {
        "conv/kernel": rng.standard_normal((3, 3, 16, 32)).astype(np.float32),
        "dense": rng.standard_normal((600, 600)).astype(np.float32),  # 1.4 MB: several chunks
        "bias": rng.standard_normal(32),
        "steps": np.array(1234, dtype=np.int64),
        "mask": rng.integers(0, 2, (5, 7)).astype(bool),
        "empty": np.zeros((0, 4), np.float16),
        "codes": np.arange(10, dtype=np.uint8),
        "file": np.arange(3, dtype=np.int16),  # numpy.savez's own argument names
        "allow_pickle": np.ones(2, np.complex64),
    }


def savez(path: Path, arrays: dict[str, Any]) -> None:
    """numpy.savez's format, written without it: it takes arrays named "file" for its own argument."""
    with zipfile.ZipFile(path, "w") as npz:
        for name, array in arrays.items():
            with npz.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array)


async def test_a_model_imported_from_npz_exports_identically(
    stack_env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = tmp_path / "in.npz", tmp_path / "out.npz"
    savez(source, arrays())
    model_id = (await roundlog(capsys, "model", "import", str(source))).strip()
    again = (await roundlog(capsys, "model", "import", str(source), "--name", "other")).strip()
    assert again == model_id, "the id derives from the bytes"
    name = await projected(stack_env, "SELECT name FROM models WHERE model_id = :m", m=model_id)
    assert name == "in"

    await roundlog(capsys, "model", "export", model_id[:8], str(target))
    with np.load(source) as want, np.load(target) as got:
        assert got.files == want.files
        for key in want.files:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            np.testing.assert_array_equal(got[key], want[key])


async def test_a_session_and_a_round_started_from_the_shell_show_in_status(
    stack_env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "m.npz"
    np.savez(source, w=np.ones((2, 2), np.float32))
    model_id = (await roundlog(capsys, "model", "import", str(source))).strip()
    await projected(stack_env, "SELECT 1 FROM models WHERE model_id = :m", m=model_id)
    session_id = (
        await roundlog(
            capsys,
            *("session", "start", "--model", model_id[:6], "--rounds", "3", "--buffer-size", "2"),
            *("--aggregator", "fedadam", "--aggregator-kwargs", '{"eta": 0.01}', "--name", "shell"),
        )
    ).strip()
    config = await projected(stack_env, "SELECT config FROM sessions WHERE session_id = :s", s=session_id)
    assert config["buffer_size"] == 2 and config["aggregator"] == "fedadam"
    assert config["aggregator_kwargs"] == {"eta": 0.01} and config["round_timeout"] == 180.0

    round_id = (
        await roundlog(
            capsys,
            *("round", "request", "--session", session_id[:8], "--task", "inference", "--model", model_id),
            *("--round-timeout", "5"),
        )
    ).strip()
    row = await projected(
        stack_env,
        "SELECT json_build_array(round_no, state, round_timeout, buffer_size, aggregator) FROM rounds "
        "WHERE round_id = :r",
        r=round_id,
    )
    assert row == [1, "requested", 5.0, 2, "fedadam"], "unset flags take the session's settings"

    listing = await roundlog(capsys, "status")
    assert session_id[:8] in listing and "shell" in listing and "0/3" in listing
    detail = await roundlog(capsys, "status", "--session", session_id[:8])
    assert session_id in detail and "inference" in detail and "requested" in detail


async def test_unknown_ids_and_bad_settings_are_refused(
    shell: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = ["session", "start", "--model", "m", "--rounds", "1"]
    for argv, reason in [
        (["model", "export", "nope", str(tmp_path / "x.npz")], "no model 'nope'"),
        ([*start, "--aggregator", "fedsomething"], "unknown aggregator 'fedsomething'"),
        ([*start, "--buffer-size", "0"], "buffer_size must be"),
    ]:
        capsys.readouterr()
        assert await asyncio.to_thread(main, argv) == 2, argv
        assert capsys.readouterr().err.startswith(f"roundlog: {reason}"), argv


async def test_tail_prints_each_event_on_one_line_until_interrupted(
    shell: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "m.npz"
    np.savez(source, w=np.ones(3, np.float32))
    model_id = (await roundlog(capsys, "model", "import", str(source))).strip()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roundlog", "tail", "--from-beginning", stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        line = (await process.stdout.readline()).decode()
    process.send_signal(signal.SIGINT)
    assert await process.wait() == 0
    assert f"ModelImported      model_id={model_id[:8]} name=m tensor=12B/sha256:" in line
