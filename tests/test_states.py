"""The state machine, tested directly: no bytes, no bus, no threads, no clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbus_vmstate2.errors import Busy, Cancelled, Corrupt, InvalidState
from dbus_vmstate2.states import OUTCOMES, TRANSITIONS, Effect, Event, Guard, Machine, State, markdown_table

REQUESTS = [e for e in Event if e not in OUTCOMES]
STARTS = {Event.SAVE: State.SAVING, Event.PRE_COPY: State.PRE_COPY, Event.LOAD: State.RESUMING}


def machine_in(state: State) -> Machine:
    """A machine brought to ``state`` through legal arcs only."""
    m = Machine()
    path = {
        State.RUNNING: [],
        State.SAVING: [Event.SAVE],
        State.PRE_COPY: [Event.PRE_COPY],
        State.STOP_COPY: [Event.PRE_COPY, Event.STOP_COPY],
        State.STOPPED: [Event.PRE_COPY, Event.STOP_COPY, Event.SUCCEEDED],
        State.RESUMING: [Event.LOAD],
        State.STAGED: [Event.LOAD, Event.STAGED],
        State.ERROR: [Event.LOAD, Event.LOAD_BROKE],
    }[state]
    for event in path:
        m.handle(event, 1.0, caller=":1.1", number=m.transfer.number if m.transfer else None)
    assert m.state is state
    return m


@pytest.mark.parametrize("event", list(Event))
@pytest.mark.parametrize("state", list(State))
def test_every_pair_is_an_arc_busy_or_invalid_state_and_refusals_change_nothing(state, event):
    m = machine_in(state)
    before = (m.state, m.transfer.number if m.transfer else None, m.transfer.finished if m.transfer else None)
    arc = TRANSITIONS[state].get(event)
    if arc is None or arc.refusal is not None:
        with pytest.raises(InvalidState if arc is None else Busy) as raised:
            m.handle(event, 2.0, caller=":1.1", number=m.transfer.number if m.transfer else None)
        assert str(event) in str(raised.value) or "busy with" in str(raised.value)
        after = (m.state, m.transfer.number if m.transfer else None, m.transfer.finished if m.transfer else None)
        assert after == before
    else:
        step = m.handle(event, 2.0, caller=":1.1", number=m.transfer.number if m.transfer else None)
        assert (step.before, step.after, step.effects) == (state, arc.target, arc.effects)


def test_every_state_has_a_row_and_is_reachable():
    assert set(TRANSITIONS) == set(State)
    reached = {State.RUNNING}
    for _ in State:
        reached |= {a.target for s in reached for a in TRANSITIONS[s].values() if a.target is not None}
    assert reached == set(State)


def test_a_second_transfer_is_busy_in_every_transferring_state():
    for state in (State.SAVING, State.PRE_COPY, State.STOP_COPY, State.RESUMING, State.STAGED):
        for start in STARTS:
            assert TRANSITIONS[state][start].refusal is Busy


def test_no_failure_touches_the_daemons_state():
    # A failed or cancelled transfer never leads to error (only a broken load
    # callable does), and a failed stop-copy resumes the quiesced daemon.
    for state, arcs in TRANSITIONS.items():
        if Event.FAILED in arcs:
            assert arcs[Event.FAILED].target is State.RUNNING
    assert TRANSITIONS[State.STOP_COPY][Event.FAILED].effects == (Effect.RESUME_DAEMON, Effect.FINISHED)
    into_error = [
        s for s, arcs in TRANSITIONS.items() if s is not State.ERROR and any(a.target is State.ERROR for a in arcs.values())
    ]
    # A daemon that swallows the discard of its staged load and returns may
    # have applied it: that is its load code failing, as in resuming.
    assert into_error == [State.RESUMING, State.STAGED]
    assert {e for e, a in TRANSITIONS[State.ERROR].items() if a.target is State.RUNNING} == {Event.RESET}


def test_stopped_is_left_only_by_resume():
    # Its state may already run on the destination: nothing else may thaw it.
    leaving = {e for e, a in TRANSITIONS[State.STOPPED].items() if a.target not in (None, State.STOPPED)}
    assert leaving == {Event.RESUME}
    assert TRANSITIONS[State.STOPPED][Event.RESUME].effects == (Effect.RESUME_DAEMON,)


def test_source_and_destination_back_to_back():
    # One live migration, as the VMM helper drives a source and a destination.
    source, dest = Machine(), Machine()
    step = source.handle(Event.PRE_COPY, 10.0, caller=":1.9")
    assert step.effects == (Effect.START_PRE_COPY,) and step.transfer.operation == "pre-copy"
    number = step.transfer.number
    load = dest.handle(Event.LOAD, 10.5, caller=":1.9").transfer
    assert source.handle(Event.STOP_COPY, 12.0, caller=":1.9", number=number).effects == (Effect.STOP_COPY,)
    finished = source.handle(Event.SUCCEEDED, 12.2)
    assert finished.after is State.STOPPED and finished.transfer.ended == 12.2 and finished.transfer.error is None
    assert dest.handle(Event.SUCCEEDED, 12.3).after is State.RUNNING
    assert (load.started, load.ended) == (10.5, 12.3)
    assert source.handle(Event.RESUME, 13.0).effects == (Effect.RESUME_DAEMON,)  # the migration failed later
    assert source.state is State.RUNNING
    assert source.handle(Event.SAVE, 14.0, caller=":1.9").transfer.number == number + 1


def test_a_failed_stop_copy_resumes_the_source_and_the_destination_keeps_its_state():
    source, dest = machine_in(State.STOP_COPY), machine_in(State.RESUMING)
    step = source.handle(Event.FAILED, 5.0, error=Cancelled("cancelled"))
    assert (step.after, step.effects) == (State.RUNNING, (Effect.RESUME_DAEMON, Effect.FINISHED))
    assert isinstance(step.transfer.error, Cancelled)
    assert dest.handle(Event.FAILED, 5.0, error=Corrupt("truncated")).after is State.RUNNING


def test_cancel_applies_only_to_the_callers_own_transfer():
    m = Machine()
    number = m.handle(Event.SAVE, 1.0, caller=":1.5").transfer.number
    assert m.handle(Event.CANCEL, 2.0, caller=":1.6").effects == ()
    assert m.handle(Event.CANCEL, 2.0, caller=":1.5").effects == (Effect.CANCEL,)
    assert m.handle(Event.CANCEL_TRANSFER, 2.0, caller=":1.6", number=number + 1).effects == ()
    assert m.handle(Event.CANCEL_TRANSFER, 2.0, caller=":1.6", number=number).effects == (Effect.CANCEL,)
    assert m.state is State.SAVING  # the outcome, not the request, ends the transfer
    m.handle(Event.FAILED, 3.0, error=Cancelled("x"))
    assert m.handle(Event.CANCEL, 4.0, caller=":1.5").effects == ()  # safe to repeat


def test_a_two_phase_load_is_applied_only_on_commit_of_its_own_number():
    m = machine_in(State.RESUMING)
    number = m.transfer.number
    step = m.handle(Event.STAGED, 2.0)
    assert (step.after, step.effects) == (State.STAGED, (Effect.ANNOUNCE_STAGED,))
    assert not m.transfer.finished  # staged is still the load's transfer: Busy for a second one
    with pytest.raises(InvalidState, match="not the running transfer"):
        m.handle(Event.COMMIT, 3.0, number=number + 1)
    assert m.state is State.STAGED
    step = m.handle(Event.COMMIT, 3.0, number=number)
    assert (step.after, step.effects) == (State.RESUMING, (Effect.COMMIT,))
    with pytest.raises(InvalidState):
        m.handle(Event.COMMIT, 3.5, number=number)  # once: the daemon is applying it
    assert m.handle(Event.SUCCEEDED, 4.0).after is State.RUNNING


def test_a_staged_load_discarded_leaves_the_daemons_state():
    for event, caller, number in ((Event.CANCEL, ":1.1", None), (Event.CANCEL_TRANSFER, ":1.7", 1)):
        m = machine_in(State.STAGED)
        assert m.handle(event, 2.0, caller=caller, number=number).effects == (Effect.CANCEL,)
        assert m.handle(Event.FAILED, 2.5, error=Cancelled("discarded")).after is State.RUNNING


def test_stop_copy_names_the_running_transfer():
    m = Machine()
    number = m.handle(Event.PRE_COPY, 1.0, caller=":1.5").transfer.number
    with pytest.raises(InvalidState, match="not the running transfer"):
        m.handle(Event.STOP_COPY, 2.0, number=number + 1)
    assert m.state is State.PRE_COPY
    assert m.handle(Event.STOP_COPY, 2.0, number=number).after is State.STOP_COPY
    with pytest.raises(InvalidState):
        m.handle(Event.STOP_COPY, 2.0, number=number)  # only once


def test_guards_are_in_the_table():
    guarded = {(s, e): a.guard for s, arcs in TRANSITIONS.items() for e, a in arcs.items() if a.guard is not Guard.NONE}
    assert {e for _, e in guarded} == {Event.CANCEL, Event.CANCEL_TRANSFER, Event.STOP_COPY, Event.COMMIT}


def test_docs_are_generated_from_the_table():
    docs = Path(__file__).resolve().parent.parent / "docs" / "states.md"
    assert docs.read_text() == markdown_table(), "run: python -m dbus_vmstate2.states > docs/states.md"


# -- The XML and the README say what the table does (issue 11, Busy versus InvalidState) --

ROOT = Path(__file__).resolve().parent.parent
TRANSFERS = (Event.SAVE, Event.PRE_COPY, Event.LOAD)


def _states_in(phrase: str) -> set[State]:
    import re

    return {State(s) for s in re.findall(r"``?([a-z-]+)``?", phrase) if s in set(State)}


def _xml_docs() -> dict[str, str]:
    """Each member's doc comment in interfaces/org.qemu.VMState2.xml, and the interface's as ''."""
    import re

    text = (ROOT / "interfaces" / "org.qemu.VMState2.xml").read_text()
    docs = {}
    for comment in re.findall(r"<!--(.*?)-->", text, re.S):
        name = comment.strip().split(":", 1)[0]
        docs["" if name == "org.qemu.VMState2" else name] = " ".join(comment.split())
    return docs


def allowed(event: Event) -> set[State]:
    return {s for s in State if (arc := TRANSITIONS[s].get(event)) is not None and arc.target is not None}


def busy(event: Event) -> set[State]:
    return {s for s in State if (arc := TRANSITIONS[s].get(event)) is not None and arc.refusal is Busy}


def test_the_xml_says_where_each_request_is_allowed_as_the_table_does():
    import re

    docs = _xml_docs()
    for event in REQUESTS:
        [phrase] = re.findall(r"Allowed in (.*?)(?:[;.]|$)", docs[str(event)])
        said = set(State) if "every state" in phrase else _states_in(phrase.split("(")[0])
        assert said == allowed(event), event


def test_the_xml_and_the_readme_say_where_busy_and_invalid_state_come_from_as_the_table_does():
    import re

    interface = _xml_docs()[""]
    [busy_phrase] = re.findall(r"while one runs, in (.*?), fails with ``org\.qemu\.VMState2\.Error\.Busy``", interface)
    [invalid_phrase] = re.findall(r"\(a transfer requested in (.*?) included\)", interface)
    readme = " ".join((ROOT / "README.md").read_text().split())
    [readme_phrase] = re.findall(r"`Busy` answers a Save, SavePreCopy or Load while a transfer runs \(in (.*?)\)", readme)
    for event in TRANSFERS:
        assert _states_in(busy_phrase) == _states_in(readme_phrase) == busy(event), event
        refused = set(State) - allowed(event) - busy(event)
        assert _states_in(invalid_phrase) == refused, event
        for state in refused:  # no arc at all: InvalidState
            assert event not in TRANSITIONS[state]
    assert all(arc.refusal in (None, Busy) for arcs in TRANSITIONS.values() for arc in arcs.values())
    states_md = (ROOT / "docs" / "states.md").read_text()
    assert "**Busy**" in states_md and "`org.qemu.VMState2.Error.Busy`" in states_md
