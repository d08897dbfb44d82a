"""A VMState2 back-end written by hand, without this project's library, that
misbehaves on Save in one chosen way: the VMM helper must not trust it.

    python -m tests.rogue_backend ADDRESS ID MODE

MODE is one of :data:`MODES`.  Save writes the stream MODE names into the
fd, reports success with TransferFinished, and closes the fd (or, for the
``*-kept-open`` modes, keeps it open for good).  Prints ``READY <unique
name>`` once queued on org.qemu.VMState2, and ``FINISHED <n>`` after each
TransferFinished; runs until SIGTERM.
"""

# No "from __future__ import annotations": dbus-fast reads the D-Bus
# signatures from the evaluated annotations.
import asyncio
import os
import signal
import sys

from dbus_fast import NameFlag
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusDict, DBusStr, DBusUInt64, DBusUnixFd
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method, signal as dbus_signal

from dbus_vmstate2.stream import Compression, encode_stream
from dbus_vmstate2.stream._format import pack_header, pack_record, pack_trailer_fields, zstd_check
from dbus_vmstate2.stream._zstd import zstd

STATE = b"rogue state " * 1000


def forged(backend_id: str, raw_len: int, frame: bytes) -> bytes:
    """A zstd stream of one record whose framing, CRCs and digest are all
    right around ``frame``, whatever the frame holds: a skim passes it."""
    import hashlib

    head = pack_header(backend_id, Compression.ZSTD, 1)
    record = pack_record(1, 0, raw_len, len(frame), zstd_check(frame))
    fields = pack_trailer_fields(1, raw_len, len(head) + len(record) + len(frame))
    return head + record + frame + fields + hashlib.sha256(head + record + fields).digest()


def stream_for(mode: str, backend_id: str) -> bytes:
    good = encode_stream(backend_id, [STATE], Compression.NONE)
    if mode in ("good", "kept-open"):
        return good
    if mode == "damaged-payload":  # the record's CRC no longer matches: only a full decode sees it
        bad = bytearray(good)
        bad[bad.index(STATE) + 100] ^= 0x20
        return bytes(bad)
    if mode == "zstd-bomb":  # 1 MiB of zeros behind a record that declares 1000 bytes
        compressor = zstd.ZstdCompressor(options={zstd.CompressionParameter.checksum_flag: 1})
        return forged(backend_id, 1000, compressor.compress(bytes(1 << 20), mode=compressor.FLUSH_FRAME))
    if mode == "other-id":
        return encode_stream(backend_id + "-other", [STATE], Compression.NONE)
    if mode in ("truncated", "truncated-kept-open"):
        return good[:-1]
    raise SystemExit(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


MODES = ("good", "kept-open", "damaged-payload", "zstd-bomb", "other-id", "truncated", "truncated-kept-open")


class RogueVMState2(ServiceInterface):
    def __init__(self, backend_id: str, mode: str) -> None:
        super().__init__("org.qemu.VMState2")
        self._id, self._mode = backend_id, mode
        self._number = 0
        self._kept: list[int] = []
        self._counters = (0, 0, 0)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:  # noqa: N802
        return self._id

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:  # noqa: N802
        return "running"

    @dbus_property(access=PropertyAccess.READ)
    def Capabilities(self) -> DBusDict:  # noqa: N802
        return {}

    @method()
    def Save(self, fd: DBusUnixFd, options: DBusDict) -> DBusUInt64:  # noqa: N802
        self._number += 1
        data = stream_for(self._mode, self._id)
        os.write(fd, data)  # smaller than a pipe's buffer
        if self._mode.endswith("kept-open"):
            self._kept.append(fd)
        else:
            os.close(fd)
        self._counters = (1, len(STATE), len(data))
        asyncio.get_running_loop().call_soon(self._finish, self._number)
        return self._number

    def _finish(self, number: int) -> None:
        self.TransferFinished(number, "save", "", "", *self._counters)
        print(f"FINISHED {number}", flush=True)

    @method()
    def Check(self) -> "tbttt":  # noqa: N802, F821
        return [self._number, True, *self._counters]

    @method()
    def Cancel(self) -> None:  # noqa: N802
        pass

    @method()
    def CancelTransfer(self, transfer: DBusUInt64) -> DBusBool:  # noqa: N802
        return False

    @dbus_signal()
    def TransferFinished(  # noqa: N802
        self, transfer: int, operation: str, error_name: str, message: str, records: int, raw_bytes: int, stream_bytes: int
    ) -> "tsssttt":  # noqa: F821
        return [transfer, operation, error_name, message, records, raw_bytes, stream_bytes]


async def main(address: str, backend_id: str, mode: str) -> None:
    stream_for(mode, backend_id)  # an unknown mode fails here, before READY
    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    bus.export("/org/qemu/VMState1", RogueVMState2(backend_id, mode))
    await bus.request_name("org.qemu.VMState2", NameFlag.NONE)
    print(f"READY {bus.unique_name}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
