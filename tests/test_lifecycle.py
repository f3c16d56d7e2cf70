"""The five lifecycles run on one engine (:mod:`sre_core.lifecycle`): each table is sound.

How one could break: a state added to an enum but no transition leads to it (dead code that a stored
record may still name), a stored state with no resume entry (a restart does not know where to go), a
final state with a way out, an event with no line silently ignored.
"""

from __future__ import annotations

from enum import StrEnum

import pytest

from chaos.runner import TABLE as CHAOS_RUN
from deployment.canary import TABLE as CANARY
from deployment.lifecycle import TABLE as MODULE_UPDATE
from deployment.lifecycle import Event, IllegalTransitionError, Phase, next_phase
from hub.rollouts import TABLE as ROLLOUT
from sre_agent.escalations import TABLE as ESCALATION
from sre_core.lifecycle import NoTransitionError, StateTable

TABLES = {"module update": MODULE_UPDATE, "canary": CANARY, "chaos run": CHAOS_RUN, "escalation": ESCALATION}
TABLES["rollout"] = ROLLOUT  # type: ignore[assignment]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_state_is_reachable_and_every_stored_state_resumes(name: str) -> None:
    table = TABLES[name]
    assert table.name == name
    assert table.problems() == []
    assert table.reachable() == table.states()
    for s in table.states():
        assert table.resume_state(s) in table.states()


@pytest.mark.parametrize("name", sorted(TABLES))
def test_an_event_with_no_transition_raises_the_one_error(name: str) -> None:
    table = TABLES[name]
    events = {e for _, e in table.transitions}
    missing = [(s, e) for s in table.states() for e in events if (s, e) not in table.transitions]
    assert missing, "every table refuses something"
    for s, e in missing:
        with pytest.raises(NoTransitionError) as info:
            table.next(s, e)
        assert info.value.state == s and info.value.event == e and name in str(info.value)


def test_the_engine_flags_unsound_tables() -> None:
    class St(StrEnum):
        A = "a"
        B = "b"
        ORPHAN = "orphan"

    class Ev(StrEnum):
        GO = "go"
        BACK = "back"

    t = StateTable("toy", {(St.A, Ev.GO): St.B, (St.B, Ev.BACK): St.A}, St.A, {St.A: St.A}, frozenset({St.B}))
    problems = t.problems()
    assert any("'orphan' is unreachable" in p for p in problems)
    assert any("'b' has no resume entry" in p for p in problems)
    assert any("final state 'b'" in p for p in problems)
    assert t.run([Ev.GO, Ev.BACK]) == St.A
    with pytest.raises(NoTransitionError):
        t.run([Ev.BACK])


def test_module_update_keeps_its_own_error_type_on_the_engine() -> None:
    with pytest.raises(IllegalTransitionError) as info:
        next_phase(Phase.IDLE, Event.FLIPPED)
    assert isinstance(info.value, NoTransitionError) and info.value.phase is Phase.IDLE
