"""``roundlog ...``: one function per command, registered with ``@command``.

A command's name may have several words (``topics create``, later ``db upgrade``);
the parser tree is built from the registry, so adding a command touches nothing
but its own function (and ``GROUPS`` for a new first word).

A failure the user can fix (a server down, a bad URL, a bad file, a refused setting)
ends the command with one line on stderr saying what is wrong and what to do, and exit
status 2: ``main`` maps those exceptions to lines in ``_user_error``. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvloop

from roundlog.config import ConfigError, Settings, database_url_from_env
from roundlog.ui import DEFAULT_PORT

Handler = Callable[[argparse.Namespace], int]

#: One-line help of the first word of multi-word commands.
GROUPS = {
    "topics": "manage roundlog's Kafka topics",
    "db": "manage the projection tables in PostgreSQL (Alembic migrations shipped in the package)",
    "model": "bring models in from .npz files and write them back out",
    "session": "start sessions of training rounds",
    "round": "ask a running session for a round",
    "keys": "manage the signing keys of a deployment that signs its events (ROUNDLOG_AUTH=signed)",
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


class Refused(Exception):
    """A command cannot do what it was asked, for a reason the user can fix; ``main`` prints it."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        logging.getLogger("aiokafka").addFilter(_not_a_bootstrap_attempt)
    try:
        return int(args.handler(args))
    except Exception as exc:
        reason = _user_error(exc, args)
        if reason is None:
            raise  # a bug: its traceback is what helps
        print(f"roundlog: {reason}", file=sys.stderr)
        return 2


def _user_error(exc: Exception, args: argparse.Namespace) -> str | None:
    """What is wrong and what to do, in one line, for a failure the user can cause; None for a bug."""
    import psycopg
    import sqlalchemy as sa
    from aiokafka.errors import KafkaConnectionError
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    from roundlog.kafka_cluster import ToolchainMissing

    # what psycopg said, whether through SQLAlchemy or through a connection of replay's own
    error = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc
    match error:
        case ConfigError() | Refused() | ToolchainMissing():
            return str(error)
        case KafkaConnectionError():
            return (
                f"cannot reach the Kafka broker at {os.environ.get('ROUNDLOG_KAFKA_BOOTSTRAP')}: is it "
                "running, and is ROUNDLOG_KAFKA_BOOTSTRAP right? (-v shows each attempt)"
            )
        case psycopg.OperationalError(sqlstate=None):  # the client's own: connecting, or a lost connection
            return (
                f"cannot connect to PostgreSQL ({_first_line(error)}): is it running, and is "
                "ROUNDLOG_DATABASE_URL right?"
            )
        case psycopg.errors.UndefinedTable() | psycopg.errors.UndefinedColumn():
            return (
                f"the projection tables are missing or out of date ({_first_line(error)}): "
                "run `roundlog db upgrade` first"
            )
        case CommandError() | RevisionError() if args.handler in (db_upgrade, db_downgrade):  # their --to
            return f"{error}: give head, base, +N, -N or one of the revisions {', '.join(_revisions())}"
        case OSError(filename=str(path)) if path == getattr(args, "file", None):
            return f"{path}: {error.strerror}"
    return None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0]


#: aiokafka logs why each bootstrap server failed, then raises KafkaConnectionError, which main
#: reports on one line; the attempts show with -v.
_BOOTSTRAP_ATTEMPTS = ('Unable connect to "%s:%s": %s', 'Unable to request metadata from "%s:%s": %s')


def _not_a_bootstrap_attempt(record: logging.LogRecord) -> bool:
    return record.msg not in _BOOTSTRAP_ATTEMPTS


def _revisions() -> list[str]:
    """The migrations shipped in the package, oldest first."""
    from importlib import resources

    from alembic.script import ScriptDirectory

    with resources.as_file(resources.files("roundlog") / "migrations") as scripts:
        return [script.revision for script in reversed(list(ScriptDirectory(str(scripts)).walk_revisions()))]


#: How the embedded stack's broker is chosen, for `up` and `demo`.
BROKER_ARGUMENTS = [
    arg(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="tansu: one in-memory node from a wheel (default); kafka: Apache Kafka in KRaft "
        "mode from Maven Central (needs java and mvn on PATH)",
    ),
    arg("--brokers", type=int, default=None, metavar="N", help="Kafka nodes (default: 3)"),
]


def _broker_nodes(args: argparse.Namespace) -> int:
    if args.brokers is not None and (args.broker == "tansu" or args.brokers < 1):
        raise Refused(f"--brokers {args.brokers}: give --broker kafka and 1 or more nodes")
    return 1 if args.broker == "tansu" else 3 if args.brokers is None else int(args.brokers)


@command(
    "up",
    help="run the embedded broker and PostgreSQL until stopped, printing their addresses "
    "(a server already named in the environment is passed through, not started)",
    example="roundlog up --broker kafka --brokers 3 > stack.env &   "
    "# then: set -a; . ./stack.env; set +a; ...; kill %1",
    arguments=BROKER_ARGUMENTS,
)
def up(args: argparse.Namespace) -> int:
    from roundlog.embedded import set_parent_death_signal, stack_settings

    brokers = _broker_nodes(args)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    set_parent_death_signal(signal.SIGTERM)
    with stack_settings(broker=args.broker, brokers=brokers) as settings:
        print(f"ROUNDLOG_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}", flush=True)
        print(f"ROUNDLOG_DATABASE_URL={settings.database_url}", flush=True)
        if settings.kafka_idempotence:
            print("ROUNDLOG_KAFKA_IDEMPOTENCE=true", flush=True)
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
    help="federated training of a digits classifier by simulated clients through every role, on the "
    "embedded stack (or on the servers the environment names); ends with a replay and a model audit",
    example="roundlog demo --clients 20 --rounds 8 --aggregator fedadam --stragglers 2",
    arguments=[
        arg("--clients", type=int, default=10, metavar="N", help="simulated clients (default: 10)"),
        arg("--rounds", type=int, default=5, metavar="N", help="training rounds (default: 5)"),
        arg("--aggregator", default="fedavg", metavar="NAME", help="aggregator (default: fedavg)"),
        arg(
            "--stragglers",
            type=int,
            default=1,
            metavar="N",
            help="clients whose updates arrive after their round closed (default: 1)",
        ),
        arg("--seed", type=int, default=0, help="data split and local training seed (default: 0)"),
        arg(
            "--auth",
            choices=["off", "signed"],
            default=os.environ.get("ROUNDLOG_AUTH", "off"),
            help="signed: every party signs with its own registered key and the fold checks every "
            "event (default: $ROUNDLOG_AUTH, else off)",
        ),
        arg(
            "--shards",
            type=int,
            default=1,
            metavar="K",
            help="aggregate each round in K shards, reduced once (weighted-sum aggregators; default: 1)",
        ),
        arg(
            "--ui",
            action="store_true",
            help=f"then serve the dashboard over the run on 127.0.0.1:{DEFAULT_PORT} until Ctrl-C "
            "(the embedded stack stays up meanwhile)",
        ),
        *BROKER_ARGUMENTS,
    ],
)
def demo(args: argparse.Namespace) -> int:
    from roundlog.demo import Options, run
    from roundlog.embedded import stack_settings

    _check_aggregator(args.aggregator)
    try:
        options = Options(
            args.clients,
            args.rounds,
            args.aggregator,
            args.stragglers,
            args.seed,
            args.auth == "signed",
            args.shards,
        )
    except ValueError as exc:
        raise Refused(str(exc)) from None
    with stack_settings(broker=args.broker, brokers=_broker_nodes(args)) as settings:
        status = run(settings, options)
        if args.ui:
            _serve_dashboard(settings.database_url, "127.0.0.1", DEFAULT_PORT, _dashboard_token("127.0.0.1"))
        else:
            print(
                f"dashboard of this run: `roundlog demo --ui` (http://127.0.0.1:{DEFAULT_PORT}/ once it "
                "is done), or `roundlog ui` over a stack of your own (`roundlog up`)"
            )
        return status


#: Each role's module has ``async def run(settings, stop)``; adding a role is one line here.
ROLES = {
    "coordinator": "roundlog.roles.coordinator",
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
    from roundlog import observability

    settings = Settings.from_env()
    ops = observability.OpsSettings.from_env()
    observability.configure_logging(ops.log_level, json=ops.log_format == "json")
    names = list(ROLES) if "all" in args.role else list(dict.fromkeys(args.role))
    runners = {name: importlib.import_module(ROLES[name]).run for name in names}

    async def run_all() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        async def tracked(name: str) -> None:
            with observability.LIVENESS.track(name, ops.stale_after):
                await runners[name](settings, stop)

        # One endpoint per process, up before the roles so a slow first join is visible as such.
        async with await observability.serve_health(ops.metrics_port):
            await asyncio.gather(*(tracked(name) for name in names))

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

    database_url = database_url_from_env()
    upgrade(database_url, args.schema, args.to)
    print(f"projection tables at revision {current(database_url, args.schema)}")
    return 0


@command(
    "db downgrade",
    help="migrate the projection tables down to a revision; 'base' drops them all",
    example="roundlog db downgrade --to base",
    arguments=[arg("--to", required=True, metavar="REVISION", help="target revision, e.g. base"), _SCHEMA],
)
def db_downgrade(args: argparse.Namespace) -> int:
    from roundlog.projections.schema import current, downgrade

    database_url = database_url_from_env()
    downgrade(database_url, args.to, args.schema)
    print(f"projection tables at revision {current(database_url, args.schema) or 'base'}")
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
            "--jobs",
            type=int,
            default=None,
            metavar="N",
            help="processes that rebuild the partitions side by side (default: one per core)",
        ),
        arg(
            "--logged",
            action="store_true",
            help="write the schema with WAL, so it survives a server crash and reaches replicas "
            "(by default its tables are UNLOGGED: rebuilt from the log, not recovered)",
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
    console = Console(stderr=True)
    try:
        # not on a pipe: there it would leave an empty line on stderr, even before a one-line failure
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task(f"replaying into {args.schema}", total=None)
            report = uvloop.run(
                replay(
                    settings,
                    args.schema,
                    lambda done, total: bar.update(task, completed=done, total=total),
                    args.live_schema,
                    args.limit,
                    args.jobs,
                    args.logged,
                )
            )
    except ValueError as exc:
        print(f"roundlog: {exc}", file=sys.stderr)
        return 2
    print(report.render())
    ok = report.identical
    if args.verify_models:
        from roundlog.audit import verify_models

        audit = uvloop.run(verify_models(settings))
        print(audit.render())
        for mismatch in audit.mismatches:
            print(f"  session {mismatch.session_id} round {mismatch.round_id}: {mismatch.detail}")
        ok = ok and audit.ok
    return 0 if ok else 1


# --- models, sessions, rounds: the producer helpers of roundlog.client, from the shell ------------


def _check_aggregator(name: str) -> None:
    from roundlog.aggregation import AGGREGATORS

    if name not in AGGREGATORS:
        raise Refused(f"unknown aggregator {name!r}; one of {', '.join(AGGREGATORS)}")


def _lookup(settings: Settings, table_name: str, given: str) -> Any:
    """The projection row whose id is ``given`` or starts with it: ids are long, prefixes are handy."""
    import sqlalchemy as sa

    from roundlog.projections import tables

    table = tables.metadata.tables[table_name]
    key = next(iter(table.primary_key.columns))
    engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table).where(key.startswith(given, autoescape=True)).limit(2)).all()
    finally:
        engine.dispose()
    kind = table_name.removesuffix("s")
    if not rows:
        raise Refused(f"no {kind} {given!r} in the projections (is the projector running?)")
    if len(rows) > 1:
        raise Refused(f"{given!r} is the start of several {table_name}' ids; give more of it")
    return rows[0]


def _tensor_ref(model: Any) -> Any:
    """The TensorRef of a ``models`` row: the inverse of how the projector stores it."""
    from roundlog.domain.events import ArraySpec, TensorRef

    return TensorRef(
        **model.tensor,
        nbytes=model.nbytes,
        sha256=model.sha256,
        arrays=tuple(
            ArraySpec(name=a["name"], dtype=a["dtype"], shape=tuple(a["shape"])) for a in model.layout
        ),
    )


async def _producing(settings: Settings, work: Callable[[Any, Any], Any]) -> Any:
    """Run ``work(producer, topics)`` with a started producer."""
    from roundlog.bus import Topics, make_producer

    producer = make_producer(settings)
    try:
        await producer.start()
        return await work(producer, Topics.from_prefix(settings.topic_prefix))
    finally:
        await producer.stop()


@command(
    "model import",
    help="store the arrays of an .npz file (names, dtypes, shapes and order kept) as a model and print "
    "its id, which derives from the bytes: importing the same arrays again gives the same id",
    example="roundlog model import initial.npz --name resnet-init",
    arguments=[
        arg("file", metavar="FILE.npz", help="arrays as written by numpy.savez"),
        arg("--name", help="a name for people (default: the file's name without .npz)"),
    ],
)
def model_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from roundlog.client import import_model

    settings = Settings.from_env()
    arrays = _read_npz(args.file)
    name = Path(args.file).name.removesuffix(".npz") if args.name is None else args.name
    model_id, _ = asyncio.run(_producing(settings, lambda p, t: import_model(p, t, arrays, name)))
    print(model_id)
    return 0


@command(
    "model export",
    help="write a model (imported or aggregated) to an .npz file, array for array as it was stored",
    example="roundlog model export 0aac75d2 final.npz",
    arguments=[
        arg("model_id", metavar="ID", help="model id, or its first characters"),
        arg("file", metavar="FILE.npz", help="where to write (numpy.savez's format)"),
    ],
)
def model_export(args: argparse.Namespace) -> int:
    import zipfile

    import numpy as np

    from roundlog.bus import Topics, make_consumer
    from roundlog.tensors import read_tensors

    settings = Settings.from_env()
    _check_writable(args.file)
    ref = _tensor_ref(_lookup(settings, "models", args.model_id))

    async def fetch() -> Any:
        consumer = make_consumer(settings)
        try:
            await consumer.start()
            return await read_tensors(consumer, Topics.from_prefix(settings.topic_prefix).tensors, ref)
        finally:
            await consumer.stop()

    arrays = asyncio.run(fetch())
    # numpy.savez's own format, written here: savez would take arrays named "file" or "allow_pickle"
    # for its arguments, and append .npz to a FILE without it
    with zipfile.ZipFile(args.file, "w", allowZip64=True) as npz:
        for name, array in arrays:
            with npz.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    print(f"{args.file}: {len(ref.arrays)} arrays, {ref.nbytes:,} bytes, sha256 {ref.sha256}")
    return 0


def _read_npz(path: str) -> list[tuple[str, Any]]:
    """The arrays of an .npz file in order; refused unless it holds at least one and each is numeric."""
    import zipfile

    import numpy as np

    with open(path, "rb") as file:  # a missing or unreadable file fails here, as an OSError on FILE
        if not zipfile.is_zipfile(file):  # numpy would blame "pickled data"
            raise Refused(f"{path} is not an .npz file (a zip of .npy arrays, as numpy.savez writes)")
        file.seek(0)
        with np.load(file, allow_pickle=False) as npz:
            arrays = [(name, _numeric_array(path, npz, name)) for name in npz.files]
    if not arrays:
        raise Refused(f"{path} holds no arrays; a model needs at least one")
    return arrays


def _numeric_array(path: str, npz: Any, name: str) -> Any:
    """Array ``name`` of an open .npz file, refused unless its dtype can be streamed."""
    import numpy as np

    from roundlog.arrays import STREAMABLE_KINDS

    numeric = "only bool, integer, float and complex arrays can be stored"
    try:
        array = npz[name]
    except ValueError as exc:  # an object array (numpy would need pickle), or a damaged header
        raise Refused(f"{path}: array {name!r} is not numeric or is damaged ({exc}); {numeric}") from None
    if not isinstance(array, np.ndarray):
        raise Refused(f"{path}: {name!r} is not a .npy array; {numeric}")
    if array.dtype.kind not in STREAMABLE_KINDS or array.dtype.fields is not None:
        raise Refused(f"{path}: array {name!r} has dtype {array.dtype}; {numeric}")
    return array


def _check_writable(path: str) -> None:
    """Refuse, before a long fetch, a file that cannot be written: probe its directory with a nameless
    temporary file (missing, not a directory, no permission, read-only), which vanishes on close."""
    import tempfile
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise Refused(f"cannot write {path}: it is a directory; give a file name")
    try:
        tempfile.TemporaryFile(dir=target.parent).close()
    except OSError as exc:
        raise Refused(f"cannot write {path}: {target.parent}: {exc.strerror}") from None


#: The RoundConfig fields as flags (dest = field name); None means "not given", so defaults can differ.
_CONFIG_ARGUMENTS = (
    arg("--round-timeout", type=float, metavar="S", help="seconds a round collects before it times out"),
    arg(
        "--buffer-size",
        type=int,
        metavar="N",
        help="accepted updates that close a training round; -1: every assigned client",
    ),
    arg("--clients-required", type=int, metavar="N", help="live clients needed to start a round"),
    arg("--max-clients", type=int, metavar="N", help="clients sampled per round; -1: every live one"),
    arg("--min-updates", type=int, metavar="N", help="updates (or results) a timed-out round still needs"),
    arg("--aggregator", metavar="NAME", help="fedavg, fedavgm, fedadam, fedyogi, fedadagrad, median, ..."),
    arg(
        "--aggregator-kwargs",
        metavar="JSON",
        help='aggregator options, e.g. \'{"eta": 0.01, "max_norm": 5}\'',
    ),
    arg(
        "--shards",
        type=int,
        metavar="K",
        help="aggregate each training round in K shards, folded by any aggregator processes and "
        "reduced once (weighted-sum aggregators only; default 1)",
    ),
)


def _round_config(args: argparse.Namespace, base: Any) -> Any:
    """``base`` (a RoundConfig) with the flags that were given; refused like the fold would refuse it."""
    import dataclasses

    from roundlog.domain.session import config_problem

    given = {
        f.name: value for f in dataclasses.fields(base) if (value := getattr(args, f.name, None)) is not None
    }
    config = dataclasses.replace(base, **given)
    problem = config_problem(config)
    if problem is not None:
        raise Refused(problem)
    return config


@command(
    "session start",
    help="start a session of N training rounds on a stored model (imported, or aggregated by an earlier "
    "session) and print its id; round settings default to FEDn's (timeout 180 s, all clients)",
    example="roundlog session start --model 3f2a --rounds 10 --buffer-size 8 --validate-each-round",
    arguments=[
        arg("--model", required=True, metavar="ID", help="the initial model's id, or its first characters"),
        arg("--rounds", type=int, required=True, metavar="N", help="training rounds"),
        *_CONFIG_ARGUMENTS,
        arg(
            "--validate-each-round", action="store_true", help="a validation round after each training round"
        ),
        arg(
            "--continue-on-failure",
            action="store_true",
            help="go on with the next round when one fails (default: the session fails with it)",
        ),
        arg("--name", default="", help="a name for people"),
    ],
)
def session_start(args: argparse.Namespace) -> int:
    from roundlog.client import start_session
    from roundlog.domain.events import RoundConfig

    settings = Settings.from_env()
    config = _round_config(args, RoundConfig())
    if args.rounds < 1:
        raise Refused(f"--rounds must be >= 1, not {args.rounds}")
    model = _lookup(settings, "models", args.model)
    session_id = asyncio.run(
        _producing(
            settings,
            lambda producer, topics: start_session(
                producer,
                topics,
                model_id=model.model_id,
                model=_tensor_ref(model),
                rounds=args.rounds,
                config=config,
                validate_each_round=args.validate_each_round,
                stop_on_failure=not args.continue_on_failure,
                name=args.name,
            ),
        )
    )
    print(session_id)
    return 0


@command(
    "round request",
    help="ask a running session for a training, validation or inference round on one of its models and "
    "print the round id; round settings default to the session's",
    example="roundlog round request --session 9c1e --task inference --model 0aac75d2 --round-timeout 60",
    arguments=[
        arg("--session", required=True, metavar="ID", help="session id, or its first characters"),
        arg("--task", required=True, choices=["training", "validation", "inference"]),
        arg("--model", required=True, metavar="ID", help="the model the round runs on (id or prefix)"),
        arg(
            "--round-no",
            type=int,
            metavar="N",
            help="the round's number (default: one past the session's last round of this task)",
        ),
        *_CONFIG_ARGUMENTS,
    ],
)
def round_request(args: argparse.Namespace) -> int:
    import json

    import sqlalchemy as sa

    from roundlog.client import request_round
    from roundlog.domain.events import RoundConfig, Task

    settings = Settings.from_env()
    session = _lookup(settings, "sessions", args.session)
    stored = {**session.config, "aggregator_kwargs": json.dumps(session.config["aggregator_kwargs"])}
    config = _round_config(args, RoundConfig(**stored))
    model_id = _lookup(settings, "models", args.model).model_id
    round_no = args.round_no
    if round_no is None:
        engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
        with engine.connect() as conn:
            last = conn.execute(
                sa.text("SELECT max(round_no) FROM rounds WHERE session_id = :s AND task = :t"),
                {"s": session.session_id, "t": args.task},
            ).scalar()
        engine.dispose()
        round_no = (last or 0) + 1
    round_id = asyncio.run(
        _producing(
            settings,
            lambda producer, topics: request_round(
                producer,
                topics,
                session_id=session.session_id,
                round_no=round_no,
                task=Task(args.task),
                model_id=model_id,
                config=config,
            ),
        )
    )
    print(round_id)
    return 0


# --- watching: status from SQL, tail from the log -------------------------------------------------

_SESSIONS_SQL = """
    SELECT session_id, name, state, rounds_done, rounds_total, pct_done, current_round_no, rounds_open,
           rounds_failed, started_at, COALESCE(finished_at, last_change_at) AS until
    FROM session_progress ORDER BY started_at DESC LIMIT :limit
"""


KEY_ROLES = ("operator", "coordinator", "aggregator", "client")


@command(
    "keys create",
    help="write a new Ed25519 signing key to FILE (PEM, readable by you only) and print its key id, "
    "the public key that `keys register` and ROUNDLOG_OPERATOR_KEY take",
    example="roundlog keys create coordinator.pem",
    arguments=[arg("file", metavar="FILE", help="where to write the private key (must not exist)")],
)
def keys_create(args: argparse.Namespace) -> int:
    from pathlib import Path

    from roundlog.keys import create_key_file

    try:
        key_id = create_key_file(Path(args.file))
    except FileExistsError:
        raise Refused(f"{args.file} exists: a key file is never overwritten") from None
    print(key_id)
    return 0


def _operator_producing(settings: Settings, work: Callable[[Any, Any], Any]) -> Any:
    """Run a registry change signed by the operator key (ROUNDLOG_KEY_FILE must hold it)."""
    from roundlog.keys import Signer

    if settings.key_file is None or settings.operator_key is None:
        raise Refused(
            "registering keys needs ROUNDLOG_OPERATOR_KEY and ROUNDLOG_KEY_FILE, the operator's key file"
        )
    signer = Signer.from_file(settings.key_file)
    if signer.key_id != settings.operator_key:
        raise Refused(
            f"ROUNDLOG_KEY_FILE holds key {signer.key_id[:16]}..., not the operator key "
            f"{settings.operator_key[:16]}... (ROUNDLOG_OPERATOR_KEY): the fold would refuse it"
        )
    return asyncio.run(_producing(settings, work))


@command(
    "keys register",
    help="let a key sign events in the given roles, from now on, in every partition of the events "
    "topic (signed with the operator key in ROUNDLOG_KEY_FILE); registering a key again changes its "
    "roles",
    example="roundlog keys register 3b6a...e1 --role client --client-id hospital-7 --name 'ward 7 server'",
    arguments=[
        arg("key_id", metavar="KEY_ID", help="the key id `keys create` printed"),
        arg("--role", action="append", required=True, choices=KEY_ROLES, help="repeat for several"),
        arg("--client-id", default="", help="for a client key: the one client it speaks for"),
        arg("--name", default="", help="a label for people"),
    ],
)
def keys_register(args: argparse.Namespace) -> int:
    from roundlog.client import register_key
    from roundlog.domain.events import KeyRole

    settings = Settings.from_env()
    roles = tuple(KeyRole(role) for role in dict.fromkeys(args.role))
    try:
        partitions = _operator_producing(
            settings,
            lambda producer, topics: register_key(
                producer, topics, args.key_id, roles, client_id=args.client_id, name=args.name
            ),
        )
    except ValueError as error:
        raise Refused(str(error)) from None
    print(f"registered {args.key_id} as {', '.join(roles)} in {partitions} partitions")
    return 0


@command(
    "keys revoke",
    help="withdraw a key: in each partition, its events after this point are refused (revoked_key); "
    "its earlier events stay valid, on replay too",
    example="roundlog keys revoke 3b6a...e1 --reason 'laptop lost'",
    arguments=[
        arg("key_id", metavar="KEY_ID"),
        arg("--reason", default="", help="why, for people"),
    ],
)
def keys_revoke(args: argparse.Namespace) -> int:
    from roundlog.client import revoke_key

    settings = Settings.from_env()
    try:
        partitions = _operator_producing(
            settings, lambda producer, topics: revoke_key(producer, topics, args.key_id, args.reason)
        )
    except ValueError as error:
        raise Refused(str(error)) from None
    print(f"revoked {args.key_id} in {partitions} partitions")
    return 0


@command(
    "keys refresh",
    help="restate every key's registration (and every revocation) as projected, in every partition: "
    "a role re-folds a partition from the oldest registry event it still needs, so without a refresh "
    "now and then a restart re-reads the log from its first registration",
    example="roundlog keys refresh",
)
def keys_refresh(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from roundlog.client import register_key, revoke_key
    from roundlog.domain.events import KeyRole

    settings = Settings.from_env()
    engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            keys = conn.execute(sa.text("SELECT * FROM keys ORDER BY registered_at, key_id")).all()
    finally:
        engine.dispose()

    async def restate(producer: Any, topics: Any) -> None:
        for key in keys:
            if key.revoked_at is None:
                roles = tuple(KeyRole(role) for role in key.roles)
                await register_key(producer, topics, key.key_id, roles, key.client_id or "", key.name)
            else:
                await revoke_key(producer, topics, key.key_id, key.revoke_reason or "")

    _operator_producing(settings, restate)
    print(f"restated {len(keys)} keys")
    return 0


@command(
    "keys list",
    help="the registered keys as projected: roles, client, when registered and revoked",
    example="roundlog keys list",
)
def keys_list(args: argparse.Namespace) -> int:
    import sqlalchemy as sa
    from rich.console import Console
    from rich.table import Table

    settings = Settings.from_env()
    engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM keys ORDER BY registered_at, key_id")).all()
    finally:
        engine.dispose()
    table = Table("key", "roles", "client", "name", "registered", "revoked")
    for row in rows:
        revoked = "" if row.revoked_at is None else f"{row.revoked_at:%Y-%m-%d %H:%M:%S} {row.revoke_reason}"
        table.add_row(
            row.key_id,
            ", ".join(row.roles),
            row.client_id or "",
            row.name,
            f"{row.registered_at:%Y-%m-%d %H:%M:%S}",
            revoked.strip(),
        )
    Console(width=200).print(table if rows else "no keys registered")
    return 0


@command(
    "status",
    help="show sessions and their progress from the projections; with --session, that session's rounds "
    "with their state, counts, durations and example-weighted metrics",
    example="roundlog status --session 9c1e",
    arguments=[
        arg("--session", metavar="ID", help="a session id, or its first characters"),
        arg("--limit", type=int, default=20, metavar="N", help="most recent sessions shown (default: 20)"),
    ],
)
def status(args: argparse.Namespace) -> int:
    import sqlalchemy as sa
    from rich.console import Console

    from roundlog.ui import queries

    settings = Settings.from_env()
    session = None if args.session is None else _lookup(settings, "sessions", args.session)
    engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            if session is None:
                _print_sessions(Console(), conn.execute(sa.text(_SESSIONS_SQL), {"limit": args.limit}).all())
            else:
                params = {"session_id": session.session_id}
                rounds = queries.rounds(conn, session.session_id)
                metrics = conn.execute(sa.text(queries.METRICS_SQL), params).all()
                _print_session(Console(), session, rounds, metrics)
    finally:
        engine.dispose()
    return 0


def _print_sessions(console: Any, sessions: Sequence[Any]) -> None:
    from rich.table import Table

    if not sessions:
        console.print("no sessions yet")
        return
    table = Table("session", "name", "state", "progress", "round", "open", "failed", "started", "for")
    for s in sessions:
        table.add_row(
            s.session_id[:8],
            s.name,
            s.state,
            f"{s.rounds_done}/{s.rounds_total} ({s.pct_done}%)",
            str(s.current_round_no or ""),
            str(s.rounds_open),
            str(s.rounds_failed),
            f"{s.started_at:%Y-%m-%d %H:%M:%S}",
            f"{(s.until - s.started_at).total_seconds():.1f}s",
        )
    console.print(table)


def _print_session(console: Any, session: Any, rounds: Sequence[Any], metrics: Sequence[Any]) -> None:
    from rich.table import Table

    verdict = f" ({session.finish_reason})" if session.finish_reason else ""
    console.print(
        f"session {session.session_id} {session.name!r}: [bold]{session.state}[/]{verdict}, "
        f"{session.rounds_done}/{session.rounds_total} training rounds done, "
        f"latest model {session.latest_model_id}"
    )
    means: dict[str, list[str]] = {}
    for m in metrics:
        means.setdefault(m.round_id, []).append(f"{m.key}={m.mean:.4g}")
    table = Table(
        "round", "task", "state", "assigned", "accepted", "rejected", "collect s", "total s", "metrics"
    )
    for r in rounds:
        state = (
            r.state
            + (" (timed out)" if r.timed_out else "")
            + (f": {r.fail_reason}" if r.fail_reason else "")
        )
        table.add_row(
            str(r.round_no),
            r.task,
            state,
            str(r.n_assigned),
            str(r.n_accepted),
            str(r.n_rejected),
            "" if r.collecting_s is None else f"{r.collecting_s:.2f}",
            "" if r.total_s is None else f"{r.total_s:.2f}",
            " ".join(means.get(r.round_id, [])),
        )
    console.print(table)


@command(
    "ui",
    help="serve a read-only web dashboard of the projections: sessions, metric curves, round timelines, "
    "client participation, model lineage with audit verdicts, rejected records; a bind address other "
    "than loopback needs ROUNDLOG_UI_TOKEN, which every request must then bear",
    example="roundlog ui --port 8321   # then open http://127.0.0.1:8321/",
    arguments=[
        arg("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"),
        arg("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default: {DEFAULT_PORT})"),
    ],
)
def ui(args: argparse.Namespace) -> int:
    token = _dashboard_token(args.host)  # before the settings: a refusal needs no servers
    _serve_dashboard(database_url_from_env(), args.host, args.port, token)
    return 0


def _dashboard_token(host: str) -> str | None:
    """ROUNDLOG_UI_TOKEN, refused when missing for a bind address other than loopback."""
    from roundlog.ui.app import Exposed, check_exposure

    token = os.environ.get("ROUNDLOG_UI_TOKEN") or None
    try:
        check_exposure(host, token)
    except Exposed as exc:
        raise Refused(str(exc)) from None
    return token


def _serve_dashboard(database_url: str, host: str, port: int, token: str | None) -> None:
    """Serve the dashboard over the database until Ctrl-C."""
    import sqlalchemy as sa
    import uvicorn

    from roundlog.ui.app import create_app

    engine = sa.create_engine(database_url, pool_pre_ping=True)
    try:
        with engine.connect() as conn:  # a wrong URL, or tables missing or out of date, fail here in one line
            conn.execute(
                sa.text(
                    "SELECT (SELECT 1 FROM session_progress LIMIT 1), (SELECT 1 FROM model_audits LIMIT 1)"
                )
            )
        bound = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL has it
        print(f"roundlog ui: http://{bound}:{port}/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
        uvicorn.run(create_app(engine, token), host=host, port=port, log_level="warning")
    finally:
        engine.dispose()


@command(
    "tail",
    help="print the events as they arrive, one line each: time, partition:offset, type, session and round "
    "(first 8 characters of the ids), client, and the event's key fields; undecodable records with why",
    example="roundlog tail --from-beginning | grep -E 'Round(Aggregated|Failed)'",
    arguments=[
        arg("--from-beginning", action="store_true", help="start at the first event, not at the end"),
        arg("--heartbeats", action="store_true", help="also show the clients' heartbeats"),
    ],
)
def tail(args: argparse.Namespace) -> int:
    from roundlog.bus import Topics, make_consumer, read_from_end

    settings = Settings.from_env()
    topics = Topics.from_prefix(settings.topic_prefix)
    watched = [topics.events, *([topics.clients] if args.heartbeats else [])]

    async def follow() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        consumer = make_consumer(settings)
        try:
            await consumer.start()
            if args.from_beginning:
                consumer.subscribe(watched)
            else:
                await read_from_end(consumer, *watched)
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        print(_tail_line(record), flush=True)
        finally:
            await consumer.stop()

    asyncio.run(follow())
    return 0


def _tail_line(record: Any) -> str:
    """One record as a line: when, where, what, whose, and the fields that say what happened."""
    import dataclasses
    from datetime import UTC, datetime

    from roundlog.codec import DecodeError, decode

    where = f"{record.partition}:{record.offset}"
    event = decode(record.value or b"")
    if isinstance(event, DecodeError):
        produced = datetime.fromtimestamp(record.timestamp / 1000, UTC)
        return (
            f"{produced:%H:%M:%S.%f}"[:-3] + f" {where:>7} {'UNDECODABLE':<18} {event.reason}: {event.detail}"
        )
    ids = ("session_id", "round_id", "client_id")
    whose = [f"{name[0]}={_tail_value(name, getattr(event, name))}" for name in ids if hasattr(event, name)]
    fields = [
        f"{f.name}={_tail_value(f.name, getattr(event, f.name))}"
        for f in dataclasses.fields(event)
        if f.name not in ("event_id", "occurred_at", *ids) and getattr(event, f.name) not in ("", None, {})
    ]
    when = f"{event.occurred_at:%H:%M:%S.%f}"[:-3]
    return " ".join([when, f"{where:>7}", f"{type(event).__name__:<18}", *whose, *fields])


def _tail_value(name: str, value: Any) -> str:
    """A field, short: ids to 8 characters, tensors to size and hash, configs to their gist."""
    from collections.abc import Mapping
    from datetime import datetime

    from roundlog.domain.events import RoundConfig, TensorRef

    if name.endswith("_ids"):
        shown = ", ".join(_tail_value(name[:-1], v) for v in value[:3])
        return f"{len(value)}[{shown}{', ...' if len(value) > 3 else ''}]"
    if name.endswith("_id") and len(value) == 36 and value[8] == "-":  # a UUID; a client's name stays whole
        return str(value[:8])
    if name == "sha256":
        return str(value[:12])
    if isinstance(value, datetime):
        return f"{value:%H:%M:%S.%f}"[:-3]
    if isinstance(value, TensorRef):
        return f"{value.nbytes:,}B/sha256:{value.sha256[:12]}"
    if isinstance(value, RoundConfig):
        return f"{value.aggregator}/buffer={value.buffer_size}/timeout={value.round_timeout:g}s"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}={_tail_value(k, v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)
