"""The contract between a daemon's state and the back-end library.

A daemon hands :class:`~.core.Backend` one object that implements
:class:`Daemon` (a one-shot save and a load) and, if it can migrate
iteratively, :class:`PreCopyDaemon` as well.  The asyncio and the threaded
back-end use it the same way.  :class:`~.dirty.DirtyStore` implements both
for state shaped as keys to bytes values.

Which thread calls what:

* ``save`` may be a coroutine function (awaited on the bus's loop: take a
  consistent snapshot there) or a plain function (run in a worker thread).
  It returns one bytes-like object (sent as 1 MiB records, without a copy)
  or an iterable of bytes-like records of at most 16 MiB each, consumed in a
  worker thread one at a time as the fd takes them.  A record must not
  change once yielded, until the save ends.
* ``load`` and every :class:`PreCopyDaemon` method are plain functions,
  called from the library's worker threads while the daemon keeps serving
  in its own: they must be thread-safe against the daemon's own changes.
* ``load`` gets an iterator of verified :class:`~dbus_vmstate2.stream.Record`
  (``.type``: DATA, END_OF_INITIAL or DIRTY; ``.payload``: a read-only
  memoryview; what may be kept of it: below).
  The iterator raises (StreamError, Cancelled, ...) instead of ending if
  anything is wrong, the stream's trailer being checked before the last
  iteration ends.  Stage, then commit after the loop: then a failed
  transfer leaves the daemon's state exactly as it was.

What a daemon may keep of a payload, without copying it:

* a payload whose ``payload.obj`` is a ``bytes`` object (``type(payload.obj)
  is bytes``) views bytes that never change: keep it as long as you like.
  If it covers that object whole (``payload.nbytes == len(payload.obj)``),
  keep ``payload.obj`` itself, a ``bytes`` at no cost.  A view of part of
  one keeps the whole object alive (up to a read's worth of the stream
  beside it): keep such a view only briefly, or copy its bytes
  (``bytes(payload)``);
* any other payload (a view of a buffer the library may reuse) is valid
  only during the ``load`` call: copy what you keep beyond it.

Test for ``bytes`` rather than rely on what a payload happens to be.
Today a VMState2 load gives: for a zstd record, a view of the whole
``bytes`` it decompressed into; for an uncompressed record, a read-only view
of the buffer the record was read into (with the next record's header: one
read per record, no copy), which is not ``bytes``: copy it.  A VMState1
blob's records are views of the blob, a ``bytes``.  examples/memstate.py
keeps whole ``bytes`` payloads and copies the rest once.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from ..stream import Record
from .records import BytesLike, SaveResult

__all__ = ["Daemon", "LoadCallable", "Pending", "PreCopyDaemon", "SaveCallable", "SaveResult", "as_daemon"]


@dataclass(frozen=True, slots=True)
class Pending:
    """A daemon's estimates, in state bytes before compression (VFIO's PRECOPY_INFO)."""

    initial_bytes: int = 0
    """Initial data not yet yielded by ``initial_records``."""
    dirty_bytes: int = 0
    """Data changed since it was last yielded, that ``dirty_records`` would yield now."""
    total_bytes: int = 0
    """The size of the whole state: what a one-shot save would write."""


@runtime_checkable
class Daemon(Protocol):
    """What every back-end's daemon provides."""

    def save(self) -> SaveResult | Awaitable[SaveResult]:
        """The whole state, for a one-shot save."""
        ...

    def load(self, records: Iterator[Record]) -> None:
        """Stage the verified records, then commit once the loop has ended."""
        ...


@runtime_checkable
class PreCopyDaemon(Daemon, Protocol):
    """A daemon that can save iteratively while it serves (VMState2 SavePreCopy).

    The library calls, in its worker thread: ``precopy_start``; then
    ``initial_records`` once (consumed while the daemon serves); then
    ``dirty_records`` once per round until the VMM asks for stop-copy; then
    ``quiesce``, a last ``dirty_records``, and ``precopy_end``.  On failure
    or Cancel it calls ``precopy_end`` and, if it had quiesced the daemon,
    ``resume``.  ``pending`` may be called at any time from any thread.
    """

    def precopy_start(self) -> None:
        """Start tracking changes: from now on every change shows in ``dirty_records``."""
        ...

    def initial_records(self) -> Iterable[BytesLike]:
        """The state as it is, as records; changes made meanwhile are tracked."""
        ...

    def dirty_records(self) -> Iterable[BytesLike]:
        """Records of everything changed since the last call (or since
        ``precopy_start``): one round.  Nothing if nothing changed."""
        ...

    def pending(self) -> Pending:
        """Cheap estimates of what is left to send."""
        ...

    def quiesce(self) -> None:
        """Stop changing the state; return once it no longer changes (until ``resume``)."""
        ...

    def resume(self) -> None:
        """Serve and change the state again after ``quiesce``."""
        ...

    def precopy_end(self) -> None:
        """Stop tracking changes: the iterative save ended, whatever its outcome."""
        ...


SaveCallable: TypeAlias = Callable[[], SaveResult | Awaitable[SaveResult]]
LoadCallable: TypeAlias = Callable[[Iterator[bytes]], Any]


class Callables:
    """A :class:`Daemon` made of a save and a load callable, the library's
    first form (``Backend(id, save, load)``), kept for the daemons that use
    it: ``load`` gets the records' payloads (read-only memoryviews) only."""

    def __init__(self, save: SaveCallable, load: LoadCallable) -> None:
        if inspect.iscoroutinefunction(load):
            raise TypeError("load must be a plain function: it runs in the transfer's thread and pulls records as they arrive")
        self.save = save
        self._load = load

    def load(self, records: Iterator[Record]) -> None:
        self._load(record.payload for record in records)


def as_daemon(daemon: Daemon | SaveCallable, load: LoadCallable | None) -> Daemon:
    """The :class:`Daemon` behind Backend's arguments: a daemon object, or a
    save and a load callable.

    Raises:
        TypeError: neither form, or a coroutine function as ``load``.
    """
    if load is not None:
        return Callables(daemon, load)
    if not isinstance(daemon, Daemon):
        raise TypeError(
            f"a back-end needs a daemon object with save() and load(records), or a save and a load callable; "
            f"got {type(daemon).__name__}"
        )
    if inspect.iscoroutinefunction(daemon.load):
        raise TypeError("the daemon's load must be a plain function: it runs in a worker thread")
    return daemon
