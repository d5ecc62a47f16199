"""The event contract: Avro schemas in ``roundlog/schemas`` and their single-object encoding.

Producers may be written in any language with any Avro library, so the tests build their
expectations from the Avro spec and plain fastavro, never from the codec's own helpers.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from typing import Any

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from roundlog.clock import utc_now
from roundlog.codec import (
    DecodeError,
    decode,
    decode_with_json,
    encode,
    event_to_json,
    event_type_name,
    schema_json,
)
from roundlog.domain import events
from roundlog.domain.events import (
    EVENT_TYPES,
    ArraySpec,
    ClientHeartbeat,
    ClientRole,
    Event,
    RoundAggregated,
    TensorRef,
    UpdateReceived,
)

from tests.strategies import any_event, instances

SCHEMAS = resources.files("roundlog") / "schemas"
T0 = datetime(2024, 5, 1, 12, 30, 15, 123000, tzinfo=UTC)


def avsc(*path: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMAS.joinpath(*path).read_text(encoding="utf-8"))
    return loaded


# --- CRC-64-AVRO, written from the Avro specification ("Schema Fingerprints") --------------------

EMPTY = 0xC15D213AA4D7A795


def _fingerprint_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    return table


FP_TABLE = _fingerprint_table()


def rabin(data: bytes) -> int:
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


def single_object_header(schema: dict[str, Any]) -> bytes:
    """``C3 01`` + the little-endian Rabin fingerprint of the Parsing Canonical Form (Avro spec)."""
    return b"\xc3\x01" + rabin(to_parsing_canonical_form(schema).encode()).to_bytes(8, "little")


def written_by_plain_fastavro(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    """What a producer outside roundlog sends: spec header, then fastavro's binary body."""
    buf = io.BytesIO()
    buf.write(single_object_header(schema))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


ANY_EVENT = any_event()


def shape(value: Any) -> Any:
    """The exact Python types inside a value, which ``==`` does not see (``Task.X == "x"``)."""
    if dataclasses.is_dataclass(value):
        return type(value), [shape(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, tuple | list):
        return type(value), [shape(v) for v in value]
    if isinstance(value, Mapping):
        return type(value), [shape(v) for v in value.values()]
    if isinstance(value, datetime):
        return datetime, value.tzinfo
    return type(value)


def tensor_ref(key: str) -> TensorRef:
    return TensorRef(
        key=key,
        partition=2,
        first_offset=1000,
        last_offset=1003,
        chunks=4,
        nbytes=3_000_000,
        sha256="ab" * 32,
        arrays=(ArraySpec(name="dense.kernel", dtype="float32", shape=(784, 128)),),
    )


def heartbeat(**changes: Any) -> ClientHeartbeat:
    fields: dict[str, Any] = {
        "event_id": "5f0c6f5e-3c55-4a39-9d5c-0b7f2a1e9c01",
        "occurred_at": T0,
        "client_id": "client-7",
        "roles": (ClientRole.TRAINER,),
        "labels": {"region": "eu"},
    }
    return ClientHeartbeat(**fields | changes)


def update_received(**metrics: float) -> UpdateReceived:
    return UpdateReceived(
        event_id="e1",
        occurred_at=T0,
        session_id="s1",
        round_id="r1",
        client_id="client-7",
        update_id="u1",
        num_examples=600,
        metrics=metrics,
        tensor=tensor_ref("u1"),
    )


# --- the schemas -------------------------------------------------------------------------------------


def named_types(schema: Any) -> list[dict[str, Any]]:
    """Every record and enum defined inside a schema, outermost first."""
    if isinstance(schema, list):
        return [t for branch in schema for t in named_types(branch)]
    if not isinstance(schema, dict):
        return []
    found = [schema] if schema["type"] in ("record", "enum") else []
    for field in schema.get("fields", ()):
        found += named_types(field["type"])
    return found + named_types(schema.get("items")) + named_types(schema.get("values"))


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
def test_each_event_type_has_a_documented_schema_named_after_it(event_type: type[Event]) -> None:
    schema = avsc(f"{event_type.__name__}.avsc")
    assert (schema["namespace"], schema["name"]) == ("roundlog.v1", event_type.__name__)
    assert schema_json(event_type) == schema
    for named in named_types(schema):
        assert named["doc"]
        assert all(field["doc"] for field in named.get("fields", ()))


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
def test_schema_records_and_enums_mirror_the_dataclasses_field_by_field(event_type: type[Event]) -> None:
    for named in named_types(avsc(f"{event_type.__name__}.avsc")):
        python_type = getattr(events, named["name"])
        if named["type"] == "enum":
            assert named["symbols"] == [member.value for member in python_type]
            continue
        fields = dataclasses.fields(python_type)
        assert [f["name"] for f in named["fields"]] == [f.name for f in fields]
        for avro_field, field in zip(named["fields"], fields, strict=True):
            if field.default is not dataclasses.MISSING:
                assert avro_field["default"] == field.default
            elif field.default_factory is not dataclasses.MISSING:
                assert avro_field["default"] == field.default_factory()
            else:
                assert "default" not in avro_field


def without_docs(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: without_docs(v) for k, v in schema.items() if k != "doc"}
    if isinstance(schema, list):
        return [without_docs(v) for v in schema]
    return schema


def test_released_versions_evolve_into_the_current_schema_only_by_added_fields_with_defaults() -> None:
    released = [
        (folder.name, version)
        for folder in SCHEMAS.joinpath("history").iterdir()
        for version in folder.iterdir()
    ]
    assert ("ClientHeartbeat", "v1.avsc") in [(name, version.name) for name, version in released]
    for name, version in released:
        assert_only_added_fields(json.loads(version.read_text(encoding="utf-8")), avsc(f"{name}.avsc"), name)


def assert_only_added_fields(old: Any, current: Any, path: str) -> None:
    """Records (nested ones too) may gain fields with defaults; every other type stays as it was."""
    if isinstance(old, dict) and old.get("type") == "record":
        assert isinstance(current, dict) and current.get("type") == "record", path
        old_fields = {f["name"]: f for f in old["fields"]}
        new_fields = {f["name"]: f for f in current["fields"]}
        assert old_fields.keys() <= new_fields.keys(), f"{path}: fields were removed"
        assert [n for n in new_fields if n in old_fields] == list(old_fields), (
            f"{path}: fields were reordered"
        )
        for field_name, field in new_fields.items():
            if field_name in old_fields:
                assert_only_added_fields(
                    old_fields[field_name]["type"], field["type"], f"{path}.{field_name}"
                )
            else:
                assert "default" in field, f"{path}: added field {field_name} has no default"
    else:
        assert without_docs(old) == without_docs(current), path


# --- the encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("canonical_form", "published"),
    [
        ('"null"', 7195948357588979594),
        ('"boolean"', -6970731678124411036),
        ('"int"', 8247732601305521295),
        ('{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}', 7843277075252814651),
    ],
)
def test_the_reference_rabin_fingerprint_matches_avros_published_test_vectors(
    canonical_form: str, published: int
) -> None:
    # Signed 64-bit values from apache/avro share/test/data/schema-tests.txt.
    assert rabin(canonical_form.encode()) == published % 2**64


@settings(max_examples=30, deadline=None)
@given(event=ANY_EVENT)
def test_encoding_is_single_object_with_the_fingerprint_of_the_current_schemas_canonical_form(
    event: Event,
) -> None:
    data = encode(event)
    assert data[:10] == single_object_header(schema_json(type(event)))


@settings(deadline=None)
@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
@given(data=st.data())
def test_every_event_decodes_back_to_the_identical_dataclass(
    event_type: type[Event], data: st.DataObject
) -> None:
    event = data.draw(instances(event_type))
    decoded = decode(encode(event))
    assert decoded == event
    assert shape(decoded) == shape(event)  # tuples not lists, enum members, aware UTC datetimes


def test_a_record_from_a_plain_avro_producer_decodes_to_the_expected_event() -> None:
    record = {
        "event_id": "e9",
        "occurred_at": 1714566615123,  # epoch millis, as any Avro library writes timestamp-millis
        "session_id": "s1",
        "round_id": "r1",
        "model_id": "m2",
        "parent_model_id": "m1",
        "tensor": {
            "key": "m2",
            "partition": 2,
            "first_offset": 1000,
            "last_offset": 1003,
            "chunks": 4,
            "nbytes": 3_000_000,
            "sha256": "ab" * 32,
            "arrays": [{"name": "dense.kernel", "dtype": "float32", "shape": [784, 128]}],
        },
        "update_ids": ["u1", "u2"],
        "total_weight": 1200.0,
    }
    data = written_by_plain_fastavro(avsc("RoundAggregated.avsc"), record)
    assert decode(data) == RoundAggregated(
        event_id="e9",
        occurred_at=T0,
        session_id="s1",
        round_id="r1",
        model_id="m2",
        parent_model_id="m1",
        tensor=tensor_ref("m2"),
        optimizer_state=None,
        update_ids=("u1", "u2"),
        total_weight=1200.0,
    )


def test_a_heartbeat_written_with_schema_v1_decodes_to_the_current_dataclass_with_no_labels() -> None:
    v1 = avsc("history", "ClientHeartbeat", "v1.avsc")
    assert "labels" not in [f["name"] for f in v1["fields"]]
    record = {"event_id": "h1", "occurred_at": T0, "client_id": "client-7", "roles": ["trainer", "validator"]}
    data = written_by_plain_fastavro(v1, record)
    assert data[:10] != encode(heartbeat())[:10]
    assert decode(data) == ClientHeartbeat(
        event_id="h1",
        occurred_at=T0,
        client_id="client-7",
        roles=(ClientRole.TRAINER, ClientRole.VALIDATOR),
        labels={},
    )


def test_times_are_aware_utc_at_millisecond_precision_and_encode_refuses_anything_it_would_change() -> None:
    now = utc_now()
    assert now.utcoffset() == timedelta(0)
    assert now.microsecond % 1000 == 0
    assert decode(encode(heartbeat(occurred_at=now))) == heartbeat(occurred_at=now)
    with pytest.raises(ValueError, match="sub-millisecond"):
        encode(heartbeat(occurred_at=T0 + timedelta(microseconds=1)))
    with pytest.raises(ValueError, match="naive"):
        encode(heartbeat(occurred_at=T0.replace(tzinfo=None)))


def test_an_aware_time_in_another_zone_decodes_to_the_same_instant_in_utc() -> None:
    decoded = decode(encode(heartbeat(occurred_at=T0.astimezone(timezone(timedelta(hours=2))))))
    assert isinstance(decoded, ClientHeartbeat)
    assert decoded.occurred_at == T0
    assert decoded.occurred_at.tzinfo is UTC


# --- bad bytes are values, never exceptions ------------------------------------------------------


def reason(data: bytes) -> str:
    result = decode(data)
    assert isinstance(result, DecodeError), result
    assert result.detail
    return result.reason


def test_bytes_without_the_single_object_marker_are_bad_magic() -> None:
    valid = encode(heartbeat())
    assert reason(b"\xc3\x02" + valid[2:]) == "bad_magic"
    assert reason(b"Obj\x01" + valid) == "bad_magic"  # an Avro container file is not a single object
    assert reason(b'{"event_id": "h1"}') == "bad_magic"


def test_a_fingerprint_of_no_released_schema_is_unknown() -> None:
    valid = encode(heartbeat())
    assert reason(valid[:2] + bytes(8) + valid[10:]) == "unknown_fingerprint"
    assert (
        reason(single_object_header({"type": "record", "name": "Other", "fields": []}))
        == "unknown_fingerprint"
    )


@settings(max_examples=40, deadline=None)
@given(event=ANY_EVENT)
def test_every_proper_prefix_of_an_encoding_is_truncated(event: Event) -> None:
    data = encode(event)
    assert [reason(data[:n]) for n in range(len(data))] == ["truncated"] * len(data)


def test_bytes_after_a_complete_body_are_an_error() -> None:
    assert reason(encode(heartbeat()) + b"\x00") == "trailing_bytes"


def test_a_body_its_schema_cannot_parse_is_bad() -> None:
    valid = encode(heartbeat(event_id="~", labels={}))
    assert valid[11:12] == b"~"
    assert reason(valid[:11] + b"\xff" + valid[12:]) == "bad_body"  # not UTF-8
    assert valid[-4:] == b"\x02\x00\x00\x00"  # one role (index 0), end of roles, no labels
    assert reason(valid[:-3] + b"\x0a" + valid[-2:]) == "bad_body"  # role index 5 of 2 symbols


@given(data=st.binary(max_size=200))
def test_random_bytes_are_an_error_value(data: bytes) -> None:
    assert isinstance(decode(data), DecodeError)


@settings(max_examples=300)
@given(event_type=st.sampled_from(EVENT_TYPES), body=st.binary(max_size=200))
def test_any_body_behind_a_known_fingerprint_is_that_event_or_an_error_value(
    event_type: type[Event], body: bytes
) -> None:
    result = decode(single_object_header(schema_json(event_type)) + body)
    assert isinstance(result, event_type | DecodeError)


# --- JSON for the projections --------------------------------------------------------------------


@given(event=ANY_EVENT)
def test_every_event_has_a_strict_json_form(event: Event) -> None:
    payload = event_to_json(event)
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload
    assert list(payload) == [f.name for f in dataclasses.fields(event)]
    assert event_type_name(event) == schema_json(type(event))["name"]


@given(event=ANY_EVENT)
def test_the_json_written_while_decoding_is_the_events_json_form(event: Event) -> None:
    """The projector stores the JSON ``decode_with_json`` writes from the Avro record; it must say
    what ``event_to_json`` says of the event (compared as parsed JSON, as JSONB compares)."""
    decoded, text = decode_with_json(encode(event))
    assert text is not None and json.loads(text) == event_to_json(event)
    assert shape(decoded) == shape(decode(encode(event)))


def test_the_json_written_while_decoding_spells_non_finite_metrics_as_strings() -> None:
    _, text = decode_with_json(encode(update_received(loss=math.nan, grad=-math.inf, acc=0.5)))
    assert text is not None and json.loads(text)["metrics"] == {
        "loss": "NaN",
        "grad": "-Infinity",
        "acc": 0.5,
    }
    assert decode_with_json(b"\x00\x01") == (decode(b"\x00\x01"), None)


def test_json_form_spells_times_enums_sequences_and_non_finite_numbers_as_json_does() -> None:
    assert event_to_json(heartbeat()) == {
        "event_id": "5f0c6f5e-3c55-4a39-9d5c-0b7f2a1e9c01",
        "occurred_at": "2024-05-01T12:30:15.123+00:00",
        "client_id": "client-7",
        "roles": ["trainer"],
        "labels": {"region": "eu"},
    }
    payload = event_to_json(update_received(loss=math.nan, grad=math.inf, acc=0.5))
    assert payload["metrics"] == {"loss": "NaN", "grad": "Infinity", "acc": 0.5}
    assert payload["tensor"]["arrays"] == [{"name": "dense.kernel", "dtype": "float32", "shape": [784, 128]}]
