"""Well-known names, paths and limits shared by the back-end and the VMM side."""

from __future__ import annotations

from .errors import LimitExceeded

OBJECT_PATH = "/org/qemu/VMState1"
"""The one object a back-end exports; QEMU looks for VMState1 here."""

VMSTATE1 = "org.qemu.VMState1"
"""QEMU's interface, and the bus name every back-end queues on."""

VMSTATE2 = "org.qemu.VMState2"
"""Our interface, on the same object; back-ends queue on this name too."""

VMSTATE1_SIZE_LIMIT = 1 << 20
"""QEMU's ``DBUS_VMSTATE_SIZE_LIMIT``: the largest blob one Save may return."""

MAX_ID_BYTES = 255
"""QEMU keeps an Id in 256 bytes including the terminating NUL."""


def check_id(backend_id: str) -> str:
    """Return ``backend_id`` if QEMU and our stream format accept it.

    Raises:
        LimitExceeded: the Id is empty or longer than 255 bytes in UTF-8.
        ValueError: the Id contains a comma (QEMU's ``id-list`` splits on
            commas, so such an Id could never be required) or a NUL.
    """
    size = len(backend_id.encode())
    if not 0 < size <= MAX_ID_BYTES:
        raise LimitExceeded(f"a back-end Id must be 1 to {MAX_ID_BYTES} bytes of UTF-8, got {size}")
    if "," in backend_id or "\0" in backend_id:
        raise ValueError(f"a back-end Id may not contain ',' or NUL: {backend_id!r}")
    return backend_id
