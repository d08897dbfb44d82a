"""The state machine table, tested directly: no bytes, no bus."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbus_vmstate2.errors import InvalidState
from dbus_vmstate2.states import TRANSITIONS, Event, State, markdown_table, next_state

ALL_PAIRS = [(s, e) for s in State for e in Event]


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS)
def test_every_pair_is_an_arc_or_the_named_error(state, event):
    if event in TRANSITIONS[state]:
        assert next_state(state, event) is TRANSITIONS[state][event]
    else:
        with pytest.raises(InvalidState) as raised:
            next_state(state, event)
        assert str(state) in str(raised.value) and str(event) in str(raised.value)


def test_every_state_has_a_row_and_is_reachable():
    assert set(TRANSITIONS) == set(State)
    reached = {State.RUNNING}
    for _ in State:
        reached |= {t for s in reached for t in TRANSITIONS[s].values()}
    assert reached == set(State)


def test_no_failed_transfer_leaves_the_running_path():
    # A failed or cancelled transfer never touches the daemon's state, so it
    # must never lead to error: only a broken load callable does.
    for state, arcs in TRANSITIONS.items():
        if Event.FAILED in arcs:
            assert arcs[Event.FAILED] is State.RUNNING
    assert [s for s, arcs in TRANSITIONS.items() if State.ERROR in arcs.values()] == [State.RESUMING]
    assert set(TRANSITIONS[State.ERROR]) == {Event.RESET}  # the only way out


def test_docs_are_generated_from_the_table():
    docs = Path(__file__).resolve().parent.parent / "docs" / "states.md"
    assert docs.read_text() == markdown_table(), "run: python -m dbus_vmstate2.states > docs/states.md"
