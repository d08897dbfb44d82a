"""The values :mod:`.precopy` takes and gives: frozen, validated, one line per field.

Inputs (:class:`Observation`, :class:`PendingReply`, :class:`Counters`,
:class:`PreCopyConfig`), decisions (:class:`Decision` and its subclasses),
and the reports (:class:`Status`, :class:`Summary`).  No logic beyond
validation lives here; the rules are in :mod:`.precopy`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import MigrationAborted


def _check_counts(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be an int >= 0, not {value!r}")


# -- What the adapter feeds in ------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingReply:
    """A back-end's reply to ``Pending()``: estimates in state bytes, before compression."""

    initial_bytes: int
    """Initial data not yet written (falls to 0 as it is sent)."""
    dirty_bytes: int
    """Data changed since it was last written, to be sent again."""
    stop_copy_bytes: int
    """What stop-copy would write now; 0 if the back-end cannot estimate."""
    rounds: int
    """Rounds of changed data written in this pre-copy so far."""

    def __post_init__(self) -> None:
        _check_counts(self, "initial_bytes", "dirty_bytes", "stop_copy_bytes", "rounds")


@dataclass(frozen=True, slots=True)
class Counters:
    """What a back-end has moved so far: ``Check()``'s or ``TransferFinished``'s counters."""

    raw_bytes: int
    """State bytes, before compression."""
    stream_bytes: int
    """Stream bytes the back-end has written to its fd."""

    def __post_init__(self) -> None:
        _check_counts(self, "raw_bytes", "stream_bytes")


@dataclass(frozen=True, slots=True)
class Observation:
    """One back-end as the adapter sees it at a tick: cumulative figures, not deltas."""

    backend: str
    """The back-end's Id, as given to :class:`PreCopyPlan`."""
    received: int
    """Stream bytes received from its fd since SavePreCopy: never decreases."""
    pending: PendingReply | None = None
    """The latest Pending() reply; None if none has arrived yet (the last one given is kept)."""
    initial_data_sent: bool = False
    """Whether its InitialDataSent signal has arrived (once True, it stays so)."""
    written: Counters | None = None
    """The latest Check() counters, if the adapter asks for them (the last one given is kept)."""
    held: bool = False
    """Whether the adapter itself holds the back-end up: what it read waits for
    the sink to take it (a migration's link that is slow or stuck), so no byte
    arriving is not the back-end's stall."""

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"Observation.backend must be a back-end Id, not {self.backend!r}")
        _check_counts(self, "received")


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the container's destination still has to do after the back-ends'
    last byte, as the adapter sees it at a tick (rule 3).  A file has none;
    a migration's connection has bytes on their way and a handover."""

    queued: int = 0
    """Stream bytes received from the back-ends and not yet delivered (in
    this process's buffers and the kernel's send queue, on their way to the
    peer): they go before any stop-copy byte."""
    handover: float = 0.0
    """Seconds the end takes once the last byte is through (a migration's:
    the destination's commit and its answer), as estimated by the adapter."""
    delivered: int | None = None
    """Stream bytes the destination has taken so far, cumulative (None: the
    adapter cannot tell).  Their rate, where lower than the back-ends', is
    the channel's: what the back-ends' pipes give while buffers fill is not
    what gets through."""

    def __post_init__(self) -> None:
        _check_counts(self, "queued")
        if self.delivered is not None:
            _check_counts(self, "delivered")
        if not isinstance(self.handover, (int, float)) or not math.isfinite(self.handover) or self.handover < 0:
            raise ValueError(f"Backlog.handover must be a number of seconds >= 0, not {self.handover!r}")


@dataclass(frozen=True, slots=True)
class PreCopyConfig:
    """The limits of a live save; every figure in seconds unless named otherwise."""

    downtime_limit: float = 0.3
    """The longest acceptable stop-copy (QEMU's default ``downtime-limit``: 300 ms)."""
    max_rounds: int = 30
    """Rounds of changed data each lagging back-end may write before the plan gives up (or forces)."""
    force: bool = False
    """At ``max_rounds``, switch over anyway and accept the longer downtime, instead of giving up."""
    timeout: float | None = 300.0
    """The longest pre-copy may run before the plan gives up; None: no limit."""
    stall_timeout: float = 10.0
    """How long a back-end with something pending may send nothing."""
    stop_copy_timeout: float | None = None
    """The longest stop-copy may run before the plan gives up; None: no limit (the stall rule still applies)."""
    rate_window: float = 1.0
    """The span of ticks over which the rate is measured."""
    wait_for_trigger: bool = False
    """Never switch over on its own (rules 5 and 6 only report): wait for
    :meth:`~.precopy.PreCopyPlan.switch_over_now`, as a migration paced by
    QEMU's ``pre-switchover`` must.  The stall and timeout rules still apply."""

    def __post_init__(self) -> None:
        for name in ("downtime_limit", "stall_timeout", "rate_window", "timeout", "stop_copy_timeout"):
            value = getattr(self, name)
            if value is None and name in ("timeout", "stop_copy_timeout"):
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"PreCopyConfig.{name} must be a number of seconds >= 0, not {value!r}")
        if self.rate_window <= 0 or self.stall_timeout <= 0:
            raise ValueError("PreCopyConfig.rate_window and stall_timeout must be > 0")
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"PreCopyConfig.max_rounds must be an int >= 1, not {self.max_rounds!r}")


# -- What the plan answers ----------------------------------------------------


class Phase(enum.StrEnum):
    """Where the live save is."""

    PRE_COPY = "pre-copy"
    STOP_COPY = "stop-copy"
    DONE = "done"
    GAVE_UP = "gave up"


class SwitchReason(enum.StrEnum):
    """Why the plan switched over."""

    CONVERGED = "converged"
    FORCED = "max rounds, forced"
    REQUESTED = "requested"


class GiveUpReason(enum.StrEnum):
    """Why the plan gave up."""

    NOT_CONVERGING = "not converging"
    STALLED = "stalled"
    TIMEOUT = "timeout"
    STOP_COPY_TIMEOUT = "stop-copy timeout"
    BACKEND_FAILED = "back-end failed"


class Decision:
    """What the adapter must do next (one of the subclasses)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Continue(Decision):
    """Keep pumping and ticking."""

    deadline: float | None
    """Tick again by this time at the latest (None: no time rule pending)."""


@dataclass(frozen=True, slots=True)
class SwitchOver(Decision):
    """Call StopCopy on every back-end now; returned once."""

    reason: SwitchReason
    at: float
    """The switch-over's start: the downtime is counted from here."""
    expected_downtime: float | None
    """Seconds, by rule 3; None if not known yet (only when requested)."""
    pending_bytes: int | None
    """Stream bytes stop-copy is expected to move, in total."""
    rate: float | None
    """The measured rate, stream bytes per second, in total."""


@dataclass(frozen=True, slots=True)
class AwaitStopCopy(Decision):
    """Stop-copy is running; keep pumping, ticking and reporting ends."""

    waiting: tuple[str, ...]
    """The back-ends whose stop-copy has not finished."""
    deadline: float | None


@dataclass(frozen=True, slots=True)
class Finished(Decision):
    """Every stop-copy ended: the live save is complete."""

    summary: Summary


@dataclass(frozen=True, slots=True)
class GiveUp(Decision):
    """Stop the live save: cancel every back-end's transfer (the source runs on)."""

    reason: GiveUpReason
    message: str
    """What happened, with the figures, and what a person can change."""
    backends: tuple[str, ...]
    """The back-ends to blame, if any."""
    at: float
    expected_downtime: float | None = None
    rate: float | None = None

    def error(self) -> MigrationAborted:
        """The error for the adapter to raise."""
        return MigrationAborted(self.message)


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """One back-end in :class:`Status`."""

    backend: str
    initial_done: bool
    rounds: int
    received: int
    """Stream bytes received so far."""
    pending_bytes: int | None
    """Stream bytes stop-copy would move now (rule 2); None before its first Pending reply."""
    rate: float | None
    """Stream bytes per second over the window; None until the window is full."""
    finished: bool
    """Its stop-copy has ended."""


@dataclass(frozen=True, slots=True)
class Status:
    """The figures for a live status line."""

    phase: Phase
    elapsed: float
    rounds: int
    """The rounds rule 6 compares with ``max_rounds``."""
    max_rounds: int
    sending_initial: tuple[str, ...]
    """The back-ends still sending their initial data."""
    pending_bytes: int | None
    rate: float | None
    expected_downtime: float | None
    downtime_limit: float
    converged: bool
    """Rule 5 holds: the plan switches over (or would, in the same tick)."""
    backends: tuple[BackendStatus, ...]


@dataclass(frozen=True, slots=True)
class BackendSummary:
    """One back-end in :class:`Summary`."""

    backend: str
    stream_bytes: int
    """Stream bytes received from it."""
    raw_bytes: int | None
    """State bytes it moved (its last counters); None if the adapter gave none."""
    rounds: int
    stop_copy_time: float | None
    """Seconds from the switch-over to its stop-copy's end; None if it did not end."""


@dataclass(frozen=True, slots=True)
class Summary:
    """The outcome of a live save, for the JSON result."""

    phase: Phase
    switch_reason: SwitchReason | None
    give_up_reason: GiveUpReason | None
    message: str
    """The give-up message; empty otherwise."""
    stream_bytes: int
    raw_bytes: int | None
    """None unless every back-end's raw bytes are known."""
    rounds: int
    """The most rounds any back-end wrote."""
    total_time: float
    """Seconds from the start to the last stop-copy's end (or to the give-up, or to the last call)."""
    precopy_time: float | None
    """Seconds from the start to the switch-over."""
    downtime: float | None
    """Seconds from the switch-over to the last stop-copy's end: measured, once done."""
    expected_downtime: float | None
    """What rule 3 expected at the switch-over."""
    downtime_limit: float
    backends: tuple[BackendSummary, ...]

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain JSON values (an infinite or unknown figure is None)."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
