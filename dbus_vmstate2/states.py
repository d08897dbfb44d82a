"""The migration state machine of a VMState2 back-end: one table, no I/O.

Theory of operation.  A back-end is in exactly one :class:`State` and runs at
most one transfer.  Every request (a D-Bus method) and every end of a
transfer (an outcome) is an :class:`Event`; ``TRANSITIONS[state][event]`` is
the :class:`Arc` it takes: the next state, the :class:`Effect` s the adapter
must carry out, and the guard that decides whether the request applies to
the running transfer.  Rule 1: everything that affects the state machine
lives here.  An event missing from a state's row is refused with
:class:`~.errors.InvalidState` and changes nothing; a request for a second
transfer while one runs is refused with :class:`~.errors.Busy` (listed in the
table, as ``BUSY``).  :class:`Machine` applies the table; it has no bus, no
threads and no clock (time comes in as ``now``), so it is tested back to back
without any of them.  docs/states.md is generated from the table
(``python -m dbus_vmstate2.states``) and a test keeps the two in step.

The states map onto VFIO migration v2 (linux/vfio.h) as follows:

=============  ==========================  =======================================
ours           VFIO                        meaning
=============  ==========================  =======================================
``running``    RUNNING                     serving, no transfer
``saving``     (none: VFIO cannot)         one-shot Save of a snapshot; serving on
``pre-copy``   PRE_COPY                    iterative save; serving and changing
``stop-copy``  STOP_COPY                   quiesced; the rest is written
``stopped``    STOP                        quiesced, state frozen, until Resume
``resuming``   RESUMING                    a Load is streaming; applied on success
``staged``     RESUMING                    a two-phase Load verified; held until Commit
``error``      ERROR                       the daemon's load broke; only Reset
=============  ==========================  =======================================

A failed or cancelled transfer never changes the daemon's state: a save only
reads it (and a failed stop-copy resumes the daemon), a load is staged and
committed only once the stream has verified (and, for a two-phase load,
once the VMM said Commit).  The one way into ``error`` is
a load callable of the daemon that fails after it may have applied records.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import Busy, InvalidState, VMStateError


class State(enum.StrEnum):
    """The value of the ``State`` property."""

    RUNNING = "running"
    SAVING = "saving"
    PRE_COPY = "pre-copy"
    STOP_COPY = "stop-copy"
    STOPPED = "stopped"
    RESUMING = "resuming"
    STAGED = "staged"
    ERROR = "error"


class Event(enum.StrEnum):
    """What moves the machine: a request (named as the D-Bus method) or an outcome."""

    SAVE = "Save"
    """Start a one-shot save of a snapshot."""
    PRE_COPY = "SavePreCopy"
    """Start an iterative save."""
    STOP_COPY = "StopCopy"
    """Quiesce the daemon and finish the iterative save."""
    RESUME = "Resume"
    """Let a quiesced daemon serve again."""
    LOAD = "Load"
    """Start loading a stream."""
    COMMIT = "Commit"
    """Apply a two-phase load that is staged."""
    CANCEL = "Cancel"
    """Stop the running transfer, if the caller started it."""
    CANCEL_TRANSFER = "CancelTransfer"
    """Stop the running transfer, if it has the number given."""
    RESET = "Reset"
    """Return to ``running`` (the only way out of ``error``)."""
    STAGED = "staged"
    """A two-phase load's whole stream verified; it waits for Commit."""
    SUCCEEDED = "succeeded"
    """The transfer finished and verified."""
    FAILED = "failed"
    """The transfer failed or was cancelled; the daemon's state is as it was."""
    LOAD_BROKE = "load broke"
    """The daemon's load callable failed; its state is not known to be good."""


OUTCOMES = frozenset({Event.STAGED, Event.SUCCEEDED, Event.FAILED, Event.LOAD_BROKE})


class Effect(enum.StrEnum):
    """What the adapter must do when an arc is taken."""

    START_SAVE = "start a one-shot save"
    START_PRE_COPY = "start an iterative save"
    START_LOAD = "start a load"
    STOP_COPY = "quiesce the daemon and finish the save"
    ANNOUNCE_STAGED = "announce the staged load"
    COMMIT = "let the daemon apply the staged load"
    CANCEL = "cancel the running transfer"
    RESUME_DAEMON = "resume the daemon"
    FINISHED = "report the transfer's outcome"


class Guard(enum.StrEnum):
    """Which running transfer a request applies to."""

    NONE = ""
    OWNER = "only if the caller started it, else nothing"
    NUMBER = "only if its number is given, else nothing"
    NUMBER_OR_REFUSE = "only if its number is given, else InvalidState"


@dataclass(frozen=True, slots=True)
class Arc:
    """One entry of the table."""

    target: State | None
    """The next state; None when the request is refused."""
    effects: tuple[Effect, ...] = ()
    guard: Guard = Guard.NONE
    refusal: type[VMStateError] | None = None


BUSY = Arc(None, refusal=Busy)
"""A request for a second transfer while one runs."""


def _transferring(state: State, arcs: dict[Event, Arc]) -> dict[Event, Arc]:
    """The arcs every state with a running transfer shares, plus ``arcs``."""
    return {
        Event.SAVE: BUSY,
        Event.PRE_COPY: BUSY,
        Event.LOAD: BUSY,
        Event.CANCEL: Arc(state, (Effect.CANCEL,), Guard.OWNER),
        Event.CANCEL_TRANSFER: Arc(state, (Effect.CANCEL,), Guard.NUMBER),
        **arcs,
    }


def _idle(state: State) -> dict[Event, Arc]:
    """Cancel is safe to repeat: with no transfer it does nothing."""
    return {Event.CANCEL: Arc(state), Event.CANCEL_TRANSFER: Arc(state)}


TRANSITIONS: dict[State, dict[Event, Arc]] = {
    State.RUNNING: {
        Event.SAVE: Arc(State.SAVING, (Effect.START_SAVE,)),
        Event.PRE_COPY: Arc(State.PRE_COPY, (Effect.START_PRE_COPY,)),
        Event.LOAD: Arc(State.RESUMING, (Effect.START_LOAD,)),
        Event.RESUME: Arc(State.RUNNING),
        Event.RESET: Arc(State.RUNNING),
        **_idle(State.RUNNING),
    },
    State.SAVING: _transferring(State.SAVING, {
        Event.SUCCEEDED: Arc(State.RUNNING, (Effect.FINISHED,)),
        Event.FAILED: Arc(State.RUNNING, (Effect.FINISHED,)),
    }),
    State.PRE_COPY: _transferring(State.PRE_COPY, {
        Event.STOP_COPY: Arc(State.STOP_COPY, (Effect.STOP_COPY,), Guard.NUMBER_OR_REFUSE),
        Event.FAILED: Arc(State.RUNNING, (Effect.FINISHED,)),
    }),
    State.STOP_COPY: _transferring(State.STOP_COPY, {
        Event.SUCCEEDED: Arc(State.STOPPED, (Effect.FINISHED,)),
        Event.FAILED: Arc(State.RUNNING, (Effect.RESUME_DAEMON, Effect.FINISHED)),
    }),
    State.STOPPED: {
        Event.RESUME: Arc(State.RUNNING, (Effect.RESUME_DAEMON,)),
        **_idle(State.STOPPED),
    },
    State.RESUMING: _transferring(State.RESUMING, {
        Event.STAGED: Arc(State.STAGED, (Effect.ANNOUNCE_STAGED,)),
        Event.SUCCEEDED: Arc(State.RUNNING, (Effect.FINISHED,)),
        Event.FAILED: Arc(State.RUNNING, (Effect.FINISHED,)),
        Event.LOAD_BROKE: Arc(State.ERROR, (Effect.FINISHED,)),
    }),
    State.STAGED: _transferring(State.STAGED, {
        Event.COMMIT: Arc(State.RESUMING, (Effect.COMMIT,), Guard.NUMBER_OR_REFUSE),
        Event.FAILED: Arc(State.RUNNING, (Effect.FINISHED,)),
        Event.LOAD_BROKE: Arc(State.ERROR, (Effect.FINISHED,)),
    }),
    State.ERROR: {
        Event.RESET: Arc(State.RUNNING),
        **_idle(State.ERROR),
    },
}

OPERATIONS = {Effect.START_SAVE: "save", Effect.START_PRE_COPY: "pre-copy", Effect.START_LOAD: "load"}
"""The ``operation`` a starting effect gives its transfer (TransferFinished's argument)."""


@dataclass(slots=True)
class Transfer:
    """One transfer, from its request to its outcome."""

    number: int
    operation: str
    owner: str
    """The unique bus name of the connection that started it."""
    started: float
    ended: float | None = None
    error: VMStateError | None = None

    @property
    def finished(self) -> bool:
        return self.ended is not None


@dataclass(frozen=True, slots=True)
class Step:
    """What :meth:`Machine.handle` did: the adapter carries out ``effects``."""

    before: State
    after: State
    effects: tuple[Effect, ...]
    transfer: Transfer | None
    """The transfer the step concerns (new, running or just finished); None if none."""

    @property
    def changed(self) -> bool:
        return self.before is not self.after


@dataclass
class Machine:
    """The table applied to one back-end: its state and its latest transfer."""

    state: State = State.RUNNING
    transfer: Transfer | None = None
    """The latest transfer, running or finished."""
    _numbers: int = field(default=0, repr=False)

    def handle(
        self,
        event: Event,
        now: float,
        *,
        caller: str = "",
        number: int | None = None,
        error: VMStateError | None = None,
    ) -> Step:
        """Apply ``event``.

        Args:
            now: the time, for the transfer's start and end.
            caller: the unique bus name of a request's sender.
            number: the transfer number a request names (StopCopy, CancelTransfer).
            error: an outcome's error (None for success).

        Returns:
            The step taken; an arc whose guard does not hold is taken with no effects.

        Raises:
            Busy: a second transfer while one runs; nothing changes.
            InvalidState: the table has no such arc, or StopCopy names
                another transfer; nothing changes.
        """
        arc = self._arc(event)
        running = self.transfer if self.transfer is not None and not self.transfer.finished else None
        if not self._guard_holds(arc.guard, running, caller, number):
            if arc.guard is Guard.NUMBER_OR_REFUSE:
                current = f"#{running.number}" if running else "none"
                raise InvalidState(f"{event} #{number}: that is not the running transfer ({current})")
            return Step(self.state, self.state, (), running)
        before, self.state = self.state, arc.target
        transfer = running
        for effect in arc.effects:
            if effect in OPERATIONS:
                self._numbers += 1
                transfer = self.transfer = Transfer(self._numbers, OPERATIONS[effect], caller, now)
            elif effect is Effect.FINISHED:
                transfer.ended, transfer.error = now, error
        return Step(before, self.state, arc.effects, transfer)

    def _arc(self, event: Event) -> Arc:
        try:
            arc = TRANSITIONS[self.state][event]
        except KeyError:
            allowed = ", ".join(e for e, a in TRANSITIONS[self.state].items() if a.target is not None and e not in OUTCOMES)
            raise InvalidState(f"{event} is not allowed in state {self.state} (allowed: {allowed})") from None
        if arc.refusal is not None:
            kind = self.transfer.operation if self.transfer else "a transfer"
            number = f" #{self.transfer.number}" if self.transfer else ""
            raise arc.refusal(f"busy with {kind}{number} (state {self.state})")
        return arc

    @staticmethod
    def _guard_holds(guard: Guard, running: Transfer | None, caller: str, number: int | None) -> bool:
        if guard is Guard.NONE:
            return True
        if running is None:
            return False
        if guard is Guard.OWNER:
            return caller == running.owner
        return number == running.number


def markdown_table() -> str:
    """The table as Markdown, for docs/states.md."""
    lines = [
        "# The VMState2 state machine",
        "",
        "Generated from `dbus_vmstate2/states.py` by `python -m dbus_vmstate2.states`;",
        "do not edit by hand. Any event not listed for a state is refused with",
        "`org.qemu.VMState2.Error.InvalidState` and changes nothing; **Busy** marks a",
        "second transfer requested while one runs (`org.qemu.VMState2.Error.Busy`).",
        "Requests are named as the D-Bus methods; `succeeded`, `failed` and `load broke`",
        "are a transfer's outcomes.",
        "",
        "The VFIO column is the state of VFIO migration v2 (linux/vfio.h) each one",
        "corresponds to. `saving` has none: VFIO cannot save a running device whole;",
        "a one-shot Save reads a snapshot while the daemon serves on, and ends back in",
        "`running`. An iterative save goes `pre-copy` (VFIO's PRE_COPY: the daemon serves",
        "and changes its state while it is sent) -> `stop-copy` (STOP_COPY: quiesced,",
        "the rest written) -> `stopped` (STOP: frozen until Resume, since its state may",
        "already run on the destination). A failure or Cancel in `pre-copy` or",
        "`stop-copy` returns to `running` with the daemon resumed and its state",
        "untouched, as QEMU's recovery to RUNNING does. The destination is `resuming`",
        "(RESUMING) until its whole stream verified; only then does the daemon commit.",
        "A two-phase load (Load's option `commit` `explicit`) waits in `staged` (still",
        "VFIO's RESUMING: nothing applied yet) until Commit, so that a VMM can apply",
        "several back-ends' loads all or nothing; Cancel, a commit timeout or the loss of",
        "the VMM's connection discards it.",
        "",
        "| state | VFIO | event | next state | effects | applies |",
        "|---|---|---|---|---|---|",
    ]
    for state, arcs in TRANSITIONS.items():
        for event, arc in arcs.items():
            target = "**Busy**" if arc.target is None else f"`{arc.target}`"
            effects = "; ".join(arc.effects)
            lines.append(f"| `{state}` | {VFIO_STATES[state]} | {event} | {target} | {effects} | {arc.guard} |")
    return "\n".join(lines) + "\n"


VFIO_STATES = {
    State.RUNNING: "RUNNING",
    State.SAVING: "(none)",
    State.PRE_COPY: "PRE_COPY",
    State.STOP_COPY: "STOP_COPY",
    State.STOPPED: "STOP",
    State.RESUMING: "RESUMING",
    State.STAGED: "RESUMING",
    State.ERROR: "ERROR",
}
"""The VFIO migration v2 state each of ours corresponds to."""


if __name__ == "__main__":
    print(markdown_table(), end="")
