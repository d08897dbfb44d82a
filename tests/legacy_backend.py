"""A VMState1 back-end written by hand against QEMU's interface, without this
project's library: the kind of daemon that serves its state as a raw blob and
must keep migrating while it upgrades to the library (``vmstate1="legacy"``).

    python -m tests.legacy_backend ADDRESS ID STATE_FILE LOADED_FILE

Save returns the bytes of STATE_FILE; Load writes what it gets to LOADED_FILE.
Prints ``READY <unique name>`` once queued on org.qemu.VMState1.
"""

import asyncio
import signal
import sys
from pathlib import Path

from dbus_fast import NameFlag
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBytes, DBusStr
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method


class VMState1(ServiceInterface):
    def __init__(self, backend_id: str, state: Path, loaded: Path) -> None:
        super().__init__("org.qemu.VMState1")
        self._id, self._state, self._loaded = backend_id, state, loaded

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:  # noqa: N802
        return self._id

    @method()
    def Save(self) -> DBusBytes:  # noqa: N802
        return self._state.read_bytes()

    @method()
    def Load(self, data: DBusBytes) -> None:  # noqa: N802
        self._loaded.write_bytes(data)


async def main(address: str, backend_id: str, state: str, loaded: str) -> None:
    bus = await MessageBus(bus_address=address).connect()
    bus.export("/org/qemu/VMState1", VMState1(backend_id, Path(state), Path(loaded)))
    await bus.request_name("org.qemu.VMState1", NameFlag.NONE)
    print(f"READY {bus.unique_name}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
