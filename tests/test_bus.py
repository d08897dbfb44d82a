"""dbus_vmstate2/bus.py: the project's bus connections fail cleanly.

A connection whose socket breaks as it sends must fail the call that sent,
and say nothing else: a stray "Future exception was never retrieved" on
stderr is a second, misleading line from a command that promises one
(tests/test_fault_matrix.py kills the bus mid-migration and checks that).
"""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest
from dbus_fast import Message

from dbus_vmstate2.bus import open_bus


def get_id() -> Message:
    """A call any bus daemon answers (a new one each time: a sent message keeps its serial)."""
    return Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                   interface="org.freedesktop.DBus", member="GetId")  # fmt: skip


async def test_a_call_whose_send_breaks_fails_and_logs_nothing(bus_address):
    loop = asyncio.get_running_loop()
    logged: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: logged.append(context))
    try:
        bus = await open_bus(bus_address)
        # The next send fails with EPIPE at once, before the reader can see
        # the daemon hang up: the order in which a killed bus daemon is
        # noticed by a connection that was about to send.
        bus._sock.shutdown(socket.SHUT_WR)
        with pytest.raises(BrokenPipeError):
            await bus.call(get_id())
        with pytest.raises(BrokenPipeError):
            await bus.wait_for_disconnect()
        del bus
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert [context["message"] for context in logged] == []


async def test_a_call_on_a_closed_connection_fails_at_once(bus_address):
    """Rather than wait forever for a reply that cannot come, or have the
    loop watch the closed socket's fd, whose number may be another file's."""
    bus = await open_bus(bus_address)
    bus.disconnect()
    await bus.wait_for_disconnect()
    with pytest.raises(BrokenPipeError, match="the connection to the bus is closed"):
        await asyncio.wait_for(bus.call(get_id()), 5)
