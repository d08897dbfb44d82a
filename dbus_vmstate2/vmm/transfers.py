"""Save back-ends to a file and load them back, over VMState2.

The VMM side of a transfer: create a pipe, pass one end with ``Save`` or
``Load``, close our copy of that end once the reply is in (the bytes are then
surely on their way to the bus), and move the data between the other end and
the saved file in a worker thread.  Several back-ends move in parallel into
one container file (docs/stream-format.md, "saved file").  The outcome comes
from ``Check``, woken by the ``TransferFinished`` signal: a pipe cannot carry
a failure, and no call waits longer than a moment, so no D-Bus timeout bites
however large the state.

Failure handling: the first failure cancels every other transfer of the same
operation (``Cancel``), so each back-end keeps its state and returns to
``running``; a save writes no file under the final name; and the error raised
is the first one, naming the back-end.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from ..backend.channel import enlarge_pipe
from ..errors import BackendFailed, Corrupt, ErrorName, IdMismatch, StreamError, Unsupported, VMStateError
from ..names import VMSTATE2
from ..stream.container import StreamInfo
from .calls import call
from .discovery import NOT_VMSTATE2, BackendInfo
from .savefile import SaveFileReader, SaveFileWriter, verify_streams

CHUNK = 1 << 20


@dataclass
class Progress:
    """Bytes moved so far, per back-end Id (written by the worker threads)."""

    total: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)


class _FinishedSignals:
    """Wakes waiters whenever a back-end emits TransferFinished."""

    RULE = f"type='signal',interface='{VMSTATE2}',member='TransferFinished'"

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._events: dict[str, asyncio.Event] = {}

    async def __aenter__(self) -> _FinishedSignals:
        self._bus.add_message_handler(self._on_message)
        await call(self._bus, "org.freedesktop.DBus", "org.freedesktop.DBus", "AddMatch", "s", [self.RULE], path="/org/freedesktop/DBus")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._bus.remove_message_handler(self._on_message)
        if self._bus.connected:
            await call(self._bus, "org.freedesktop.DBus", "org.freedesktop.DBus", "RemoveMatch", "s", [self.RULE], path="/org/freedesktop/DBus")

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.interface == VMSTATE2 and msg.member == "TransferFinished":
            self._event(msg.sender).set()

    def _event(self, sender: str) -> asyncio.Event:
        return self._events.setdefault(sender, asyncio.Event())

    async def wait_finished(self, backend: BackendInfo, number: int) -> None:
        """Return once transfer ``number`` of ``backend`` has succeeded.

        Raises:
            VMStateError: the transfer failed (the back-end's own error), or
                the back-end is gone.
        """
        event = self._event(backend.unique_name)
        while True:
            event.clear()
            latest, finished, *_ = await call(self._bus, backend.unique_name, VMSTATE2, "Check")
            if latest != number:
                raise VMStateError(f"transfer #{number} was superseded by #{latest} on the back-end")
            if finished:
                return
            try:
                await asyncio.wait_for(event.wait(), 1.0)
            except TimeoutError:
                pass  # check again: a lost signal costs a second, not a hang


async def _start(bus: MessageBus, backend: BackendInfo, member: str, fd: int, options: dict[str, Variant]) -> int:
    """Call Save or Load with ``fd``; our copy of ``fd`` is closed once the reply is in."""
    try:
        [number] = await call(bus, backend.unique_name, VMSTATE2, member, "ha{sv}", [0, options], unix_fds=[fd])
    except VMStateError as exc:
        if exc.remote_name in NOT_VMSTATE2:
            raise Unsupported(
                "it serves only org.qemu.VMState1 (QEMU's dbus-vmstate, at most 1 MiB): migrate it with QEMU"
            ) from exc
        raise
    finally:
        os.close(fd)
    return number


async def _cancel_all(bus: MessageBus, backends: Sequence[BackendInfo]) -> None:
    for backend in backends:
        try:
            await call(bus, backend.unique_name, VMSTATE2, "Cancel")
        except Exception:  # a back-end (or a bus) that is gone has nothing to cancel
            pass


async def _all_or_cancel(bus: MessageBus, backends: Sequence[BackendInfo], jobs: list[Awaitable[Any]]) -> list[Any]:
    """Run ``jobs`` together; on the first failure, or if we are cancelled
    ourselves, Cancel every back-end's transfer (which ends our pumps too:
    the back-ends close their ends) and raise."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        await asyncio.shield(_cancel_all(bus, backends))
        await asyncio.wait(tasks)
        raise
    failed = [t.exception() for t in tasks if t.done() and t.exception() is not None]
    if failed:
        await _cancel_all(bus, backends)
        await asyncio.wait(tasks)
        for task in tasks:
            task.exception()  # retrieved: the first failure speaks for all
        raise failed[0]
    return [t.result() for t in tasks]


def _labelled(backend: BackendInfo, exc: VMStateError) -> VMStateError:
    labelled = type(exc)(f"back-end {backend.id!r}: {exc}")
    labelled.remote_name = exc.remote_name
    return labelled


async def save_to_file(
    bus: MessageBus,
    backends: Sequence[BackendInfo],
    path: str | os.PathLike[str],
    options: dict[str, Variant] | None = None,
    progress: Progress | None = None,
) -> list[StreamInfo]:
    """Save every back-end in ``backends`` into one new file at ``path``.

    Args:
        options: VMState2 Save options (``compression``, ``level``, ``workers``).
        progress: updated with the bytes received per back-end.

    Returns:
        The file's index entries, one per back-end, in ``backends`` order.

    Raises:
        VMStateError: the first failure, naming its back-end; no file is
            left under ``path`` and every back-end keeps its state.
    """
    progress = progress or Progress()
    writer = await asyncio.to_thread(SaveFileWriter, path)
    try:
        async with _FinishedSignals(bus) as signals:
            jobs = [_save_one(bus, signals, writer, b, options or {}, progress) for b in backends]
            infos = await _all_or_cancel(bus, backends, jobs)
        await asyncio.to_thread(writer.commit)
    except BaseException:
        writer.abort()
        raise
    return infos


async def _save_one(
    bus: MessageBus, signals: _FinishedSignals, writer: SaveFileWriter, backend: BackendInfo,
    options: dict[str, Variant], progress: Progress,
) -> StreamInfo:
    stream = writer.open_stream(backend.id)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        enlarge_pipe(read_end)
        try:
            number = await _start(bus, backend, "Save", write_end, options)
            try:
                await asyncio.to_thread(_pump_to_file, read_end, writer, stream, backend.id, progress)
                info = writer.close_stream(stream)
            except StreamError as exc:
                # A bad stream on save is the back-end's failure, not a bad
                # file.  If it can say why (it was cancelled, its save
                # raised, a record was too large), that is the error to show.
                await _reported_failure(signals, backend, number)
                raise BackendFailed(f"its stream is unusable ({type(exc).__name__}): {exc}") from exc
            await signals.wait_finished(backend, number)
        except VMStateError as exc:
            raise _labelled(backend, exc) from exc
    finally:
        os.close(read_end)
    return info


async def _reported_failure(signals: _FinishedSignals, backend: BackendInfo, number: int) -> None:
    """Raise the back-end's own error for transfer ``number``, if it reports one soon."""
    try:
        await asyncio.wait_for(signals.wait_finished(backend, number), 5.0)
    except VMStateError as reported:
        if reported.remote_name in set(ErrorName):
            raise
    except TimeoutError:
        pass


def _pump_to_file(fd: int, writer: SaveFileWriter, stream: int, backend_id: str, progress: Progress) -> None:
    # One buffer for the whole stream: a fresh 1 MiB bytes per read costs
    # page faults that showed up as system time.  The writer has written
    # (and its skimming decoder consumed) each piece before write() returns.
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    while size := os.readv(fd, [buffer]):
        writer.write(stream, view[:size])
        total += size
        progress.total[backend_id] = total


async def load_from_file(
    bus: MessageBus,
    backends: Sequence[BackendInfo],
    path: str | os.PathLike[str],
    progress: Progress | None = None,
    *,
    verify: bool = True,
) -> list[StreamInfo]:
    """Load each back-end in ``backends`` from its stream in the file at ``path``.

    The whole file is verified first (every stream decoded: a read of the
    file and its decompression), so a damaged file is refused before any
    back-end is touched; then each back-end verifies its own stream again as
    it loads (Id, checksums, counts, digest) and applies it only when all of
    it verified.  As with QEMU, back-ends on the bus that the file does not
    mention are not touched, but every back-end named in ``backends`` must be
    in the file.

    Args:
        verify: verify the whole file before loading (default True).

    Raises:
        StreamError: the file is not a valid saved file.
        IdMismatch: a back-end has no stream in the file.
        VMStateError: the first back-end failure; every back-end keeps the
            state it had unless its load succeeded.
    """
    progress = progress or Progress()
    reader = await asyncio.to_thread(SaveFileReader, path)
    try:
        streams = {}
        for backend in backends:
            try:
                streams[backend.id] = reader.find(backend.id)
            except KeyError:
                held = ", ".join(info.backend_id for info in reader.streams) or "none"
                raise IdMismatch(f"{os.fspath(path)} holds no state for back-end {backend.id!r} (it holds: {held})") from None
            progress.expected[backend.id] = reader.streams[streams[backend.id]].stream_bytes
        if verify:
            errors = await asyncio.to_thread(verify_streams, reader)
            bad = [f"{info.backend_id!r}: {error}" for info, error in zip(reader.streams, errors, strict=True) if error]
            if bad:
                raise Corrupt(f"{os.fspath(path)} does not verify, nothing was loaded: {'; '.join(bad)}")
        async with _FinishedSignals(bus) as signals:
            jobs = [_load_one(bus, signals, reader, streams[b.id], b, progress) for b in backends]
            await _all_or_cancel(bus, backends, jobs)
        return [reader.streams[streams[b.id]] for b in backends]
    finally:
        reader.close()


async def _load_one(
    bus: MessageBus, signals: _FinishedSignals, reader: SaveFileReader, stream: int, backend: BackendInfo, progress: Progress,
) -> None:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        enlarge_pipe(write_end)
        try:
            number = await _start(bus, backend, "Load", read_end, {})
        finally:
            read_end = -1  # _start closed it
        try:
            pumped = asyncio.to_thread(_pump_from_file, reader, stream, write_end, backend.id, progress)
            pump_error: BaseException | None = None
            try:
                await pumped
            except BrokenPipeError as exc:
                pump_error = exc  # the back-end stopped reading: its outcome says why
            os.close(write_end)
            write_end = -1
            await signals.wait_finished(backend, number)
            if pump_error is not None:
                raise VMStateError("the back-end stopped reading its stream early") from pump_error
        except VMStateError as exc:
            raise _labelled(backend, exc) from exc
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def _pump_from_file(reader: SaveFileReader, stream: int, fd: int, backend_id: str, progress: Progress) -> None:
    total = 0
    for data in reader.stream_chunks(stream, CHUNK):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        total += len(data)
        progress.total[backend_id] = total

