"""org.qemu.VMState2 (interfaces/org.qemu.VMState2.xml): the bus face of a back-end.

The interface only translates: each method calls its :class:`Handler`, and
typed errors become D-Bus error replies in :func:`~.boundary.dbus_errors`.
"""

# No "from __future__ import annotations": dbus-fast reads the D-Bus
# signatures from the evaluated annotations.
import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from dbus_fast import Variant
from dbus_fast.annotations import DBusBool, DBusDict, DBusStr, DBusUInt64, DBusUnixFd
from dbus_fast.service import PropertyAccess, dbus_property, method, signal

from ..names import VMSTATE2
from .boundary import dbus_errors
from .surface import EMITS_CHANGED, DescribedInterface

log = logging.getLogger(__name__)


class Handler(Protocol):
    """What the interface asks of the back-end (:class:`~.core.Backend` is one)."""

    id: str

    @property
    def state(self) -> str: ...
    def capabilities(self) -> dict[str, Variant]: ...
    def start_save(self, fd: int, options: dict[str, Variant]) -> int: ...
    def start_precopy(self, fd: int, options: dict[str, Variant]) -> int: ...
    def start_load(self, fd: int, options: dict[str, Variant]) -> int: ...
    def commit(self, number: int) -> None: ...
    def stop_copy(self, number: int) -> None: ...
    def resume(self) -> None: ...
    def pending(self) -> tuple[int, int, int, int]: ...
    def check(self) -> tuple[int, bool, int, int, int]: ...
    def cancel_own(self) -> None: ...
    def cancel_transfer(self, number: int) -> bool: ...
    def reset(self) -> None: ...


class VMState2Interface(DescribedInterface):
    """Each member of interfaces/org.qemu.VMState2.xml; the work is the handler's."""

    # What the methods' Python cannot say, as the XML says it (backend/surface.py).
    OUT_ARGS = {
        "Save": ("transfer",),
        "SavePreCopy": ("transfer",),
        "Pending": ("initial_bytes", "dirty_bytes", "stop_copy_bytes", "rounds"),
        "Load": ("transfer",),
        "Check": ("transfer", "finished", "records", "raw_bytes", "stream_bytes"),
        "CancelTransfer": ("cancelled",),
    }
    ANNOTATIONS = {
        "Id": {EMITS_CHANGED: "const"},
        "State": {EMITS_CHANGED: "true"},
        "Capabilities": {EMITS_CHANGED: "const"},
    }

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._held: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self._holders: set[asyncio.Future[Any]] = set()
        super().__init__(VMSTATE2)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:  # noqa: N802 - D-Bus member names
        return self._handler.id

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:  # noqa: N802
        return str(self._handler.state)

    @dbus_property(access=PropertyAccess.READ)
    def Capabilities(self) -> DBusDict:  # noqa: N802
        return self._handler.capabilities()

    # The methods are plain, not coroutines: dbus-fast runs a coroutine
    # handler as a task, later, so a Cancel right behind a Save would find no
    # transfer yet and be lost; and the caller is noted just before a plain
    # method runs (see Backend._note_caller).

    @method()
    def Save(self, fd: DBusUnixFd, options: DBusDict) -> DBusUInt64:  # noqa: N802
        with dbus_errors("VMState2 Save"):
            return self._handler.start_save(fd, options)

    @method()
    def SavePreCopy(self, fd: DBusUnixFd, options: DBusDict) -> DBusUInt64:  # noqa: N802
        with dbus_errors("VMState2 SavePreCopy"):
            return self._handler.start_precopy(fd, options)

    @method()
    def StopCopy(self, transfer: DBusUInt64) -> None:  # noqa: N802
        with dbus_errors("VMState2 StopCopy"):
            self._handler.stop_copy(transfer)

    @method()
    def Resume(self) -> None:  # noqa: N802
        with dbus_errors("VMState2 Resume"):
            self._handler.resume()

    @method()
    def Pending(self) -> "tttt":  # noqa: N802, F821
        with dbus_errors("VMState2 Pending"):
            return list(self._handler.pending())

    @method()
    def Load(self, fd: DBusUnixFd, options: DBusDict) -> DBusUInt64:  # noqa: N802
        with dbus_errors("VMState2 Load"):
            return self._handler.start_load(fd, options)

    @method()
    def Commit(self, transfer: DBusUInt64) -> None:  # noqa: N802
        with dbus_errors("VMState2 Commit"):
            self._handler.commit(transfer)

    @method()
    def Check(self) -> "tbttt":  # noqa: N802, F821
        with dbus_errors("VMState2 Check"):
            return list(self._handler.check())

    @method()
    def Cancel(self) -> None:  # noqa: N802
        with dbus_errors("VMState2 Cancel"):
            self._handler.cancel_own()

    @method()
    def CancelTransfer(self, transfer: DBusUInt64) -> DBusBool:  # noqa: N802
        with dbus_errors("VMState2 CancelTransfer"):
            return self._handler.cancel_transfer(transfer)

    @method()
    def Reset(self) -> None:  # noqa: N802
        with dbus_errors("VMState2 Reset"):
            self._handler.reset()

    @signal()
    def TransferFinished(  # noqa: N802
        self, transfer: int, operation: str, error_name: str, message: str, records: int, raw_bytes: int, stream_bytes: int
    ) -> "tsssttt":  # noqa: F821
        return [transfer, operation, error_name, message, records, raw_bytes, stream_bytes]

    @signal()
    def InitialDataSent(self, transfer: int) -> "t":  # noqa: F821
        return transfer

    @signal()
    def LoadStaged(self, transfer: int) -> "t":  # noqa: N802, F821
        return transfer

    def state_changed(self, state: str) -> None:
        """Emit the ``State`` property's change (through :meth:`emit`, as every signal)."""
        self.emit(self.emit_properties_changed, {"State": state})

    def emit(self, signal: Callable[..., object], *args: Any) -> None:
        """Send ``signal`` (one of this interface's) with ``args`` now, or,
        while signals are held (:meth:`hold_signals_until`), in turn later."""
        if self._holders:
            self._held.append((signal, args))
        else:
            signal(*args)

    def hold_signals_until(self, call: asyncio.Future[Any]) -> None:
        """Hold every signal until ``call`` (the task dbus-fast runs a
        method call in) is done and its reply sent, then send them in order.

        A VMState1 call's reply is downtime; its ``State`` changes and its
        TransferFinished are news for watchers, which can wait for a reply
        of 1 MiB to go first (README "VMState1 inline").  dbus-fast sends the
        reply from a done callback it adds to ``call`` before the call's
        code runs; the one added here runs after it.
        """
        self._holders.add(call)
        call.add_done_callback(self._release)

    def _release(self, call: asyncio.Future[Any]) -> None:
        self._holders.discard(call)
        if self._holders:
            return
        held, self._held = self._held, []
        try:
            for emit, args in held:
                emit(*args)
        except Exception as exc:  # the bus went away: what it would have told is in Check
            log.warning("back-end %r: signals not sent: %s", self._handler.id, exc)
