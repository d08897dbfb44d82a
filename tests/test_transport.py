"""The migration transport's own figures, on real sockets."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from collections.abc import Callable

from dbus_vmstate2.vmm.transport import connect
from dbus_vmstate2.vmm.uri import parse_uri


def received_unread(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def test_unsent_is_what_has_not_reached_the_peer():
    """What the source's plan counts as still on its way: every byte the
    peer's kernel has not acknowledged, however it is split between our
    buffer and the send queue; nothing once the peer has it all."""
    server = socket.create_server(("127.0.0.1", 0))
    source = await connect(parse_uri(f"tcp:127.0.0.1:{server.getsockname()[1]}"))
    peer, _ = server.accept()
    server.close()
    total = 16 << 20
    try:
        assert source.unsent() == 0
        source.queue(b"x" * total)  # the peer reads nothing for now
        assert await until(lambda: source.unsent() == total - received_unread(peer))
        assert 0 < source.unsent() < total  # what is in the peer's receive queue is acknowledged
        peer.setblocking(False)
        taken = 0

        def take() -> bool:
            nonlocal taken
            try:
                taken += len(peer.recv(1 << 20))
            except BlockingIOError:
                pass
            return taken == total

        assert await until(take)
        assert await until(lambda: source.unsent() == 0)
    finally:
        peer.close()
        await source.close()


async def test_round_trip_is_tcps_own_measure_and_zero_on_a_local_socket(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    tcp = await connect(parse_uri(f"tcp:127.0.0.1:{server.getsockname()[1]}"))
    peer, _ = server.accept()
    try:
        assert 0 < tcp.round_trip() < 0.5  # loopback: microseconds, as the kernel measured the handshake
    finally:
        peer.close()
        server.close()
        await tcp.close()
    path = str(tmp_path / "local.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    local = await connect(parse_uri(f"unix:{path}"))
    try:
        assert local.round_trip() == 0.0 and local.unsent() == 0
    finally:
        server.close()
        await local.close()
