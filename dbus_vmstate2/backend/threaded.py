"""The back-end library for a plain threaded daemon with no event loop.

:class:`ThreadedBackend` runs a :class:`~.core.Backend` on an event loop in
a thread of its own.  The daemon's plain-function callables then run in
worker threads, as they do under asyncio.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .core import Backend


class ThreadedBackend:
    """Serve a back-end from a daemon that has no event loop.

    Takes the same arguments as :class:`~.core.Backend`.  Use it as a context
    manager, or call :meth:`start` before sandboxing and :meth:`stop` at exit.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.backend: Backend | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Connect and register; return once the back-end is on the bus.

        Its threads (this adapter's and the workers) are running by then: a
        daemon that sandboxes itself next must apply its seccomp filter to
        every thread (TSYNC), see the README's sandbox contract.

        Raises:
            whatever :meth:`Backend.start` raised (the bus is unreachable, ...).
            TimeoutError: registration took longer than ``timeout`` seconds.
        """
        if self._thread is not None:
            raise RuntimeError("the back-end is already started")
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="dbus-vmstate2", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"the back-end did not register within {timeout} s")
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self, timeout: float = 30.0) -> None:
        """Leave the bus and end the thread; safe to call more than once."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop has already ended (the bus went away)
                pass
        self._thread.join(timeout)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the bus connection ends; False if ``timeout`` passed first."""
        if self._thread is None:
            raise RuntimeError("the back-end is not started")
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def unique_name(self) -> str:
        if self.backend is None:
            raise RuntimeError("the back-end is not started")
        return self.backend.unique_name

    def __enter__(self) -> ThreadedBackend:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        backend = Backend(*self._args, **self._kwargs)
        try:
            await backend.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self.backend = backend
        self._started.set()
        closed = asyncio.ensure_future(backend.wait_closed())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await backend.stop()
        await closed
