"""Apache Kafka on loopback: a KRaft cluster of combined broker+controller nodes, run from Maven Central.

The production engine in the test loop. Kafka's jars come from the pom shipped beside
this module (Maven resolves them once into ~/.m2; the classpath is cached per pom), so
``java`` and ``mvn`` on PATH are the only prerequisites. Each node is a JVM child of the
calling thread with PR_SET_PDEATHSIG, and its files live under the caller's folder, so
the embedded stack's watchdog sweeps them like Tansu's.

``BROKER_SETTINGS`` is the single statement of how roundlog's Kafka is configured: the
tested cluster runs with it, and ``compose/compose.yaml`` must say the same
(tests/unit/test_compose.py compares them).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

#: Kafka's version, as the pom names it (compose's image tag must be the same).
KAFKA_VERSION = "4.1.1"


def broker_settings(nodes: int) -> dict[str, str]:
    """The cluster-wide settings that matter to roundlog, for a cluster of ``nodes`` (docs/operations.md)."""
    replicas, min_isr = min(3, nodes), min(2, nodes)
    return {
        # Topics come only from `roundlog topics create`, with their partitions and retention.
        "auto.create.topics.enable": "false",
        "default.replication.factor": str(replicas),
        # With acks=all, a write is acknowledged once two replicas have it: one broker may be
        # lost (or restarted) without losing an acknowledged event or stopping writes.
        "min.insync.replicas": str(min_isr),
        "unclean.leader.election.enable": "false",
        "offsets.topic.replication.factor": str(replicas),
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "group.initial.rebalance.delay.ms": "0",
        # roundlog's largest batch: a 1 MiB tensor chunk with key and headers, 2 MiB + 64 KiB
        # (bus.TOPIC_MAX_MESSAGE_BYTES); roundlog sets the same on each topic.
        "message.max.bytes": "2162688",
        "replica.fetch.max.bytes": "2162688",
        # The log is the audit record: keep everything (roundlog sets the same per topic).
        "log.retention.ms": "-1",
        "log.retention.bytes": "-1",
    }


#: Sizes that only keep a test cluster small and quick to start on a laptop; not semantics.
_SMALL_NODE_SETTINGS = {
    "offsets.topic.num.partitions": "10",
    "num.network.threads": "2",
    "num.io.threads": "4",
    "log.index.size.max.bytes": "1048576",
}
_HEAP = ["-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError"]
_LOG4J2 = """\
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = out
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""
_FORMAT_TIMEOUT = 60.0


class ToolchainMissing(RuntimeError):
    """``java`` or ``mvn`` is not on PATH, or Maven could not resolve Kafka."""


def kafka_classpath() -> str:
    """The broker's classpath, resolved by Maven from the shipped pom once and cached by its content."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        raise ToolchainMissing(
            f"--broker kafka runs Apache Kafka from Maven Central and needs {' and '.join(missing)} "
            "on PATH (Java 17+ and Maven); plain `roundlog up` needs neither"
        )
    pom = resources.files("roundlog") / "kafka" / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "roundlog" / f"kafka-{digest}"
    saved = cache / "classpath.txt"
    if saved.exists():
        classpath = saved.read_text().strip()
        if all(Path(jar).exists() for jar in classpath.split(os.pathsep)):
            return classpath
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"classpath.{os.getpid()}.tmp"
    with resources.as_file(pom) as pom_path:
        done = subprocess.run(
            [
                "mvn",
                "-B",
                "-q",
                "-f",
                str(pom_path),
                "dependency:build-classpath",
                f"-Dmdep.outputFile={partial}",
            ],
            capture_output=True,
            text=True,
        )
    if done.returncode != 0 or not partial.exists():
        raise ToolchainMissing(
            f"Maven could not resolve Apache Kafka {KAFKA_VERSION}:\n{done.stdout[-2000:]}"
        )
    partial.replace(saved)  # atomic: a concurrent resolver writes the same content
    return saved.read_text().strip()


def new_cluster_id(draw: Callable[[], uuid.UUID] = uuid.uuid4) -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, as ``kafka-storage random-uuid`` spells
    it. Like Kafka's own ``Uuid.randomUuid``, never one starting with "-", which the storage tool's
    command line would take for an option: one id in 64 would fail the format."""
    while True:
        cluster_id = base64.urlsafe_b64encode(draw().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class Node:
    """One combined broker+controller JVM."""

    node_id: int
    port: int
    controller_port: int
    home: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def properties(self) -> Path:
        return self.home / "server.properties"

    @property
    def log(self) -> Path:
        return self.home / "kafka.log"


class KafkaCluster:
    """``nodes`` Kafka nodes under ``root``; nodes can be killed, paused and restarted (the fault tests)."""

    def __init__(self, root: Path, nodes: int, ports: list[int]) -> None:
        if nodes < 1:
            raise ValueError(f"a Kafka cluster needs at least one node, not {nodes}")
        self.root = root
        self.classpath = kafka_classpath()
        self.nodes = [
            Node(n + 1, ports[2 * n], ports[2 * n + 1], root / f"kafka-{n + 1}") for n in range(nodes)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(node.address for node in self.nodes)

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id - 1]

    def _java(self, main: str, *args: str, heap: list[str]) -> list[str]:
        log4j = self.root / "kafka-log4j2.properties"
        return [
            "java",
            *heap,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            self.classpath,
            main,
            *args,
        ]

    def configure(self) -> None:
        """Write each node's server.properties and format its storage, all nodes at once."""
        (self.root / "kafka-log4j2.properties").write_text(_LOG4J2)
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        cluster_id = new_cluster_id()
        formatting = []
        for node in self.nodes:
            node.home.mkdir(parents=True)
            settings = {
                "process.roles": "broker,controller",
                "node.id": str(node.node_id),
                "controller.quorum.voters": voters,
                "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
                "advertised.listeners": f"PLAINTEXT://{node.address}",
                "controller.listener.names": "CONTROLLER",
                "inter.broker.listener.name": "PLAINTEXT",
                "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "log.dirs": str(node.home / "data"),
                **broker_settings(len(self.nodes)),
                **_SMALL_NODE_SETTINGS,
            }
            node.properties.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
            command = ["format", "-t", cluster_id, "-c", str(node.properties)]
            formatting.append(
                subprocess.Popen(
                    self._java("kafka.tools.StorageTool", *command, heap=["-Xmx256m"]),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        for node, process in zip(self.nodes, formatting, strict=True):
            out, _ = process.communicate(timeout=_FORMAT_TIMEOUT)
            if process.returncode != 0:
                raise RuntimeError(f"formatting Kafka node {node.node_id} failed:\n{out.decode()[-2000:]}")

    def start_node(self, node_id: int, preexec: Callable[[], None] | None = None) -> None:
        """(Re)start one node's JVM on its existing data; ``preexec`` ties it to our life."""
        node = self.node(node_id)
        if node.process is not None and node.process.poll() is None:
            raise RuntimeError(f"Kafka node {node_id} is already running")
        with open(node.log, "ab") as log:  # the child keeps its own descriptor
            node.process = subprocess.Popen(
                self._java("kafka.Kafka", str(node.properties), heap=_HEAP),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )

    def signal(self, node_id: int, sig: int) -> None:
        """Send ``sig`` to a node: SIGKILL to crash it, SIGSTOP/SIGCONT to pause it."""
        process = self.node(node_id).process
        if process is None:
            raise RuntimeError(f"Kafka node {node_id} was never started")
        process.send_signal(sig)
        if sig == signal.SIGKILL:
            process.wait()

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def stop(self) -> None:
        """Kill every JVM at once: the data is deleted next, so nothing needs a controlled shutdown
        (which, with every controller leaving together, would wait for a quorum that is gone)."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.process.kill()
                node.process.wait()

    def log_tail(self, chars: int = 2000) -> str:
        tails = []
        for node in self.nodes:
            with contextlib.suppress(OSError):
                tails.append(f"--- node {node.node_id}\n{node.log.read_text(errors='replace')[-chars:]}")
        return "\n".join(tails)

    def exited(self) -> list[int]:
        """Nodes whose JVM has exited since it was started."""
        return [n.node_id for n in self.nodes if n.process is not None and n.process.poll() is not None]
