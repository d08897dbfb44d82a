"""dbus_vmstate2/bus.py: the project's bus connections fail cleanly, and
send large byte arrays from their own buffers.

A connection whose socket breaks as it sends must fail the call that sent,
and say nothing else: a stray "Future exception was never retrieved" on
stderr is a second, misleading line from a command that promises one
(tests/test_fault_matrix.py kills the bus mid-migration and checks that).
"""

from __future__ import annotations

import asyncio
import gc
import random
import socket

import pytest
from dbus_fast import Message, MessageType

from dbus_vmstate2.bus import SplitBytes, open_bus


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


async def test_large_byte_arrays_arrive_whole(bus_address):
    """A body of one large byte array goes from its own buffers (bytes, or
    SplitBytes of more pieces than one sendmsg takes), and a small
    SplitBytes the usual way; each arrives as sent, and the connection
    goes on with the messages behind it."""
    sender = await open_bus(bus_address)
    receiver = await open_bus(bus_address)
    got: list[Message] = []

    def on_call(msg: Message) -> Message | None:
        if msg.member != "Take":
            return None
        got.append(msg)
        return Message.new_method_return(msg, "u", [len(msg.body[0])])

    receiver.add_message_handler(on_call)
    pieces = [bytes([n % 251]) * (16 << 10) for n in range(1100)]  # 17.2 MiB in 1100 pieces (sendmsg takes 512)
    small = [b"a" * 100, memoryview(b"b" * 200)[50:]]
    cases = {"bytes": random.Random(1).randbytes(3 << 20), "pieces": SplitBytes(pieces), "small": SplitBytes(small)}
    expected = {"bytes": cases["bytes"], "pieces": b"".join(pieces), "small": b"a" * 100 + b"b" * 150}
    try:
        for name, data in cases.items():
            calls = [sender.call(Message(destination=receiver.unique_name, path="/", interface="test.Bus",
                                         member="Take", signature="ay", body=[body]))
                     for body in (data, b"behind")]  # fmt: skip
            replies = await asyncio.gather(*calls)
            assert [r.message_type for r in replies] == [MessageType.METHOD_RETURN] * 2, name
            assert [r.body for r in replies] == [[len(expected[name])], [6]], name
            assert [m.body[0] for m in got] == [expected[name], b"behind"], name
            got.clear()
    finally:
        for bus in (sender, receiver):
            bus.disconnect()
            await bus.wait_for_disconnect()


def test_split_bytes_take_only_what_cannot_change():
    assert bytes(SplitBytes([b"ab", memoryview(b"xcd")[1:]])) == b"abcd"
    assert len(SplitBytes([b"ab", memoryview(b"xcd")[1:]])) == 4
    assert len(SplitBytes([b"a"] * 100).pieces) == 1  # small pieces are joined
    for unsafe in (bytearray(b"ab"), memoryview(bytearray(b"ab")), memoryview(b"abcd")[::2]):
        with pytest.raises(TypeError, match="bytes or a contiguous view of bytes"):
            SplitBytes([b"ok", unsafe])
    theirs = memoryview(bytes(range(256)) * 128).cast("B", (128, 256))  # 32 KiB in two dimensions
    split = SplitBytes([theirs])
    theirs.release()  # the caller's view; the pieces hold their own
    assert len(split) == 32 << 10 and bytes(split) == bytes(range(256)) * 128
