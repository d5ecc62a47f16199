"""Builds the Java and TypeScript clients once per run, where their toolchains are installed.

On a machine without them the tests that need them are skipped, saying what is missing; in CI
(``CI`` set) a missing toolchain is a failure, so the mixed round always runs there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JAVA = ROOT / "clients" / "java"
TYPESCRIPT = ROOT / "clients" / "typescript"
JAVA_JAR = JAVA / "target" / "roundlog-client.jar"
TS_TRAINER = TYPESCRIPT / "dist" / "trainer.js"


def _need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} not on PATH"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the mixed-language round: {message}")
    pytest.skip(message)


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"{' '.join(command)} in {cwd}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )


@pytest.fixture(scope="session")
def java_client() -> None:
    _need("java", "mvn")
    _run(["mvn", "-B", "-q", "-DskipTests", "package"], JAVA)
    assert JAVA_JAR.is_file(), f"mvn package did not build {JAVA_JAR}"


@pytest.fixture(scope="session")
def ts_client() -> None:
    _need("node", "npm")
    _run(["npm", "ci", "--no-audit", "--no-fund"], TYPESCRIPT)
    _run(["npm", "run", "build"], TYPESCRIPT)
    assert TS_TRAINER.is_file(), f"npm run build did not build {TS_TRAINER}"
