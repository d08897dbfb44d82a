"""org.qemu.VMState1 exactly as QEMU drives it (interfaces/org.qemu.VMState1.xml)."""

# No "from __future__ import annotations": dbus-fast reads the D-Bus
# signatures from the evaluated annotations.
import asyncio
from typing import Any, Protocol

from dbus_fast.annotations import DBusBytes, DBusStr
from dbus_fast.service import PropertyAccess, dbus_property, method

from ..bus import SplitBytes
from ..names import VMSTATE1
from .boundary import dbus_errors
from .surface import DescribedInterface


class Handler(Protocol):
    """What the interface asks of the back-end (:class:`~.core.Backend` is one)."""

    id: str

    async def save_inline(self) -> SplitBytes: ...
    async def load_inline(self, blob: bytes) -> None: ...
    def signals_after_reply(self, call: "asyncio.Task[Any]") -> None: ...


class VMState1Interface(DescribedInterface):
    """``Id``, ``Save() -> ay`` and ``Load(ay)``; the work is the handler's."""

    OUT_ARGS = {"Save": ("data",)}  # as QEMU's XML names it (backend/surface.py)

    def __init__(self, backend: Handler) -> None:
        self._backend = backend
        super().__init__(VMSTATE1)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:  # noqa: N802 - D-Bus member names
        return self._backend.id

    @method()
    async def Save(self) -> DBusBytes:  # noqa: N802
        # Each call is its own task in dbus-fast; its reply is downtime, so
        # the signals it causes wait for it (VMState2Interface.hold_signals_until).
        # The blob is SplitBytes, which our connection sends unjoined (bus.py).
        self._backend.signals_after_reply(asyncio.current_task())  # type: ignore[arg-type]
        with dbus_errors("VMState1 Save"):
            return await self._backend.save_inline()

    @method()
    async def Load(self, data: DBusBytes) -> None:  # noqa: N802
        self._backend.signals_after_reply(asyncio.current_task())  # type: ignore[arg-type]
        with dbus_errors("VMState1 Load"):
            await self._backend.load_inline(data)
