"""The verdicts of ``replay --verify-models`` in SQL: one ``model_audits`` row per model per run.

The audit re-folds the log; only SQL outlives the run, and the dashboard reads SQL alone, so
each run records, for every aggregated model it checked, whether the re-fold reached the
sha256 the log names and, if not, why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import psycopg

from roundlog.projections.writer import libpq_url

if TYPE_CHECKING:  # roundlog.audit calls this module: a runtime import would be circular
    from roundlog.audit import AuditReport

log = logging.getLogger(__name__)

_INSERT = """
    INSERT INTO model_audits (model_id, audited_at, session_id, round_id, sha256, verified, detail)
    VALUES (%s, now(), %s, %s, %s, %s, %s)
"""


async def record_audits(database_url: str, report: AuditReport) -> int:
    """Write one row per model the audit checked; returns how many (0 without the table to hold them)."""
    problems: dict[tuple[str, str], list[str]] = {}
    for mismatch in report.mismatches:
        problems.setdefault((mismatch.session_id, mismatch.round_id), []).append(mismatch.detail)
    rows = [
        (
            model.model_id,
            model.session_id,
            model.round_id,
            model.tensor.sha256,
            (model.session_id, model.round_id) not in problems,
            "; ".join(problems.get((model.session_id, model.round_id), [])),
        )
        for model in report.models
    ]
    async with await psycopg.AsyncConnection.connect(libpq_url(database_url)) as conn:
        cursor = await conn.execute("SELECT to_regclass('model_audits') IS NOT NULL")
        found = await cursor.fetchone()
        if not (found and found[0]):
            # a log audited against a database without the projections: nowhere to keep the verdicts
            log.info("no model_audits table (run `roundlog db upgrade`): the audit's verdicts are not kept")
            return 0
        async with conn.cursor() as writer:
            await writer.executemany(_INSERT, rows)
    return len(rows)
