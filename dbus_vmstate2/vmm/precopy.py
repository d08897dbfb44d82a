"""When to switch over a live save of several back-ends: a pure planner.

Theory of operation.  A live save starts ``SavePreCopy`` on every back-end
and pumps each one's fd while the daemons serve on and change their state
(VFIO's PRE_COPY).  At some point the VMM must *switch over*: call
``StopCopy`` on every back-end, which quiesces it and writes the rest.  That
is the downtime, and :class:`PreCopyPlan` decides when it starts.  The plan
has no bus, no thread and no clock: the I/O adapter feeds it, on every tick
(about every 100 ms, and whenever a signal arrives), one :class:`Observation`
per back-end (its latest ``Pending()`` reply, whether ``InitialDataSent``
arrived, the stream bytes received from its fd so far, and ``Check()``'s
counters if it has them) together with ``now``.  The plan answers with a
:class:`Decision`:

* :class:`Continue`: keep pumping; tick again by ``deadline`` at the latest;
* :class:`SwitchOver` (returned once): call ``StopCopy`` on every back-end
  now, keep ticking, and report each back-end's end with
  :meth:`PreCopyPlan.stop_copy_finished`;
* :class:`AwaitStopCopy`: stop-copy runs on the back-ends named;
* :class:`Finished`: every stop-copy ended; the :class:`Summary` is final;
* :class:`GiveUp`: stop, with a message a person can act on (Cancel every
  back-end's transfer; Resume those already ``stopped``).

Finished and GiveUp are sticky: every later call returns them again.  A
failure of the adapter's own (a back-end's transfer failed, a call failed)
comes in through :meth:`PreCopyPlan.failed` and ends in GiveUp.  Misuse (a
missing back-end, time or a byte count going backwards) raises ValueError and
changes nothing.

Rules, as a tick applies them (after QEMU's ``migration_iteration_run()`` and
VFIO's PRECOPY_INFO; reference/state-migration-anchors.md §1 and §4):

1. **Rate.**  Stream bytes received per second over a sliding window of the
   last ``rate_window`` seconds (default 1 s) of ticks, per back-end and in
   total.  It is unknown until the ticks span a whole window, and until then
   the plan never switches over by itself.  This is throughput, not link
   capacity: while a back-end has little to send it looks slower than its
   link, which errs towards a longer expected downtime (safe).  Where the
   adapter's :class:`Backlog` says how much the destination has taken, the
   channel's rate is the lower of the two: while buffers on the way fill,
   the pipes give more than gets through.  Rule 3 takes the lowest channel
   rate of the last :data:`RATE_HISTORY` windows that ended with bytes
   queued on the way (the channel, not the back-ends, was then the limit):
   on a busy host or link the throughput of one second says little of the
   next, and stop-copy should be expected at the pace the channel is known
   to fall to.  It relies on the back-end starting each round as soon as the
   last one is written; one that waits between rounds for longer than the
   downtime limit may never look converged.
2. **Pending.**  What stop-copy would have to move, per back-end, in stream
   bytes: ``max(initial_bytes + dirty_bytes, stop_copy_bytes)`` from its
   latest ``Pending()`` reply (state bytes), times its compression ratio,
   plus the bytes in flight.  ``stop_copy_bytes`` is the back-end's own
   estimate of what stop-copy writes (QEMU's ``state_pending_exact`` uses
   VFIO's ``stop_copy_length`` the same way); what is initial or dirty now
   is a lower bound of it, and covers a back-end that reports 0 for "cannot
   estimate".  The ratio is ``stream_bytes / raw_bytes`` of ``Check()``'s
   counters since the transfer began (1.0 until the adapter gives them: no
   credit for compression it has not seen).  In flight: what the back-end
   says it wrote (Check's ``stream_bytes``) minus what we received.
3. **Expected downtime.**  ``max((sum(pending) + queued) / channel rate,
   max(pending_i / rate_i)) + handover``: stop-copy runs on all back-ends at
   once, so it lasts at least as long as the shared channel needs for the
   total and as long as the slowest back-end needs for its own part.  The
   adapter's :class:`Backlog` adds what the channel must deliver first (the
   bytes ``queued`` on a migration's connection, which go before any
   stop-copy byte) and the ``handover`` that follows the last byte (the
   destination's commit and answer).  The queue costs nothing when the
   back-ends, not the link, limit the rate: then the link keeps it empty.
   Nothing pending takes 0 s; something pending at rate 0 takes forever.
4. **Stall.**  A back-end that has had something pending, and from which
   no byte arrived, through every tick of the last ``stall_timeout`` seconds
   (default 10 s) => GiveUp naming it.  No Pending reply yet counts as
   pending; after the switch-over, every back-end whose stop-copy has not
   ended has something pending.  A tick at which the adapter says it holds
   the back-end up (``held``: what it read waits for the sink, a migration's
   link) counts as moving: a stuck link is the link's to time out, and
   blaming the back-ends for it would name the wrong party.
5. **Converged.**  Every back-end has sent its initial data
   (``InitialDataSent`` seen, or ``initial_bytes == 0``), the rate is known
   and the expected downtime is within ``downtime_limit`` (default 300 ms,
   QEMU's ``downtime-limit``) => SwitchOver (``converged``).
6. **Rounds.**  Initial data all sent and the rate known, but over the
   limit: once every back-end that still has something pending has written
   ``max_rounds`` rounds (default 30) of changed data, the state changes
   faster than it can be sent => GiveUp with the figures (the rate at which
   the state changes, the rate that gets through, the expected downtime and
   the limit); with ``force``, SwitchOver (``max rounds, forced``) instead,
   accepting the longer downtime.  Counting the back-ends that hold up the
   switch-over, and the slowest of them, gives each of them ``max_rounds``
   chances; one with nothing pending may do no rounds at all.
7. **Timeout.**  Pre-copy has run ``timeout`` seconds (default 300 s; None:
   no limit) => GiveUp.  ``force`` does not change this.
8. **Told to.**  :meth:`PreCopyPlan.switch_over_now` => SwitchOver
   (``requested``) at once, whatever the rules above say: it is how the
   user, or QEMU's ``pre-switchover``, overrides the plan.  With
   ``wait_for_trigger`` it is the only way to switch over: rules 5 and 6
   decide nothing (a converged state shows in :meth:`PreCopyPlan.status`;
   a state that does not converge keeps being sent, since whoever triggers
   decides when the VM stops), and the plan keeps answering Continue until
   told, or until the stall or timeout rule gives up.
9. **Stop-copy.**  The switch-over's ``now`` is when StopCopy was requested
   (the back-ends quiesce); the downtime is the last back-end's stop-copy
   end minus that.  A back-end silent for ``stall_timeout`` meanwhile, or
   ``stop_copy_timeout`` passing (default: none), => GiveUp.

The adapter must give every back-end in every tick; :meth:`next_deadline`
says by when it must tick at the latest for the time rules (4, 7, 9) to fire.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..units import size
from ._precopy_values import (
    AwaitStopCopy,
    Backlog,
    BackendStatus,
    BackendSummary,
    Continue,
    Counters,
    Decision,
    Finished,
    GiveUp,
    GiveUpReason,
    Observation,
    PendingReply,
    Phase,
    PreCopyConfig,
    Status,
    Summary,
    SwitchOver,
    SwitchReason,
)

__all__ = [
    "AwaitStopCopy",
    "Backlog",
    "BackendStatus",
    "BackendSummary",
    "Continue",
    "Counters",
    "Decision",
    "Finished",
    "GiveUp",
    "GiveUpReason",
    "Observation",
    "PendingReply",
    "Phase",
    "PreCopyConfig",
    "PreCopyPlan",
    "Status",
    "Summary",
    "SwitchOver",
    "SwitchReason",
]

_log = logging.getLogger(__name__)

RATE_HISTORY = 3
"""Rule 1: how many windows back the channel rate of rule 3 looks (it takes their lowest)."""


# -- The plan -----------------------------------------------------------------


_NEXT_PHASES: dict[Phase, frozenset[Phase]] = {
    Phase.PRE_COPY: frozenset({Phase.STOP_COPY, Phase.GAVE_UP}),
    Phase.STOP_COPY: frozenset({Phase.DONE, Phase.GAVE_UP}),
    Phase.DONE: frozenset(),
    Phase.GAVE_UP: frozenset(),
}


@dataclass(slots=True)
class _Backend:
    """What the plan knows of one back-end."""

    name: str
    received: int = 0
    pending: PendingReply | None = None
    initial_sent: bool = False
    written: Counters | None = None
    fine_at: float = 0.0
    """The latest tick at which it was moving, held up by the adapter, or had nothing pending (rule 4)."""
    ended: float | None = None
    """When its stop-copy ended."""
    most_rounds: int = 0
    """The most rounds it reported: once its stop-copy ended it reports 0 (Pending outside pre-copy)."""

    @property
    def initial_done(self) -> bool:
        return self.initial_sent or (self.pending is not None and self.pending.initial_bytes == 0)

    @property
    def rounds(self) -> int:
        return self.most_rounds

    @property
    def ratio(self) -> float:
        """Stream bytes per state byte, observed so far (1.0 until known)."""
        c = self.written
        if c is None or c.raw_bytes == 0 or c.stream_bytes == 0:
            return 1.0
        return c.stream_bytes / c.raw_bytes

    @property
    def outstanding(self) -> int | None:
        """State bytes not yet sent (initial + dirty), for the dirty-rate figure."""
        p = self.pending
        return None if p is None else p.initial_bytes + p.dirty_bytes

    @property
    def pending_bytes(self) -> int | None:
        """Rule 2: stream bytes stop-copy would move now."""
        p = self.pending
        if p is None:
            return None
        raw = max(p.initial_bytes + p.dirty_bytes, p.stop_copy_bytes)
        in_flight = max(0, self.written.stream_bytes - self.received) if self.written else 0
        return math.ceil(raw * self.ratio) + in_flight


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    received: tuple[int, ...]
    outstanding: tuple[int | None, ...]
    delivered: int | None = None


@dataclass(frozen=True, slots=True)
class _Figures:
    """Rules 1 to 3 applied to the latest tick."""

    rates: tuple[float, ...] | None
    """Each back-end's, over the window."""
    pending: tuple[int | None, ...]
    expected_downtime: float | None
    rate: float | None
    """The channel's, as rule 3 takes it (rule 1)."""

    @property
    def pending_total(self) -> int | None:
        return None if None in self.pending else sum(p for p in self.pending if p is not None)


def _time_for(pending: int, rate: float) -> float:
    if pending == 0:
        return 0.0
    return pending / rate if rate > 0 else math.inf


class PreCopyPlan:
    """Decides when a live save of several back-ends switches over (see the module's rules).

    Args:
        backends: the back-ends' Ids, in the order the results list them.
        now: when SavePreCopy was started (the rate and the timeout count from here).
        config: the limits (default: :class:`PreCopyConfig`'s).

    Raises:
        ValueError: no back-end, or an Id given twice.
    """

    def __init__(self, backends: Iterable[str], now: float, config: PreCopyConfig | None = None) -> None:
        names = tuple(backends)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"backends must be distinct back-end Ids, at least one: {names!r}")
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time, not {now!r}")
        self.config = config or PreCopyConfig()
        self.now = now
        """The time of the latest call."""
        self._start = now
        self._phase = Phase.PRE_COPY
        self._state = {n: _Backend(n, fine_at=now) for n in names}
        self._samples: deque[_Sample] = deque([_Sample(now, (0,) * len(names), (None,) * len(names))])
        self._switch: SwitchOver | None = None
        self._final: Finished | GiveUp | None = None
        self._backlog = Backlog()
        self._channel_rates: deque[tuple[float, float]] = deque()
        """(tick time, channel rate over the window ending then), for the last RATE_HISTORY windows."""

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self._state)

    @property
    def phase(self) -> Phase:
        return self._phase

    # -- inputs --

    def tick(self, now: float, observations: Iterable[Observation], backlog: Backlog | None = None) -> Decision:
        """Take the latest figures of every back-end and decide.

        Args:
            now: the time of the figures.
            observations: one per back-end, every back-end, any order.
            backlog: the destination's, if it has one (rule 3); None keeps
                the last one given (none at first).

        Returns:
            Continue, SwitchOver (once), AwaitStopCopy, Finished or GiveUp.

        Raises:
            ValueError: a back-end missing, repeated or unknown, its
                ``received`` smaller than before, or ``now`` earlier than
                the last call's; nothing changes.
        """
        observations = list(observations)
        self._check_time(now)
        if self._final is not None:
            return self._final
        self._check_observations(observations)
        if backlog is not None and not isinstance(backlog, Backlog):
            raise ValueError(f"backlog must be a Backlog, not {backlog!r}")
        self.now = now
        if backlog is not None:
            self._backlog = backlog
        for obs in observations:
            b = self._state[obs.backend]
            moved = obs.received > b.received
            b.received = obs.received
            if obs.pending is not None:
                b.pending = obs.pending
                b.most_rounds = max(b.most_rounds, obs.pending.rounds)
            if obs.written is not None:
                b.written = obs.written
            b.initial_sent = b.initial_sent or obs.initial_data_sent
            if moved or obs.held or not self._has_pending(b):
                b.fine_at = now
        self._add_sample(now)
        self._note_channel_rate(now)
        if self._phase is Phase.PRE_COPY:
            return self._decide_pre_copy(now)
        return self._decide_stop_copy(now)

    def switch_over_now(self, now: float) -> Decision:
        """Rule 8: switch over at once, as the user (or QEMU) says.

        Returns:
            SwitchOver (``requested``) in pre-copy; otherwise what the plan
            already decided (AwaitStopCopy, Finished or GiveUp): safe to repeat.
        """
        self._check_time(now)
        self.now = now
        if self._phase is Phase.PRE_COPY:
            return self._switch_over(now, SwitchReason.REQUESTED, self._figures())
        return self._current(now)

    def stop_copy_finished(
        self, backend: str, now: float, *, received: int | None = None, counters: Counters | None = None,
    ) -> Decision:
        """A back-end's stop-copy ended: its transfer succeeded and its fd reached its end.

        Args:
            received: the final count of stream bytes received, if not ticked in yet.
            counters: TransferFinished's (or Check's) final counters.

        Returns:
            AwaitStopCopy until the last back-end, then Finished; a repeated
            report keeps the first end and changes nothing.

        Raises:
            ValueError: an unknown back-end, time going backwards, or a
                report before the switch-over (a pre-copy stream does not end
                by itself: report a failure with :meth:`failed`).
        """
        self._check_time(now)
        if self._final is not None:
            return self._final
        if self._phase is Phase.PRE_COPY:
            raise ValueError(f"stop_copy_finished({backend!r}) before the switch-over: use failed() for an early end")
        b = self._backend(backend)
        if received is not None and received < b.received:
            raise ValueError(f"back-end {backend!r}: received went back from {b.received} to {received}")
        self.now = now
        if b.ended is None:
            b.ended = now
            b.received = b.received if received is None else received
            if counters is not None:
                b.written = counters
            _log.debug("stop-copy of %r ended after %.3f s", backend, now - self._switch.at)
        if all(x.ended is not None for x in self._state.values()):
            self._set_phase(Phase.DONE, "every stop-copy ended")
            self._final = Finished(self.summary())
            return self._final
        return self._current(now)

    def failed(self, backend: str, now: float, message: str) -> Decision:
        """The adapter saw ``backend`` fail (its transfer, a call to it): give up.

        Returns:
            GiveUp (``back-end failed``), or what the plan had already
            finished with (a failure after Finished changes nothing).
        """
        self._check_time(now)
        if self._final is not None:
            return self._final
        self._backend(backend)
        self.now = now
        during = "stop-copy" if self._phase is Phase.STOP_COPY else "pre-copy"
        message = f"back-end {backend!r} failed during {during}: {message}"
        return self._give_up(now, GiveUpReason.BACKEND_FAILED, message, (backend,))

    # -- outputs --

    def next_deadline(self) -> float | None:
        """When the adapter must tick at the latest, even with nothing new: the
        earliest time a back-end could count as stalled (if it sent nothing
        from now on), the timeout, or the stop-copy timeout; None once the
        plan has finished or given up."""
        if self._final is not None:
            return None
        deadlines = [b.fine_at + self.config.stall_timeout for b in self._state.values() if b.ended is None]
        if self._phase is Phase.PRE_COPY and self.config.timeout is not None:
            deadlines.append(self._start + self.config.timeout)
        if self._phase is Phase.STOP_COPY and self.config.stop_copy_timeout is not None:
            deadlines.append(self._switch.at + self.config.stop_copy_timeout)
        return min(deadlines, default=None)

    def status(self, now: float) -> Status:
        """The figures of the latest tick, for a status line (changes nothing)."""
        figures = self._figures()
        backends = tuple(
            BackendStatus(
                b.name, b.initial_done, b.rounds, b.received, pending,
                None if figures.rates is None else figures.rates[i], b.ended is not None,
            )
            for i, (b, pending) in enumerate(zip(self._state.values(), figures.pending, strict=True))
        )
        return Status(
            self._phase, now - self._start, self._rule_rounds(figures), self.config.max_rounds,
            tuple(b.name for b in self._state.values() if not b.initial_done),
            figures.pending_total, figures.rate, figures.expected_downtime, self.config.downtime_limit,
            self._converged(figures), backends,
        )

    def summary(self) -> Summary:
        """The outcome so far; final once the plan has Finished or given up."""
        switch = self._switch
        ends = [b.ended for b in self._state.values()]
        done = self._phase is Phase.DONE
        end = max(e for e in ends if e is not None) if done else self.now
        raws = [b.written.raw_bytes if b.written else None for b in self._state.values()]
        give_up = self._final if isinstance(self._final, GiveUp) else None
        return Summary(
            phase=self._phase,
            switch_reason=switch.reason if switch else None,
            give_up_reason=give_up.reason if give_up else None,
            message=give_up.message if give_up else "",
            stream_bytes=sum(b.received for b in self._state.values()),
            raw_bytes=None if None in raws else sum(r for r in raws if r is not None),
            rounds=max(b.rounds for b in self._state.values()),
            total_time=end - self._start,
            precopy_time=switch.at - self._start if switch else None,
            downtime=end - switch.at if done and switch else None,
            expected_downtime=switch.expected_downtime if switch else None,
            downtime_limit=self.config.downtime_limit,
            backends=tuple(
                BackendSummary(
                    b.name, b.received, raw, b.rounds,
                    b.ended - switch.at if switch and b.ended is not None else None,
                )
                for b, raw in zip(self._state.values(), raws, strict=True)
            ),
        )

    # -- the rules --

    def _decide_pre_copy(self, now: float) -> Decision:
        stalled = self._stalled(now)
        if stalled:
            return self._give_up_stalled(now, stalled)
        figures = self._figures()
        initial_done = all(b.initial_done for b in self._state.values())
        if not self.config.wait_for_trigger:  # rule 8: then only switch_over_now() switches over
            if self._converged(figures):
                return self._switch_over(now, SwitchReason.CONVERGED, figures)
            if initial_done and figures.expected_downtime is not None:
                rounds = self._rule_rounds(figures)
                if rounds >= self.config.max_rounds:
                    if self.config.force:
                        return self._switch_over(now, SwitchReason.FORCED, figures)
                    return self._give_up_not_converging(now, figures, rounds)
        if self.config.timeout is not None and now - self._start >= self.config.timeout:
            return self._give_up_timeout(now, figures)
        return Continue(self.next_deadline())

    def _decide_stop_copy(self, now: float) -> Decision:
        stalled = self._stalled(now)
        if stalled:
            return self._give_up_stalled(now, stalled)
        limit = self.config.stop_copy_timeout
        if limit is not None and now - self._switch.at >= limit:
            waiting = tuple(b.name for b in self._state.values() if b.ended is None)
            return self._give_up(
                now, GiveUpReason.STOP_COPY_TIMEOUT,
                f"stop-copy did not end within {_duration(limit)} (the stop-copy timeout): still waiting for "
                f"{_names(waiting)}; the back-ends are quiesced until cancelled. Raise the stop-copy timeout "
                "if the link is slow, or see the back-ends' logs",
                waiting,
            )
        return self._current(now)

    def _converged(self, figures: _Figures) -> bool:
        """Rule 5."""
        expected = figures.expected_downtime
        return (
            all(b.initial_done for b in self._state.values())
            and expected is not None
            and expected <= self.config.downtime_limit
        )

    def _has_pending(self, b: _Backend) -> bool:
        if self._phase is Phase.STOP_COPY:
            return b.ended is None
        pending = b.pending_bytes
        return pending is None or pending > 0

    def _stalled(self, now: float) -> tuple[str, ...]:
        limit = self.config.stall_timeout
        return tuple(b.name for b in self._state.values() if b.ended is None and now - b.fine_at >= limit)

    def _figures(self) -> _Figures:
        """Rules 1 to 3."""
        pending = tuple(b.pending_bytes for b in self._state.values())
        rates = self._rates()
        if rates is None:
            return _Figures(rates, pending, None, None)
        channel = min([self._channel_rate(rates), *(r for _, r in self._channel_rates)])
        if None in pending:
            return _Figures(rates, pending, None, channel)
        known = [p for p in pending if p is not None]
        total = _time_for(sum(known) + self._backlog.queued, channel)
        slowest = max(_time_for(p, r) for p, r in zip(known, rates, strict=True))
        return _Figures(rates, pending, max(total, slowest) + self._backlog.handover, channel)

    def _window(self) -> tuple[_Sample, _Sample] | None:
        first, last = self._samples[0], self._samples[-1]
        if last.at - first.at < self.config.rate_window:
            return None
        return first, last

    def _rates(self) -> tuple[float, ...] | None:
        window = self._window()
        if window is None:
            return None
        first, last = window
        span = last.at - first.at
        return tuple((b - a) / span for a, b in zip(first.received, last.received, strict=True))

    def _channel_rate(self, rates: tuple[float, ...]) -> float:
        """Over the current window: the back-ends' rates together, or the destination's if lower."""
        delivery = self._delivery_rate()
        return sum(rates) if delivery is None else min(sum(rates), delivery)

    def _note_channel_rate(self, now: float) -> None:
        """Rule 1: remember the channel's rate if it was the limit (bytes queued on the way)."""
        rates = self._rates()
        if rates is None:
            return
        if self._backlog.queued:
            self._channel_rates.append((now, self._channel_rate(rates)))
        horizon = now - RATE_HISTORY * self.config.rate_window
        while self._channel_rates and self._channel_rates[0][0] < horizon:
            self._channel_rates.popleft()

    def _delivery_rate(self) -> float | None:
        """Bytes per second the destination took over the window (rule 1), if it says."""
        window = self._window()
        if window is None or window[0].delivered is None or window[1].delivered is None:
            return None
        first, last = window
        return max(0, last.delivered - first.delivered) / (last.at - first.at)

    def _add_sample(self, now: float) -> None:
        """Keep the ticks of the last window, plus one at or before its start.

        Ticks closer together than 1/32 of the window replace the newest
        one, so the window holds about 35 samples however often the adapter
        ticks."""
        sample = _Sample(
            now, tuple(b.received for b in self._state.values()), tuple(b.outstanding for b in self._state.values()),
            self._backlog.delivered,
        )
        samples = self._samples
        if len(samples) >= 2 and now - samples[-2].at < self.config.rate_window / 32:
            samples[-1] = sample
        else:
            samples.append(sample)
        horizon = now - self.config.rate_window
        while len(samples) >= 2 and samples[1].at <= horizon:
            samples.popleft()

    def _rule_rounds(self, figures: _Figures) -> int:
        """Rule 6: the fewest rounds among the back-ends with something pending."""
        lagging = [b.rounds for b, p in zip(self._state.values(), figures.pending, strict=True) if p is None or p > 0]
        return min(lagging or [b.rounds for b in self._state.values()])

    def _dirty_rate(self) -> tuple[float, float] | None:
        """How fast the state changes, over the window, in state and stream bytes per second.

        What was sent plus how much the backlog grew is what changed (a lower
        bound: a change to data already dirty shows nowhere)."""
        window = self._window()
        if window is None:
            return None
        first, last = window
        span = last.at - first.at
        raw = stream = 0.0
        for i, b in enumerate(self._state.values()):
            sent = (last.received[i] - first.received[i]) / b.ratio
            o0, o1 = first.outstanding[i], last.outstanding[i]
            grown = o1 - o0 if o0 is not None and o1 is not None else 0
            changed = max(0.0, (sent + grown) / span)
            raw += changed
            stream += changed * b.ratio
        return raw, stream

    # -- the outcomes --

    def _switch_over(self, now: float, reason: SwitchReason, figures: _Figures) -> SwitchOver:
        self._switch = SwitchOver(reason, now, figures.expected_downtime, figures.pending_total, figures.rate)
        for b in self._state.values():
            b.fine_at = now  # each must now write its rest and its trailer
        self._set_phase(Phase.STOP_COPY, f"{reason}, expected downtime {_duration(figures.expected_downtime)}")
        return self._switch

    def _give_up(
        self, now: float, reason: GiveUpReason, message: str, backends: tuple[str, ...],
        figures: _Figures | None = None,
    ) -> GiveUp:
        figures = figures or self._figures()
        self._final = GiveUp(reason, message, backends, now, figures.expected_downtime, figures.rate)
        self._set_phase(Phase.GAVE_UP, message)
        return self._final

    def _give_up_stalled(self, now: float, stalled: tuple[str, ...]) -> GiveUp:
        figures = self._figures()
        if self._phase is Phase.STOP_COPY:
            what = "during stop-copy (the back-ends are quiesced until cancelled)"
        else:
            left = [self._state[n].pending_bytes for n in stalled]
            what = "while " + ("it has" if len(stalled) == 1 else "they have") + " " + (
                "an unknown amount" if None in left else _size(sum(p for p in left if p is not None))
            ) + " left to send"
        return self._give_up(
            now, GiveUpReason.STALLED,
            f"{_names(stalled)} sent no data for {_duration(self.config.stall_timeout)} {what}: "
            "the back-end or the channel from it is stuck (see the back-end's log)",
            stalled, figures,
        )

    def _give_up_not_converging(self, now: float, figures: _Figures, rounds: int) -> GiveUp:
        if self._backlog.handover >= self.config.downtime_limit:
            return self._give_up(
                now, GiveUpReason.NOT_CONVERGING,
                f"the handover alone (the destination's commit and answer after the last byte) is expected to "
                f"take {_duration(self._backlog.handover)}, over the {_duration(self.config.downtime_limit)} "
                "downtime limit, whatever the back-ends send. Raise the downtime limit, see why the destination's "
                "bus calls are slow, or force the switch-over to accept the longer downtime",
                (), figures,
            )
        times = {
            b.name: _time_for(p, r)
            for b, p, r in zip(self._state.values(), figures.pending, figures.rates, strict=True)
            if p
        }
        culprits = tuple(sorted(times, key=lambda n: -times[n]))
        shares = ", ".join(f"{n!r} {_size(self._state[n].pending_bytes)}" for n in culprits[:3])
        more = f" and {len(culprits) - 3} more" if len(culprits) > 3 else ""
        dirty = self._dirty_rate()
        changes = (
            f"the state changes at {_rate(dirty[0])} at least ({_rate(dirty[1])} as stream bytes)"
            if dirty else "the state changes"
        )
        return self._give_up(
            now, GiveUpReason.NOT_CONVERGING,
            f"the back-ends' state changes faster than it can be sent: after {rounds} rounds, "
            f"{_size(figures.pending_total)} is still pending ({shares}{more}); {changes} while "
            f"{_rate(figures.rate)} gets through, so stop-copy {_would_take(figures.expected_downtime)}"
            f"{self._with_backlog()}, "
            f"over the {_duration(self.config.downtime_limit)} "
            "downtime limit. Raise the downtime limit, give the migration more bandwidth or lighten the "
            "back-ends' load, or force the switch-over to accept the longer downtime",
            culprits, figures,
        )

    def _give_up_timeout(self, now: float, figures: _Figures) -> GiveUp:
        initial = tuple(b.name for b in self._state.values() if not b.initial_done)
        if initial:
            replies = [self._state[n].pending for n in initial]
            left = None if None in replies else sum(p.initial_bytes for p in replies if p is not None)
            why = f"{_names(initial)} still sending initial data ({_size(left)} left)"
            blamed = initial
        elif figures.expected_downtime is None:
            why = "no Pending reply or rate measured yet"
            blamed = tuple(b.name for b in self._state.values() if b.pending is None)
        else:
            why = (
                f"stop-copy {_would_take(figures.expected_downtime)} "
                f"({_size(figures.pending_total)} pending at {_rate(figures.rate)}{self._with_backlog()}), over the "
                f"{_duration(self.config.downtime_limit)} limit after {self._rule_rounds(figures)} of "
                f"{self.config.max_rounds} rounds"
            )
            blamed = ()
        if self.config.wait_for_trigger:
            return self._give_up(
                now, GiveUpReason.TIMEOUT,
                f"pre-copy was not told to switch over within the {_duration(self.config.timeout)} timeout "
                f"(it waits for its trigger, such as QEMU's pre-switchover); meanwhile {why}. "
                "Raise the timeout, or see why the trigger did not come",
                blamed, figures,
            )
        return self._give_up(
            now, GiveUpReason.TIMEOUT,
            f"pre-copy did not converge within the {_duration(self.config.timeout)} timeout: {why}. "
            "Raise the timeout, or the downtime limit, or give the migration more bandwidth",
            blamed, figures,
        )

    def _with_backlog(self) -> str:
        """What rule 3 added for the destination, for a message ("" if nothing)."""
        parts = []
        if self._backlog.queued:
            parts.append(f"{_size(self._backlog.queued)} queued on the link")
        if self._backlog.handover:
            parts.append(f"a handover of {_duration(self._backlog.handover)}")
        return f", with {' and '.join(parts)}" if parts else ""

    # -- plumbing --

    def _current(self, now: float) -> Decision:
        if self._final is not None:
            return self._final
        if self._phase is Phase.STOP_COPY:
            waiting = tuple(b.name for b in self._state.values() if b.ended is None)
            return AwaitStopCopy(waiting, self.next_deadline())
        return Continue(self.next_deadline())

    def _set_phase(self, phase: Phase, why: str) -> None:
        if phase not in _NEXT_PHASES[self._phase]:
            raise RuntimeError(f"pre-copy plan: no way from {self._phase} to {phase}")
        _log.info("pre-copy plan: %s -> %s: %s", self._phase, phase, why)
        self._phase = phase

    def _check_time(self, now: float) -> None:
        if not math.isfinite(now) or now < self.now:
            raise ValueError(f"time went backwards (or is not finite): {now!r} after {self.now!r}")

    def _backend(self, name: str) -> _Backend:
        try:
            return self._state[name]
        except KeyError:
            raise ValueError(f"unknown back-end {name!r} (the plan has: {', '.join(self._state)})") from None

    def _check_observations(self, observations: list[Observation]) -> None:
        seen = [o.backend for o in observations]
        for name in seen:
            self._backend(name)
        if len(set(seen)) != len(seen) or len(seen) != len(self._state):
            missing = sorted(set(self._state) - set(seen))
            raise ValueError(f"a tick needs one observation per back-end: missing {missing}, got {seen}")
        for obs in observations:
            before = self._state[obs.backend].received
            if obs.received < before:
                raise ValueError(f"back-end {obs.backend!r}: received went back from {before} to {obs.received}")


def _names(names: Sequence[str]) -> str:
    quoted = [repr(n) for n in names]
    if len(quoted) == 1:
        return f"back-end {quoted[0]}"
    return "back-ends " + ", ".join(quoted)


def _size(n: float | None) -> str:
    return "an unknown amount" if n is None else size(n)


def _rate(n: float | None) -> str:
    return "an unknown rate" if n is None else f"{_size(n)}/s"


def _would_take(seconds: float | None) -> str:
    if seconds is not None and math.isinf(seconds):
        return "would not end at the rates measured (a back-end with data pending sent nothing in the last window)"
    return f"would take about {_duration(seconds)}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.3g} s"
