"""Hypothesis strategies for events, from the dataclasses' type hints: any value each Avro type holds."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from roundlog.domain.events import EVENT_TYPES, Event

EPOCH = datetime.fromtimestamp(0, UTC)
MILLIS_SINCE_EPOCH = st.integers(
    min_value=(datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1),
    max_value=(datetime(9999, 12, 31, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1),
)
#: Strategies per primitive type hint; ``datetime`` values are aware and whole milliseconds.
Primitives = Mapping[Any, st.SearchStrategy[Any]]
PRIMITIVES: Primitives = {
    str: st.text(max_size=12),
    int: st.integers(min_value=-(2**63), max_value=2**63 - 1),
    float: st.floats(allow_nan=False),  # NaN != NaN: an event holding one is not equal to itself
    bool: st.booleans(),
    datetime: MILLIS_SINCE_EPOCH.map(lambda ms: EPOCH + timedelta(milliseconds=ms)),
}


def values(hint: Any, primitives: Primitives = PRIMITIVES) -> st.SearchStrategy[Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return instances(typing.cast(type[Any], hint), primitives)
    if origin is types.UnionType:
        return st.none() | values(next(a for a in args if a is not type(None)), primitives)
    if origin is tuple:
        return st.lists(values(args[0], primitives), max_size=3).map(tuple)
    if origin is Mapping:
        return st.dictionaries(primitives[str], values(args[1], primitives), max_size=3)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.sampled_from(hint)
    return primitives[hint]


def instances(cls: type[Any], primitives: Primitives = PRIMITIVES) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: values(hints[f.name], primitives) for f in dataclasses.fields(cls)})


def any_event(primitives: Primitives = PRIMITIVES) -> st.SearchStrategy[Event]:
    return st.one_of([instances(t, primitives) for t in EVENT_TYPES])
