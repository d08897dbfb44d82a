"""The back-end helper library's asyncio core: one daemon's presence on the bus.

Theory of operation: a daemon builds a :class:`Backend` with its Id, a save
callable and a load callable, and awaits :meth:`Backend.start` once, *before*
it sandboxes itself.  That connects to the bus, exports ``/org/qemu/VMState1``
with org.qemu.VMState1 and org.qemu.VMState2, and queues on both bus names;
it also starts the back-end's worker threads and warms up the codecs
(:mod:`.workers`).  From then on the library opens no socket or file and
starts no thread of its own: QEMU or the dbus-vmstate2 VMM helper drives it
over that one connection, and the state moves through fds that arrive on it.

The daemon's callables:

* ``save()`` returns the state: one bytes-like object, or an iterable of
  bytes-like records (each at most ``stream.MAX_RECORD_SIZE``).  It may be a
  coroutine function (awaited on the loop: take a consistent snapshot there)
  or a plain function (run in a worker thread); the iterable is consumed in
  the transfer's worker thread, one record at a time.  A record must not
  change once yielded, until the save has ended: it is written while the
  next one is made (yield fresh bytes, or views of a snapshot).
* ``load(records)`` is a plain function, run in the transfer's worker
  thread.  It receives an iterator over the records, in order, each verified
  before it is handed over; the iterator raises if the stream fails a check,
  the last one when the trailer is read.  Stage what you get and replace
  your live state only once the loop has ended without an exception: then a
  failed transfer loses nothing.

Every transfer moves the state machine of :mod:`dbus_vmstate2.states`, one
transfer at a time; a second one while the first runs fails with Busy.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from dbus_fast import BusType, DBusError, Message, MessageType, NameFlag, Variant
from dbus_fast.aio import MessageBus

from ..errors import BackendFailed, Busy, InvalidState, Unsupported, VMStateError
from ..names import OBJECT_PATH, VMSTATE1, VMSTATE1_SIZE_LIMIT, VMSTATE2, check_id
from ..states import Event, State, next_state
from ..stream import FORMAT_VERSION, MAX_RECORD_SIZE, Compression
from .boundary import call_daemon, log, log_exception
from .channel import Channel
from .fdguard import FdGuard
from .inline import InlineMode, decode_inline, encode_inline
from .records import SaveResult, iter_records
from .transfers import LoadOutcome, Progress, SaveOptions, load_stream, save_stream
from .vmstate1 import VMState1Interface
from .vmstate2 import VMState2Interface
from .workers import Workers

SaveCallable: TypeAlias = Callable[[], SaveResult | Awaitable[SaveResult]]
LoadCallable: TypeAlias = Callable[[Iterator[bytes]], Any]


@dataclass
class Transfer:
    """One Save or Load, from its start to its outcome."""

    number: int
    operation: str
    channel: Channel | None = None
    owner: str | None = None
    """The unique bus name of the connection that started it."""
    progress: Progress = field(default_factory=Progress)
    error: VMStateError | None = None
    finished: bool = False


class Backend:
    """A back-end on the bus, serving VMState1 and VMState2 for its daemon.

    Args:
        backend_id: the back-end's Id, 1 to 255 bytes, unique on the bus and
            stable across the migration (QEMU matches source and destination
            back-ends by it).
        save: the daemon's save callable (see the module docstring).
        load: the daemon's load callable, a plain function.
        address: a D-Bus address such as ``unix:path=/run/vm1/bus``; the
            session bus when None.
        compression: how VMState1's inline blob may be compressed (a state
            that does not shrink is sent uncompressed).
        vmstate1: how to serve QEMU's org.qemu.VMState1: ``stream`` (the
            default: the blob is a verified stream), ``legacy`` (the raw
            state, as a daemon written by hand against QEMU's interface
            serves it; Load takes either) or ``off`` (VMState2 only; QEMU's
            dbus-vmstate never sees this back-end).  See backend/inline.py.

    Raises:
        TypeError: ``load`` is a coroutine function.
    """

    def __init__(
        self,
        backend_id: str,
        save: SaveCallable,
        load: LoadCallable,
        *,
        address: str | None = None,
        compression: Compression = Compression.ZSTD,
        vmstate1: InlineMode | str = InlineMode.STREAM,
    ) -> None:
        if inspect.iscoroutinefunction(load):
            raise TypeError("load must be a plain function: it runs in the transfer's thread and pulls records as they arrive")
        self.id = check_id(backend_id)
        self._save = save
        self._load = load
        self._address = address
        self._compression = compression
        self._inline_mode = InlineMode(vmstate1)
        self._bus: MessageBus | None = None
        self._workers = Workers()
        self._vmstate2 = VMState2Interface(self)
        self.state = State.RUNNING
        self._transfer: Transfer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._caller: str | None = None

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

        Raises:
            OSError, dbus_fast.AuthError, ...: the bus cannot be reached.
            PermissionError: the bus's policy refuses every name we need.
            RuntimeError: already started, or a thread cannot be started.
        """
        await self._workers.start()
        try:
            self._bus = await self._register()
        except BaseException:
            self._workers.shutdown()
            raise

    async def _register(self) -> MessageBus:
        if self._address is None:
            bus = MessageBus(bus_type=BusType.SESSION, negotiate_unix_fd=True)
        else:
            bus = MessageBus(bus_address=self._address, negotiate_unix_fd=True)
        await bus.connect()
        try:
            bus.add_message_handler(FdGuard(OBJECT_PATH, VMSTATE2, [("Save", "ha{sv}"), ("Load", "ha{sv}")]))
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
        self.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._workers.shutdown()
        if self._bus is not None and self._bus.connected:
            self._bus.disconnect()
            await self._bus.wait_for_disconnect()

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

    # -- the state machine and the transfer record --------------------------

    def _fire(self, event: Event) -> None:
        new = next_state(self.state, event)
        if new is not self.state:
            log.info("back-end %r: %s -> %s (%s)", self.id, self.state, new, event)
            self.state = new
            self._vmstate2.state_changed(new.value)

    def _open(self, operation: str, event: Event, channel: Channel | None = None) -> Transfer:
        if self._transfer is not None and not self._transfer.finished:
            raise Busy(f"back-end {self.id!r} is busy with {self._transfer.operation} #{self._transfer.number}")
        self._fire(event)
        number = self._transfer.number + 1 if self._transfer else 1
        self._transfer = Transfer(number, operation, channel, owner=self._caller)
        return self._transfer

    def _finish(self, transfer: Transfer, event: Event, error: VMStateError | None) -> None:
        if transfer.channel is not None:
            transfer.channel.close()
        transfer.error = error
        transfer.finished = True
        self._fire(event)
        progress = transfer.progress
        if error is None:
            log.info("back-end %r: %s #%d done, %d records, %d bytes", self.id, transfer.operation, transfer.number,
                     progress.records, progress.raw_bytes)
        else:
            log.warning("back-end %r: %s #%d failed: %s", self.id, transfer.operation, transfer.number, error)
        self._vmstate2.TransferFinished(
            transfer.number, transfer.operation, error.dbus_name.value if error else "", str(error) if error else "",
            progress.records, progress.raw_bytes, progress.stream_bytes,
        )

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- VMState2 -------------------------------------------------------------

    def capabilities(self) -> dict[str, Variant]:
        return {
            "stream-versions": Variant("au", [FORMAT_VERSION]),
            "compression": Variant("as", [c.name.lower() for c in Compression]),
            "max-record-size": Variant("t", MAX_RECORD_SIZE),
            "inline-size-limit": Variant("t", VMSTATE1_SIZE_LIMIT),
            "pre-copy": Variant("b", False),
            "vmstate1": Variant("s", self._inline_mode.value),
        }

    def start_save(self, fd: int, options: dict[str, Variant]) -> int:
        """Save: start streaming the state into ``fd``, which we now own."""
        try:
            save_options = SaveOptions.from_dbus(options)
        except BaseException:
            os.close(fd)
            raise
        transfer = self._open_with_channel("save", Event.SAVE, fd)
        self._spawn(self._run_save(transfer, save_options))
        return transfer.number

    def start_load(self, fd: int, options: dict[str, Variant]) -> int:
        """Load: start reading a stream from ``fd``, which we now own."""
        if options:
            os.close(fd)
            raise Unsupported(f"Load takes no options yet, got: {', '.join(sorted(options))}")
        transfer = self._open_with_channel("load", Event.LOAD, fd)
        self._spawn(self._run_load(transfer))
        return transfer.number

    def _open_with_channel(self, operation: str, event: Event, fd: int) -> Transfer:
        channel = Channel(fd)  # owns fd from here, closes it on its own failure
        try:
            return self._open(operation, event, channel)
        except BaseException:
            channel.close()
            raise

    async def _run_save(self, transfer: Transfer, options: SaveOptions) -> None:
        async def work() -> None:
            state = await call_daemon("save", self._workers, self._save)
            await self._in_thread(
                transfer, save_stream, transfer.channel, self.id, state, options, transfer.progress, self._workers.submit
            )

        await self._run(transfer, work, on_bug=Event.FAILED)

    async def _run_load(self, transfer: Transfer) -> None:
        async def work() -> None:
            await self._in_thread(transfer, load_stream, transfer.channel, self.id, self._load, transfer.progress)

        # A bug of ours in mid-load may have handed the daemon bad records.
        await self._run(transfer, work, on_bug=Event.LOAD_BROKE)

    async def _in_thread(self, transfer: Transfer, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` in a worker thread; if we are cancelled (the loop is
        shutting down), cancel the channel and wait for the thread, so that
        the fd is never closed under it."""
        future = asyncio.ensure_future(self._workers.run(fn, *args))
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if transfer.channel is not None:
                transfer.channel.cancel()
            await asyncio.wait({future})
            raise

    async def _run(self, transfer: Transfer, work: Callable[[], Awaitable[None]], on_bug: Event) -> None:
        """Run a transfer's ``work`` and record its outcome, whatever happens."""
        try:
            await work()
        except LoadOutcome as exc:
            self._finish(transfer, Event.LOAD_BROKE, exc.error)
        except VMStateError as exc:
            self._finish(transfer, Event.FAILED, exc)
        except BaseException as exc:
            log_exception(f"{transfer.operation} #{transfer.number} failed", exc)
            error = BackendFailed(f"{transfer.operation} failed with an internal error ({type(exc).__name__}); see the back-end's log")
            self._finish(transfer, on_bug, error)
            if not isinstance(exc, Exception):
                raise
        else:
            self._finish(transfer, Event.SUCCEEDED, None)

    def check(self) -> tuple[int, bool, int, int, int]:
        """Check: the latest transfer's number, whether it finished, and its counters.

        Raises:
            InvalidState: no transfer yet.
            VMStateError: the latest transfer failed (a fresh copy of its error).
        """
        transfer = self._transfer
        if transfer is None:
            raise InvalidState(f"no transfer has been started on back-end {self.id!r}")
        self._raise_outcome(transfer)
        progress = transfer.progress
        return transfer.number, transfer.finished, progress.records, progress.raw_bytes, progress.stream_bytes

    def cancel(self, caller: str | None = None) -> None:
        """Cancel: stop the running transfer, if any; the state stays as it was.

        Args:
            caller: stop it only if this unique bus name started it (None:
                whoever did, as when the back-end stops).
        """
        transfer = self._transfer
        if transfer is not None and (caller is None or caller == transfer.owner):
            self._cancel(transfer)

    def cancel_own(self) -> None:
        """Cancel, the D-Bus method: stop the running transfer if the
        connection calling it is the one that started it."""
        self.cancel(caller=self._caller or "")

    def cancel_transfer(self, number: int) -> bool:
        """CancelTransfer: stop transfer ``number`` if it is the one running.

        Returns:
            True if it was running and is being stopped, else False.
        """
        transfer = self._transfer
        if transfer is None or transfer.number != number:
            return False
        return self._cancel(transfer)

    def _cancel(self, transfer: Transfer) -> bool:
        if transfer.finished or transfer.channel is None:
            return False
        log.info("back-end %r: cancelling %s #%d", self.id, transfer.operation, transfer.number)
        transfer.channel.cancel()
        return True

    def reset(self) -> None:
        """Reset: back to ``running`` (from ``error``, or a no-op in ``running``)."""
        self._fire(Event.RESET)

    # -- VMState1 -------------------------------------------------------------

    async def save_inline(self) -> bytes:
        """VMState1 Save: the whole state as one verified stream of <= 1 MiB."""
        transfer = self._open("save", Event.SAVE)
        blob = b""

        async def work() -> None:
            nonlocal blob
            state = await call_daemon("save", self._workers, self._save)
            blob = await call_daemon("save", self._workers, self._encode_inline, state)
            transfer.progress.stream_bytes = len(blob)

        await self._run(transfer, work, on_bug=Event.FAILED)
        self._raise_outcome(transfer)
        return blob

    async def load_inline(self, blob: bytes) -> None:
        """VMState1 Load: verify the whole blob, then hand its records to load."""
        transfer = self._open("load", Event.LOAD)

        async def work() -> None:
            records = await self._workers.run(decode_inline, self.id, blob, self._inline_mode)
            try:
                await call_daemon("load", self._workers, self._load, iter(records))
            except VMStateError as exc:
                raise LoadOutcome(exc) from exc
            progress = transfer.progress
            progress.records, progress.stream_bytes = len(records), len(blob)
            progress.raw_bytes = sum(len(r) for r in records)

        await self._run(transfer, work, on_bug=Event.LOAD_BROKE)
        self._raise_outcome(transfer)

    @staticmethod
    def _raise_outcome(transfer: Transfer) -> None:
        if transfer.error is not None:
            raise type(transfer.error)(str(transfer.error))

    def _encode_inline(self, state: SaveResult) -> bytes:
        return encode_inline(self.id, iter_records(state), self._compression, self._inline_mode)
