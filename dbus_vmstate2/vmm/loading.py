"""Loading several back-ends all or nothing: the VMM's side of the two-phase load.

Each back-end gets a pipe and a ``Load`` with ``commit`` ``explicit``
(interfaces/org.qemu.VMState2.xml).  The caller writes each back-end's
stream into its pipe (from a saved file, or from a migration's connection)
and ends it; every back-end verifies its whole stream and reports it staged
(``LoadStaged``); only when every one has does :meth:`StagedLoads.commit`
say ``Commit`` to each.  If any fails first (a corrupt stream, a back-end
error, a stall, our own cancellation), every staged load is discarded
(``CancelTransfer``) and every back-end keeps the state it had.  So a
damaged file or stream is read once, and touches no back-end's state.

A back-end that has no two-phase load (``Capabilities["two-phase-load"]``
absent: an older library, another implementation) gets a plain Load, which
applies as soon as its own stream verified; :func:`two_phase_support`
tells the caller, who can verify the input first to keep the guarantee
(``load_from_file`` does).

A back-end that never hears Commit (we died) discards its staged load by
itself: at once when our connection leaves the bus, or after the commit
timeout we give it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from ..errors import BackendFailed, Cancelled, Corrupt, IdMismatch, NoBackends, VMStateError
from ..fds import enlarge_pipe
from ..names import VMSTATE2
from ..stream.container import StreamInfo
from .calls import PROPERTIES, SignalWatch, call
from .discovery import BackendInfo, describe
from .savefile import SaveFileReader, verify_streams
from .transfers import STALL_TIMEOUT, Operation, Progress, in_thread, labelled, wait_regardless

COMMIT_TIMEOUT = 60
"""Seconds each back-end holds its staged load for our Commit (Load's
``commit-timeout``), once its stream verified."""


class _StagedSignals(SignalWatch):
    """Notes every LoadStaged."""

    MEMBER = "LoadStaged"

    def __init__(self, bus: MessageBus) -> None:
        super().__init__(bus)
        self.staged: set[tuple[str, int]] = set()

    def on_signal(self, msg: Message) -> None:
        if msg.signature == "t" and msg.sender:
            self.staged.add((msg.sender, msg.body[0]))


class StagedLoads:
    """Load ``backends`` at once, all or nothing.

    Use it as ``async with``: on entry every back-end's Load has started;
    write each stream into :attr:`fds` (or with :meth:`feed`), end it with
    :meth:`end_input`, then ``await`` :meth:`commit`.  Leaving the block
    without a successful commit (an exception, a cancellation) discards
    every load, and every fd is closed on exit.

    Args:
        stall_timeout: seconds a back-end may take, once its input ended, to
            report its load staged (or failed); also the bound of
            :meth:`feed`'s writes into a back-end that reads nothing.
        commit_timeout: seconds each back-end holds its staged load for
            our Commit before it discards it by itself.
        two_phase: :func:`two_phase_support` of ``backends``, if the caller
            has already asked; else it is asked on entry.
    """

    def __init__(
        self,
        bus: MessageBus,
        backends: Sequence[BackendInfo],
        progress: Progress | None = None,
        *,
        stall_timeout: float | None = STALL_TIMEOUT,
        commit_timeout: int = COMMIT_TIMEOUT,
        two_phase: Mapping[str, bool] | None = None,
    ) -> None:
        self.bus = bus
        self.backends = list(backends)
        self.progress = progress or Progress()
        self.fds: dict[str, int] = {}
        """Back-end Id -> the write end of its pipe (blocking), until :meth:`end_input`."""
        self._two_phase: dict[str, bool] = dict(two_phase) if two_phase is not None else {}
        self._stall_timeout = stall_timeout
        self._commit_timeout = commit_timeout
        self.operation = Operation(bus, self.backends)
        """The loads' transfers: :meth:`Operation.run` runs jobs beside them, stopping all on a failure."""
        self._staged = _StagedSignals(bus)
        self._numbers: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._committed = False

    @property
    def all_two_phase(self) -> bool:
        """False if a back-end can only load with auto commit (see the module docstring)."""
        return all(self._two_phase.values())

    async def __aenter__(self) -> StagedLoads:
        if not self._two_phase:
            self._two_phase = await two_phase_support(self.bus, self.backends)
        await self.operation.signals.__aenter__()
        try:
            await self._staged.__aenter__()
            for backend in self.backends:
                await self._start(backend)
        except BaseException:
            await self._discard()
            raise
        return self

    async def __aexit__(self, etype: type[BaseException] | None, *exc: object) -> None:
        if not self._committed:
            await self._discard()
        else:
            await self._leave()

    async def _start(self, backend: BackendInfo) -> None:
        two_phase = self._two_phase[backend.id]
        options = {"commit": Variant("s", "explicit"), "commit-timeout": Variant("u", self._commit_timeout)}
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self.fds[backend.id] = write_end
        try:
            enlarge_pipe(write_end)
        except BaseException:
            os.close(read_end)
            raise
        self._started[backend.id] = time.monotonic()
        try:
            self._numbers[backend.id] = await self.operation.start(backend, "Load", read_end, options if two_phase else {})
        except VMStateError as exc:
            raise labelled(backend, exc) from exc

    def end_input(self, backend_id: str) -> None:
        """Close the write end of ``backend_id``'s pipe: its stream has ended."""
        fd = self.fds.pop(backend_id, -1)
        if fd >= 0:
            os.close(fd)

    async def feed(self, backend_id: str, write: Callable[[int, threading.Event], Any]) -> None:
        """Run ``write(fd, stop)`` in a worker thread to fill ``backend_id``'s
        pipe, then end its input.

        ``write`` must return soon once ``stop`` is set (we were cancelled).
        A back-end that stops reading (BrokenPipeError) has failed: its own
        error comes from :meth:`commit`.
        """
        stop = threading.Event()
        try:
            await in_thread(write, self.fds[backend_id], stop, stop=stop.set)
        except BrokenPipeError:
            pass  # it stopped reading: its outcome says why
        except VMStateError as exc:
            [backend] = [b for b in self.backends if b.id == backend_id]
            raise labelled(backend, exc) from exc
        finally:
            self.end_input(backend_id)

    async def commit(self) -> dict[str, float]:
        """Wait until every back-end's load is staged, then commit them all.

        Returns:
            Each back-end's load time in seconds, from its Load to its outcome.

        Raises:
            VMStateError: the first failure, naming its back-end; every
                load not yet committed was discarded, and those back-ends
                keep their state.  A failure after some back-ends committed
                (a Commit refused, a daemon whose load code failed) says
                which did.
        """
        for backend_id in list(self.fds):
            self.end_input(backend_id)
        waits = [self._wait_staged(b) for b in self.backends if self._two_phase[b.id]]
        await self.operation.run(waits)
        self._committed = True
        committed: list[str] = []
        seconds: dict[str, float] = {}
        try:
            for backend in self.backends:
                if self._two_phase[backend.id]:
                    await call(self.bus, backend.unique_name, VMSTATE2, "Commit", "t", [self._numbers[backend.id]])
                    committed.append(backend.id)
            for backend in self.backends:
                await self.operation.signals.wait_finished(backend, self._numbers[backend.id])
                seconds[backend.id] = time.monotonic() - self._started[backend.id]
        except VMStateError as exc:
            done = ", ".join(repr(i) for i in committed) or "none"
            raise BackendFailed(f"{labelled(backend, exc)} (after Commit; committed: {done})") from exc
        self.progress.seconds.update(seconds)
        return seconds

    async def _wait_staged(self, backend: BackendInfo) -> None:
        """Return once ``backend``'s load is staged; raise its failure, or after the stall timeout.

        The signals land in memory, which is looked at often; the bus is asked
        once a second, in case a signal was lost.  (No task is cancelled
        here: a cancelled ``wait_for`` can swallow its cancellation.)
        """
        number = self._numbers[backend.id]
        key = (backend.unique_name, number)
        began = asked = time.monotonic()
        try:
            while key not in self._staged.staged:
                if (outcome := self.operation.signals.outcome(backend, number)) is not None:
                    outcome.raise_error()  # its failure, in the back-end's own words
                    raise BackendFailed("its load finished without being staged for Commit")
                now = time.monotonic()
                if self._stall_timeout is not None and now - began >= self._stall_timeout:
                    raise BackendFailed(
                        f"its stream ended {now - began:.0f} s ago and its load is still not staged: gave up "
                        f"after the stall timeout of {self._stall_timeout:g} s"
                    )
                if now - asked >= 1.0:
                    await self._poll_staged(backend, key)
                    asked = time.monotonic()
                await asyncio.sleep(0.01)
        except VMStateError as exc:
            raise labelled(backend, exc) from exc

    async def _poll_staged(self, backend: BackendInfo, key: tuple[str, int]) -> None:
        """A lost signal costs a second: the State property says it too.
        (Check raises the load's error if it failed.)"""
        [state] = await call(self.bus, backend.unique_name, PROPERTIES, "Get", "ss", [VMSTATE2, "State"])
        [latest, *_] = await call(self.bus, backend.unique_name, VMSTATE2, "Check")
        if state.value == "staged" and latest == key[1]:
            self._staged.staged.add(key)

    async def _discard(self) -> None:
        """Stop every load we started (a staged one is discarded); close our fds."""
        for backend_id in list(self.fds):
            self.end_input(backend_id)
        cleanup = asyncio.ensure_future(self.operation.stop())
        await wait_regardless(cleanup)
        if not cleanup.cancelled():
            cleanup.exception()
        await self._leave()

    async def _leave(self) -> None:
        for watch in (self._staged, self.operation.signals):
            try:
                await watch.__aexit__(None, None, None)
            except Exception:  # a bus that is gone has no match rules left
                pass


CHUNK = 1 << 20
"""The largest piece a load writes into a back-end's pipe at once."""

READ_AHEAD = 16 << 20
"""How far beyond what it splices a load asks the kernel to have read the
file.  splice(2) holds the pipe's lock while it waits for the file's pages,
so a back-end reading what is already in the pipe waits for the disk too:
the reads and the back-end's work then take turns instead of overlapping.
Read ahead, splice finds the pages there: a cold 1 GiB load took a median
of 1.7 s instead of 2.2 s, and 2.25 s instead of 3.0 s with zstd
(benchmarks/bench_load.py; the README has the figures)."""


async def load_from_file(
    bus: MessageBus,
    backends: Sequence[BackendInfo],
    path: str | os.PathLike[str],
    progress: Progress | None = None,
    *,
    verify: bool = True,
    stall_timeout: float | None = STALL_TIMEOUT,
    commit_timeout: int = COMMIT_TIMEOUT,
) -> list[StreamInfo]:
    """Load each back-end in ``backends`` from its stream in the file at ``path``,
    all or nothing.

    The file is read once: each back-end's stream goes into its pipe, every
    back-end verifies its own stream (Id, checksums, counts, digest) and
    holds it staged, and only when all are staged are they committed
    (:class:`StagedLoads`).  A damaged stream leaves every back-end with
    the state it had.  As with QEMU, back-ends on the bus that the file
    does not mention are not touched, but every back-end named in
    ``backends`` must be in the file.

    Args:
        verify: if a back-end cannot load in two phases (an older one), verify
            the whole file first, so that a damaged file still touches no
            back-end (the default); False skips that pass.  With two-phase
            back-ends there is no such pass: ``dbus-vmstate2 inspect``
            verifies a file without touching any back-end.
        progress: updated with the phase and the bytes verified or sent.
        stall_timeout: seconds a back-end may read nothing of its stream, or
            take to report it staged once it ended; None: no bound.
        commit_timeout: seconds each back-end holds its staged load for our Commit.

    Raises:
        UnusableFile: ``path`` is not a regular file (a pipe cannot be read
            index first).
        NoBackends: ``backends`` is empty.
        StreamError: the file is not a valid saved file.
        IdMismatch: a back-end has no stream in the file.
        VMStateError: the first back-end failure, naming it; every back-end
            keeps the state it had.
    """
    progress = progress or Progress()
    reader = await in_thread(SaveFileReader, path, discard=SaveFileReader.close)
    try:
        if not backends:
            raise NoBackends("no back-ends to load")
        progress.backends = len(backends)
        streams = {}
        for backend in backends:
            try:
                streams[backend.id] = reader.find(backend.id)
            except KeyError:
                held = ", ".join(info.backend_id for info in reader.streams) or "none"
                raise IdMismatch(f"{os.fspath(path)} holds no state for back-end {backend.id!r} (it holds: {held})") from None
        sizes = {b.id: reader.streams[streams[b.id]].stream_bytes for b in backends}
        two_phase = await two_phase_support(bus, backends)
        if verify and not all(two_phase.values()):
            await _verify_first(reader, path, progress)
        async with StagedLoads(bus, backends, progress, stall_timeout=stall_timeout, commit_timeout=commit_timeout,
                               two_phase=two_phase) as loads:  # fmt: skip
            progress.begin("loading", sizes)

            def pump(backend_id: str) -> Callable[[int, threading.Event], None]:
                return lambda fd, stop: _pump_from_file(reader, streams[backend_id], fd, backend_id, progress,
                                                        stall_timeout, stop)  # fmt: skip

            await loads.operation.run([loads.feed(b.id, pump(b.id)) for b in backends])
            progress.begin("committing")
            await loads.commit()
        progress.phase = "done"
        return [reader.streams[streams[b.id]] for b in backends]
    finally:
        reader.close()


async def two_phase_support(bus: MessageBus, backends: Sequence[BackendInfo]) -> dict[str, bool]:
    """Whether each back-end (by Id) can load in two phases (``Capabilities["two-phase-load"]``)."""
    return {b.id: bool((await describe(bus, b)).capabilities.get("two-phase-load", False)) for b in backends}


async def _verify_first(reader: SaveFileReader, path: str | os.PathLike[str], progress: Progress) -> None:
    """Decode every stream of the file; raise Corrupt if any does not verify."""
    progress.begin("verifying", {info.backend_id: info.stream_bytes for info in reader.streams})

    def count(backend_id: str, size: int) -> None:
        progress.done[backend_id] = progress.done.get(backend_id, 0) + size

    stop = threading.Event()
    errors = await in_thread(verify_streams, reader, count, stop, stop=stop.set)
    bad = [f"{info.backend_id!r}: {error}" for info, error in zip(reader.streams, errors, strict=True) if error]
    if bad:
        raise Corrupt(f"{os.fspath(path)} does not verify, nothing was loaded: {'; '.join(bad)}")


def _pump_from_file(
    reader: SaveFileReader, stream: int, fd: int, backend_id: str, progress: Progress,
    stall_timeout: float | None, stop: threading.Event,
) -> None:
    """Write one stream of the file into a back-end's pipe.

    Raises:
        BrokenPipeError: the back-end closed its end.
        BackendFailed: it read nothing for ``stall_timeout`` seconds.
        Cancelled: ``stop`` was set.
    """
    waiter = PipeWaiter(fd, stall_timeout, stop, "the load")
    copy_buffer: memoryview | None = None  # made if the file system cannot splice(2)
    total = 0
    asked = 0  # the kernel was asked to read the file up to here
    for offset, size in reader.stream_extents(stream, CHUNK):
        end = offset + size
        if asked < end + READ_AHEAD // 2:
            start = max(asked, offset)
            reader.read_ahead(start, READ_AHEAD)
            asked = start + READ_AHEAD
        while offset < end:
            if copy_buffer is not None:
                data = reader.read(offset, end - offset, copy_buffer)
                _write_all(fd, data, waiter)
                offset += len(data)
                continue
            try:  # the bytes go from the page cache to the pipe, never through our memory
                offset += reader.splice(offset, end - offset, fd)
            except BlockingIOError:
                waiter.wait()
            except OSError as exc:
                if exc.errno not in _CANNOT_SPLICE:
                    raise
                copy_buffer = memoryview(bytearray(CHUNK))
        total += size
        progress.done[backend_id] = total


_CANNOT_SPLICE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
"""What splice(2) fails with where a file system does not support it."""


def write_all(fd: int, data: bytes | bytearray | memoryview, stall_timeout: float | None, stop: threading.Event,
              what: str = "the transfer") -> None:  # fmt: skip
    """Write all of ``data`` into a back-end's pipe ``fd`` (made non-blocking).

    Raises:
        BrokenPipeError: the back-end closed its end.
        BackendFailed: it read nothing for ``stall_timeout`` seconds.
        Cancelled: ``stop`` was set (seen within a quarter of a second).
    """
    _write_all(fd, data, PipeWaiter(fd, stall_timeout, stop, what))


def _write_all(fd: int, data: bytes | bytearray | memoryview, waiter: PipeWaiter) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            waiter.wait()


class PipeWaiter:
    """Waits for a back-end's pipe ``fd`` (made non-blocking) to take more."""

    def __init__(self, fd: int, stall_timeout: float | None, stop: threading.Event, what: str) -> None:
        if os.get_blocking(fd):
            os.set_blocking(fd, False)
        self._poller = select.poll()
        self._poller.register(fd, select.POLLOUT)
        self._stall_timeout, self._stop, self._what = stall_timeout, stop, what

    def wait(self) -> None:
        """Return once the pipe takes more.

        Raises:
            BackendFailed: it read nothing for ``stall_timeout`` seconds.
            Cancelled: ``stop`` was set (seen within a quarter of a second).
        """
        waited = 0.0
        while not self._poller.poll(250):  # a quarter of a second at a time: stop() is seen soon
            if self._stop.is_set():
                raise Cancelled(f"{self._what} was stopped")
            waited += 0.25
            if self._stall_timeout is not None and waited >= self._stall_timeout:
                raise BackendFailed(
                    f"it has read nothing of its stream for {waited:g} s (is it stopped or hung?): gave up "
                    f"after the stall timeout of {self._stall_timeout:g} s"
                )


