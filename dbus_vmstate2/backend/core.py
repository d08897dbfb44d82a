"""The back-end helper library's asyncio core: one daemon's presence on the bus.

Theory of operation: a daemon builds a :class:`Backend` with its Id and its
state (a :class:`~.daemon.Daemon`, or a save and a load callable), and awaits
:meth:`Backend.start` once, *before* it sandboxes itself.  That starts the
back-end's worker threads and warms up the codecs (:mod:`.workers`), connects
to the bus, exports ``/org/qemu/VMState1`` with org.qemu.VMState1 and
org.qemu.VMState2, and queues on the bus names.  From then on the library
opens no socket or file and starts no thread of its own: QEMU or the
dbus-vmstate2 VMM helper drives it over that one connection, and the state
moves through fds that arrive on it.

This module is the thin adapter between the bus and the pure state machine
of :mod:`dbus_vmstate2.states`: every request and every transfer's outcome is
fed to the :class:`~dbus_vmstate2.states.Machine`, and the adapter carries
out the effects it returns (start a transfer's worker, cancel it, ask it for
stop-copy, resume the daemon, report the outcome).  It decides nothing of
its own: Busy, InvalidState and which transfer a Cancel applies to all come
from the table.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import DBusError, Message, MessageType, NameFlag, Variant
from dbus_fast.aio import MessageBus

from ..bus import SplitBytes, open_bus, sends_unjoined
from ..errors import BackendFailed, InvalidState, Unsupported, VMStateError
from ..names import OBJECT_PATH, VMSTATE1, VMSTATE1_SIZE_LIMIT, VMSTATE2, check_id
from ..states import Effect, Event, Machine, State, Step, Transfer
from ..stream import FORMAT_VERSION, MAX_RECORD_SIZE, Compression, Record, RecordType
from .boundary import call_daemon, daemon_failed, log, log_exception
from .callers import CallerGate, default_allowed_uids
from .channel import Channel
from .daemon import Daemon, LoadCallable, Pending, PreCopyDaemon, SaveCallable, as_daemon
from .fdguard import READ, WRITE, FdGuard
from .inline import InlineMode, decode_inline, inline_blob
from .notify import Notifier
from .precopy import PreCopyControl, precopy_stream
from .records import BytesLike, SaveResult, iter_records, nbytes
from .staging import LoadOptions, OwnerWatch, StagedGate
from .transfers import LoadOutcome, Progress, SaveOptions, load_stream, save_stream
from .vmstate1 import VMState1Interface
from .vmstate2 import VMState2Interface
from .workers import Workers

FD_METHODS = [("Save", "ha{sv}", WRITE), ("SavePreCopy", "ha{sv}", WRITE), ("Load", "ha{sv}", READ)]
STALL_TIMEOUT = 60.0
"""Seconds a transfer may wait for a peer that neither reads nor writes."""

GUARDED_MEMBERS = {
    "Save", "SavePreCopy", "StopCopy", "Resume", "Pending", "Load", "Commit", "Check", "Cancel", "CancelTransfer",
    "Reset",
}
"""The methods of both interfaces, for a call that names no interface."""


@dataclass
class Job:
    """The I/O side of a transfer, beside the machine's record of it."""

    transfer: Transfer
    channel: Channel | None = None
    progress: Progress = field(default_factory=Progress)
    control: PreCopyControl | None = None
    """An iterative save's link to its worker thread."""
    gate: StagedGate | None = None
    """A two-phase load's link to its worker thread."""
    owner_watch: OwnerWatch | None = None
    """Watches, while a two-phase load is staged, for its VMM leaving the bus."""


class Backend:
    """A back-end on the bus, serving VMState1 and VMState2 for its daemon.

    Args:
        backend_id: the back-end's Id, 1 to 255 bytes, unique on the bus and
            stable across the migration (QEMU matches source and destination
            back-ends by it).
        daemon: the daemon's state, an object implementing
            :class:`~.daemon.Daemon` (and :class:`~.daemon.PreCopyDaemon` for
            iterative saves); or, in the library's first form, the daemon's
            save callable, with ``load`` its load callable.
        load: the load callable of the first form (it gets the records'
            payloads only); None with a daemon object.
        address: a D-Bus address such as ``unix:path=/run/vm1/bus``; the
            session bus when None.
        compression: how VMState1's inline blob may be compressed (a state
            that does not shrink is sent uncompressed).
        vmstate1: how to serve QEMU's org.qemu.VMState1: ``stream`` (the
            default: the blob is a verified stream), ``legacy`` (the raw
            state, as a daemon written by hand against QEMU's interface
            serves it; Load takes either) or ``off`` (VMState2 only; QEMU's
            dbus-vmstate never sees this back-end).  See backend/inline.py.
        allowed_uids: the Unix users whose connections may call the
            back-end's methods (backend/callers.py); default: the back-end's
            own user and root.  Others get AccessDenied; anyone the bus
            admits may still read the properties.
        stall_timeout: how long a transfer may wait for its peer to read or
            write, in seconds (default :data:`STALL_TIMEOUT`), before it ends
            as Cancelled, the state kept; None: no bound.
        notify: speak systemd's readiness protocol (a ``Type=notify``
            unit): :meth:`start` connects to ``$NOTIFY_SOCKET`` first and
            sends ``READY=1`` once the back-end is on the bus, every state
            change sets the unit's ``STATUS=``, and :meth:`stop` sends
            ``STOPPING=1``.  Without ``$NOTIFY_SOCKET`` it does nothing.
            See backend/notify.py.

    Raises:
        TypeError: not a daemon, or a load that is a coroutine function.
    """

    def __init__(
        self,
        backend_id: str,
        daemon: Daemon | SaveCallable,
        load: LoadCallable | None = None,
        *,
        address: str | None = None,
        compression: Compression = Compression.ZSTD,
        vmstate1: InlineMode | str = InlineMode.STREAM,
        allowed_uids: Iterable[int] | None = None,
        stall_timeout: float | None = STALL_TIMEOUT,
        notify: bool = False,
    ) -> None:
        self.id = check_id(backend_id)
        self.allowed_uids = default_allowed_uids() if allowed_uids is None else frozenset(allowed_uids)
        self._stall_timeout = stall_timeout
        self._daemon = as_daemon(daemon, load)
        self._iterative = isinstance(self._daemon, PreCopyDaemon)
        self._address = address
        self._compression = compression
        self._inline_mode = InlineMode(vmstate1)
        self._notify = notify
        self._notifier = Notifier(None)
        self._bus: MessageBus | None = None
        self._workers = Workers()
        self._vmstate2 = VMState2Interface(self)
        self._machine = Machine()
        self._job: Job | None = None
        """The latest transfer's I/O side, running or finished."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._caller: str | None = None

    @property
    def state(self) -> State:
        """The migration state (the ``State`` property)."""
        return self._machine.state

    @property
    def unique_name(self) -> str:
        """This back-end's unique bus name (``:1.N``); only once started."""
        if self._bus is None or self._bus.unique_name is None:
            raise RuntimeError("the back-end is not started")
        return self._bus.unique_name

    async def start(self) -> None:
        """Start the worker threads, connect, export the object and queue on
        the bus names: everything the back-end will need, so that the daemon
        may sandbox itself as soon as this returns.

        A queued name request is success: QEMU enumerates every queued
        owner.  A name the bus's policy refuses is logged with what still
        works (a bus that lets helpers own only org.qemu.VMState1, as QEMU's
        own test bus does, still gets VMState1); only a bus that refuses
        every name is an error.

        With ``notify``, the connection to systemd's notification socket is
        made first, and ``READY=1`` is the last thing start() does.

        Raises:
            OSError, dbus_fast.AuthError, ...: the bus cannot be reached,
                or (``notify``) ``$NOTIFY_SOCKET`` cannot.
            ValueError: (``notify``) ``$NOTIFY_SOCKET`` is not a path or
                an abstract socket name.
            PermissionError: the bus's policy refuses every name we need.
            RuntimeError: already started, or a thread cannot be started.
        """
        if self._notify and not self._notifier.enabled:
            self._notifier = Notifier.from_environment()
        try:
            await self._workers.start()
            try:
                self._bus = await self._register()
            except BaseException:
                self._workers.shutdown()
                raise
        except BaseException:
            self._notifier.close()
            raise
        self._notifier.ready(self._status_line())

    def _status_line(self) -> str:
        """The unit's STATUS= line: who we are on the bus, and our state."""
        name = self._bus.unique_name if self._bus is not None else None
        return f"back-end {self.id!r} is {name or 'not on the bus'}, {self.state.value}"

    async def _register(self) -> MessageBus:
        bus = await open_bus(self._address)
        try:
            gate = CallerGate(bus, OBJECT_PATH, {VMSTATE1, VMSTATE2}, self.allowed_uids)
            gate.watch_members(GUARDED_MEMBERS)
            bus.add_message_handler(gate)  # first: a call it holds reaches the others once
            await gate.start()
            bus.add_message_handler(FdGuard(OBJECT_PATH, VMSTATE2, FD_METHODS))
            bus.add_message_handler(self._note_caller)
            names = [VMSTATE2]
            if self._inline_mode is not InlineMode.OFF:
                bus.export(OBJECT_PATH, VMState1Interface(self))
                names.insert(0, VMSTATE1)
            bus.export(OBJECT_PATH, self._vmstate2)
            queued = await self._request_names(bus, names)
        except BaseException:
            bus.disconnect()
            raise
        log.info("back-end %r is %s (%s)", self.id, bus.unique_name, ", ".join(f"{n}: {r}" for n, r in queued.items()))
        return bus

    async def _request_names(self, bus: MessageBus, names: list[str]) -> dict[str, str]:
        """Queue on ``names``; return how each request went, refusals logged."""
        outcome, refused = {}, []
        for name in names:
            try:
                outcome[name] = (await bus.request_name(name, NameFlag.NONE)).name.lower().replace("_", " ")
            except DBusError as exc:
                outcome[name] = "refused"
                refused.append(f"{name} ({exc.type}: {exc.text})")
        if len(refused) == len(names):
            raise PermissionError(f"back-end {self.id!r}: the bus refused every name it needs: {'; '.join(refused)}")
        if refused:
            if outcome.get(VMSTATE1, "refused") == "refused":
                works = "VMState2 still works (a VMM finds it in the org.qemu.VMState2 queue), QEMU's dbus-vmstate does not see it"
            else:
                works = ("QEMU's dbus-vmstate (VMState1, up to 1 MiB) still works, and a VMM finds it for VMState2 "
                         "in the org.qemu.VMState1 queue where the bus lets it call this back-end")
            log.warning("back-end %r: the bus refused %s: %s", self.id, "; ".join(refused), works)
        return outcome

    async def stop(self) -> None:
        """Cancel a running transfer, leave the bus and let the worker threads
        end; safe to call more than once."""
        self._notifier.stopping()
        running = self._machine.transfer
        if running is not None and not running.finished:
            self._handle(Event.CANCEL_TRANSFER, number=running.number)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._workers.shutdown()
        if self._bus is not None and self._bus.connected:
            self._bus.disconnect()
            await self._bus.wait_for_disconnect()
        self._notifier.close()

    async def wait_closed(self) -> None:
        """Wait until the bus connection ends (the bus daemon went away, or stop())."""
        if self._bus is None:
            raise RuntimeError("the back-end is not started")
        try:
            await self._bus.wait_for_disconnect()
        except Exception as exc:
            log.warning("back-end %r lost the bus: %s", self.id, exc)

    async def __aenter__(self) -> Backend:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _note_caller(self, msg: Message) -> None:
        # dbus-fast gives a method no access to its message, but it runs the
        # message handlers and then a plain (non-coroutine) method in one
        # synchronous step: Save, Load and Cancel read the caller noted here.
        if msg.message_type is MessageType.METHOD_CALL and msg.path == OBJECT_PATH:
            self._caller = msg.sender

    # -- the adapter: requests in, effects out -----------------------------------

    def _handle(self, event: Event, *, number: int | None = None, error: VMStateError | None = None) -> Step:
        """Feed ``event`` to the machine and carry out the effects it returns
        (the transfer-starting ones are the caller's)."""
        step = self._machine.handle(event, time.monotonic(), caller=self._caller or "", number=number, error=error)
        if step.changed:
            log.info("back-end %r: %s -> %s (%s)", self.id, step.before, step.after, event)
            self._vmstate2.state_changed(step.after.value)
            if self._notifier.enabled:
                self._notifier.status(self._status_line())
        job = self._job
        for effect in step.effects:
            if effect is Effect.CANCEL and job is not None:
                log.info("back-end %r: cancelling %s #%d", self.id, job.transfer.operation, job.transfer.number)
                if job.channel is not None:
                    job.channel.cancel()
                if job.control is not None:
                    job.control.wake()
                if job.gate is not None:
                    job.gate.discard()
            elif effect is Effect.ANNOUNCE_STAGED and job is not None:
                self._announce_staged(job)
            elif effect is Effect.COMMIT and job is not None and job.gate is not None:
                job.gate.commit()
            elif effect is Effect.STOP_COPY and job is not None and job.control is not None:
                job.control.request_stop_copy(self._workers.submit, self._daemon)
            elif effect is Effect.RESUME_DAEMON:
                self._resume_daemon()
            elif effect is Effect.FINISHED and job is not None:
                self._finished(job)
        return step

    def _resume_daemon(self) -> None:
        job = self._job
        if job is None or job.control is None:
            return  # never quiesced: nothing to resume
        try:
            job.control.resume(self._daemon)  # type: ignore[arg-type] - only iterative daemons quiesce
        except Exception as exc:
            log_exception(f"back-end {self.id!r}: the daemon's resume() raised; it may still be quiesced", exc)

    def _announce_staged(self, job: Job) -> None:
        log.info("back-end %r: load #%d verified and staged, waiting for Commit", self.id, job.transfer.number)
        self._vmstate2.emit(self._vmstate2.LoadStaged, job.transfer.number)
        if self._bus is not None and job.transfer.owner:
            job.owner_watch = OwnerWatch(self._bus, job.transfer.owner, lambda: self._owner_gone(job))
            self._spawn(job.owner_watch.start())

    def _owner_gone(self, job: Job) -> None:
        if job is self._job and self.state is State.STAGED and job.gate is not None:
            log.warning("back-end %r: the VMM of staged load #%d (%s) left the bus", self.id, job.transfer.number,
                        job.transfer.owner)  # fmt: skip
            job.gate.discard(f"the VMM that started it ({job.transfer.owner}) left the bus before Commit")
            self._handle(Event.CANCEL_TRANSFER, number=job.transfer.number)

    def _finished(self, job: Job) -> None:
        if job.owner_watch is not None:
            self._spawn(job.owner_watch.stop())
        if job.channel is not None:
            job.channel.close()
        transfer, progress, error = job.transfer, job.progress, job.transfer.error
        if error is None:
            log.info("back-end %r: %s #%d done, %d records, %d bytes", self.id, transfer.operation, transfer.number,
                     progress.records, progress.raw_bytes)
        else:
            log.warning("back-end %r: %s #%d failed: %s", self.id, transfer.operation, transfer.number, error)
        self._vmstate2.emit(
            self._vmstate2.TransferFinished, transfer.number, transfer.operation,
            error.dbus_name.value if error else "", str(error) if error else "",
            progress.records, progress.raw_bytes, progress.stream_bytes,
        )

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start(self, event: Event, fd: int, parse: Callable[[], Any], run: Callable[[Job, Any], Coroutine[Any, Any, None]]) -> int:
        """Start a transfer on ``fd`` (ours from now on): parse its options,
        take the machine's arc, and run it in the background."""
        try:
            options = parse()
        except BaseException:
            os.close(fd)
            raise
        channel = Channel(fd, self._stall_timeout)  # owns fd from here, closes it on its own failure
        try:
            step = self._handle(event)
        except BaseException:
            channel.close()
            raise
        job = self._job = Job(step.transfer, channel)
        self._spawn(run(job, options))
        return step.transfer.number

    async def _run(self, job: Job, work: Callable[[], Awaitable[None]], on_bug: Event) -> None:
        """Run a transfer's ``work`` and feed its outcome to the machine, whatever happens."""
        bug: BaseException | None = None
        try:
            await work()
        except LoadOutcome as exc:
            outcome, error = Event.LOAD_BROKE, exc.error
        except VMStateError as exc:
            outcome, error = Event.FAILED, exc
        except BaseException as exc:
            log_exception(f"{job.transfer.operation} #{job.transfer.number} failed", exc)
            outcome = on_bug
            error = BackendFailed(
                f"{job.transfer.operation} failed with an internal error ({type(exc).__name__}); see the back-end's log"
            )
            bug = None if isinstance(exc, Exception) else exc
        else:
            outcome, error = Event.SUCCEEDED, None
        self._handle(outcome, error=error)
        if bug is not None:
            raise bug

    async def _in_thread(self, job: Job, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` in a worker thread; if we are cancelled (the loop is
        shutting down), cancel the channel and wait for the thread, so that
        the fd is never closed under it."""
        future = asyncio.ensure_future(self._workers.run(fn, *args))
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if job.channel is not None:
                job.channel.cancel()
            if job.control is not None:
                job.control.wake()
            if job.gate is not None:
                job.gate.discard("the back-end is stopping")
            await asyncio.wait({future})
            raise

    # -- VMState2 -------------------------------------------------------------

    def capabilities(self) -> dict[str, Variant]:
        return {
            "stream-versions": Variant("au", [FORMAT_VERSION]),
            "compression": Variant("as", [c.name.lower() for c in Compression]),
            "max-record-size": Variant("t", MAX_RECORD_SIZE),
            "inline-size-limit": Variant("t", VMSTATE1_SIZE_LIMIT),
            "pre-copy": Variant("b", self._iterative),
            "two-phase-load": Variant("b", True),
            "vmstate1": Variant("s", self._inline_mode.value),
        }

    def start_save(self, fd: int, options: dict[str, Variant]) -> int:
        """Save: start a one-shot save of a snapshot into ``fd``, which we now own."""
        return self._start(Event.SAVE, fd, lambda: SaveOptions.from_dbus(options), self._run_save)

    def start_precopy(self, fd: int, options: dict[str, Variant]) -> int:
        """SavePreCopy: start an iterative save into ``fd``, which we now own."""

        def parse() -> SaveOptions:
            if not self._iterative:
                raise Unsupported(
                    f"back-end {self.id!r} cannot save iteratively (its daemon has no pre-copy support): use Save"
                )
            return SaveOptions.from_dbus(options)

        return self._start(Event.PRE_COPY, fd, parse, self._run_precopy)

    def start_load(self, fd: int, options: dict[str, Variant]) -> int:
        """Load: start reading a stream from ``fd``, which we now own."""
        return self._start(Event.LOAD, fd, lambda: LoadOptions.from_dbus(options), self._run_load)

    async def _run_save(self, job: Job, options: SaveOptions) -> None:
        async def work() -> None:
            state = await call_daemon("save", self._workers, self._daemon.save)
            await self._in_thread(job, save_stream, job.channel, self.id, state, options, job.progress, self._workers.submit)

        await self._run(job, work, on_bug=Event.FAILED)

    async def _run_precopy(self, job: Job, options: SaveOptions) -> None:
        loop = asyncio.get_running_loop()
        number = job.transfer.number

        def initial_sent() -> None:  # in the worker thread
            loop.call_soon_threadsafe(self._vmstate2.emit, self._vmstate2.InitialDataSent, number)

        job.control = PreCopyControl(initial_sent)

        async def work() -> None:
            await self._in_thread(
                job, precopy_stream, job.channel, self.id, self._daemon, options, job.progress, self._workers.submit,
                job.control,
            )

        await self._run(job, work, on_bug=Event.FAILED)

    async def _run_load(self, job: Job, options: LoadOptions) -> None:
        if options.explicit_commit:
            loop = asyncio.get_running_loop()

            def staged() -> None:  # in the worker thread
                loop.call_soon_threadsafe(self._on_staged, job)

            job.gate = StagedGate(options.commit_timeout, staged)

        async def work() -> None:
            await self._in_thread(
                job, load_stream, job.channel, self.id, self._daemon.load, job.progress, self._iterative,
                self._workers.submit, job.gate,
            )

        # A bug of ours in mid-load may have handed the daemon bad records.
        await self._run(job, work, on_bug=Event.LOAD_BROKE)

    def _on_staged(self, job: Job) -> None:
        if job is self._job and self.state is State.RESUMING and not job.transfer.finished:
            self._handle(Event.STAGED)

    def commit(self, number: int) -> None:
        """Commit: let the daemon apply staged load ``number``."""
        self._handle(Event.COMMIT, number=number)

    def check(self) -> tuple[int, bool, int, int, int]:
        """Check: the latest transfer's number, whether it finished, and its counters.

        Raises:
            InvalidState: no transfer yet.
            VMStateError: the latest transfer failed (a fresh copy of its error).
        """
        job = self._job
        if job is None:
            raise InvalidState(f"no transfer has been started on back-end {self.id!r}")
        self._raise_outcome(job.transfer)
        progress = job.progress
        return job.transfer.number, job.transfer.finished, progress.records, progress.raw_bytes, progress.stream_bytes

    def pending(self) -> tuple[int, int, int, int]:
        """Pending: (initial bytes, dirty bytes, stop-copy bytes, rounds)."""
        estimate = self._daemon.pending() if self._iterative else Pending()  # type: ignore[union-attr]
        job = self._job
        if self.state in (State.PRE_COPY, State.STOP_COPY) and job is not None and job.control is not None:
            remaining = estimate.initial_bytes + estimate.dirty_bytes
            return estimate.initial_bytes, estimate.dirty_bytes, remaining, job.control.rounds
        return 0, 0, estimate.total_bytes, 0

    def stop_copy(self, number: int) -> None:
        """StopCopy: quiesce the daemon and finish iterative save ``number``."""
        self._handle(Event.STOP_COPY, number=number)

    def resume(self) -> None:
        """Resume: let the daemon serve again after a completed stop-copy."""
        self._handle(Event.RESUME)

    def cancel_own(self) -> None:
        """Cancel: stop the running transfer if the calling connection started it."""
        self._handle(Event.CANCEL)

    def cancel_transfer(self, number: int) -> bool:
        """CancelTransfer: stop transfer ``number`` if it is the one running.

        Returns:
            True if it was running and is being stopped, else False.
        """
        return Effect.CANCEL in self._handle(Event.CANCEL_TRANSFER, number=number).effects

    def reset(self) -> None:
        """Reset: back to ``running`` (from ``error``, or a no-op in ``running``)."""
        self._handle(Event.RESET)

    # -- VMState1 -------------------------------------------------------------

    def signals_after_reply(self, call: asyncio.Task[Any]) -> None:
        """Send the signals of the VMState1 call ``call`` (its task) after its reply."""
        self._vmstate2.hold_signals_until(call)

    async def save_inline(self) -> SplitBytes:
        """VMState1 Save: the whole state as one blob of <= 1 MiB (backend/inline.py)."""
        step = self._handle(Event.SAVE)
        job = self._job = Job(step.transfer)
        blob = SplitBytes(())

        async def work() -> None:
            nonlocal blob
            save = self._daemon.save
            if inspect.iscoroutinefunction(save):
                state = await call_daemon("save", self._workers, save)
                blob = await call_daemon("save", self._workers, self._encode_inline, state, job.progress)
            else:  # one hop into a worker, not two: this is time inside QEMU's downtime
                blob = await call_daemon("save", self._workers, lambda: self._encode_inline(save(), job.progress))

        await self._run(job, work, on_bug=Event.FAILED)
        self._raise_outcome(job.transfer)
        if self._bus is not None and not sends_unjoined(self._bus):
            return bytes(blob)  # type: ignore[return-value] - dbus-fast's own writer takes only bytes
        return blob

    async def load_inline(self, blob: bytes) -> None:
        """VMState1 Load: verify the whole blob, then hand its records to the daemon."""
        step = self._handle(Event.LOAD)
        job = self._job = Job(step.transfer)
        load = self._daemon.load

        def verified() -> list[Record]:
            records = decode_inline(self.id, blob, self._inline_mode)
            if not self._iterative and any(r.type is not RecordType.DATA for r in records):
                raise Unsupported("the blob is an iterative save's, and this back-end's daemon takes only one-shot saves")
            progress = job.progress
            progress.records, progress.stream_bytes = len(records), len(blob)
            progress.raw_bytes = sum(r.raw_size for r in records)
            return records

        def verify_and_load() -> None:  # one hop into a worker, not two: time inside the downtime
            records = verified()
            try:
                load(iter(records))
            except VMStateError as exc:
                raise LoadOutcome(exc) from exc
            except Exception as exc:
                raise LoadOutcome(daemon_failed("load", exc)) from exc

        async def work() -> None:
            if not inspect.iscoroutinefunction(load):
                await self._workers.run(verify_and_load)
                return
            records = await self._workers.run(verified)
            try:
                await call_daemon("load", self._workers, load, iter(records))
            except VMStateError as exc:
                raise LoadOutcome(exc) from exc

        await self._run(job, work, on_bug=Event.LOAD_BROKE)
        self._raise_outcome(job.transfer)

    @staticmethod
    def _raise_outcome(transfer: Transfer) -> None:
        if transfer.error is not None:
            raise type(transfer.error)(str(transfer.error))

    def _encode_inline(self, state: SaveResult, progress: Progress) -> SplitBytes:
        def counted() -> Iterator[BytesLike]:
            for record in iter_records(state):
                progress.records += 1
                progress.raw_bytes += nbytes(record)
                yield record

        blob = inline_blob(self.id, counted(), self._compression, self._inline_mode)
        progress.stream_bytes = len(blob)
        return blob
