"""Method calls to a back-end, with error replies raised as our typed errors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Self

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from ..errors import BackendFailed, BusLost, VMStateError, from_dbus_error
from ..names import OBJECT_PATH, VMSTATE2

BUS_NAME = "org.freedesktop.DBus"
CALL_TIMEOUT = 30.0
"""Seconds to wait for a reply: every VMState method answers at once (the
work runs after the reply), so only a hung or stopped peer takes longer."""
PROPERTIES = "org.freedesktop.DBus.Properties"
CLEANUP_TIMEOUT = 5.0
"""Seconds for a call that only tidies up after a failure."""


async def call(
    bus: MessageBus,
    destination: str,
    interface: str,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    *,
    path: str = OBJECT_PATH,
    unix_fds: Sequence[int] = (),
    timeout: float | None = CALL_TIMEOUT,
) -> list[Any]:
    """Call ``interface.member`` on ``destination`` and return the reply's body.

    Args:
        timeout: seconds to wait for the reply (every method of ours answers
            at once); None: no bound.

    Raises:
        VMStateError: the subclass matching the error reply's name.
        BackendFailed: no reply within ``timeout`` (a hung or stopped peer).
        BusLost: the bus connection ended.
    """
    message = Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=list(body),
        unix_fds=list(unix_fds),
    )
    if not bus.connected:
        raise BusLost(f"the connection to the bus was lost (the bus daemon went away?) before {interface}.{member}")
    try:
        async with asyncio.timeout(timeout):
            reply = await bus.call(message)
    except TimeoutError:
        raise BackendFailed(f"{destination} did not answer {interface}.{member} within {timeout:g} s") from None
    except (EOFError, OSError) as exc:
        # Once the bus daemon is gone dbus-fast closes the socket, and a call
        # that was already on its way fails on the closed fd (EBADF), not
        # with a ConnectionError.
        if bus.connected and not isinstance(exc, ConnectionError):
            raise
        raise BusLost(
            f"the connection to the bus was lost (the bus daemon went away?) during {interface}.{member}: "
            f"{exc or type(exc).__name__}"
        ) from exc
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise from_dbus_error(reply.error_name or "", text)
    return reply.body


class SignalWatch:
    """Receives one VMState2 signal of every back-end while an ``async with``
    block runs (a match rule added on entry, removed on exit); a subclass
    names it in ``MEMBER`` and handles it in :meth:`on_signal`."""

    MEMBER = ""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._rule = f"type='signal',interface='{VMSTATE2}',member='{self.MEMBER}'"

    async def __aenter__(self) -> Self:
        self._bus.add_message_handler(self._on_message)
        await call(self._bus, BUS_NAME, BUS_NAME, "AddMatch", "s", [self._rule], path="/org/freedesktop/DBus")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._bus.remove_message_handler(self._on_message)
        if not self._bus.connected:
            return
        try:
            await call(self._bus, BUS_NAME, BUS_NAME, "RemoveMatch", "s", [self._rule], path="/org/freedesktop/DBus",
                       timeout=CALL_TIMEOUT if exc_info[0] is None else CLEANUP_TIMEOUT)  # fmt: skip
        except VMStateError:
            # Already failing (a bus that stopped answering, say): that error
            # is the one to report, and a rule left behind goes with the
            # connection.
            if exc_info[0] is None:
                raise

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.interface == VMSTATE2 and msg.member == self.MEMBER:
            self.on_signal(msg)

    def on_signal(self, msg: Message) -> None:
        raise NotImplementedError
