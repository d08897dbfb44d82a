"""A caller's file descriptor, read or written in a worker thread and
interruptible by :meth:`Channel.cancel` from any thread.

The fd is put in non-blocking mode and waited on with ``poll`` together with
a wake-up pipe, so a cancel takes effect at once even when the peer has
stopped reading or writing.  (O_NONBLOCK belongs to the open file description,
which a peer may share: it is set back when the channel closes.)  Pipes, sockets and regular
files all work; for a regular file poll always reports ready.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable

from ..errors import Cancelled, Stalled, VMStateError
from ..fds import enlarge_pipe

READ_SIZE = 1 << 20


class Channel:
    """Owns ``fd`` from construction on and closes it in :meth:`close`.

    Args:
        stall_timeout: how long one read or write may wait for the peer, in
            seconds, before the transfer ends with :class:`Stalled` (a peer
            that never reads or writes, yet keeps its end open); None: no bound.
    """

    def __init__(self, fd: int, stall_timeout: float | None = None) -> None:
        self.fd = fd
        self._stall_ms = -1 if stall_timeout is None else max(1, int(stall_timeout * 1000))
        self._wake_r = self._wake_w = -1
        self._cancelled = False
        try:
            # dbus-fast receives fds without MSG_CMSG_CLOEXEC: a child the
            # daemon spawns must not inherit the stream's end, or the peer
            # would never see our close.
            os.set_inheritable(fd, False)
            self._was_blocking = os.get_blocking(fd)
            os.set_blocking(fd, False)
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            self.close()
            raise
        enlarge_pipe(fd)

    def cancel(self) -> None:
        """Make the current and every later read or write raise Cancelled.

        Call it from the thread that calls :meth:`close` (the event loop's),
        so that it never writes to an fd number that has been reused.
        """
        self._cancelled = True
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # already closed, or the wake pipe is full: either way woken
            pass

    def write(self, data: bytes | bytearray | memoryview, written: Callable[[int], None] | None = None) -> None:
        """Write all of ``data``.

        Args:
            written: called with the size of each write as it returns, so
                that a caller counts what reached the fd even when a cancel
                cuts ``data`` short.

        Raises:
            Cancelled: :meth:`cancel` was called.
            VMStateError: the reader went away or the write failed.
        """
        view = memoryview(data).cast("B")
        while view:
            self._check()
            try:
                size = os.write(self.fd, view)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            except BrokenPipeError:
                raise VMStateError("the reader of the stream closed its end before the stream ended") from None
            except OSError as exc:
                raise VMStateError(f"writing the stream failed: {exc.strerror}") from None
            view = view[size:]
            if written is not None:
                written(size)

    def read(self, size: int = READ_SIZE) -> bytes:
        """Read up to ``size`` bytes; ``b""`` at end of file.

        Raises:
            Cancelled: :meth:`cancel` was called.
            VMStateError: the read failed.
        """
        while True:
            self._check()
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                self._wait(select.POLLIN)
            except OSError as exc:
                raise VMStateError(f"reading the stream failed: {exc.strerror}") from None

    def read_exactly(self, size: int) -> memoryview:
        """Read ``size`` bytes into a new buffer, fewer only at end of file.

        Returns:
            A read-only view of the bytes read: the buffer is never written
            again, so whoever holds a view of it may keep it.

        Raises:
            Cancelled: :meth:`cancel` was called.
            VMStateError: a read failed.
        """
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            self._check()
            try:
                got = os.readv(self.fd, [view[done:]])
            except BlockingIOError:
                self._wait(select.POLLIN)
                continue
            except OSError as exc:
                raise VMStateError(f"reading the stream failed: {exc.strerror}") from None
            if not got:
                break
            done += got
        return view[:done].toreadonly()

    def close(self) -> None:
        """Close the caller's fd and our wake-up pipe; safe to call more than once."""
        if self.fd >= 0 and getattr(self, "_was_blocking", False):
            try:  # the open file description may be shared: leave it as we found it
                os.set_blocking(self.fd, True)
            except OSError:
                pass
        for name in ("fd", "_wake_r", "_wake_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def check(self) -> None:
        """Raise Cancelled if :meth:`cancel` was called (for a loop that may
        go on without reading or writing, such as an idle pre-copy)."""
        self._check()

    def _check(self) -> None:
        if self._cancelled:
            raise Cancelled("the transfer was cancelled; the back-end keeps its state")

    def _wait(self, events: int) -> None:
        poller = select.poll()
        poller.register(self.fd, events)
        poller.register(self._wake_r, select.POLLIN)
        # POLLERR/POLLHUP also wake us: the next read or write reports them.
        if not poller.poll(self._stall_ms):
            what = "read" if events == select.POLLOUT else "written"
            raise Stalled(
                f"nothing was {what} on the other end for {self._stall_ms / 1000:g} s: the transfer was ended; "
                "the back-end keeps its state"
            )
        self._check()
