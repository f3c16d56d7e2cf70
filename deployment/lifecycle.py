"""The module-update lifecycle as ONE ``(phase, event) -> phase`` table, plus the resume map.

Pure: no I/O. :mod:`deployment.slots` persists the new phase in ``state.json`` *before* it acts on it,
so after ``kill -9`` at any instant the stored phase says what was under way, and :data:`RESUME` sends
every stored phase somewhere safe (after Mender's state machine: states never name their successor,
an event without a transition is a bug and raises).

    idle --install--> installing --installed--> idle            (standby now holds a verified version)
                      installing --install_failed--> idle       (standby discarded)
    idle --flip--> flipping --flipped--> probing --probes_passed--> idle   (committed)
                                         probing --probes_failed--> rolling_back --rolled_back--> idle
    idle --canary_start--> canary --canary_promote--> flipping            (managed serving)
                           canary --canary_abort--> idle
    idle|probing --rollback--> rolling_back                               (operator or reconcile)
    idle|canary --enter_safe--> safe --leave_safe--> idle
"""

from __future__ import annotations

import enum

from sre_core.lifecycle import NoTransitionError, StateTable

__all__ = ["RESUME", "TABLE", "TRANSITIONS", "Event", "IllegalTransitionError", "Phase", "next_phase"]


class Phase(enum.StrEnum):
    """A module's persisted lifecycle phase."""

    IDLE = "idle"
    INSTALLING = "installing"
    FLIPPING = "flipping"
    PROBING = "probing"
    CANARY = "canary"
    ROLLING_BACK = "rolling_back"
    SAFE = "safe"


class Event(enum.StrEnum):
    """What happened (posted by the orchestrator after acting, or to start an operation)."""

    INSTALL = "install"
    INSTALLED = "installed"
    INSTALL_FAILED = "install_failed"
    FLIP = "flip"
    FLIPPED = "flipped"
    PROBES_PASSED = "probes_passed"
    PROBES_FAILED = "probes_failed"
    CANARY_START = "canary_start"
    CANARY_PROMOTE = "canary_promote"
    CANARY_ABORT = "canary_abort"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled_back"
    ENTER_SAFE = "enter_safe"
    LEAVE_SAFE = "leave_safe"


P, E = Phase, Event

TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (P.IDLE, E.INSTALL): P.INSTALLING,
    (P.INSTALLING, E.INSTALLED): P.IDLE,
    (P.INSTALLING, E.INSTALL_FAILED): P.IDLE,
    (P.IDLE, E.FLIP): P.FLIPPING,
    (P.FLIPPING, E.FLIPPED): P.PROBING,
    (P.PROBING, E.PROBES_PASSED): P.IDLE,
    (P.PROBING, E.PROBES_FAILED): P.ROLLING_BACK,
    (P.PROBING, E.ROLLBACK): P.ROLLING_BACK,
    (P.IDLE, E.ROLLBACK): P.ROLLING_BACK,
    (P.ROLLING_BACK, E.ROLLED_BACK): P.IDLE,
    (P.IDLE, E.CANARY_START): P.CANARY,
    (P.CANARY, E.CANARY_PROMOTE): P.FLIPPING,
    (P.CANARY, E.CANARY_ABORT): P.IDLE,
    (P.IDLE, E.ENTER_SAFE): P.SAFE,
    (P.CANARY, E.ENTER_SAFE): P.SAFE,
    (P.SAFE, E.LEAVE_SAFE): P.IDLE,
}
"""The whole graph. Anything not here is illegal."""

RESUME: dict[Phase, Phase] = {
    P.IDLE: P.IDLE,
    # The standby was being written and was never active: throw it away.
    P.INSTALLING: P.IDLE,
    # A flip that was not yet judged by probes goes back to the version that was active before it.
    P.FLIPPING: P.ROLLING_BACK,
    P.PROBING: P.ROLLING_BACK,
    P.ROLLING_BACK: P.ROLLING_BACK,
    # The serving engine lost its canary with the process; the standby stays installed, verified.
    P.CANARY: P.IDLE,
    P.SAFE: P.SAFE,
}
"""Where each stored phase goes when the agent starts (every phase has an entry)."""


TABLE: StateTable[Phase, Event] = StateTable("module update", TRANSITIONS, P.IDLE, RESUME)
"""The lifecycle on the shared engine (:mod:`sre_core.lifecycle`)."""


class IllegalTransitionError(NoTransitionError):
    """An event was posted in a phase that has no transition for it (a bug or a refused request)."""

    def __init__(self, phase: Phase, event: Event) -> None:
        super().__init__(TABLE.name, phase, event)
        self.phase = phase


def next_phase(phase: Phase, event: Event) -> Phase:
    """The successor of ``phase`` on ``event``. Raises :class:`IllegalTransitionError` if there is none."""
    try:
        return TABLE.next(phase, event)
    except NoTransitionError:
        raise IllegalTransitionError(phase, event) from None
