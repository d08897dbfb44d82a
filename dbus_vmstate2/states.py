"""The migration state machine of a VMState2 back-end: one table.

Theory of operation.  A back-end is in exactly one :class:`State`.  Every
request and every end of a transfer is an :class:`Event`; the next state is
``TRANSITIONS[state][event]``, and an event missing from the table is the
illegal-transition error (:class:`~.errors.InvalidState`) and changes
nothing.  Rule 1: everything that affects the state machine lives here;
docs/states.md is generated from this table (``python -m dbus_vmstate2.states``)
and a test keeps the two in step.

The one-shot Save and Load of the whole state move through ``stop-copy`` and
``resuming`` and come back to ``running`` whether they succeed or fail: the
daemon's live state is never touched by a failed transfer (a save only reads
it; a load is staged and committed only once the stream has verified).  The
one way into ``error`` is a load callable of the daemon that fails after it
may have applied records; then only ``Reset`` leaves it, the VMM's word that
it knows the state may be bad (it will load again, or give up on it).  Iterative live migration will add VFIO v2's PRE_COPY and STOP
here as ``pre-copy`` and ``stopped``; clients must accept State values they
do not know.
"""

from __future__ import annotations

import enum

from .errors import InvalidState


class State(enum.StrEnum):
    """The value of the ``State`` property."""

    RUNNING = "running"
    STOP_COPY = "stop-copy"
    RESUMING = "resuming"
    ERROR = "error"


class Event(enum.StrEnum):
    """What moves the machine: a request (capitalised as the D-Bus method) or an outcome."""

    SAVE = "Save"
    """A save of the whole state into an fd starts."""
    LOAD = "Load"
    """A load of the whole state from an fd starts."""
    SUCCEEDED = "succeeded"
    """The transfer finished and verified."""
    FAILED = "failed"
    """The transfer failed or was cancelled; the daemon's state is as it was."""
    LOAD_BROKE = "load broke"
    """The daemon's load callable failed; its state is not known to be good."""
    RESET = "Reset"
    """The VMM asks to return to ``running`` (the only way out of ``error``)."""


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.RUNNING: {
        Event.SAVE: State.STOP_COPY,
        Event.LOAD: State.RESUMING,
        Event.RESET: State.RUNNING,
    },
    State.STOP_COPY: {
        Event.SUCCEEDED: State.RUNNING,
        Event.FAILED: State.RUNNING,
    },
    State.RESUMING: {
        Event.SUCCEEDED: State.RUNNING,
        Event.FAILED: State.RUNNING,
        Event.LOAD_BROKE: State.ERROR,
    },
    State.ERROR: {
        Event.RESET: State.RUNNING,
    },
}


def next_state(state: State, event: Event) -> State:
    """The state after ``event`` in ``state``.

    Raises:
        InvalidState: the table has no such arc; the caller changes nothing.
    """
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        allowed = ", ".join(TRANSITIONS[state])
        raise InvalidState(f"{event} is not allowed in state {state} (allowed: {allowed})") from None


def markdown_table() -> str:
    """The table as Markdown, for docs/states.md."""
    lines = [
        "# The VMState2 state machine",
        "",
        "Generated from `dbus_vmstate2/states.py` by `python -m dbus_vmstate2.states`;",
        "do not edit by hand. Any event not listed for a state is refused with",
        "`org.qemu.VMState2.Error.InvalidState` and changes nothing.",
        "",
        "| state | event | next state |",
        "|---|---|---|",
    ]
    for state, arcs in TRANSITIONS.items():
        for event, target in arcs.items():
            lines.append(f"| `{state}` | {event} | `{target}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
