"""Moving one back-end's stream from its pipe into the saved file.

A :class:`StreamPump` runs in a worker thread and does three things with
every piece it reads: it decodes it (by default completely: every payload's
CRC-32 or zstd frame, with the output bounded as a load bounds it, so a
file that ``save`` calls good is one that ``load`` will take), hands it to
the file's writer (which skims it again for the index), and counts it.

Every wait in it has an end.  The read waits with ``poll`` beside a wake-up
pipe, so :meth:`StreamPump.stop` (a cancel, SIGTERM in the command) ends it
at once whatever the back-end does.  And the back-end must close its end of
the pipe when its transfer ends (interfaces/org.qemu.VMState2.xml:
TransferFinished comes "after the fd is closed"): once the stream's trailer
has passed, or the back-end has reported its transfer finished, the pump
waits at most ``close_timeout`` seconds for the end of file, then fails with
an error that says so.  A back-end that kept a copy of the fd open (or let a
child inherit it) would otherwise hold the save forever.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import TYPE_CHECKING

from ..errors import BackendFailed, Cancelled, VMStateError
from ..stream import NEED_DATA, StreamDecoder, StreamEnd

if TYPE_CHECKING:
    from .savefile import ContainerSink
    from .transfers import Progress

CHUNK = 1 << 20
"""The largest read from a back-end's pipe."""

CLOSE_TIMEOUT = 10.0
"""Default seconds a back-end has to close its end of the pipe once its
stream has ended or it has reported its transfer finished."""


class Throttle:
    """Caps the total rate of the pumps that share it, in bytes per second
    (QEMU's ``max-bandwidth``): each pump waits after a read until the bytes
    read so far fit the rate."""

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"a bandwidth cap must be more than 0 bytes per second, not {rate!r}")
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def take(self, size: int) -> None:
        """Account for ``size`` bytes just moved; sleep as long as the cap asks."""
        with self._lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + size / self.rate
            delay = self._free_at - now
        time.sleep(delay)


class StreamPump:
    """Read a back-end's stream from ``fd`` into ``writer``'s stream ``stream``.

    :meth:`run` runs in a worker thread; :meth:`stop`, :meth:`backend_finished`
    and :meth:`close` are called from the event loop's thread (so that a
    wake-up never goes to an fd number that was closed and reused).  The
    caller keeps ``fd`` and closes it after :meth:`run` has returned.

    Args:
        verify: decode every payload (the default); False only skims the
            stream (docs/stream-format.md §6.4), as the file's index does.
        close_timeout: seconds the back-end has to close its end of the pipe
            once its stream has ended or it reported its transfer finished.
        throttle: a shared bandwidth cap, if any.
        stall_timeout: seconds the back-end may send nothing before its
            stream has ended (a stopped or hung back-end); None: no bound.
    """

    def __init__(
        self,
        fd: int,
        writer: ContainerSink,
        stream: int,
        backend_id: str,
        progress: Progress,
        *,
        verify: bool = True,
        close_timeout: float = CLOSE_TIMEOUT,
        throttle: Throttle | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        if not close_timeout > 0:
            raise ValueError(f"close_timeout must be more than 0 seconds, not {close_timeout!r}")
        self._fd = fd
        self._writer = writer
        self._stream = stream
        self._backend_id = backend_id
        self._progress = progress
        self._close_timeout = close_timeout
        self._throttle = throttle
        self._stall_timeout = stall_timeout
        self._last_data = time.monotonic()
        self._decoder = StreamDecoder(backend_id, payloads=verify)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopped = False
        self._failure: VMStateError | None = None
        self._trailer_at: float | None = None
        self._finished_at: float | None = None
        self.held = False
        """True while :meth:`run` waits for the writer to take a piece (a
        migration's link that is slow or stuck): then the back-end is not
        the one holding the stream up."""

    # -- from the event loop's thread --------------------------------------------

    def stop(self) -> None:
        """Make :meth:`run` raise Cancelled at once."""
        self._stopped = True
        self._wake()

    def backend_finished(self, error: BaseException | None = None) -> None:
        """The back-end reported its transfer's outcome: on success the end
        of file must follow within ``close_timeout``; a failure ends
        :meth:`run` at once with that error."""
        if isinstance(error, VMStateError):
            self._failure = error
        elif error is None and self._finished_at is None:
            self._finished_at = time.monotonic()
        self._wake()

    def close(self) -> None:
        """Close the wake-up pipe (after :meth:`run` has returned)."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:  # full: already woken
                pass

    # -- in the worker thread ----------------------------------------------------

    def run(self) -> None:
        """Move the whole stream; return once the back-end closed its end and
        the stream verified.

        Raises:
            StreamError: the stream does not verify (or is truncated).
            BackendFailed: the back-end did not close its end in time.
            VMStateError: the back-end reported its transfer failed.
            Cancelled: :meth:`stop` was called.
            OSError: the saved file could not be written.
        """
        was_blocking = os.get_blocking(self._fd)
        os.set_blocking(self._fd, False)
        try:
            self._move()
        finally:
            os.set_blocking(self._fd, was_blocking)

    def _move(self) -> None:
        # One buffer for the whole stream: a fresh 1 MiB bytes per read costs
        # page faults that showed up as system time.  The decoder and the
        # writer are done with each piece before the next read reuses it.
        size = CHUNK if self._throttle is None else min(CHUNK, max(4096, int(self._throttle.rate / 20)))
        buffer = bytearray(size)
        view = memoryview(buffer)
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        total = 0
        while True:
            timeout = self._check()
            events = poller.poll(None if timeout is None else max(1, int(timeout * 1000) + 1))
            if any(fd == self._wake_r for fd, _ in events):
                self._drain_wake()
            if not any(fd == self._fd for fd, _ in events):
                continue
            try:
                size = os.readv(self._fd, [buffer])
            except BlockingIOError:
                continue
            if not size:
                break
            self._last_data = time.monotonic()
            self._decode(view[:size])
            self.held = True
            try:
                self._writer.write(self._stream, view[:size])
            finally:
                self.held = False
                self._last_data = time.monotonic()  # the writer's time is not the back-end's silence
            total += size
            self._progress.done[self._backend_id] = total
            if self._throttle is not None:
                self._throttle.take(size)
        self._decoder.feed_eof()
        self._decode(None)

    def _decode(self, data: memoryview | None) -> None:
        if data is not None:
            self._decoder.feed(data)
        while (event := self._decoder.next_event()) is not NEED_DATA:
            if isinstance(event, StreamEnd):
                self._trailer_at = time.monotonic()

    def _check(self) -> float | None:
        """Raise if we must stop; return how long the next wait may last (None: no end)."""
        if self._stopped:
            raise Cancelled("the save was stopped")
        if self._failure is not None:
            raise self._failure
        starts = [t for t in (self._trailer_at, self._finished_at) if t is not None]
        if not starts:
            return self._check_stall()
        since = time.monotonic() - min(starts)
        if since < self._close_timeout:
            return self._close_timeout - since
        if self._trailer_at is not None:
            what = f"its stream ended {since:.1f} s ago (its trailer arrived and verified)"
        else:
            what = f"it reported its save finished {since:.1f} s ago, but its stream has no trailer yet"
        raise BackendFailed(
            f"{what}, and it has not closed its end of the pipe: a back-end must close the fd when its transfer "
            "ends (is a copy still open, or inherited by a child process?); gave up after the close timeout "
            f"of {self._close_timeout:g} s"
        )

    def _check_stall(self) -> float | None:
        if self._stall_timeout is None:
            return None
        silent = time.monotonic() - self._last_data
        if silent < self._stall_timeout:
            return self._stall_timeout - silent
        raise BackendFailed(
            f"it has sent nothing for {silent:.1f} s in the middle of its stream (is it stopped or hung?): gave up "
            f"after the stall timeout of {self._stall_timeout:g} s"
        )

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass
