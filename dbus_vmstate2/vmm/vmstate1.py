"""VMState1 calls as QEMU makes them: the whole state inline, at most 1 MiB."""

from __future__ import annotations

from dbus_fast.aio import MessageBus

from ..names import VMSTATE1
from .calls import call
from .discovery import BackendInfo


async def save_inline(bus: MessageBus, backend: BackendInfo) -> bytes:
    """``Save()`` on ``backend``: its state as one blob of at most 1 MiB."""
    [blob] = await call(bus, backend.unique_name, VMSTATE1, "Save")
    return blob


async def load_inline(bus: MessageBus, backend: BackendInfo, blob: bytes) -> None:
    """``Load(blob)`` on ``backend``."""
    await call(bus, backend.unique_name, VMSTATE1, "Load", "ay", [blob])
