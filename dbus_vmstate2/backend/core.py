"""The back-end helper library's asyncio core: one daemon's presence on the bus.

Theory of operation: a daemon builds a :class:`Backend` with its Id, a save
callable and a load callable, and awaits :meth:`Backend.start` once, *before*
it sandboxes itself.  That connects to the bus, exports ``/org/qemu/VMState1``
and queues on the VMState bus names.  From then on the library opens no
socket or file of its own: QEMU or the dbus-vmstate2 VMM helper drives it
over that one connection.

The daemon's callables:

* ``save()`` returns the state: one bytes-like object, or an iterable of
  bytes-like records (each at most ``stream.MAX_RECORD_SIZE``).
* ``load(records)`` receives an iterator over the records, in order.  Every
  record has been verified before it is handed over; stage what you get and
  replace your live state only once the iteration has ended without an
  exception, so that a stream that fails its final check loses nothing.

Either may be a coroutine function (awaited on the bus's event loop) or a
plain function (run in a worker thread, so the bus keeps answering).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeAlias

from dbus_fast import BusType, NameFlag
from dbus_fast.aio import MessageBus

from ..errors import Busy
from ..names import OBJECT_PATH, VMSTATE1, check_id
from ..stream import Compression
from .boundary import call_daemon, log
from .inline import decode_inline, encode_inline
from .records import SaveResult, iter_records
from .vmstate1 import VMState1Interface

SaveCallable: TypeAlias = Callable[[], SaveResult | Awaitable[SaveResult]]
LoadCallable: TypeAlias = Callable[[Iterator[bytes]], Any]


class Backend:
    """A back-end on the bus, serving VMState1 for its daemon.

    Args:
        backend_id: the back-end's Id, 1 to 255 bytes, unique on the bus and
            stable across the migration (QEMU matches source and destination
            back-ends by it).
        save: the daemon's save callable (see the module docstring).
        load: the daemon's load callable.
        address: a D-Bus address such as ``unix:path=/run/vm1/bus``; the
            session bus when None.
        compression: how the state is compressed on the wire.
    """

    def __init__(
        self,
        backend_id: str,
        save: SaveCallable,
        load: LoadCallable,
        *,
        address: str | None = None,
        compression: Compression = Compression.ZSTD,
    ) -> None:
        self.id = check_id(backend_id)
        self._save = save
        self._load = load
        self._address = address
        self._compression = compression
        self._bus: MessageBus | None = None
        self._transfer: str | None = None

    @property
    def unique_name(self) -> str:
        """This back-end's unique bus name (``:1.N``); only once started."""
        if self._bus is None or self._bus.unique_name is None:
            raise RuntimeError("the back-end is not started")
        return self._bus.unique_name

    async def start(self) -> None:
        """Connect, export the object and queue on the bus names.

        A queued name request is success: QEMU enumerates every queued owner.

        Raises:
            OSError, dbus_fast.AuthError, ...: the bus cannot be reached.
        """
        if self._address is None:
            bus = MessageBus(bus_type=BusType.SESSION, negotiate_unix_fd=True)
        else:
            bus = MessageBus(bus_address=self._address, negotiate_unix_fd=True)
        await bus.connect()
        try:
            bus.export(OBJECT_PATH, VMState1Interface(self))
            reply = await bus.request_name(VMSTATE1, NameFlag.NONE)
        except BaseException:
            bus.disconnect()
            raise
        self._bus = bus
        log.info("back-end %r is %s on %s (%s)", self.id, bus.unique_name, VMSTATE1, reply.name)

    async def stop(self) -> None:
        """Leave the bus; safe to call more than once."""
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

    # -- the work behind the interfaces -------------------------------------

    def _begin(self, what: str) -> None:
        if self._transfer is not None:
            raise Busy(f"back-end {self.id!r} is busy with {self._transfer}; try again when it ends")
        self._transfer = what

    async def save_inline(self) -> bytes:
        """VMState1 Save: the whole state as one verified stream of <= 1 MiB."""
        self._begin("a VMState1 Save")
        try:
            state = await call_daemon("save", self._save)
            return await call_daemon("save", self._encode_inline, state)
        finally:
            self._transfer = None

    async def load_inline(self, blob: bytes) -> None:
        """VMState1 Load: verify the whole blob, then hand its records to load."""
        self._begin("a VMState1 Load")
        try:
            records = await asyncio.to_thread(decode_inline, self.id, blob)
            await call_daemon("load", self._load, iter(records))
            log.info("back-end %r loaded %d records (%d bytes inline)", self.id, len(records), len(blob))
        finally:
            self._transfer = None

    def _encode_inline(self, state: SaveResult) -> bytes:
        return encode_inline(self.id, iter_records(state), self._compression)
