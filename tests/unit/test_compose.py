"""compose/ starts the same ``roundlog`` commands the tests run, with settings roundlog agrees with.

PyYAML is no dependency, so the commands are read line by line: compose.yaml writes each
``command:`` as a one-line JSON array (valid YAML). ``docker compose config`` validated the
whole file where a compose plugin was at hand (docs/operations.md); no Docker engine runs here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from roundlog import cli
from roundlog.bus import TOPIC_MAX_MESSAGE_BYTES

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
ROLES = ("coordinator", "aggregator", "projector")


def commands(text: str) -> dict[str, list[str]]:
    """Each service's ``command:`` as compose.yaml writes it: services are the keys indented
    two spaces under ``services:``; a command is a JSON array on its line."""
    found: dict[str, list[str]] = {}
    section = service = None
    for line in text.splitlines():
        if top := re.match(r"([\w-]+):", line):
            section = top[1]
        elif section == "services" and (key := re.match(r"  ([\w-]+):\s*$", line)):
            service = key[1]
        elif section == "services" and service and (cmd := re.match(r"\s+command:\s*(\[.*\])\s*$", line)):
            found[service] = json.loads(cmd[1])
    return found


def roundlog_argvs(service: str, command: list[str]) -> list[list[str]]:
    """The ``roundlog`` argument lists a service runs: its command after the image's ENTRYPOINT
    ``roundlog``, or, for the shell one-shot, every ``roundlog ...`` of its ``&&`` chain."""
    if service != "init":
        return [command]
    (script,) = command
    argvs = [shlex.split(part) for part in script.split("&&")]
    assert all(argv[0] == "roundlog" for argv in argvs), script
    return [argv[1:] for argv in argvs]


def parse(argv: list[str]) -> object:
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"not a roundlog command: roundlog {shlex.join(argv)}")


def test_every_service_command_is_a_roundlog_command() -> None:
    found = commands((COMPOSE / "compose.yaml").read_text())
    assert set(found) == {"init", *ROLES}
    for role in ROLES:
        (argv,) = roundlog_argvs(role, found[role])
        args = parse(argv)
        assert getattr(args, "handler", None) is cli.serve and getattr(args, "role", None) == [role]
    init = [parse(argv) for argv in roundlog_argvs("init", found["init"])]
    assert [getattr(a, "handler", None) for a in init] == [cli.db_upgrade, cli.topics_create]


def test_image_runs_roundlog_as_a_non_root_user() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["roundlog"\]$', dockerfile, re.MULTILINE)
    assert re.search(r"^USER (?!root)\S+$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)


def test_broker_takes_roundlogs_largest_records_and_creates_no_topic_itself() -> None:
    text = (COMPOSE / "compose.yaml").read_text()
    for setting in ("KAFKA_MESSAGE_MAX_BYTES", "KAFKA_REPLICA_FETCH_MAX_BYTES"):
        value = re.search(rf'{setting}: "(\d+)"', text)
        assert value and int(value[1]) >= TOPIC_MAX_MESSAGE_BYTES, setting
    assert 'KAFKA_AUTO_CREATE_TOPICS_ENABLE: "false"' in text
    port = re.search(r'ROUNDLOG_METRICS_PORT: "(\d+)"', text)
    assert port and f"http://127.0.0.1:{port[1]}/healthz" in text
