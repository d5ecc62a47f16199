"""``roundlog ...``: one function per command, registered with ``@command``.

A command's name may have several words (``topics create``, later ``db upgrade``);
the parser tree is built from the registry, so adding a command touches nothing
but its own function (and ``GROUPS`` for a new first word).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from roundlog.config import ConfigError, Settings

Handler = Callable[[argparse.Namespace], int]

#: One-line help of the first word of multi-word commands.
GROUPS = {
    "topics": "manage roundlog's Kafka topics",
}


@dataclass(frozen=True)
class Argument:
    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Argument:
    """An ``add_argument`` call, kept as data until the parser is built."""
    return Argument(flags, options)


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    help: str
    example: str
    arguments: tuple[Argument, ...]
    handler: Handler


COMMANDS: list[Command] = []


def command(
    name: str, *, help: str, example: str, arguments: Sequence[Argument] = ()
) -> Callable[[Handler], Handler]:
    """Register ``handler`` as ``roundlog <name>``; ``example`` goes into its ``--help``."""

    def register(handler: Handler) -> Handler:
        COMMANDS.append(Command(tuple(name.split()), help, example, tuple(arguments), handler))
        return handler

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roundlog",
        description="Federated-learning rounds as an event-sourced state machine on Kafka.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers: dict[tuple[str, ...], argparse._SubParsersAction[argparse.ArgumentParser]] = {
        (): parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    }
    for cmd in COMMANDS:
        for depth in range(1, len(cmd.words)):
            group = cmd.words[:depth]
            if group not in subparsers:
                group_help = GROUPS.get(group[-1])
                group_parser = subparsers[group[:-1]].add_parser(
                    group[-1], help=group_help, description=group_help
                )
                subparsers[group] = group_parser.add_subparsers(metavar="COMMAND", required=True)
        sub = subparsers[cmd.words[:-1]].add_parser(
            cmd.words[-1],
            help=cmd.help,
            description=f"{textwrap.fill(cmd.help, 80)}\n\nexample:\n  {cmd.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for argument in cmd.arguments:
            sub.add_argument(*argument.flags, **argument.options)
        sub.set_defaults(handler=cmd.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"roundlog: {exc}", file=sys.stderr)
        return 2


@command(
    "up",
    help="run the embedded broker and PostgreSQL until stopped, printing their addresses "
    "(a server already named in the environment is passed through, not started)",
    example="roundlog up > stack.env &   # then: set -a; . ./stack.env; set +a; ...; kill %1",
)
def up(args: argparse.Namespace) -> int:
    from roundlog.embedded import set_parent_death_signal, stack_settings

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    set_parent_death_signal(signal.SIGTERM)
    with stack_settings() as settings:
        print(f"ROUNDLOG_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}", flush=True)
        print(f"ROUNDLOG_DATABASE_URL={settings.database_url}", flush=True)
        print("roundlog up: running, Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
        while not stopping.wait(0.5):
            pass
    return 0


@command(
    "topics create",
    help="create the events, tensors, clients and deadletter topics (a no-op for existing ones)",
    example="ROUNDLOG_TOPIC_PREFIX=roundlog ROUNDLOG_PARTITIONS=6 roundlog topics create",
)
def topics_create(args: argparse.Namespace) -> int:
    from roundlog.bus import create_topics

    settings = Settings.from_env()
    for name, created in asyncio.run(create_topics(settings)).items():
        print(f"{'created' if created else 'exists '} {name}")
    return 0


@command(
    "machine",
    help="print the round and session state machines, generated from their transition tables",
    example="roundlog machine --mermaid > machine.mmd",
    arguments=[arg("--mermaid", action="store_true", required=True, help="as a Mermaid state diagram")],
)
def machine(args: argparse.Namespace) -> int:
    from roundlog.domain.diagram import mermaid

    print(mermaid())
    return 0


@command(
    "demo",
    help="run the demo on the embedded stack (or on the servers the environment names)",
    example="roundlog demo",
)
def demo(args: argparse.Namespace) -> int:
    from roundlog.embedded import stack_settings

    # Imported by name: roundlog.demo is the one module the demo issue replaces wholesale.
    run = importlib.import_module("roundlog.demo").run
    with stack_settings() as settings:
        return int(run(settings) or 0)
