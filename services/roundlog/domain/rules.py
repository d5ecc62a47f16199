"""The vocabulary of a transition table, shared by the round and session machines.

A table is data: rows of ``(source state, event type) -> guards, effect, branches``.
The fold looks a row up, runs its guards (the first refusal wins and changes
nothing), applies the effect, then takes the first branch whose condition holds.
The Mermaid diagram and the tests read the same rows.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

S = TypeVar("S", bound=enum.StrEnum)


class Reason(enum.StrEnum):
    """Why an event changed nothing."""

    LATE = "late"
    EARLY = "early"
    DUPLICATE = "duplicate"
    DUPLICATE_EVENT = "duplicate_event"
    NOT_ASSIGNED = "not_assigned"
    ILLEGAL = "illegal"
    STALE = "stale"
    WRONG_TASK = "wrong_task"
    WRONG_MODEL = "wrong_model"
    TOO_FEW_CLIENTS = "too_few_clients"
    UNKNOWN_SESSION = "unknown_session"
    WRONG_PARTITION = "wrong_partition"
    SESSION_FINISHED = "session_finished"
    UNKNOWN_ROUND = "unknown_round"
    UNKNOWN_UPDATE = "unknown_update"
    ALREADY_EXISTS = "already_exists"
    INVALID_CONFIG = "invalid_config"
    INVALID_FIELD = "invalid_field"
    INVALID_TENSOR_REF = "invalid_tensor_ref"
    WEIGHT_LIMIT = "weight_limit"
    CLOCK_SKEW = "clock_skew"
    FOREIGN_UPDATE_ID = "foreign_update_id"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    NOT_PERMITTED = "not_permitted"


#: Refusals of who signed a record (``ROUNDLOG_AUTH=signed``): the record is nobody's word.
SIGNING_REASONS = frozenset(
    {Reason.UNSIGNED, Reason.BAD_SIGNATURE, Reason.UNKNOWN_KEY, Reason.REVOKED_KEY, Reason.NOT_PERMITTED}
)


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    detail: str


#: A guard looks at the machine and the event; it returns a refusal, or None to let the event through.
Guard = Callable[[Any, Any], Refusal | None]
Effect = Callable[[Any, Any], None]
Condition = Callable[[Any], bool]


def always(_machine: object) -> bool:
    return True


def no_effect(_machine: object, _event: object) -> None:
    return None


@dataclass(frozen=True)
class Branch(Generic[S]):
    target: S
    when: Condition = always
    label: str = ""


@dataclass(frozen=True)
class Rule(Generic[S]):
    """One row of a table. A row with ``refuse`` set turns the event away in that state."""

    source: S
    event: type
    branches: tuple[Branch[S], ...] = ()
    guards: tuple[Guard, ...] = ()
    effect: Effect = no_effect
    refuse: Reason | None = None

    def __post_init__(self) -> None:
        if (self.refuse is None) == (not self.branches):
            raise ValueError(f"{self.source}/{self.event.__name__}: a rule either refuses or branches")
        if self.branches and self.branches[-1].when is not always:
            raise ValueError(f"{self.source}/{self.event.__name__}: the last branch must be unconditional")


def index(rules: tuple[Rule[S], ...]) -> dict[tuple[S, type], Rule[S]]:
    """Look-up by (state, event type); a table with two rows for one key is a bug."""
    table: dict[tuple[S, type], Rule[S]] = {}
    for rule in rules:
        key = (rule.source, rule.event)
        if key in table:
            raise ValueError(f"two rules for {rule.source} on {rule.event.__name__}")
        table[key] = rule
    return table


def fire(rule: Rule[S], machine: Any, event: object) -> tuple[S | None, Refusal | None]:
    """Run one row: guards, effect, branch. Returns the next state, or the refusal."""
    if rule.refuse is not None:
        return None, Refusal(rule.refuse, f"{type(event).__name__} in {rule.source}")
    for guard in rule.guards:
        refusal = guard(machine, event)
        if refusal is not None:
            return None, refusal
    rule.effect(machine, event)
    for branch in rule.branches:
        if branch.when(machine):
            return branch.target, None
    raise AssertionError("unreachable: the last branch is unconditional")
