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

import uvloop

from roundlog.config import ConfigError, Settings

Handler = Callable[[argparse.Namespace], int]

#: One-line help of the first word of multi-word commands.
GROUPS = {
    "topics": "manage roundlog's Kafka topics",
    "db": "manage the projection tables in PostgreSQL (Alembic migrations shipped in the package)",
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


#: Each role's module has ``async def run(settings, stop)``; adding a role is one line here.
ROLES = {
    "aggregator": "roundlog.roles.aggregator",
    "projector": "roundlog.roles.projector",
}


@command(
    "serve",
    help="run one or more roles (consumer-group members) until SIGINT/SIGTERM; 'all' runs every role "
    "in this process",
    example="roundlog serve --role aggregator",
    arguments=[
        arg(
            "--role",
            action="append",
            choices=["all", *ROLES],
            required=True,
            help="a role to run; repeat to run several in one process",
        )
    ],
)
def serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    names = list(ROLES) if "all" in args.role else list(dict.fromkeys(args.role))
    runners = [importlib.import_module(ROLES[name]).run for name in names]

    async def run_all() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.gather(*(run(settings, stop) for run in runners))

    uvloop.run(run_all())
    return 0


_SCHEMA = arg(
    "--schema", metavar="NAME", help="a PostgreSQL schema instead of the connection's default (public)"
)


@command(
    "db upgrade",
    help="create the projection tables, or migrate them to the newest revision",
    example="roundlog db upgrade",
    arguments=[
        arg("--to", default="head", metavar="REVISION", help="target revision (default: head)"),
        _SCHEMA,
    ],
)
def db_upgrade(args: argparse.Namespace) -> int:
    from roundlog.projections.schema import current, upgrade

    settings = Settings.from_env()
    upgrade(settings.database_url, args.schema, args.to)
    print(f"projection tables at revision {current(settings.database_url, args.schema)}")
    return 0


@command(
    "db downgrade",
    help="migrate the projection tables down to a revision; 'base' drops them all",
    example="roundlog db downgrade --to base",
    arguments=[arg("--to", required=True, metavar="REVISION", help="target revision, e.g. base"), _SCHEMA],
)
def db_downgrade(args: argparse.Namespace) -> int:
    from roundlog.projections.schema import current, downgrade

    settings = Settings.from_env()
    downgrade(settings.database_url, args.to, args.schema)
    print(f"projection tables at revision {current(settings.database_url, args.schema) or 'base'}")
    return 0


@command(
    "replay",
    help="rebuild every projection from offset 0 into a fresh schema (dropped first if it exists) and "
    "diff it row by row against the live one; exit 0 when identical, 1 with the differences otherwise",
    example="roundlog replay --schema audit && psql -c 'SELECT * FROM audit.rounds'",
    arguments=[
        arg("--schema", default="replay", metavar="NAME", help="schema to rebuild into (default: replay)"),
        arg(
            "--live-schema", default="public", metavar="NAME", help="schema to compare with (default: public)"
        ),
        arg(
            "--limit", type=int, default=20, metavar="N", help="differing rows shown per table (default: 20)"
        ),
        arg(
            "--verify-models",
            action="store_true",
            help="also re-fold every round and check each model's sha256",
        ),
    ],
)
def replay_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from roundlog.replay import replay

    settings = Settings.from_env()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"replaying into {args.schema}", total=None)
            report = asyncio.run(
                replay(
                    settings,
                    args.schema,
                    lambda done, total: bar.update(task, completed=done, total=total),
                    args.live_schema,
                    args.limit,
                )
            )
    except ValueError as exc:
        print(f"roundlog: {exc}", file=sys.stderr)
        return 2
    print(report.render())
    ok = report.identical
    if args.verify_models:
        from roundlog.audit import verify_models

        audit = asyncio.run(verify_models(settings))
        print(f"verified {audit.rounds_checked} aggregated models: {len(audit.mismatches)} mismatches")
        for mismatch in audit.mismatches:
            print(f"  session {mismatch.session_id} round {mismatch.round_id}: {mismatch.detail}")
        ok = ok and audit.ok
    return 0 if ok else 1
