"""org.qemu.VMState2 (interfaces/org.qemu.VMState2.xml); the work is the Backend's."""

# No "from __future__ import annotations": dbus-fast reads the D-Bus
# signatures from the evaluated annotations.
from typing import TYPE_CHECKING

from dbus_fast.annotations import DBusBool, DBusDict, DBusStr, DBusUInt64, DBusUnixFd
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

from ..names import VMSTATE2
from .boundary import dbus_errors

if TYPE_CHECKING:
    from .core import Backend


class VMState2Interface(ServiceInterface):
    def __init__(self, backend: "Backend") -> None:
        super().__init__(VMSTATE2)
        self._backend = backend

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:  # noqa: N802 - D-Bus member names
        return self._backend.id

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:  # noqa: N802
        return self._backend.state.value

    @dbus_property(access=PropertyAccess.READ)
    def Capabilities(self) -> DBusDict:  # noqa: N802
        return self._backend.capabilities()

    # Save and Load are plain methods, not coroutines: dbus-fast runs a
    # coroutine handler as a task, later, so a Cancel right behind a Save
    # would find no transfer yet and be lost.

    @method()
    def Save(self, fd: DBusUnixFd, options: DBusDict) -> DBusUInt64:  # noqa: N802
        with dbus_errors("VMState2 Save"):
            return self._backend.start_save(fd, options)

    @method()
    def Load(self, fd: DBusUnixFd, options: DBusDict) -> DBusUInt64:  # noqa: N802
        with dbus_errors("VMState2 Load"):
            return self._backend.start_load(fd, options)

    @method()
    def Check(self) -> "tbttt":  # noqa: N802, F821
        with dbus_errors("VMState2 Check"):
            return list(self._backend.check())

    @method()
    def Cancel(self) -> None:  # noqa: N802
        with dbus_errors("VMState2 Cancel"):
            self._backend.cancel_own()

    @method()
    def CancelTransfer(self, transfer: DBusUInt64) -> DBusBool:  # noqa: N802
        with dbus_errors("VMState2 CancelTransfer"):
            return self._backend.cancel_transfer(transfer)

    @method()
    def Reset(self) -> None:  # noqa: N802
        with dbus_errors("VMState2 Reset"):
            self._backend.reset()

    @signal()
    def TransferFinished(  # noqa: N802
        self, transfer: int, operation: str, error_name: str, message: str, records: int, raw_bytes: int, stream_bytes: int
    ) -> "tsssttt":  # noqa: F821
        return [transfer, operation, error_name, message, records, raw_bytes, stream_bytes]

    def state_changed(self, state: str) -> None:
        self.emit_properties_changed({"State": state})

