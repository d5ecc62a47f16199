"""Operations plumbing: Prometheus metrics, the health endpoint, structured logs and consumer lag.

Roles stay thin loops: they bump the module-level metrics below, call ``heartbeat(role)``
once per loop iteration, and ``roundlog serve`` does the rest (one HTTP server per
process, started before the roles). The server runs in a thread of its own, so
``/metrics`` and ``/healthz`` still answer while a CPU-bound fold holds the event loop;
a loop stuck that way shows as a stale heartbeat instead of a scrape timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from roundlog.config import ConfigError

log = logging.getLogger("roundlog.observability")

DEFAULT_METRICS_PORT = 9400
#: A role whose loop has not called ``heartbeat`` for this long is reported dead. Generous,
#: because a role re-folding a long partition after a rebalance does not beat meanwhile.
DEFAULT_STALE_AFTER = 60.0
LOG_FORMATS = ("text", "json")

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class OpsSettings:
    """The ``ROUNDLOG_*`` variables of operations: where metrics are served and how logs look."""

    metrics_port: int = DEFAULT_METRICS_PORT
    log_format: str = "text"
    log_level: str = "INFO"
    stale_after: float = DEFAULT_STALE_AFTER

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OpsSettings:
        env = os.environ if environ is None else environ
        port_text = env.get("ROUNDLOG_METRICS_PORT") or str(DEFAULT_METRICS_PORT)
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(f"ROUNDLOG_METRICS_PORT must be 0..65535 (0: any free port), not {port_text!r}")
        log_format = (env.get("ROUNDLOG_LOG_FORMAT") or "text").lower()
        if log_format not in LOG_FORMATS:
            raise ConfigError(f"ROUNDLOG_LOG_FORMAT must be json or text, not {log_format!r}")
        level = (env.get("ROUNDLOG_LOG_LEVEL") or "INFO").upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ConfigError(f"ROUNDLOG_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
        stale_text = env.get("ROUNDLOG_HEALTH_STALE_SECONDS") or str(DEFAULT_STALE_AFTER)
        try:
            stale_after = float(stale_text)
            if not stale_after > 0:  # also refuses nan
                raise ValueError(stale_text)
        except ValueError:
            raise ConfigError(
                f"ROUNDLOG_HEALTH_STALE_SECONDS must be a positive number, not {stale_text!r}"
            ) from None
        return cls(
            metrics_port=int(port_text), log_format=log_format, log_level=level, stale_after=stale_after
        )


# ---------------------------------------------------------------------------------------------
# Metrics. A registry of roundlog's own (not prometheus_client's global one), so an application
# that imports roundlog's client SDK next to its own metrics does not get ours mixed in.

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

EVENTS = Counter(
    "roundlog_events_processed",
    "Events a role read from the events topic and applied to its fold, by event type "
    "(refused ones included; see roundlog_events_rejected_total).",
    ["role", "type"],
    registry=REGISTRY,
)
REJECTED = Counter(
    "roundlog_events_rejected",
    "Records a role refused, by reason: the fold's rejections (late, duplicate, not_assigned, "
    "illegal in the round's state, ...), unusable updates (hash mismatch, non-finite, wrong shape) "
    "and undecodable records sent to the dead-letter topic.",
    ["role", "reason"],
    registry=REGISTRY,
)
EMITTED = Counter(
    "roundlog_events_emitted",
    "Events a role produced, by event type (RoundAggregated, RoundFailed, UpdateRejected, deadlines, ...).",
    ["role", "type"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "roundlog_consumer_lag",
    "Records on a partition assigned to this member that it has not consumed yet "
    "(end offset - position), sampled periodically; partitions it no longer owns are dropped.",
    ["role", "topic", "partition"],
    registry=REGISTRY,
)
FOLD_BYTES = Counter(
    "roundlog_fold_bytes",
    "Bytes of update tensors folded into round aggregates; rate() is the aggregator's fold throughput.",
    registry=REGISTRY,
)
PROJECTION_BATCH_SECONDS = Histogram(
    "roundlog_projection_batch_seconds",
    "Wall time of one projector batch: folding it and writing its rows and offsets in one transaction.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
BUILD = Info("roundlog_build", "Version of roundlog and of Python this process runs.", registry=REGISTRY)
try:
    _VERSION = version("roundlog")
except PackageNotFoundError:  # imported from a checkout that was never installed
    _VERSION = "unknown"
BUILD.info({"version": _VERSION, "python": sys.version.split()[0]})


# ---------------------------------------------------------------------------------------------
# Liveness: a role is alive while its loop runs and beats. The HTTP thread reads what the event
# loop writes, hence the lock.


@dataclass
class _Role:
    stale_after: float
    last_beat: float
    running: bool = True


class Liveness:
    """Which role loops of this process run, and whether each one has beaten recently."""

    def __init__(self) -> None:
        self._roles: dict[str, _Role] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def track(self, role: str, stale_after: float = DEFAULT_STALE_AFTER) -> Iterator[None]:
        """Count ``role`` as alive from now (its start is its first beat) until the block exits."""
        with self._lock:
            self._roles[role] = _Role(stale_after, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._roles[role].running = False

    def beat(self, role: str) -> None:
        """Record that ``role``'s loop made progress; a no-op for a role nobody tracks (e.g. in tests)."""
        with self._lock:
            state = self._roles.get(role)
            if state is not None:
                state.last_beat = time.monotonic()

    def status(self) -> dict[str, dict[str, Any]]:
        """Each tracked role: alive (running and fresh), running, seconds since its last beat."""
        now = time.monotonic()
        with self._lock:
            return {
                role: {
                    "alive": state.running and now - state.last_beat <= state.stale_after,
                    "running": state.running,
                    "seconds_since_heartbeat": round(now - state.last_beat, 3),
                }
                for role, state in self._roles.items()
            }

    def healthy(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """True when at least one role is tracked and every tracked role is alive."""
        roles = self.status()
        return bool(roles) and all(r["alive"] for r in roles.values()), roles


LIVENESS = Liveness()


def heartbeat(role: str) -> None:
    """Called by a role once per loop iteration: ``/healthz`` and ``roundlog_up`` follow it."""
    LIVENESS.beat(role)


async def beating(role: str, pending: Awaitable[T], alive: Callable[[], bool], every: float = 0.5) -> T:
    """Await ``pending`` (a consumer's ``getmany``), beating for ``role`` meanwhile while ``alive()``.

    ``getmany`` blocks through a whole rebalance (seconds, up to twice the session timeout on
    Tansu): a member waiting on its group is not stuck and must not be restarted for it, which
    would only start another rebalance. One whose own rebalance callback hangs (e.g. on a
    database lock) is stuck: ``alive`` says False while a callback or a failure holds the role.
    """
    task = asyncio.ensure_future(pending)
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=every)
            if done:
                return task.result()
            if alive():
                heartbeat(role)
    finally:
        task.cancel()  # a no-op once done; stops the poll when the caller is cancelled


class _UpCollector:
    """``roundlog_up{role}``, computed at scrape time from the liveness of this process's roles."""

    def __init__(self, liveness: Liveness) -> None:
        self._liveness = liveness

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "roundlog_up",
            "1 while the role's loop runs and has called heartbeat() within the stale limit "
            "(ROUNDLOG_HEALTH_STALE_SECONDS); 0 when it is stuck or stopped.",
            labels=["role"],
        )
        for role, state in sorted(self._liveness.status().items()):
            family.add_metric([role], 1.0 if state["alive"] else 0.0)
        yield family


REGISTRY.register(_UpCollector(LIVENESS))


# ---------------------------------------------------------------------------------------------
# The HTTP endpoint.


class _Handler(BaseHTTPRequestHandler):
    liveness: Liveness  # set on the per-server subclass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, content_type, encoder(REGISTRY))
        elif path == "/healthz":
            healthy, roles = self.liveness.healthy()
            body = {"status": "ok" if healthy else "unavailable", "roles": roles}
            self._send(200 if healthy else 503, "application/json", json.dumps(body).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would drown the role's own logs on stderr.
        log.debug(format, *args)


class HealthServer:
    """The running ``/metrics`` + ``/healthz`` server; ``port`` is the bound one (useful with port 0)."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        self._server = server
        self.port: int = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="roundlog-health", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()

    async def __aenter__(self) -> HealthServer:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def serve_health(port: int, liveness: Liveness = LIVENESS, host: str = "0.0.0.0") -> HealthServer:
    """Serve ``/metrics`` (Prometheus text, or OpenMetrics when asked) and ``/healthz`` on ``port``.

    ``/healthz`` answers 200 when every role tracked by ``liveness`` is alive, else 503; both
    with a JSON body naming each role's state. Port 0 binds a free port: read ``.port``.
    """
    handler = type("HealthHandler", (_Handler,), {"liveness": liveness})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"metrics port {port} is in use: set ROUNDLOG_METRICS_PORT to a free port, or 0 to pick one"
            ) from None
        raise
    server.daemon_threads = True
    started = HealthServer(server)
    log.info("serving /metrics and /healthz on port %d", started.port, extra={"port": started.port})
    return started


# ---------------------------------------------------------------------------------------------
# Structured logs.

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines that still carry the ids: ``... message session_id=... round_id=...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        if not ids:
            return line
        head, newline, rest = line.partition("\n")  # keep a traceback below the ids
        return f"{head} {ids}{newline}{rest}"


class ClientRepeats(logging.Filter):
    """Lets one of each kind of Kafka client message through per ``window`` seconds, and says
    how many it held back. aiokafka logs every failed attempt to reach a broker, hundreds a
    second per role while one is down, which buries everything else in the log."""

    def __init__(self, window: float = 10.0) -> None:
        super().__init__()
        self.window = window
        #: per (logger, level, message template): when one last got through, and how many since
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        key = (record.name, record.levelno, str(record.msg))
        shown_at, held = self._seen.get(key, (-math.inf, 0))
        if record.created - shown_at < self.window:
            self._seen[key] = (shown_at, held + 1)
            return False
        self._seen[key] = (record.created, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like it in the last {record.created - shown_at:.0f} s]"
        return True


def configure_logging(level: str | int = "INFO", json: bool = False) -> None:
    """Send every logger's records to stderr as JSON lines (``json=True``) or as text, at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(ClientRepeats())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # aiokafka logs every assign() at INFO, and the tensor reader assigns once per blob
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))


# ---------------------------------------------------------------------------------------------
# Consumer lag.

#: The partitions whose lag gauge each (role, topic) last set, so revoked ones can be dropped.
_LAG_PARTITIONS: dict[tuple[str, str], set[int]] = {}
_POSITION_WAIT = 1.0


def _publish_lag(role: str, topic: str, lags: Mapping[int, int]) -> None:
    for partition in _LAG_PARTITIONS.get((role, topic), set()) - lags.keys():
        CONSUMER_LAG.remove(role, topic, str(partition))
    for partition, lag in lags.items():
        CONSUMER_LAG.labels(role, topic, str(partition)).set(lag)
    _LAG_PARTITIONS[(role, topic)] = set(lags)


async def lag_probe(consumer: AIOKafkaConsumer, topic: str, role: str) -> dict[int, int]:
    """Lag (end offset - position) of each partition of ``topic`` assigned to ``consumer``.

    Sets ``roundlog_consumer_lag`` for them and drops the gauges of partitions no longer
    assigned, so a rebalance does not leave a stale lag on the member that lost a partition.
    A partition without a position yet (being reset or revoked meanwhile) is skipped.
    """
    assigned = [tp for tp in consumer.assignment() if tp.topic == topic]
    ends: dict[TopicPartition, int] = await consumer.end_offsets(assigned) if assigned else {}
    lags: dict[int, int] = {}
    for tp in assigned:
        try:
            position = await asyncio.wait_for(consumer.position(tp), _POSITION_WAIT)
        except (IllegalStateError, TimeoutError):
            continue
        lags[tp.partition] = max(0, ends[tp] - position)
    _publish_lag(role, topic, lags)
    return lags


@contextlib.asynccontextmanager
async def lag_watch(
    consumer: AIOKafkaConsumer, topic: str, role: str, interval: float = 15.0
) -> AsyncIterator[None]:
    """Run ``lag_probe`` every ``interval`` seconds while the block runs; clear the gauges after.

    A failed probe is logged and retried next time: measuring lag must never stop a role.
    """

    async def probe_forever() -> None:
        while True:
            try:
                await lag_probe(consumer, topic, role)
            except Exception as exc:
                log.warning("lag probe of %s failed: %r", topic, exc, extra={"role": role})
            await asyncio.sleep(interval)

    task = asyncio.create_task(probe_forever(), name=f"lag-{role}-{topic}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        _publish_lag(role, topic, {})
