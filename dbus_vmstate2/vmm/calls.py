"""Method calls to a back-end, with error replies raised as our typed errors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from ..errors import BackendFailed, BusLost, from_dbus_error
from ..names import OBJECT_PATH

BUS_NAME = "org.freedesktop.DBus"
CALL_TIMEOUT = 30.0
"""Seconds to wait for a reply: every VMState method answers at once (the
work runs after the reply), so only a hung or stopped peer takes longer."""
PROPERTIES = "org.freedesktop.DBus.Properties"


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
    try:
        reply = await asyncio.wait_for(bus.call(message), timeout)
    except TimeoutError:
        raise BackendFailed(f"{destination} did not answer {interface}.{member} within {timeout:g} s") from None
    except (EOFError, ConnectionError) as exc:
        raise BusLost(f"the bus connection ended during {interface}.{member}: {exc or type(exc).__name__}") from exc
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise from_dbus_error(reply.error_name or "", text)
    return reply.body
