"""A live save: iterative pre-copy of several back-ends into one saved file.

The I/O side of :class:`~.precopy.PreCopyPlan`.  Every back-end gets a pipe
and ``SavePreCopy``; its stream is pumped into the saved file (the same
container as a one-shot save, so ``load`` reads it unchanged) while the
daemons serve on.  Every :data:`TICK` seconds, or sooner when the plan asks,
each back-end's ``Pending()`` and ``Check()`` and the bytes received are fed
to the plan, whose decision is carried out: keep going; switch over
(``StopCopy`` on every back-end at once: the downtime starts); or give up.

A back-end's stop-copy has ended when its pump reached the end of its stream
(the writer verified the trailer as it passed) and its ``TransferFinished``
reported success; the last such end closes the downtime.  Then the file is
committed (fsync, rename).  The container may go elsewhere than a file: a
migration (:mod:`.migrate`) gives a writer that sends it over a connection,
whose commit is the destination's acknowledgement.  On success the back-ends stay ``stopped``, their
state frozen as it is in the file (as QEMU leaves a VM after a migration to
a file), unless ``resume`` is asked for.

Failure handling: any failure (a back-end's, the plan giving up, the
``watch`` future failing, the commit failing, our own cancellation) stops
every transfer this save started (``CancelTransfer``), waits for the pumps,
and resumes every back-end that had already reached ``stopped``: each serves
on with its state untouched, and no file appears under the final name.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from ..fds import enlarge_pipe
from ..errors import BackendFailed, LinkFailed, NoBackends, PeerRefused, StreamError, VMStateError
from ..names import VMSTATE2
from .calls import CALL_TIMEOUT, CLEANUP_TIMEOUT, SignalWatch, call
from .discovery import BackendInfo
from .precopy import (
    AwaitStopCopy,
    Continue,
    Counters,
    Finished,
    GiveUp,
    Observation,
    PendingReply,
    PreCopyConfig,
    PreCopyPlan,
    Status,
    Summary,
    SwitchOver,
)
from .savefile import ContainerSink, SaveFileWriter, save_target
from .pump import CLOSE_TIMEOUT, StreamPump, Throttle
from .transfers import Operation, Progress, in_thread, labelled, reported_failure, wait_regardless, watch_outcome

TICK = 0.1
"""Seconds between two looks at the back-ends' estimates."""

AWAY = 3.0
"""Seconds between two looks beyond which we were not running (a tick takes
at most OBSERVE_TIMEOUT plus TICK)."""

OBSERVE_TIMEOUT = 1.0
"""Seconds a back-end has to answer a tick's Check or Pending.  One that does
not (stopped, hung) is asked again at the next tick, and the plan's stall
rule judges it: a call that waited longer would hold every tick, and so the
plan's own timeouts, behind it."""


class _InitialSignals(SignalWatch):
    """Notes which back-ends have emitted InitialDataSent."""

    MEMBER = "InitialDataSent"

    def __init__(self, bus: MessageBus, wake: asyncio.Event) -> None:
        super().__init__(bus)
        self._wake = wake
        self.senders: set[str] = set()

    def on_signal(self, msg: Message) -> None:
        self.senders.add(msg.sender or "")
        self._wake.set()


class _Source:
    """One back-end of the live save."""

    def __init__(self, backend: BackendInfo) -> None:
        self.backend = backend
        self.number: int | None = None
        self.streamer: StreamPump | None = None
        self.pump: asyncio.Task[None] | None = None
        self.outcome: asyncio.Task[Any] | None = None
        self.counters: Counters | None = None
        self.done = False


async def save_live(
    bus: MessageBus,
    backends: Sequence[BackendInfo],
    path: str | os.PathLike[str] | ContainerSink,
    options: dict[str, Variant] | None = None,
    config: PreCopyConfig | None = None,
    progress: Progress | None = None,
    *,
    on_status: Callable[[Status], None] | None = None,
    on_switch_over: Callable[[float], None] | None = None,
    switch_over: asyncio.Event | None = None,
    watch: asyncio.Future[Any] | None = None,
    resume: bool = False,
    max_bandwidth: float | None = None,
    verify: bool = True,
    close_timeout: float = CLOSE_TIMEOUT,
) -> Summary:
    """Save ``backends`` live into one new file at ``path``, or into a sink.

    Args:
        path: the file, or a :class:`~.savefile.ContainerSink` that takes
            the container (its commit ends the save: a migration's waits for
            the destination's acknowledgement).
        options: SavePreCopy options (``compression``, ``level``, ``workers``).
        config: the plan's limits (downtime limit, rounds, timeouts, force).
        progress: updated with the bytes received per back-end.
        on_status: called with the plan's status after every tick.
        on_switch_over: called with the ``time.monotonic()`` of the
            switch-over (StopCopy requested: the downtime starts).
        switch_over: set it to switch over now, whatever the plan says.
        watch: a future whose failure ends the save at once, with its error
            (a migration's destination refusing); until the commit.
        resume: resume the back-ends once the file is committed (else they
            stay ``stopped``).
        max_bandwidth: cap the total rate read from the back-ends, in bytes
            per second (QEMU's ``max-bandwidth``); None: no cap.
        verify: False to only skim the streams (as :func:`~.transfers.save_to_file`).
        close_timeout: seconds a back-end has to close its end of the pipe
            once its stream has ended or it reported its transfer finished.

    Returns:
        The plan's summary: bytes, rounds, times, the measured downtime.

    Raises:
        UnusableFile: ``path`` cannot take a saved file; no back-end was touched.
        NoBackends: ``backends`` is empty.
        MigrationAborted: the plan gave up (it says why, with the figures).
        VMStateError: a back-end failed (named).  In every failure no file
            is left under ``path`` and every back-end serves on.
    """
    if isinstance(path, str | os.PathLike):
        save_target(path)
    if not backends:
        raise NoBackends("no back-ends to save")
    progress = progress or Progress()
    progress.backends = len(backends)
    if isinstance(path, str | os.PathLike):
        writer: ContainerSink = await in_thread(SaveFileWriter, path, discard=SaveFileWriter.abort)
    else:
        writer = path
    operation = Operation(bus, backends)
    sources = [_Source(b) for b in backends]
    wake = asyncio.Event()
    throttle = Throttle(max_bandwidth) if max_bandwidth is not None else None
    try:
        async with operation.signals, _InitialSignals(bus, wake) as initial:
            progress.begin("pre-copy")
            try:
                for source in sources:
                    await _start(operation, writer, source, options or {}, wake,
                                 lambda fd, stream, b=source.backend: StreamPump(
                                     fd, writer, stream, b.id, progress, verify=verify,
                                     close_timeout=close_timeout, throttle=throttle))  # fmt: skip
                summary = await _drive(bus, sources, writer, initial, config, progress, wake, on_status,
                                       on_switch_over, switch_over, watch)  # fmt: skip
            except BaseException:
                writer.abandon()  # a connection is dropped now: no pump stays blocked on it
                await wait_regardless(asyncio.ensure_future(_abandon(bus, operation, sources)))
                raise
        progress.begin("syncing")
        try:
            await in_thread(writer.commit, stop=writer.abandon)
        except BaseException:  # the back-ends are stopped: they must serve on
            await wait_regardless(asyncio.ensure_future(_resume(bus, sources, CLEANUP_TIMEOUT)))
            raise
        progress.phase = "done"
    except BaseException:
        writer.abort()
        raise
    if resume:
        await _resume(bus, sources)
    return summary


async def _start(
    operation: Operation, writer: ContainerSink, source: _Source, options: dict[str, Variant], wake: asyncio.Event,
    make_pump: Callable[[int, int], StreamPump],
) -> None:
    backend = source.backend
    stream = writer.open_stream(backend.id)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pump = make_pump(read_end, stream)
    source.streamer = pump
    try:
        enlarge_pipe(read_end)
        source.number = await operation.start(backend, "SavePreCopy", write_end, options)
    except VMStateError as exc:
        pump.close()
        os.close(read_end)
        raise labelled(backend, exc) from exc
    except BaseException:
        pump.close()
        os.close(read_end)
        raise
    watched = watch_outcome(operation.signals, backend, source.number, pump)

    async def run_pump() -> None:
        try:
            await in_thread(pump.run, stop=pump.stop)
            writer.close_stream(stream)
        except StreamError as exc:
            # As in a one-shot save: a stream cut short because the back-end
            # ended its transfer is explained by its outcome if that comes
            # soon (cancelled, or the bus daemon gone: a back-end ends its
            # transfers when it loses the bus, and "does not verify" would
            # blame it for the bus's death).
            try:
                await reported_failure(watched)
            except VMStateError as reported:
                raise labelled(backend, reported) from exc
            raise labelled(backend, BackendFailed(f"its stream does not verify: {type(exc).__name__}: {exc}")) from exc
        except (LinkFailed, PeerRefused):
            raise  # the connection's, not this back-end's
        except VMStateError as exc:
            raise labelled(backend, exc) from exc
        finally:
            pump.close()
            os.close(read_end)
            wake.set()

    async def outcome() -> Any:
        try:
            return await watched
        except VMStateError as exc:
            raise labelled(backend, exc) from exc
        finally:
            wake.set()

    source.pump = asyncio.ensure_future(run_pump())
    source.outcome = asyncio.ensure_future(outcome())


async def _drive(
    bus: MessageBus, sources: list[_Source], sink: ContainerSink, initial: _InitialSignals,
    config: PreCopyConfig | None,
    progress: Progress, wake: asyncio.Event, on_status: Callable[[Status], None] | None,
    on_switch_over: Callable[[float], None] | None, switch_over: asyncio.Event | None,
    watch: asyncio.Future[Any] | None,
) -> Summary:
    """Tick the plan until it finishes; raise if it gives up, a back-end fails or ``watch`` fails."""
    plan = PreCopyPlan([s.backend.id for s in sources], time.monotonic(), config)
    switched = False
    last_tick = time.monotonic()
    while True:
        # Cleared before the tasks are looked at: a pump or an outcome that
        # ends from here on wakes the wait below at once (a wake-up lost to
        # the queries in between cost up to a tick of downtime).
        wake.clear()
        _raise_failures(sources)
        if watch is not None and watch.done() and watch.exception() is not None:
            raise watch.exception()
        now = time.monotonic()
        for source in sources:
            if source.done or not (source.pump.done() and source.outcome.done()):
                continue
            source.done = True
            finished = source.outcome.result()
            if finished is not None:
                source.counters = Counters(finished.raw_bytes, finished.stream_bytes)
            plan.stop_copy_finished(
                source.backend.id, now, received=progress.done.get(source.backend.id, 0), counters=source.counters
            )
        observations = await asyncio.gather(*(_observe(bus, s, initial, progress) for s in sources))
        if time.monotonic() - last_tick > AWAY:
            # We were not running (stopped, suspended): what the back-ends
            # did meanwhile (gave up on us, say) is queued on the bus and
            # says more than the silence the plan would see; let it land.
            await asyncio.sleep(TICK)
        last_tick = time.monotonic()
        # A back-end's own failure that came while we asked (its
        # TransferFinished) says more than what the plan would infer from its
        # silence: after this helper was stopped, say, its back-ends ended
        # their transfers because nothing read them, and the plan would call
        # them stuck.
        _raise_failures(sources)
        if switch_over is not None and switch_over.is_set() and not switched:
            decision = plan.switch_over_now(time.monotonic())
        else:
            decision = plan.tick(time.monotonic(), observations, sink.backlog())
        if isinstance(decision, SwitchOver) and not switched:
            switched = True
            progress.phase = "stop-copy"  # not begin(): the received counts go on
            if on_switch_over is not None:
                on_switch_over(decision.at)
            await asyncio.gather(*(  # a back-end that cannot answer in that time is stuck (rule 4)
                call(bus, s.backend.unique_name, VMSTATE2, "StopCopy", "t", [s.number],
                     timeout=plan.config.stall_timeout)
                for s in sources
            ))  # fmt: skip
        elif isinstance(decision, GiveUp):
            raise decision.error()
        elif isinstance(decision, Finished):
            return decision.summary
        if on_status is not None:
            on_status(plan.status(time.monotonic()))
        deadline = decision.deadline if isinstance(decision, Continue | AwaitStopCopy) else None
        timeout = TICK if deadline is None else max(0.0, min(TICK, deadline - time.monotonic()))
        waits = [asyncio.ensure_future(wake.wait())]
        if switch_over is not None and not switched:
            waits.append(asyncio.ensure_future(switch_over.wait()))
        if watch is not None:
            waits.append(asyncio.ensure_future(asyncio.wait({watch})))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


async def _observe(bus: MessageBus, source: _Source, initial: _InitialSignals, progress: Progress) -> Observation:
    backend = source.backend
    received = progress.done.get(backend.id, 0)
    if source.done:
        return Observation(backend.id, received, initial_data_sent=True)
    pending = None
    try:
        number, finished, _, raw, stream = await call(
            bus, backend.unique_name, VMSTATE2, "Check", timeout=OBSERVE_TIMEOUT
        )
        if number == source.number:
            source.counters = Counters(raw, stream)
            if not finished:  # once stopped, Pending no longer describes this transfer
                pending = PendingReply(
                    *await call(bus, backend.unique_name, VMSTATE2, "Pending", timeout=OBSERVE_TIMEOUT)
                )
    except VMStateError:
        pass  # its outcome (TransferFinished) will say what happened
    # A pump waiting for a migration's link to take what it read: the plan
    # must not count that as the back-end's stall (the link's I/O timeout
    # is the one to fire, and it names the link).
    held = source.streamer is not None and source.streamer.held
    return Observation(
        backend.id, received, pending, initial_data_sent=backend.unique_name in initial.senders, written=source.counters,
        held=held,
    )


def _raise_failures(sources: list[_Source]) -> None:
    for source in sources:
        for task in (source.pump, source.outcome):
            if task is not None and task.done() and task.exception() is not None:
                raise task.exception()


async def _abandon(bus: MessageBus, operation: Operation, sources: list[_Source]) -> None:
    """Stop our transfers, stop and wait for the pumps, and resume what was stopped."""
    await operation.stop()
    tasks = [t for s in sources for t in (s.pump, s.outcome) if t is not None]
    for task in tasks:  # a back-end that keeps its end open must not hold us up
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: the first failure speaks for all
    await _resume(bus, sources, CLEANUP_TIMEOUT)


async def _resume(bus: MessageBus, sources: list[_Source], timeout: float = CALL_TIMEOUT) -> None:
    """Resume every back-end we started a transfer on; after a failure, each
    within ``timeout`` (a stopped or hung one must not hold the command)."""
    for source in sources:
        if source.number is None:
            continue
        try:
            await call(bus, source.backend.unique_name, VMSTATE2, "Resume", timeout=timeout)
        except Exception:  # gone, or not stopped (Resume in running does nothing)
            pass
