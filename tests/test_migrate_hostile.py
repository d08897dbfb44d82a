"""The migration's transport against hostile or broken peers: a source that
goes silent in the middle of its first message, and a second peer that
connects while the first is served.  The destination fails within its
stated timeout, applies nothing, and its back-ends serve on."""

from __future__ import annotations

import socket
import time

import pytest

from dbus_vmstate2.privatebus import PrivateBus
from dbus_vmstate2.vmm.wire import Kind, Message, encode

from .migration import reap_commands  # noqa: F401 (the fixture)
from .migration import Incoming, run
from .test_live_save import events
from .test_vmm import backend_state


@pytest.fixture
def dest_bus():
    with PrivateBus() as bus:
        yield bus.address


def test_a_silent_source_and_a_second_peer_fail_only_the_destination_within_its_io_timeout(
    bus_address, dest_bus, memstate, tmp_path
):
    report = tmp_path / "fs.dst"
    dest = memstate("fs", "--report", str(report), address=dest_bus)
    memstate("fs", "--size", "1M")
    path = tmp_path / "mig.sock"
    incoming = Incoming(dest_bus, f"unix:{path}", "--io-timeout", "2")
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(str(path))
    hello = encode(Message(Kind.HELLO, {"backends": ["fs"]}))
    slow.sendall(hello[: len(hello) // 2])  # then nothing: a peer that stalls mid-message
    began = time.monotonic()
    # A second peer, a real source, while the first is served: it is not
    # taken (incoming serves one source), and says so.
    second = run(bus_address, "migrate", f"unix:{path}", "--connect-timeout", "3", "--io-timeout", "3", timeout=60)
    code, _, err = incoming.finish(timeout=60)
    slow.close()
    assert code == 4, err
    assert time.monotonic() - began < 30
    assert "for 2 s (the I/O timeout)" in err, err
    # incoming took its one source and removed its socket: the second is refused at once.
    assert second.returncode == 4 and "cannot connect to unix:" in second.stderr, second.stderr
    assert backend_state(dest_bus, dest) == "running" and events(report, "loaded") == []
    assert run(bus_address, "status", "--json").returncode == 0
