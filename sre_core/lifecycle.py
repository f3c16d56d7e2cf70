"""One small engine for every ``(state, event) -> state`` lifecycle (module update, canary, chaos run,
escalation, fleet rollout).

A lifecycle is data: one :class:`StateTable` of transitions, the state a new instance starts in, and a
resume map that sends every state that can be stored somewhere safe after a restart. The engine only
looks transitions up; states act on entry elsewhere and post the next event. An event with no
transition raises :class:`NoTransitionError` (a bug, or a refused request the caller translates).
:meth:`StateTable.problems` lists what makes a table unsound (an unreachable state, a stored state
with no resume entry, a transition out of a final state), so each table is checked by a test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["NoTransitionError", "StateTable"]


class NoTransitionError(RuntimeError):
    """``event`` was posted in ``state`` and the table has no line for it."""

    def __init__(self, table: str, state: Enum, event: Enum) -> None:
        self.table = table
        self.state = state
        self.event = event
        super().__init__(
            f"{table}: event {event.value!r} is not allowed in state {state.value!r} (no transition for it)"
        )


@dataclass(frozen=True)
class StateTable[S: Enum, E: Enum]:
    """A lifecycle as data.

    Args:
        name: what it is the lifecycle of (in errors).
        transitions: ``(state, event) -> state``; the whole graph.
        initial: the state a new instance starts in.
        resume: where each stored state goes when the process starts again.
        final: states nothing leaves (checked: no transition starts there).
    """

    name: str
    transitions: Mapping[tuple[S, E], S]
    initial: S
    resume: Mapping[S, S] = field(default_factory=dict)
    final: frozenset[S] = frozenset()

    def next(self, state: S, event: E) -> S:
        """The successor of ``state`` on ``event``.

        Raises:
            NoTransitionError: the table has no line for the pair.
        """
        try:
            return self.transitions[(state, event)]
        except KeyError:
            raise NoTransitionError(self.name, state, event) from None

    def run(self, events: Iterable[E], state: S | None = None) -> S:
        """Apply ``events`` in order from ``state`` (default: the initial state)."""
        cur = self.initial if state is None else state
        for ev in events:
            cur = self.next(cur, ev)
        return cur

    def resume_state(self, stored: S) -> S:
        """Where a stored state goes after a restart.

        Raises:
            RuntimeError: nothing says (a table the tests would have flagged).
        """
        try:
            return self.resume[stored]
        except KeyError:
            raise RuntimeError(f"{self.name}: no resume entry for stored state {stored.value!r}") from None

    def states(self) -> set[S]:
        """Every state of the enum the table is over."""
        enum_type = type(self.initial)
        return set(enum_type)

    def reachable(self) -> set[S]:
        """States reachable from the initial state through the table."""
        seen = {self.initial}
        todo = [self.initial]
        while todo:
            cur = todo.pop()
            for (frm, _ev), to in self.transitions.items():
                if frm == cur and to not in seen:
                    seen.add(to)
                    todo.append(to)
        return seen

    def problems(self) -> list[str]:
        """What makes the table unsound; empty when every state is reachable, every state has a resume
        entry that is itself a state, and no final state has a way out."""
        out = []
        for s in sorted(self.states() - self.reachable(), key=lambda x: str(x.value)):
            out.append(f"{self.name}: state {s.value!r} is unreachable from {self.initial.value!r}")
        for s in sorted(self.states(), key=lambda x: str(x.value)):
            if s not in self.resume:
                out.append(f"{self.name}: stored state {s.value!r} has no resume entry")
        for (frm, ev), _to in self.transitions.items():
            if frm in self.final:
                out.append(f"{self.name}: final state {frm.value!r} has a transition on {ev.value!r}")
        return out
