"""Sharded aggregation end to end: K aggregator processes folding one round's K shards.

For each K, K real ``roundlog serve --role aggregator`` subprocesses run against the embedded
broker (every one a member of the aggregator group, which reduces, and of the shard group
``<prefix>.shards``, which folds). Once both groups have formed, one training round of N
clients x an M MB float32 update runs with ``RoundConfig(shards=K)`` (K = 1: the unsharded
path). Each update's chunks sit on the tensors partition the SDK would put them on (the
partition of its key, ``update_id_for(round, client)``), so shard k folds the updates of the
partitions p with p mod K = k. Reported per run:

- end to end: update bytes / wall time from the first UpdateReceived produced to the
  RoundAggregated read back (the groups formed before; their formation time is shown apart);
- per shard: its updates, and the time from the first UpdateReceived produced to its
  ShardAggregated (``occurred_at``; the round closes in the log with the last update, produced
  a few ms after the first, so this is the shard's whole fold: read + reassemble + sha256 +
  fold + write its partial); the rate is the shard's bytes over that time;
- the reduce: RoundAggregated.time_model_load + time_aggregation (load the base, read the K
  float64 partials, add them, finalize; for K = 1 the whole fold), and the delay from the last
  partial to the model;
- peak RSS (VmHWM) of every aggregator process, and which process folded each shard;
- CPU seconds spent in the end-to-end window by the aggregators, the broker, this process and
  everything else on the machine (a busy neighbour shows there);
- at the end, a projection (labelled as such) for 16 shards on 16 machines from the measured
  per-shard fold rate and reduce cost.

Clients share a few distinct blobs per tensors partition (``--distinct`` per partition; each is
written with the key of the first client that lands there, as that client's SDK would), so big
rounds do not need N x M MB of broker memory; every update is still read from the broker.
``--distinct 0`` writes every client's own update.

    python bench/bench_shards.py              # K = 1, 2, 4 at 48 x 8 MB; K = 1, 2 at 144 x 8 MB
    python bench/bench_shards.py --repeats 3 --clients 200 --update-mb 32 --rss-clients 600
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeGroupsRequest
from bench_aggregator import MB, model, peak_rss_mb
from machine import describe
from rounds import collecting_round, updates

from roundlog.bus import Topics, create_topics, make_consumer, make_producer, partition_for, publish
from roundlog.clock import utc_now
from roundlog.config import Settings
from roundlog.domain.events import (
    Event,
    RoundAggregated,
    RoundFailed,
    ShardAggregated,
    TensorRef,
    update_id_for,
)
from roundlog.embedded import stack_settings
from roundlog.roles.stream import Entry
from roundlog.tensors import write_tensors

GROUP_TIMEOUT_S = 180.0
ROUND_TIMEOUT_S = 900.0


@dataclasses.dataclass
class Result:
    shards: int
    clients: int
    update_mb: float
    wall_s: float
    group_s: float
    shard_updates: list[int]
    shard_s: list[float]
    shard_process: list[int | None]  # index of the aggregator process whose log says it folded the shard
    reduce_s: float  # time_model_load + time_aggregation of the RoundAggregated
    load_s: float
    last_partial_to_model_s: float
    rss_mb: list[float]
    partition_updates: list[int]
    cpu: CpuWindow

    @property
    def round_mb(self) -> float:
        return self.clients * self.update_mb

    @property
    def e2e_mb_s(self) -> float:
        return self.round_mb / self.wall_s

    def shard_mb_s(self) -> list[float]:
        return [n * self.update_mb / s for n, s in zip(self.shard_updates, self.shard_s, strict=True) if n]


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy, and stolen by the hypervisor, so far (all cores)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    busy = sum(values[:7]) - values[3] - values[4]  # user nice system irq softirq: not idle, iowait
    return busy / TICK, values[7] / TICK


def broker_pids() -> list[int]:
    """Our descendants whose command line names the broker (Tansu, or Kafka's JVMs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"tansu" in cmdline or b"kafka.Kafka" in cmdline:
            found.append(pid)
    return found


@dataclasses.dataclass
class CpuWindow:
    """CPU seconds spent during the round by the aggregators, the broker, this process and the rest."""

    aggregators: list[float]
    broker: float
    bench: float
    machine: float
    steal: float

    @classmethod
    def sample(cls, aggregators: list[int], broker: list[int]) -> CpuWindow:
        return cls(
            [cpu_seconds(pid) for pid in aggregators],
            sum(cpu_seconds(pid) for pid in broker),
            cpu_seconds(os.getpid()),
            *machine_seconds(),
        )

    def __sub__(self, before: CpuWindow) -> CpuWindow:
        return CpuWindow(
            [a - b for a, b in zip(self.aggregators, before.aggregators, strict=True)],
            self.broker - before.broker,
            self.bench - before.bench,
            self.machine - before.machine,
            self.steal - before.steal,
        )

    @property
    def others(self) -> float:
        return max(0.0, self.machine - sum(self.aggregators) - self.broker - self.bench)


def with_shards(events: list[Event], shards: int) -> list[Event]:
    """The round's events with ``config.shards`` = ``shards`` wherever a RoundConfig travels."""
    out = []
    for event in events:
        for name in ("round_config", "config"):
            if hasattr(event, name):
                config = dataclasses.replace(getattr(event, name), shards=shards)
                event = dataclasses.replace(event, **{name: config})
        out.append(event)
    return out


async def write_updates(
    producer: Any, topic: str, rid: str, names: list[str], megabytes: int, partitions: int, distinct: int
) -> list[TensorRef]:
    """One TensorRef per client, on the partition of its key as the SDK writes it; at most
    ``distinct`` blobs per partition (0: every client its own), reused round-robin."""
    written: dict[int, list[TensorRef]] = {}
    used: Counter[int] = Counter()
    refs = []
    for i, name in enumerate(names):
        key = update_id_for(rid, name)
        p = partition_for(key, partitions)
        blobs = written.setdefault(p, [])
        if distinct == 0 or len(blobs) < distinct:
            ref = await write_tensors(producer, topic, key, model(i + 1, megabytes))
            assert ref.partition == p, f"{key} landed on {ref.partition}, expected {p}"
            blobs.append(ref)
        refs.append(blobs[used[p] % len(blobs)])
        used[p] += 1
    return refs


def log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(line))
    return lines


def holdings(path: Path) -> frozenset[int] | None:
    """The tensors partitions a process last said it holds in the shard group."""
    held = None
    for line in log_lines(path):
        message = line.get("message", "")
        if message.startswith("holding tensors partitions"):
            held = frozenset(json.loads(message.split("partitions ", 1)[1].split("]", 1)[0] + "]"))
    return held


def shards_folded(path: Path) -> set[int]:
    """The shards a process's log says it folded ("shard k of K folded: ...")."""
    messages = [line.get("message", "") for line in log_lines(path)]
    return {int(m.split()[1]) for m in messages if m.startswith("shard ") and " folded:" in m}


async def describe_groups(client: AIOKafkaClient, groups: list[str]) -> dict[str, tuple[str, int]]:
    """Each group's state and member count, as its coordinator tells them (DescribeGroups; Tansu
    answers it, without the assignments); an unknown group, or no answer, is missing."""
    found = {}
    for group in groups:
        try:
            node = await client.coordinator_lookup(CoordinationType.GROUP, group)
            response = await client.send(node, DescribeGroupsRequest(groups=[group]))
        except KafkaError:
            continue
        for described in response.groups:
            # (error_code, group_id, state, protocol_type, protocol, members, ...)
            if described[0] == 0:
                found[described[1]] = (described[2], len(described[5]))
    return found


async def wait_for_groups(
    settings: Settings, processes: list[subprocess.Popen[bytes]], logs: list[Path], partitions: int
) -> float:
    """Seconds until both groups are Stable with every process a member and the shard group's
    tensors partitions spread over all of them, as each process's log says."""
    started = time.perf_counter()
    groups = [f"{settings.topic_prefix}.aggregator", f"{settings.topic_prefix}.shards"]
    client = AIOKafkaClient(**settings.kafka_client_kwargs())
    await client.bootstrap()
    try:
        return await _wait_for_groups(client, groups, processes, logs, partitions, started)
    finally:
        await client.close()


async def _wait_for_groups(
    client: AIOKafkaClient,
    groups: list[str],
    processes: list[subprocess.Popen[bytes]],
    logs: list[Path],
    partitions: int,
    started: float,
) -> float:
    stable_since = None
    while True:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"aggregator {process.pid} exited with {process.returncode}")
        held = [holdings(log) for log in logs]
        spread = all(h for h in held) and sorted(p for h in held for p in h or ()) == list(range(partitions))
        states = await describe_groups(client, groups)
        formed = spread and all(states.get(g) == ("Stable", len(processes)) for g in groups)
        now = time.perf_counter()
        if formed:
            stable_since = stable_since or now
            if now - stable_since >= 1.0:  # stayed formed for a second: no rebalance under way
                return stable_since - started
        else:
            stable_since = None
        if now - started > GROUP_TIMEOUT_S:
            raise RuntimeError(f"groups not formed after {GROUP_TIMEOUT_S:.0f}s: {states}, holdings {held}")
        await asyncio.sleep(0.25)


async def one_round(
    settings: Settings,
    shards: int,
    clients: int,
    megabytes: int,
    distinct: int,
    session_ms: int,
    logdir: Path,
) -> Result:
    topics = Topics.from_prefix(settings.topic_prefix)
    await create_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    base_ref = await write_tensors(producer, topics.tensors, "base", model(0, megabytes))
    names = [f"client-{i}" for i in range(clients)]
    sid, rid, setup = collecting_round("base", base_ref, tuple(names))
    setup = with_shards(setup, shards)
    refs = await write_updates(producer, topics.tensors, rid, names, megabytes, settings.partitions, distinct)
    update_bytes = base_ref.nbytes

    env = {
        **os.environ,
        **settings.env(),
        "ROUNDLOG_METRICS_PORT": "0",
        "ROUNDLOG_GROUP_SESSION_TIMEOUT_MS": str(session_ms),
        "ROUNDLOG_LOG_FORMAT": "json",
    }
    logs = [logdir / f"{settings.topic_prefix}-aggregator-{i}.log" for i in range(shards)]
    processes = []
    for log in logs:
        with log.open("wb") as stderr:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "roundlog", "serve", "--role", "aggregator"],
                    env=env,
                    stderr=stderr,
                )
            )
    consumer = make_consumer(settings)
    try:
        group_s = await wait_for_groups(settings, processes, logs, settings.partitions)
        submitted = updates(sid, rid, names, refs)
        await publish(producer, topics, setup)
        await consumer.start()
        consumer.subscribe([topics.events])
        brokers = broker_pids()
        cpu_before = CpuWindow.sample([p.pid for p in processes], brokers)
        started_utc = utc_now()
        started = time.perf_counter()
        await publish(producer, topics, submitted)
        partials: dict[int, ShardAggregated] = {}
        aggregated: RoundAggregated | None = None
        while aggregated is None:
            if time.perf_counter() - started > ROUND_TIMEOUT_S:
                raise RuntimeError(f"no RoundAggregated after {ROUND_TIMEOUT_S:.0f}s")
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    event = Entry.of(record).decoded
                    if getattr(event, "round_id", None) != rid:
                        continue
                    if isinstance(event, ShardAggregated):
                        partials.setdefault(event.shard, event)
                    elif isinstance(event, RoundAggregated):
                        aggregated = event
                    elif isinstance(event, RoundFailed):
                        raise RuntimeError(f"round failed: {event.reason} {event.detail}")
        wall = time.perf_counter() - started
        cpu = CpuWindow.sample([p.pid for p in processes], brokers) - cpu_before
        rss = [peak_rss_mb(process.pid) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
        await consumer.stop()
        await producer.stop()

    partition_updates = [0] * settings.partitions
    for ref in refs:
        partition_updates[ref.partition] += 1
    if shards == 1:
        shard_updates = [clients]
        shard_s = [(aggregated.occurred_at - started_utc).total_seconds()]
        shard_process: list[int | None] = [0]
        last_partial = aggregated.occurred_at
    else:
        assert sorted(partials) == list(range(shards)), f"partials of shards {sorted(partials)}"
        assert sum(len(p.update_ids) for p in partials.values()) == clients
        shard_updates = [len(partials[k].update_ids) for k in range(shards)]
        shard_s = [(partials[k].occurred_at - started_utc).total_seconds() for k in range(shards)]
        folded_by = [shards_folded(log) for log in logs]
        shard_process = [next((i for i, f in enumerate(folded_by) if k in f), None) for k in range(shards)]
        last_partial = max(p.occurred_at for p in partials.values())
    assert aggregated.total_weight > 0 and update_bytes == refs[0].nbytes
    return Result(
        shards=shards,
        clients=clients,
        update_mb=update_bytes / MB,
        wall_s=wall,
        group_s=group_s,
        shard_updates=shard_updates,
        shard_s=shard_s,
        shard_process=shard_process,
        reduce_s=aggregated.time_model_load + aggregated.time_aggregation,
        load_s=aggregated.time_model_load,
        last_partial_to_model_s=(aggregated.occurred_at - last_partial).total_seconds(),
        rss_mb=rss,
        partition_updates=partition_updates,
        cpu=cpu,
    )


def fmt(values: Sequence[float], spec: str = ".0f") -> str:
    return ", ".join(format(v, spec) for v in values)


def report(rows: list[Result], arguments: argparse.Namespace) -> None:
    print(f"\nmachine: {describe()}")
    print(
        f"tensors partitions: {arguments.partitions}, update {rows[0].update_mb:.1f} MB (float32), "
        f"distinct blobs per partition: {arguments.distinct or 'every client its own'}, "
        f"group session timeout {arguments.session_ms} ms\n"
    )
    print(
        "| run | K | clients | round MB | group formed s | end to end s | end to end MB/s | vs K=1 "
        "| updates per shard | shard fold s | shard MB/s | reduce s (load + agg; K=1: the fold) "
        "| last partial -> model s "
        "| peak RSS MB per process |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|---|")
    for run, batch in enumerate(batches(rows, arguments), start=1):
        for r in batch:
            base = next((b for b in batch if b.shards == 1 and b.clients == r.clients), None)
            ratio = f"{r.e2e_mb_s / base.e2e_mb_s:.2f}" if base else "-"
            print(
                f"| {run} | {r.shards} | {r.clients} | {r.round_mb:.0f} | {r.group_s:.1f} | {r.wall_s:.2f} "
                f"| {r.e2e_mb_s:.0f} | {ratio} | {fmt(r.shard_updates)} | {fmt(r.shard_s, '.2f')} "
                f"| {fmt(r.shard_mb_s())} | {r.reduce_s:.2f} ({r.load_s:.2f} + {r.reduce_s - r.load_s:.2f}) "
                f"| {r.last_partial_to_model_s:.2f} | {fmt(r.rss_mb)} |"
            )
    cores = os.cpu_count() or 1
    print(f"\nCPU seconds spent in each round's end-to-end window ({cores} cores: capacity {cores} x wall)")
    print("| run | K | clients | wall s | aggregators | broker | bench | others | stolen | busy / capacity |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for run, batch in enumerate(batches(rows, arguments), start=1):
        for r in batch:
            c = r.cpu
            print(
                f"| {run} | {r.shards} | {r.clients} | {r.wall_s:.2f} | {fmt(c.aggregators, '.2f')} "
                f"| {c.broker:.2f} | {c.bench:.2f} | {c.others:.2f} | {c.steal:.2f} "
                f"| {c.machine / (cores * r.wall_s):.0%} |"
            )
    print(f"\nupdates per tensors partition (last run): {rows[-1].partition_updates}")
    project(rows, arguments)


def plan_of(arguments: argparse.Namespace) -> list[tuple[int, int]]:
    """(K, clients) of one repeat: every K at --clients, then --rss-shards at --rss-clients."""
    plan = [(k, arguments.clients) for k in arguments.shards]
    if arguments.rss_clients:
        plan += [(k, arguments.rss_clients) for k in arguments.rss_shards]
    return plan


def batches(rows: list[Result], arguments: argparse.Namespace) -> list[list[Result]]:
    per_run = len(plan_of(arguments))
    return [rows[i : i + per_run] for i in range(0, len(rows), per_run)]


def project(rows: list[Result], arguments: argparse.Namespace) -> None:
    """16 shards on 16 machines, from the measured per-shard fold rate and reduce cost."""
    sharded = [r for r in rows if r.shards > 1]
    single = [r for r in rows if r.shards == 1]
    if not sharded or not single:
        return
    # r_hi: one aggregator process folding alone (K=1, the broker beside it); r_lo: the shards of
    # K=2, two aggregator processes and the broker sharing the two cores
    r_hi = statistics.median(r.round_mb / r.shard_s[0] for r in single)
    k2 = [v for r in sharded if r.shards == 2 for v in r.shard_mb_s()]
    r_lo = statistics.median(k2) if k2 else min(v for r in sharded for v in r.shard_mb_s())
    # the reduce after loading the base, per model MB, fitted as a + c K over the sharded runs
    by_k: dict[int, list[float]] = {}
    for r in sharded:
        by_k.setdefault(r.shards, []).append((r.reduce_s - r.load_s) / r.update_mb)
    ks = sorted(by_k)
    med = {k: statistics.median(v) for k, v in by_k.items()}
    if len(ks) >= 2:
        c = max(0.0, (med[ks[-1]] - med[ks[0]]) / (ks[-1] - ks[0]))
        a = max(0.0, med[ks[0]] - c * ks[0])
    else:
        c, a = med[ks[0]] / ks[0], 0.0
    load = statistics.median(r.load_s / r.update_mb for r in sharded)
    d = statistics.median(r.last_partial_to_model_s - r.reduce_s for r in sharded)
    print("\nPROJECTION, not measured: 16 shards on 16 machines, one aggregator process per machine")
    print(
        f"  r     per-shard fold rate: {r_lo:.0f} MB/s (K=2 shards here, median) .. "
        f"{r_hi:.0f} MB/s (K=1, one process, median)"
    )
    print(f"  load  reading the base model: {load * 1000:.1f} ms per model MB (median, sharded runs)")
    print(f"  a, c  reduce after the load = m (a + c K): a {a * 1e3:.1f}, c {c * 1e3:.1f} ms per model MB")
    print(f"  d     last partial -> model, beyond the reduce (event hops, model write): {d:.2f} s")
    print("  T(16) = B / (16 r) + m load          the largest shard: B/16 if placement is balanced")
    print("        + m (load + a + 16 c) + d      the reduce, serial in K")
    print("  (B: round MB, m: model MB; assumes the brokers serve 16 r MB/s and each shard has a core)")
    for clients, m in ((arguments.clients, rows[0].update_mb), (1000, 100.0)):
        b = clients * m
        reduce = m * (load + a + 16 * c) + d
        for rate in (r_lo, r_hi):
            t16 = b / (16 * rate) + m * load + reduce
            print(
                f"  {clients:,} clients x {m:.0f} MB = {b / 1000:.1f} GB, r {rate:.0f}: T(16) = {t16:.1f} s "
                f"({b / t16:,.0f} MB/s; reduce {reduce:.1f} s), one aggregator B/r = {b / rate:.1f} s "
                f"({b / rate / t16:.1f}x)"
            )


async def main(arguments: argparse.Namespace) -> None:
    with stack_settings() as settings, tempfile.TemporaryDirectory(prefix="bench-shards-") as logdir:
        settings = dataclasses.replace(settings, partitions=arguments.partitions)
        plan = plan_of(arguments)
        rows = []
        for _ in range(arguments.repeats):
            for shards, clients in plan:
                run = dataclasses.replace(settings, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}")
                row = await one_round(
                    run,
                    shards,
                    clients,
                    arguments.update_mb,
                    arguments.distinct,
                    arguments.session_ms,
                    Path(logdir),
                )
                rows.append(row)
                print(
                    f"K={shards} clients={clients}: {row.e2e_mb_s:.0f} MB/s end to end ({row.wall_s:.2f} s), "
                    f"shards {fmt(row.shard_updates)} updates in {fmt(row.shard_s, '.2f')} s, "
                    f"reduce {row.reduce_s:.2f} s, groups {row.group_s:.1f} s, RSS {fmt(row.rss_mb)} MB, "
                    f"shards folded by processes {row.shard_process}",
                    flush=True,
                )
                if arguments.keep_logs:
                    for log in Path(logdir).glob(f"{run.topic_prefix}-*.log"):
                        target = Path(arguments.keep_logs) / log.name
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(log.read_bytes())
        report(rows, arguments)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="K values; 1 first")
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument(
        "--rss-clients", type=int, default=144, help="further runs with this many clients (0: none)"
    )
    parser.add_argument("--rss-shards", type=int, nargs="+", default=[1, 2], help="K values of those runs")
    parser.add_argument("--update-mb", type=int, default=8)
    parser.add_argument("--partitions", type=int, default=8, help="partitions of each topic (T)")
    parser.add_argument(
        "--distinct", type=int, default=2, help="distinct update blobs per partition (0: one per client)"
    )
    parser.add_argument("--session-ms", type=int, default=6000, help="ROUNDLOG_GROUP_SESSION_TIMEOUT_MS")
    parser.add_argument("--repeats", type=int, default=1, help="run the whole plan this many times")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy each aggregator's JSON log here")
    asyncio.run(main(parser.parse_args()))
