"""Avro single-object encoding of events, and the catalog of every schema version ever released.

Wire format (Avro spec, "Single-object encoding"): ``C3 01``, the 8-byte little-endian CRC-64-AVRO
fingerprint of the writer schema's Parsing Canonical Form, then the Avro binary body. The bytes
name their own schema, so any Avro library can produce them without a registry, and the catalog
resolves any released writer version into the current reader schema: old events stay readable.

Events and Avro records convert into each other generically, from the dataclasses' type hints;
converters are compiled once per type, so the hot path is a dict build plus fastavro's C reader.
The projector also wants each event as JSON: ``decode_with_json`` writes it from the same Avro
record the event is built from (orjson, in C), so a record is decoded once and walked once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import io
import json
import math
import operator
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Literal

import fastavro
import orjson
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form
from fastavro.types import Schema

from roundlog.domain.events import EVENT_TYPES, Event

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8
NAMESPACE = "roundlog.v1"

DecodeReason = Literal["bad_magic", "truncated", "unknown_fingerprint", "bad_body", "trailing_bytes"]


@dataclass(frozen=True)
class DecodeError:
    """Why some bytes are not an event: a value, not an exception, so consumers can dead-letter it."""

    reason: DecodeReason
    detail: str


# --- generic conversion, derived from type hints -------------------------------------------------

_Convert = Callable[[Any], Any]


@dataclass(frozen=True)
class _Direction:
    """How each kind of type hint converts in one direction; a ``None`` converter means "as is"."""

    record: Callable[[type[Any], list[tuple[str, _Convert | None]]], _Convert]
    array: Callable[[_Convert | None], _Convert | None]
    map: Callable[[_Convert | None], _Convert | None]
    enum: Callable[[type[enum.Enum]], _Convert | None]
    timestamp: _Convert | None
    double: _Convert | None


def _compile_record(cls: type[Any], direction: _Direction) -> _Convert:
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _compile(hints[f.name], direction)) for f in dataclasses.fields(cls)]
    return direction.record(cls, fields)


def _compile(hint: Any, direction: _Direction) -> _Convert | None:
    """The converter for values of type ``hint``, built once so that converting is only calls."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _compile_record(typing.cast(type[Any], hint), direction)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _compile(next(a for a in args if a is not type(None)), direction)
        return None if inner is None else lambda v: None if v is None else inner(v)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return direction.array(_compile(args[0], direction))
    if origin is Mapping and args[0] is str:
        return direction.map(_compile(args[1], direction))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return direction.enum(hint)
    if hint is datetime:
        return direction.timestamp
    if hint is float:
        return direction.double
    if hint in (str, int, bool):
        return None
    raise TypeError(f"no Avro mapping for type hint {hint!r}")


def _to_dict(_cls: type[Any], fields: list[tuple[str, _Convert | None]]) -> _Convert:
    def convert(obj: Any) -> dict[str, Any]:
        return {
            name: getattr(obj, name) if conv is None else conv(getattr(obj, name)) for name, conv in fields
        }

    return convert


def _from_dict(cls: type[Any], fields: list[tuple[str, _Convert | None]]) -> _Convert:
    converted = [(name, conv) for name, conv in fields if conv is not None]
    build = _builder(cls)

    def convert(record: dict[str, Any]) -> Any:
        # The record is fastavro's fresh dict with exactly the reader schema's fields: reuse it.
        for name, conv in converted:
            record[name] = conv(record[name])
        return build(record)

    return convert


def _builder(cls: type[Any]) -> _Convert:
    """How a complete field dict becomes a ``cls``: as the instance's own ``__dict__``.

    A frozen dataclass's ``__init__`` spends ~2 us on one guarded setattr per field, and a
    decoded record already holds every field, typed by its schema. A class with a
    ``__post_init__`` (or slots) goes through ``__init__``.
    """
    if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
        return lambda record: cls(**record)
    new, set_attribute = object.__new__, object.__setattr__

    def build(record: dict[str, Any]) -> Any:
        instance = new(cls)
        set_attribute(instance, "__dict__", record)
        return instance

    return build


def _list_of(item: _Convert | None) -> _Convert:
    return list if item is None else lambda v: [item(x) for x in v]


def _dict_of(value: _Convert | None) -> _Convert:
    return dict if value is None else lambda v: {k: value(x) for k, x in v.items()}


def _millis(value: datetime) -> datetime:
    """Refuse what timestamp-millis would silently change, so that ``decode(encode(e)) == e``."""
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: events carry aware UTC times (roundlog.clock.utc_now)")
    if value.microsecond % 1000:
        raise ValueError(
            f"{value.isoformat()} has sub-millisecond precision, which Avro timestamp-millis drops"
        )
    return value


def _iso(value: datetime) -> str:
    """A time as JSON: ISO 8601 in UTC to the millisecond, as timestamp-millis holds it."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds")


def json_double(value: float) -> float | str:
    """JSON (and PostgreSQL JSONB) has no NaN or infinities: spell them as strings, as protobuf does."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


_value = operator.attrgetter("value")

_TO_AVRO = _Direction(
    record=_to_dict,
    array=lambda item: None if item is None else _list_of(item),
    map=lambda value: None if value is None else _dict_of(value),
    enum=lambda _cls: _value,
    timestamp=_millis,
    double=None,
)
_FROM_AVRO = _Direction(
    record=_from_dict,
    array=lambda item: tuple if item is None else lambda v: tuple([item(x) for x in v]),
    map=lambda value: None if value is None else _dict_of(value),
    enum=lambda cls: cls,
    timestamp=None,
    double=None,
)
_TO_JSON = _Direction(
    record=_to_dict,
    array=_list_of,
    map=_dict_of,
    enum=lambda _cls: _value,
    timestamp=_iso,
    double=json_double,
)


def _never(_value: Any) -> bool:
    return False


def _non_finite(value: float) -> bool:
    return not math.isfinite(value)


def _any_field(_cls: type[Any], fields: list[tuple[str, _Convert | None]]) -> _Convert:
    checks = [(name, check) for name, check in fields if check is not None and check is not _never]
    if not checks:
        return _never

    def any_field(record: dict[str, Any]) -> bool:
        for name, check in checks:  # noqa: SIM110 (every record the projector reads: no generator)
            if check(record[name]):
                return True
        return False

    return any_field


def _any_of(item: _Convert | None) -> _Convert | None:
    if item is None or item is _never:
        return None
    if item is _non_finite:  # the common case, metrics: the loop runs in C
        return lambda values: not all(map(math.isfinite, values))
    return lambda values: any(map(item, values))


#: Whether an Avro record (fastavro's dict) holds a double JSON cannot spell as a number.
_NON_FINITE = _Direction(
    record=_any_field,
    array=_any_of,
    map=lambda value: None if (each := _any_of(value)) is None else lambda v: each(v.values()),
    enum=lambda _cls: None,
    timestamp=None,
    double=_non_finite,
)

_EVENT_TO_JSON: dict[type[Any], _Convert] = {t: _compile_record(t, _TO_JSON) for t in EVENT_TYPES}


# --- the catalog ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Writer:
    header: bytes
    schema: Schema
    to_avro: _Convert


@dataclass(frozen=True)
class _Reader:
    name: str
    writer: Schema
    reader: Schema | None  # None: the writer is the current schema, no resolution needed
    from_avro: _Convert
    non_finite: _Convert


class _EndProbe(io.BytesIO):
    """A buffer that notes whether a read asked for bytes past its end, i.e. the input was truncated."""

    ran_out = False

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        if size is not None and size > len(chunk):
            self.ran_out = True
        return chunk


def _load(path: Traversable, name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if (schema.get("name"), schema.get("namespace")) != (name, NAMESPACE):
        raise ValueError(f"{path}: expected record {NAMESPACE}.{name}")
    return schema


def _fingerprint(schema: dict[str, Any]) -> bytes:
    # fastavro's hex is the fingerprint's little-endian byte order, as single-object encoding wants.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


class SchemaCatalog:
    """Every released schema of every event, parsed once: fingerprint → writer, type → current.

    Loaded from the package data (``roundlog/schemas``), so it works from an installed wheel.
    """

    def __init__(self) -> None:
        root = resources.files("roundlog") / "schemas"
        names = {t.__name__: t for t in EVENT_TYPES}
        files = {p.name.removesuffix(".avsc") for p in root.iterdir() if p.name.endswith(".avsc")}
        if files != names.keys():
            raise ValueError(f"schemas/ must hold exactly one .avsc per event type, not {sorted(files)}")
        history = root / "history"
        if history.is_dir() and (unknown := {f.name for f in history.iterdir()} - names.keys()):
            raise ValueError(f"schemas/history has versions of unknown events: {sorted(unknown)}")
        self._json: dict[type[Any], str] = {}
        self._writers: dict[type[Any], _Writer] = {}
        self._readers: dict[bytes, _Reader] = {}
        for name, event_type in names.items():
            current = _load(root / f"{name}.avsc", name)
            schema_fields = [f["name"] for f in current["fields"]]
            if schema_fields != [f.name for f in dataclasses.fields(event_type)]:
                raise ValueError(f"{name}.avsc fields {schema_fields} do not mirror the dataclass")
            parsed = parse_schema(current)
            from_avro = _compile_record(event_type, _FROM_AVRO)
            non_finite = _compile_record(event_type, _NON_FINITE)
            header = MAGIC + _fingerprint(current)
            self._json[event_type] = json.dumps(current)
            self._writers[event_type] = _Writer(header, parsed, _compile_record(event_type, _TO_AVRO))
            self._readers[header[len(MAGIC) :]] = _Reader(name, parsed, None, from_avro, non_finite)
            versions = history / name
            for path in versions.iterdir() if versions.is_dir() else ():
                if path.name.endswith(".avsc"):
                    old = _load(path, name)
                    self._readers.setdefault(
                        _fingerprint(old), _Reader(name, parse_schema(old), parsed, from_avro, non_finite)
                    )

    def encode(self, event: Event) -> bytes:
        """Single-object encoding with the current schema; raises if the event does not fit it."""
        writer = self._writers[type(event)]
        buf = io.BytesIO()
        buf.write(writer.header)
        fastavro.schemaless_writer(buf, writer.schema, writer.to_avro(event))
        return buf.getvalue()

    def decode(self, data: bytes) -> Event | DecodeError:
        """The event in ``data``, in its current dataclass shape; never raises on bad bytes."""
        read = self._read(data)
        if isinstance(read, DecodeError):
            return read
        reader, record = read
        event: Event = reader.from_avro(record)
        return event

    def decode_with_json(self, data: bytes) -> tuple[Event | DecodeError, str | None]:
        """The event in ``data`` and its JSON (``event_to_json``'s, as text), from one read."""
        read = self._read(data)
        if isinstance(read, DecodeError):
            return read, None
        reader, record = read
        if reader.non_finite(record):  # rare: JSON spells these as strings, which the event knows how to
            event: Event = reader.from_avro(record)
            return event, json_text(event_to_json(event))
        # Before from_avro, which turns the record's parts into dataclasses in place.
        text = orjson.dumps(record, default=_iso, option=orjson.OPT_PASSTHROUGH_DATETIME).decode()
        return reader.from_avro(record), text

    def _read(self, data: bytes) -> tuple[_Reader, dict[str, Any]] | DecodeError:
        """The Avro record in ``data`` (resolved to the current schema) and its reader."""
        if not MAGIC.startswith(data[:2]):
            return DecodeError("bad_magic", f"expected single-object marker c3 01, got {data[:2].hex(' ')}")
        if len(data) < HEADER_SIZE:
            return DecodeError("truncated", f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
        reader = self._readers.get(data[2:HEADER_SIZE])
        if reader is None:
            return DecodeError(
                "unknown_fingerprint", f"no schema has fingerprint {data[2:HEADER_SIZE].hex()}"
            )
        buf = io.BytesIO(data)
        buf.seek(HEADER_SIZE)
        try:
            record = fastavro.schemaless_reader(buf, reader.writer, reader.reader)
        except Exception as exc:  # fastavro raises many kinds on garbage; all mean "bad bytes"
            return _body_error(data, reader, exc)
        if buf.tell() != len(data):
            return DecodeError(
                "trailing_bytes", f"{len(data) - buf.tell()} bytes after a complete {reader.name} body"
            )
        return reader, typing.cast(dict[str, Any], record)

    def schema_json(self, event_type: type[Event]) -> dict[str, Any]:
        """The current schema of ``event_type`` as in its .avsc file (a fresh copy, safe to mutate)."""
        parsed: dict[str, Any] = json.loads(self._json[event_type])
        return parsed


def _body_error(data: bytes, reader: _Reader, exc: Exception) -> DecodeError:
    """Tell a body that ran out of bytes from one that is malformed, by reading it again."""
    probe = _EndProbe(data)
    probe.seek(HEADER_SIZE)
    with contextlib.suppress(Exception):
        fastavro.schemaless_reader(probe, reader.writer, reader.reader)
    reason: DecodeReason = "truncated" if probe.ran_out else "bad_body"
    return DecodeError(reason, f"{reader.name} body: {type(exc).__name__}: {exc}")


@functools.cache
def default_catalog() -> SchemaCatalog:
    """The catalog of the installed package's schemas, loaded on first use."""
    return SchemaCatalog()


def encode(event: Event) -> bytes:
    """Single-object encoding of ``event`` with its current schema."""
    return default_catalog().encode(event)


def decode(data: bytes) -> Event | DecodeError:
    """The event in ``data``, or why there is none; never raises on bad bytes."""
    return default_catalog().decode(data)


def decode_with_json(data: bytes) -> tuple[Event | DecodeError, str | None]:
    """The event in ``data`` (or why there is none) and its JSON text, from one Avro read."""
    return default_catalog().decode_with_json(data)


def json_text(value: Any) -> str:
    """Compact JSON of a JSON-safe value (``event_to_json``'s output and the like)."""
    return orjson.dumps(value).decode()


def schema_json(event_type: type[Event]) -> dict[str, Any]:
    """The current Avro schema of ``event_type``."""
    return default_catalog().schema_json(event_type)


def event_to_json(event: Event) -> dict[str, Any]:
    """A JSON-safe dict of ``event`` (ISO times, enum values, lists), e.g. for a JSONB column."""
    payload: dict[str, Any] = _EVENT_TO_JSON[type(event)](event)
    return payload


def event_type_name(event: Event) -> str:
    """The event's type name, which is also its Avro record name."""
    return type(event).__name__
