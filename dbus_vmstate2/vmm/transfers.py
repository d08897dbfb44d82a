"""Save back-ends to a file over VMState2, and what every operation shares.

(Loading, all or nothing, is in :mod:`.loading`.)

The VMM side of a transfer: create a pipe, pass one end with ``Save`` or
``Load``, close our copy of that end once the reply is in (the bytes are then
surely on their way to the bus), and move the data between the other end and
the saved file in a worker thread.  Several back-ends move in parallel into
one container file (docs/stream-format.md, "saved file").  The outcome comes
from the ``TransferFinished`` signal, which names the transfer, with
``Check`` as the fallback: a pipe cannot carry a failure, and no call waits
longer than a moment, so no D-Bus timeout bites however large the state.

Failure handling: the first failure, or our own cancellation (SIGTERM in the
command), stops every other transfer *this operation started*: by number with
``CancelTransfer``, because ``Cancel()`` stops whatever the calling
connection started and one connection may run several operations; a
back-end that answered Busy runs someone else's transfer, which is left
alone.  Each back-end keeps its state and returns to ``running``; a save
writes no file under the final name; and the error raised is the first one,
naming the back-end.  No worker thread is ever abandoned: a cancelled
operation returns only once its threads have ended and its files are closed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from ..fds import enlarge_pipe
from ..errors import (
    BackendFailed,
    BusLost,
    Cancelled,
    ErrorName,
    NoBackends,
    StreamError,
    Unsupported,
    VMStateError,
    from_dbus_error,
)
from ..names import VMSTATE2
from ..stream.container import StreamInfo
from .calls import SignalWatch, call
from .discovery import NOT_VMSTATE2, BackendInfo
from .pump import CLOSE_TIMEOUT, StreamPump
from .savefile import SaveFileWriter, save_target

T = TypeVar("T")

STALL_TIMEOUT = 30.0
"""Seconds a back-end may neither write (save) nor read (load) its stream in
the middle of it before the operation fails."""

STOP_TIMEOUT = 5.0
"""Seconds a back-end has to answer the Cancel of a failed operation; one that
is stopped or hung ends its transfer itself once its stall timeout passes."""


@dataclass
class Progress:
    """What an operation has done so far, for a progress display.

    The operation sets the phase; its worker threads update ``done``.
    """

    phase: str = "starting"
    """``verifying`` (a load of a back-end without two-phase loads reads the
    whole file first), ``saving``, ``loading``, ``committing`` (a load's
    back-ends all staged, and told to commit), ``syncing`` (a save's final
    fsync and rename) or ``done``."""
    backends: int = 0
    """How many back-ends the operation moves."""
    done: dict[str, int] = field(default_factory=dict)
    """Stream bytes moved (or verified) in this phase, per back-end Id."""
    expected: dict[str, int] = field(default_factory=dict)
    """Stream bytes this phase will move, per back-end Id; empty when not
    known in advance (a save: back-ends do not announce their size)."""
    started: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` at the start of the phase."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Each back-end's transfer time, from its Save or Load call to its
    outcome, once it has succeeded."""

    def begin(self, phase: str, expected: dict[str, int] | None = None) -> None:
        """Start a new phase: clear ``done`` and restart the clock."""
        self.done = {}
        self.expected = dict(expected or {})
        self.started = time.monotonic()
        self.phase = phase


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one transfer ended, from its TransferFinished signal."""

    number: int
    error_name: str
    message: str
    records: int
    raw_bytes: int
    stream_bytes: int

    def raise_error(self) -> None:
        """Raise the transfer's error, if it failed."""
        if self.error_name:
            raise from_dbus_error(self.error_name, self.message)


class FinishedSignals(SignalWatch):
    """Records every TransferFinished outcome and wakes the waiters."""

    MEMBER = "TransferFinished"

    def __init__(self, bus: MessageBus) -> None:
        super().__init__(bus)
        self._events: dict[str, asyncio.Event] = {}
        self._outcomes: dict[tuple[str, int], Outcome] = {}

    def on_signal(self, msg: Message) -> None:
        if msg.signature == "tsssttt" and msg.sender:
            number, _, error_name, message, records, raw_bytes, stream_bytes = msg.body
            self._outcomes[(msg.sender, number)] = Outcome(number, error_name, message, records, raw_bytes, stream_bytes)
            self._event(msg.sender).set()

    def outcome(self, backend: BackendInfo, number: int) -> Outcome | None:
        """Transfer ``number``'s outcome, if its signal has come."""
        return self._outcomes.get((backend.unique_name, number))

    def _event(self, sender: str) -> asyncio.Event:
        return self._events.setdefault(sender, asyncio.Event())

    async def wait_finished(self, backend: BackendInfo, number: int) -> Outcome | None:
        """Return once transfer ``number`` of ``backend`` has succeeded.

        The signal names its transfer, so a later transfer (another VMM
        helper's) cannot be mistaken for ours.  ``Check`` covers a lost
        signal; it reports only the latest transfer, but a back-end emits a
        transfer's signal before it can start the next one, and the bus
        delivers one sender's messages in order: when Check shows a later
        transfer, or fails, our transfer's signal is already recorded.

        Returns:
            The outcome from the signal (None if only Check saw it end).

        Raises:
            VMStateError: the transfer failed (the back-end's own error), or
                the back-end is gone.
        """
        event = self._event(backend.unique_name)
        key = (backend.unique_name, number)
        while True:
            event.clear()
            if (outcome := self._outcomes.get(key)) is not None:
                outcome.raise_error()
                return outcome
            try:
                latest, finished, *_ = await call(self._bus, backend.unique_name, VMSTATE2, "Check")
            except VMStateError:
                if key not in self._outcomes:
                    raise  # the latest transfer's error, and the latest is ours
                continue
            if latest == number and finished:
                return self._outcomes.get(key)
            if latest != number and key not in self._outcomes:
                raise VMStateError(f"transfer #{number} was superseded by #{latest} on the back-end, with no outcome seen")
            if latest == number:
                # Not wait_for: on Python 3.11 it can swallow our own
                # cancellation when the event fires at the same moment.
                waiter = asyncio.ensure_future(event.wait())
                try:
                    await asyncio.wait({waiter}, timeout=1.0)  # a lost signal costs a second, not a hang
                finally:
                    waiter.cancel()


@dataclass
class _Transfer:
    """One back-end's part of an operation, as far as we know it."""

    backend: BackendInfo
    call: asyncio.Task[list[Any]] | None = None
    """The Save or Load call, once made."""


class Operation:
    """The transfers of one save or load: started together, stopped together.

    Only what this operation started is ever stopped: a transfer whose
    number we hold is stopped with ``CancelTransfer``; a call that was made
    but whose reply never came (the bus timed it out) with ``Cancel()``,
    which the back-end applies only to its caller's own transfer.
    """

    def __init__(self, bus: MessageBus, backends: Sequence[BackendInfo]) -> None:
        self.bus = bus
        self.transfers = {b.unique_name: _Transfer(b) for b in backends}
        self.signals = FinishedSignals(bus)
        self._stopping = False

    async def start(self, backend: BackendInfo, member: str, fd: int, options: dict[str, Variant]) -> int:
        """Call Save or Load with ``fd``; our copy of ``fd`` is closed once the reply is in.

        Raises:
            Cancelled: the operation is being stopped (no call is made).
            Unsupported: the back-end has no VMState2.
            VMStateError: the back-end refused (Busy, ...).
        """
        transfer = self.transfers[backend.unique_name]
        if self._stopping:
            os.close(fd)
            raise Cancelled("the operation was stopped before this back-end's transfer started")
        # A task of its own, so that our cancellation never loses the reply:
        # the transfer number is what lets stop() end that transfer only.
        transfer.call = asyncio.ensure_future(self._call(backend, member, fd, options))
        try:
            [number] = await asyncio.shield(transfer.call)
        except VMStateError as exc:
            if exc.remote_name in NOT_VMSTATE2:
                raise Unsupported(
                    "it serves only org.qemu.VMState1 (QEMU's dbus-vmstate, at most 1 MiB): migrate it with QEMU"
                ) from exc
            raise
        return number

    async def _call(self, backend: BackendInfo, member: str, fd: int, options: dict[str, Variant]) -> list[Any]:
        try:
            return await call(self.bus, backend.unique_name, VMSTATE2, member, "ha{sv}", [0, options], unix_fds=[fd])
        finally:
            os.close(fd)

    async def stop(self) -> None:
        """Stop every transfer this operation started; start no more."""
        self._stopping = True
        for transfer in self.transfers.values():
            if transfer.call is None:
                continue
            await wait_regardless(transfer.call)
            try:
                if transfer.call.cancelled():
                    continue
                if (exc := transfer.call.exception()) is None:
                    [number] = transfer.call.result()
                    await call(self.bus, transfer.backend.unique_name, VMSTATE2, "CancelTransfer", "t", [number],
                               timeout=STOP_TIMEOUT)  # fmt: skip
                elif isinstance(exc, VMStateError) and exc.remote_name in (*ErrorName, *NOT_VMSTATE2):
                    continue  # refused (Busy, ...): nothing of ours runs there
                else:
                    await call(self.bus, transfer.backend.unique_name, VMSTATE2, "Cancel", timeout=STOP_TIMEOUT)
            except Exception:  # a back-end (or a bus) that is gone has nothing to cancel
                pass

    async def run(self, jobs: list[Coroutine[Any, Any, T]]) -> list[T]:
        """Run ``jobs`` together; on the first failure, or if we are cancelled
        ourselves, stop this operation's transfers, cancel every job (its
        pump stops at once, whatever its back-end does with its end), wait
        for every job, and raise.

        Every job's exception is retrieved here: the first failure speaks for
        all, and no "exception was never retrieved" is left behind.
        """
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            except asyncio.CancelledError:
                await self._stop_and_wait(tasks)
                raise
            failed = [t.exception() for t in tasks if t.done() and t.exception() is not None]
            if failed:
                await self._stop_and_wait(tasks)
                raise failed[0]
            return [t.result() for t in tasks]
        finally:
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()

    async def _stop_and_wait(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Stop our transfers, cancel every job and wait for it; not cut short by a cancellation."""

        async def stop_and_wait() -> None:
            await self.stop()
            for task in tasks:  # its pump stops at once, even if its back-end keeps its end open
                task.cancel()
            await asyncio.wait(tasks)

        cleanup = asyncio.ensure_future(stop_and_wait())
        await wait_regardless(cleanup)
        if not cleanup.cancelled():
            cleanup.exception()  # stop() already ignores a back-end that is gone


async def wait_regardless(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, even if we are cancelled meanwhile.

    For clean-up that must not be cut short (stopping the back-ends' transfers,
    a worker thread that holds our files); the caller re-raises its own
    cancellation afterwards.  The future's outcome is left to the caller.
    """
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            continue


async def in_thread(
    fn: Callable[..., T], *args: Any, stop: Callable[[], None] | None = None, discard: Callable[[T], None] | None = None
) -> T:
    """Run ``fn(*args)`` in a worker thread and return its result.

    If we are cancelled, the thread is never abandoned: ``stop()`` asks it
    to end early, we wait for it, ``discard(result)`` releases what it made,
    and the cancellation goes on.
    """
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if stop is not None:
            stop()
        await wait_regardless(future)
        if not future.cancelled() and future.exception() is None and discard is not None:
            discard(future.result())
        raise


def labelled(backend: BackendInfo, exc: VMStateError) -> VMStateError:
    label = f"back-end {backend.id!r}"
    labelled = type(exc)(str(exc) if str(exc).startswith(label) else f"{label}: {exc}")
    labelled.remote_name = exc.remote_name
    return labelled


async def save_to_file(
    bus: MessageBus,
    backends: Sequence[BackendInfo],
    path: str | os.PathLike[str],
    options: dict[str, Variant] | None = None,
    progress: Progress | None = None,
    *,
    verify: bool = True,
    close_timeout: float = CLOSE_TIMEOUT,
    stall_timeout: float | None = STALL_TIMEOUT,
) -> list[StreamInfo]:
    """Save every back-end in ``backends`` into one new file at ``path``.

    Each stream is decoded as it arrives, by default completely (every
    payload's check, every zstd frame with bounded output: what ``load``
    does), so that a file this returns is one that loads.

    Args:
        path: a regular file (replaced atomically), a new name, or a link to
            a regular file (which is replaced; the link stays).
        options: VMState2 Save options (``compression``, ``level``, ``workers``).
        progress: updated with the phase and the bytes received per back-end.
        verify: False to only skim the streams (framing, counts and digest;
            not the payloads: docs/stream-format.md §6.4).
        close_timeout: seconds a back-end has to close its end of the pipe
            once its stream has ended or it reported its transfer finished.
        stall_timeout: seconds a back-end may send nothing in the middle of
            its stream (stopped, hung) before the save fails; None: no bound.

    Returns:
        The file's index entries, one per back-end, in ``backends`` order.

    Raises:
        UnusableFile: ``path`` cannot take a saved file; no back-end was touched.
        NoBackends: ``backends`` is empty.
        BackendFailed: a back-end wrote a stream that does not verify, or did
            not close its end of the pipe in time.
        VMStateError: the first failure, naming its back-end; no file is
            left under ``path`` and every back-end keeps its state.
    """
    save_target(path)
    if not backends:
        raise NoBackends("no back-ends to save")
    progress = progress or Progress()
    progress.backends = len(backends)
    writer = await in_thread(SaveFileWriter, path, discard=SaveFileWriter.abort)
    try:
        operation = Operation(bus, backends)
        async with operation.signals:
            progress.begin("saving")
            jobs = [_save_one(operation, writer, b, options or {}, progress, verify, close_timeout, stall_timeout) for b in backends]
            infos = await operation.run(jobs)
        progress.begin("syncing")
        await in_thread(writer.commit, stop=writer.abandon)
        progress.phase = "done"
    except BaseException:
        writer.abort()
        raise
    return infos


async def _save_one(
    operation: Operation, writer: SaveFileWriter, backend: BackendInfo, options: dict[str, Variant], progress: Progress,
    verify: bool, close_timeout: float, stall_timeout: float | None,
) -> StreamInfo:
    stream = writer.open_stream(backend.id)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    started = time.monotonic()
    pump = StreamPump(read_end, writer, stream, backend.id, progress, verify=verify, close_timeout=close_timeout,
                      stall_timeout=stall_timeout)  # fmt: skip
    outcome: asyncio.Future[Outcome | None] | None = None
    try:
        enlarge_pipe(read_end)
        try:
            number = await operation.start(backend, "Save", write_end, options)
            outcome = watch_outcome(operation.signals, backend, number, pump)
            try:
                await in_thread(pump.run, stop=pump.stop)
                info = writer.close_stream(stream)
            except StreamError as exc:
                # A stream that does not verify on save is the back-end's
                # failure, not a bad file (exit 1, not 3).  If it can say why
                # (it was cancelled, its save raised, a record was too
                # large), that is the error to show.
                await reported_failure(outcome)
                raise BackendFailed(f"its stream does not verify: {type(exc).__name__}: {exc}") from exc
            await outcome
        except VMStateError as exc:
            raise labelled(backend, exc) from exc
    finally:
        if outcome is not None and not outcome.done():
            outcome.cancel()
            await wait_regardless(outcome)
        pump.close()
        os.close(read_end)
    progress.seconds[backend.id] = time.monotonic() - started
    return info


def watch_outcome(signals: FinishedSignals, backend: BackendInfo, number: int, pump: StreamPump) -> asyncio.Future[Outcome | None]:
    """Wait for transfer ``number``'s outcome beside its pump, and tell the
    pump: a success starts its close timeout, a failure stops it with the
    back-end's own error."""
    outcome = asyncio.ensure_future(signals.wait_finished(backend, number))

    def tell(future: asyncio.Future[Outcome | None]) -> None:
        if not future.cancelled():
            pump.backend_finished(future.exception())

    outcome.add_done_callback(tell)
    return outcome


async def reported_failure(outcome: asyncio.Future[Outcome | None]) -> None:
    """Raise the back-end's own error from ``outcome``, if it reports one soon."""
    try:
        async with asyncio.timeout(5.0):
            await asyncio.shield(outcome)
    except VMStateError as reported:
        if reported.remote_name in set(ErrorName) or isinstance(reported, BusLost):  # the bus died: say so
            raise
    except TimeoutError:
        pass

