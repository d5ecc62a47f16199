"""``replay --verify-models``: fold every round of the log again and check each aggregated model.

The audit runs the aggregator's own fold (``LogAggregation``) over the whole events
topic from offset 0, with a sink that records the model each closed round folds to
instead of writing it. Each ``RoundAggregated`` in the log must then name the same
sha256 and the same folded updates, in the same order. A sharded round is re-folded with
its own sharding: every shard's partial is folded again and checked against its
``ShardAggregated``, and the reduce of the logged partials against the model. Where the deployment signs its
events, the same fold checks every record's signature again, and the report counts them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from roundlog.aggregation import Partial
from roundlog.aggregation.base import BaseModel
from roundlog.arrays import sha256_of
from roundlog.bus import Topics, make_consumer
from roundlog.codec import DecodeError
from roundlog.config import Settings
from roundlog.domain.authority import Seal, seal_problem
from roundlog.domain.events import RoundAggregated, ShardAggregated
from roundlog.domain.round import Round
from roundlog.domain.rules import Reason, Refusal
from roundlog.domain.session import Session
from roundlog.projections.audits import record_audits
from roundlog.roles.aggregation import Closed, LogAggregation, RoundAggregation, Unusable, every_shard
from roundlog.roles.stream import PartitionFold, read_range
from roundlog.tensors import TensorReader


@dataclass(frozen=True)
class Refolded:
    sha256: str
    update_ids: tuple[str, ...]


@dataclass(frozen=True)
class Mismatch:
    session_id: str
    round_id: str
    logged: Refolded
    refolded: Refolded | None
    detail: str


@dataclass
class AuditReport:
    rounds_checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    #: shard partials of sharded rounds re-folded and checked
    partials_checked: int = 0
    #: records whose signature held, and those unsigned or badly signed (None: not checked)
    signatures_verified: int | None = None
    signatures_refused: int = 0
    #: every aggregated model re-folded, as the log names it (``model_audits`` keeps the verdicts)
    models: list[RoundAggregated] = field(default_factory=list)

    def render(self) -> str:
        models = f"verified {self.rounds_checked} aggregated models: {len(self.mismatches)} mismatches"
        if self.partials_checked:
            models += f" (and {self.partials_checked} shard partials)"
        if self.signatures_verified is None:
            return f"{models}; signatures not checked (ROUNDLOG_AUTH=off)"
        return (
            f"{models}; {self.signatures_verified} signatures verified, "
            f"{self.signatures_refused} records unsigned or badly signed (refused by the fold)"
        )

    @property
    def ok(self) -> bool:
        return not self.mismatches


class RecordingSink:
    """Keeps what each closed round (and each shard of a sharded one) folded to; emits nothing."""

    def __init__(self) -> None:
        self.refolded: dict[tuple[str, str], Refolded | Closed] = {}
        self.partials: dict[tuple[str, str, int], Refolded] = {}

    async def partial(self, aggregation: RoundAggregation, partial: Partial) -> None:
        round_ = aggregation.round
        arrays = partial.arrays(BaseModel.of(aggregation.base))
        update_ids = tuple(u.update_id for u in aggregation.folded)
        self.partials[(round_.session_id, round_.round_id, aggregation.shard)] = Refolded(
            sha256_of(arrays), update_ids
        )

    async def unusable(self, session: Session, round_: Round, rejection: Unusable) -> None:
        return None

    async def closed(self, session: Session, round_: Round, outcome: Closed) -> None:
        if outcome.result is None or outcome.aggregation is None:
            self.refolded[(session.session_id, round_.round_id)] = outcome
        else:
            update_ids = tuple(u.update_id for u in outcome.aggregation.folded)
            self.refolded[(session.session_id, round_.round_id)] = Refolded(
                sha256_of(outcome.result.arrays), update_ids
            )


async def verify_models(
    settings: Settings, progress: Callable[[int, int], None] | None = None
) -> AuditReport:
    """Re-fold every partition from offset 0; ``progress(done, total)`` is called per partition."""
    topics = Topics.from_prefix(settings.topic_prefix)
    log_consumer, tensor_consumer = make_consumer(settings), make_consumer(settings)
    await log_consumer.start()
    await tensor_consumer.start()
    report = AuditReport(signatures_verified=0 if settings.auth else None)
    try:
        ends = await log_consumer.end_offsets(await log_consumer.topic_partitions(topics.events))
        sink = RecordingSink()
        aggregation = LogAggregation(TensorReader(tensor_consumer, topics.tensors), sink, shards=every_shard)
        for done, (tp, end) in enumerate(sorted(ends.items()), start=1):
            fold = PartitionFold.for_settings(tp.partition, len(ends), settings)
            async for entry in read_range(log_consumer, topics.events, tp.partition, 0, end):
                event = entry.decoded
                if isinstance(event, DecodeError):
                    fold.skip(entry.offset)
                    continue
                outcome = await aggregation.apply(fold, entry, event)
                if fold.ledger.authority is not None:
                    _count_signature(report, outcome.refusal, entry.seal)
                if isinstance(event, RoundAggregated) and outcome.applied:
                    report.rounds_checked += 1
                    report.models.append(event)
                    _compare(report, event, sink.refolded.get((event.session_id, event.round_id)))
                elif isinstance(event, ShardAggregated) and outcome.applied:
                    report.partials_checked += 1
                    _compare(
                        report, event, sink.partials.get((event.session_id, event.round_id, event.shard))
                    )
            aggregation.forget_partition(tp.partition)
            if progress is not None:
                progress(done, len(ends))
    finally:
        await log_consumer.stop()
        await tensor_consumer.stop()
    await record_audits(settings.database_url, report)
    return report


def _count_signature(report: AuditReport, refusal: Refusal | None, seal: Seal | None) -> None:
    """The fold checked this record's signature before anything else: count what it found. Only a
    record kept aside before the fold (``wrong_partition``) has its signature checked here."""
    if refusal is not None and refusal.reason == Reason.WRONG_PARTITION:
        refusal = seal_problem(seal)
    if refusal is not None and refusal.reason in (Reason.UNSIGNED, Reason.BAD_SIGNATURE):
        report.signatures_refused += 1
    elif report.signatures_verified is not None:
        report.signatures_verified += 1


def _compare(
    report: AuditReport, logged_event: RoundAggregated | ShardAggregated, refolded: Refolded | Closed | None
) -> None:
    tensor = logged_event.tensor if isinstance(logged_event, RoundAggregated) else logged_event.partial
    logged = Refolded(tensor.sha256, logged_event.update_ids)
    if isinstance(refolded, Refolded) and refolded == logged:
        return
    if refolded is None:
        detail = "the round never closed in the re-fold"
    elif isinstance(refolded, Closed):
        detail = f"the re-fold failed: {refolded.fail_reason} {refolded.detail}".strip()
    elif refolded.update_ids != logged.update_ids:
        detail = "different updates were folded"
    else:
        detail = "the same updates fold to another model"
    if isinstance(logged_event, ShardAggregated):
        detail = f"shard {logged_event.shard}: {detail}"
    report.mismatches.append(
        Mismatch(
            session_id=logged_event.session_id,
            round_id=logged_event.round_id,
            logged=logged,
            refolded=refolded if isinstance(refolded, Refolded) else None,
            detail=detail,
        )
    )
