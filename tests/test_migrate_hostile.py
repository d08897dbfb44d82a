"""The migration against hostile or broken peers and faults: a source that
goes silent in the middle of its first message, a second peer that connects
while the first is served, a peer that takes nothing, a source back-end
killed in mid-migration.  Each fails within its stated timeout, with its
true reason, nothing is applied, and every back-end that lives serves on."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from dbus_vmstate2.errors import LinkFailed
from dbus_vmstate2.privatebus import PrivateBus
from dbus_vmstate2.vmm.transport import Connection
from dbus_vmstate2.vmm.wire import Kind, Message, MessageReader, encode, progress_buffered

from .migration import reap_commands  # noqa: F401 (the fixture)
from .migration import Incoming, run, start
from .test_live_save import events
from .test_vmm import backend_state, wait_for


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


async def test_a_connection_dropped_after_a_send_timed_out_is_not_the_peer_leaving():
    """A send that takes nothing for the I/O timeout drops the connection; a
    wait for the peer's answer on it then fails with that reason, not as if
    the peer had closed (it may only be stopped: SIGSTOP, a full disk)."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    conn = Connection(reader, writer, "unix:peer", io_timeout=0.2)
    answer = asyncio.ensure_future(conn.recv(100, None))
    try:
        with pytest.raises(LinkFailed, match=r"took nothing for 0.2 s"):
            await conn.send(b"x" * (8 << 20))  # the peer reads nothing
        with pytest.raises(LinkFailed, match=r"^the link to unix:peer took nothing for 0.2 s \(the I/O timeout\)"):
            await answer
    finally:
        await conn.close()
        theirs.close()


@pytest.mark.slow
def test_a_source_backend_killed_mid_migration_fails_it_and_every_other_backend_serves_on(
    bus_address, dest_bus, memstate, tmp_path
):
    fs = memstate("fs", "--size", "64M", "--seed", "1", "--dirty-rate", "64M", "--report", str(tmp_path / "fs.src"))
    net = memstate("net", "--size", "2M", "--seed", "2", "--dirty-rate", "2M")
    dests = {i: memstate(i, "--report", str(tmp_path / f"{i}.dst"), address=dest_bus) for i in ("fs", "net")}
    incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}")
    migrating = start(bus_address, "migrate", incoming.address, "--max-bandwidth", "16M")
    wait_for(lambda: backend_state(bus_address, net) == "pre-copy", "the pre-copy")
    net.process.kill()
    net.process.wait()
    _, err = migrating.communicate(timeout=60)
    assert migrating.returncode == 1 and "back-end 'net'" in err, err
    code, _, dest_err = incoming.finish()
    assert code == 4, dest_err
    assert backend_state(bus_address, fs) == "running" and events(tmp_path / "fs.src", "quiesced") == []
    for backend_id, dest in dests.items():
        assert backend_state(dest_bus, dest) == "running" and events(tmp_path / f"{backend_id}.dst", "loaded") == []


def test_the_destination_reports_what_it_holds_only_when_asked(bus_address, dest_bus, memstate, tmp_path):
    """A source that asks (HELLO ``progress``) gets PROGRESS every 50 ms while
    the container comes: the bytes the destination holds that its back-ends
    have not read; one that does not ask (an older source) never does."""
    memstate("fs", "--size", "8M")
    image = tmp_path / "fs.vmstate"
    assert run(bus_address, "save", str(image), "--compression", "none").returncode == 0
    container = image.read_bytes()
    memstate("fs", address=dest_bus)
    for ask in (True, False):
        path = tmp_path / f"mig-{ask}.sock"
        incoming = Incoming(dest_bus, f"unix:{path}")
        source = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        source.connect(str(path))
        source.sendall(encode(Message(Kind.HELLO, {"backends": ["fs"], **({"progress": True} if ask else {})})))
        reader = MessageReader()
        messages = []

        def receive(seconds: float, until: Kind | None = None) -> None:
            """What comes for ``seconds``, or until a message of kind ``until``."""
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0 and not any(m.kind is until for m in messages):
                source.settimeout(left)
                try:
                    data = source.recv(1 << 16)
                except TimeoutError:
                    return
                if not data:
                    return
                reader.feed(data)
                while isinstance(message := reader.next_message(), Message):
                    messages.append(message)

        receive(10.0, until=Kind.READY)
        assert messages[0].kind is Kind.READY, messages  # (a PROGRESS may follow it in the same read)
        source.settimeout(30)  # receive() left a short one
        source.sendall(container[: len(container) // 2])
        receive(0.5)  # the rest of the container is late: the destination waits, holding what came
        progress = [m for m in messages if m.kind is Kind.PROGRESS]
        if ask:
            assert len(progress) >= 3 and all(progress_buffered(m) is not None for m in progress), messages
        else:
            assert progress == []
        source.settimeout(30)
        source.sendall(container[len(container) // 2 :])
        receive(30.0, until=Kind.COMMITTED)
        assert messages[-1].kind is Kind.COMMITTED, messages[-3:]
        source.close()
        code, _, err = incoming.finish(timeout=60)
        assert code == 0, err
