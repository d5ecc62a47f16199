"""Row derivation of the projector, without a database: what each event makes of each table."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from roundlog.codec import decode, decode_with_json, encode, event_to_json
from roundlog.domain.events import ClientRole, Event, ModelImported, Task
from roundlog.domain.rules import SIGNING_REASONS, Refusal
from roundlog.domain.session import Outcome
from roundlog.projections.rows import EVENT_COLUMNS, UPDATE_COLUMNS, BatchRows, Folded, storable
from roundlog.roles.projector import fold_entry
from roundlog.roles.stream import Entry, PartitionFold

from tests.builders import T0, Script, tensor_ref, uid

TOPIC = "test.events"


class Batches:
    """Folds events into one partition, one batch at a time, as the projector does."""

    def __init__(self) -> None:
        self.fold = PartitionFold(0)
        self.offset = 0
        self.seen: set[str] = set()

    def entry(self, value: bytes) -> Entry:
        entry = Entry(0, self.offset, b"k", value, decode(value))
        self.offset += 1
        return entry

    def batch(self, events: Iterable[Event | bytes]) -> BatchRows:
        rows = BatchRows(TOPIC, set(self.seen))
        for item in events:
            entry = self.entry(item if isinstance(item, bytes) else encode(item))
            folded = fold_entry(self.fold, entry)
            if folded is not None:
                rows.folded(folded)
            else:
                assert not isinstance(entry.decoded, Event)
                rows.undecodable(TOPIC, entry, entry.decoded)  # type: ignore[arg-type]
        self.seen |= rows.seen_event_ids
        rows.snapshot()
        return rows


def by_column(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(columns, row, strict=True)) for row in rows]


def one(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    (found,) = [row for row in rows if all(row[k] == v for k, v in match.items())]
    return found


def training_round(s: Script) -> list[Event]:
    """Three assigned clients, buffer 2: a accepted, a again (duplicate), x not assigned, b closes, c late."""
    return [
        s.started(),
        s.requested("s1-r1"),
        s.staged("s1-r1"),
        s.assigned("s1-r1", ("a", "b", "c")),
        s.update("a", "s1-r1"),
        s.update("a", "s1-r1", update_id="again"),
        s.update("x", "s1-r1"),
        s.update("b", "s1-r1"),
        s.update("c", "s1-r1"),
    ]


def test_each_update_is_a_row_with_the_machines_verdict() -> None:
    rows = Batches().batch(training_round(Script()))
    updates = by_column(UPDATE_COLUMNS, rows.round_updates)
    verdicts = [(u["client_id"], u["update_id"], u["status"], u["reject_reason"]) for u in updates]
    assert verdicts == [
        ("a", uid("a", "s1-r1"), "accepted", None),
        ("a", "again", "rejected", "duplicate"),
        ("x", uid("x", "s1-r1"), "rejected", "not_assigned"),
        ("b", uid("b", "s1-r1"), "accepted", None),
        ("c", uid("c", "s1-r1"), "rejected", "late"),
    ]
    assert [r.reason for r in rows.rejections] == ["duplicate", "not_assigned", "late"]
    outcomes = [e["outcome"] for e in by_column(EVENT_COLUMNS, rows.events)]
    assert outcomes == ["applied"] * 4 + ["applied", "duplicate", "not_assigned", "applied", "late"]


def test_a_round_row_carries_counts_and_a_time_per_state() -> None:
    rows = Batches().batch(training_round(Script()))
    (round_,) = rows.round_rows
    assert (round_["state"], round_["n_assigned"], round_["n_received"]) == ("closed", 3, 5)
    assert (round_["n_accepted"], round_["n_rejected"], round_["total_weight"]) == (2, 3, 20.0)
    assert [round_[f"{s}_at"] is not None for s in ("requested", "staged", "collecting", "closed")] == [
        True
    ] * 4
    assert round_["aggregated_at"] is None and round_["failed_at"] is None
    assert (round_["buffer_size"], round_["aggregator"], round_["aggregator_kwargs"]) == (2, "fedavg", {})
    assignments = {key: row["reported_at"] is not None for key, row in rows.assignments.items()}
    assert assignments == {("s1-r1", "a"): True, ("s1-r1", "b"): True, ("s1-r1", "c"): False}


def test_later_batches_count_their_own_results_and_flip_unusable_updates() -> None:
    s, batches = Script(), Batches()
    batches.batch(training_round(s))
    rows = batches.batch([s.rejected("a", "s1-r1", "non_finite"), s.update("c", "s1-r1", update_id="late-2")])
    (round_,) = rows.round_rows
    # n_received is this batch's share; the writer adds it to the stored count.
    assert (round_["n_received"], round_["n_accepted"], round_["n_rejected"]) == (1, 1, 0)
    assert round_["total_weight"] == 10.0
    assert rows.update_flips == [
        {"update_id": uid("a", "s1-r1"), "round_id": "s1-r1", "reason": "non_finite", "detail": None}
    ]


def test_a_session_finished_in_the_batch_keeps_its_final_state() -> None:
    s = Script()
    events = [
        *training_round(s),
        s.aggregated("s1-r1", (uid("a", "s1-r1"), uid("b", "s1-r1"))),
        s.finished(succeeded=True),
    ]
    batches = Batches()
    rows = batches.batch(events)
    assert "s1" not in batches.fold.ledger.sessions, "the session left the ledger"
    (session,) = rows.session_rows
    assert (session["state"], session["rounds_done"], session["latest_model_id"]) == ("completed", 1, "m1")
    assert session["succeeded"] is True and session["completed_at"] == events[-1].occurred_at
    (round_,) = rows.round_rows
    assert (round_["state"], round_["new_model_id"], round_["total_weight"]) == ("aggregated", "m1", 20.0)
    (model,) = rows.models.values()
    assert (model["origin"], model["parent_model_id"], model["session_id"], model["n_updates"]) == (
        "aggregated",
        "m0",
        "s1",
        2,
    )
    assert model["layout"] == [{"name": "w", "dtype": "float32", "shape": [2, 2]}]


def test_re_emitted_events_write_nothing() -> None:
    s, batches = Script(), Batches()
    events = [*training_round(s), s.timed_out("s1-r1"), s.finished(succeeded=False)]
    batches.batch(events)
    # Within the session: duplicate_event. After it finished: refused, but the id is known.
    again = batches.batch([events[4], events[-1], events[-2]])
    assert again.events == [] and again.rejections == [] and again.round_updates == []
    assert again.session_rows == [] and again.round_rows == []


def test_undecodable_and_refused_records_are_rejections_with_their_bytes() -> None:
    s = Script()
    garbage = b"\x00\x01not avro"
    rows = Batches().batch([garbage, s.update("a", "nowhere")])
    first, second = (r.row() for r in rows.rejections)
    assert (first["reason"], first["head"], first["raw_size"], first["event_id"]) == (
        "bad_magic",
        garbage,
        len(garbage),
        None,
    )
    assert (second["reason"], second["type"], second["session_id"]) == (
        "unknown_session",
        "UpdateReceived",
        "s1",
    )
    assert by_column(UPDATE_COLUMNS, rows.round_updates)[0]["reject_reason"] == "unknown_session"


def test_a_record_refused_for_its_signature_leaves_its_event_id_to_the_true_author() -> None:
    """Event ids are derived, so a forger can send a real event's id first: refused for who signed
    it, the record is kept aside and takes neither the ``events`` nor the ``round_updates`` row."""
    s, batches = Script(), Batches()
    batches.batch(training_round(s)[:4])
    real = s.update("a", "s1-r1")
    rows = BatchRows(TOPIC, set(batches.seen))
    for offset, reason in enumerate(sorted(SIGNING_REASONS)):  # the verdict a signed fold gives
        entry = Entry(0, 100 + offset, b"s1", encode(real), real)
        rows.folded(Folded(entry, real, Outcome(Refusal(reason, "forged")), None, "{}"))
    assert [r.reason for r in rows.rejections] == sorted(SIGNING_REASONS)
    assert rows.events == [] and rows.round_updates == [] and real.event_id not in rows.seen_event_ids
    after = batches.batch([real])
    assert [row[2] for row in after.events] == [real.event_id]
    assert by_column(UPDATE_COLUMNS, after.round_updates)[0]["status"] == "accepted"


def test_results_models_and_heartbeats() -> None:
    s = Script()
    imported = ModelImported(
        event_id="imp", occurred_at=T0, model_id="m0", name="base", tensor=tensor_ref("m0")
    )
    rows = Batches().batch(
        [
            imported,
            s.started(),
            s.requested("s1-v1", Task.VALIDATION),
            s.staged("s1-v1"),
            s.assigned("s1-v1", ("a", "b")),
            s.validation("a", "s1-v1"),
            s.heartbeat("a"),
            s.heartbeat("a", ClientRole.VALIDATOR),
        ]
    )
    assert rows.models["m0"]["origin"] == "imported" and rows.models["m0"]["name"] == "base"
    (validation,) = rows.validations
    assert (validation["client_id"], validation["metrics"], validation["num_examples"]) == (
        "a",
        {"acc": 0.5},
        5,
    )
    assert rows.clients["a"]["roles"] == ["validator"], "the latest heartbeat wins"
    assert one(rows.round_rows, round_id="s1-v1")["n_accepted"] == 1


def test_text_postgresql_cannot_hold_is_made_storable_before_the_fold() -> None:
    s = Script()
    event = s.update("a\x00b", "s1-r1")
    event = type(event)(**{**event.__dict__, "metrics": {"lo\x00ss": float("nan")}})
    clean, text = storable(event)
    assert clean.client_id == "a\ufffdb" and json.loads(text)["metrics"] == {"lo\ufffdss": "NaN"}  # type: ignore[union-attr]
    assert json.loads(text) == event_to_json(clean) and "\\u0000" not in text
    _, decoded_text = decode_with_json(encode(event))
    assert storable(event, decoded_text)[1] == text, "the same whether the decoder wrote the JSON or not"
    plain = s.update("a", "s1-r1")
    assert storable(plain)[0] is plain, "events without NUL pass through untouched"


def test_a_batch_keeps_its_own_state_while_the_fold_moves_on() -> None:
    """The projector folds the next batch while this one is written: its rows must not follow."""
    s, batches = Script(), Batches()
    first = batches.batch(training_round(s)[:5])
    batches.batch([s.update("b", "s1-r1")])
    (round_,) = first.round_rows
    assert (round_["state"], round_["n_accepted"], round_["closed_at"]) == ("collecting", 1, None)
