"""Mermaid state diagrams drawn from the transition tables themselves, so they cannot drift."""

from __future__ import annotations

from typing import Any

from roundlog.domain.round import ROUND_RULES, TERMINAL
from roundlog.domain.rules import Rule
from roundlog.domain.session import SESSION_RULES, SessionState


def _edges(rules: tuple[Rule[Any], ...]) -> list[str]:
    lines = []
    for rule in rules:
        for branch in rule.branches:
            label = rule.event.__name__ + (f" [{branch.label}]" if branch.label else "")
            lines.append(f"    {rule.source.name} --> {branch.target.name}: {label}")
    return lines


def _state_diagram(
    title: str, first: str, start_event: str, rules: tuple[Rule[Any], ...], terminal: frozenset[Any]
) -> str:
    lines = [
        f"---\ntitle: {title}\n---",
        "stateDiagram-v2",
        f"    [*] --> {first}: {start_event}",
    ]
    lines += _edges(rules)
    lines += [f"    {state.name} --> [*]" for state in sorted(terminal, key=lambda s: s.name)]
    return "\n".join(lines)


def mermaid() -> str:
    """Both machines; refusals (late, duplicate, ...) are rows of the tables but not edges."""
    round_diagram = _state_diagram("round", "REQUESTED", "RoundRequested", ROUND_RULES, TERMINAL)
    session_diagram = _state_diagram(
        "session",
        "RUNNING",
        "SessionStarted",
        SESSION_RULES,
        frozenset({SessionState.COMPLETED, SessionState.FAILED}),
    )
    return round_diagram + "\n\n" + session_diagram + "\n"
