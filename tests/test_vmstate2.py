"""VMState2 on a real bus: fd-passed Save/Load, Check, Cancel, the fd guard."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from dbus_fast import Message, MessageType, Variant

from dbus_vmstate2.errors import (
    BackendFailed,
    Busy,
    Cancelled,
    Corrupt,
    ErrorName,
    IdMismatch,
    InvalidState,
    StreamError,
    Unsupported,
)
from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.names import OBJECT_PATH, VMSTATE2
from dbus_vmstate2.stream import NEED_DATA, StreamDecoder, decode_stream
from dbus_vmstate2.stream._format import RECORD_HEADER_SIZE
from dbus_vmstate2.vmm import connect, list_backends
from dbus_vmstate2.vmm.calls import PROPERTIES, call

from .conftest import count_fds
from .introspection import busctl_table, described_from_busctl, described_from_xml, members_from_busctl, members_from_xml


async def start(client, backend, member, fd, options=None):
    """Call Save or Load with ``fd`` and close our copy, as the VMM does."""
    try:
        [number] = await call(client, backend.unique_name, VMSTATE2, member, "ha{sv}", [0, options or {}], unix_fds=[fd])
    finally:
        os.close(fd)
    return number


async def check(client, backend):
    return await call(client, backend.unique_name, VMSTATE2, "Check")


async def wait_finished(client, backend, number):
    for _ in range(600):
        latest, finished, *counters = await check(client, backend)
        assert latest == number
        if finished:
            return counters
        await asyncio.sleep(0.05)
    raise TimeoutError(f"transfer {number} did not finish")


def stream_state(data: bytes, backend_id: str) -> bytes:
    """The state a whole stream carries, after verifying it."""
    return b"".join(r.payload for r in decode_stream(data, expected_id=backend_id).records)


def lone_end(write: bool) -> int:
    """One end of a new pipe, the other end closed."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r if write else w)
    return w if write else r


def read_all(fd: int) -> bytes:
    chunks = []
    while data := os.read(fd, 1 << 20):
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks)


async def save_bytes(client, backend, options=None) -> bytes:
    r, w = os.pipe2(os.O_CLOEXEC)
    number = await start(client, backend, "Save", w, options)
    data = await asyncio.to_thread(read_all, r)
    await wait_finished(client, backend, number)
    return data


async def load_bytes(client, backend, data: bytes, options=None) -> int:
    """Start a Load and feed it ``data`` through a pipe; return the transfer number."""
    r, w = os.pipe2(os.O_CLOEXEC)
    number = await start(client, backend, "Load", r, options)

    def feed() -> None:
        try:
            os.write(w, data)
        finally:
            os.close(w)

    await asyncio.to_thread(feed)
    return number


async def get_state(client, backend) -> str:
    [value] = await call(client, backend.unique_name, PROPERTIES, "Get", "ss", [VMSTATE2, "State"])
    return value.value


async def test_busctl_introspection_and_state_property(bus_address, memstate):
    backend = memstate("intro", "--size", "1K")
    live = await asyncio.to_thread(members_from_busctl, bus_address, backend.unique_name, OBJECT_PATH, VMSTATE2)
    assert live == members_from_xml(VMSTATE2)
    # Everything the XML says: argument names, directions and order, annotations.
    served = await asyncio.to_thread(described_from_busctl, bus_address, backend.unique_name, OBJECT_PATH, VMSTATE2)
    assert served == described_from_xml(VMSTATE2)
    flags = {f[0]: f[4:] for f in await asyncio.to_thread(busctl_table, bus_address, backend.unique_name, OBJECT_PATH, VMSTATE2)
             if f[1] == "property"}  # fmt: skip
    assert "const" in flags[".Id"] and "const" in flags[".Capabilities"] and "emits-change" in flags[".State"]
    out = subprocess.run(
        ["busctl", f"--address={bus_address}", "get-property", backend.unique_name, OBJECT_PATH, VMSTATE2, "State"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout
    assert out.strip() == 's "running"'


async def test_both_names_are_queued(client, memstate):
    started = [memstate(f"b{i}", "--size", "1K") for i in range(2)]
    [owners] = await call(client, "org.freedesktop.DBus", "org.freedesktop.DBus", "ListQueuedOwners", "s", [VMSTATE2], path="/org/freedesktop/DBus")
    assert owners == [b.unique_name for b in started]


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_save_streams_a_verified_stream_through_a_pipe(client, memstate, compression):
    memstate("pipe", "--size", "3M", "--seed", "5")
    [backend] = await list_backends(client)
    data = await save_bytes(client, backend, {"compression": Variant("s", compression)})
    assert stream_state(data, "pipe") == deterministic_state(3 << 20, 5)
    assert await get_state(client, backend) == "running"


async def test_save_and_load_through_a_regular_file(client, memstate, tmp_path):
    source = memstate("file", "--size", "2M", "--seed", "2")
    [backend] = await list_backends(client)
    path = tmp_path / "state"
    number = await start(client, backend, "Save", os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    records, raw_bytes, stream_bytes = await wait_finished(client, backend, number)
    assert (records, raw_bytes, stream_bytes) == (2, 2 << 20, path.stat().st_size)
    source.stop()
    loaded = tmp_path / "loaded"
    memstate("file", "--save-loaded", str(loaded))
    [backend] = await list_backends(client)
    number = await start(client, backend, "Load", os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    await wait_finished(client, backend, number)
    assert loaded.read_bytes() == deterministic_state(2 << 20, 2)


async def test_load_of_a_stream_for_another_id_keeps_the_state(client, memstate, tmp_path):
    memstate("a", "--size", "64K", "--seed", "1")
    memstate("b", "--size", "64K", "--seed", "2", "--save-loaded", str(tmp_path / "b.loaded"))
    a, b = await list_backends(client)
    stream = await save_bytes(client, a)
    number = await load_bytes(client, b, stream)
    with pytest.raises(IdMismatch) as raised:
        await wait_finished(client, b, number)
    assert "'a'" in str(raised.value) and "'b'" in str(raised.value)
    assert await get_state(client, b) == "running"
    assert not (tmp_path / "b.loaded").exists()
    assert stream_state(await save_bytes(client, b), "b") == deterministic_state(64 << 10, 2)


async def test_cancel_in_mid_save_keeps_serving(client, memstate):
    memstate("slow", "--size", "16M", "--seed", "9")
    [backend] = await list_backends(client)
    signals: list[Message] = []

    def on_message(msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member in ("TransferFinished", "PropertiesChanged"):
            signals.append(msg)

    client.add_message_handler(on_message)
    await call(client, "org.freedesktop.DBus", "org.freedesktop.DBus", "AddMatch", "s", [f"type='signal',sender='{backend.unique_name}'"], path="/org/freedesktop/DBus")
    r, w = os.pipe2(os.O_CLOEXEC)
    number = await start(client, backend, "Save", w, {"compression": Variant("s", "none")})
    # Nobody reads: the back-end blocks on a full pipe, and stays responsive.
    await asyncio.sleep(0.2)
    assert await get_state(client, backend) == "saving"
    other_r, other_w = os.pipe2(os.O_CLOEXEC)
    with pytest.raises(Busy):
        await start(client, backend, "Save", other_w)
    os.close(other_r)
    latest, finished, *_ = await check(client, backend)
    assert (latest, finished) == (number, False)
    with pytest.raises(InvalidState):
        await call(client, backend.unique_name, VMSTATE2, "Reset")
    await call(client, backend.unique_name, VMSTATE2, "Cancel")
    with pytest.raises(Cancelled):
        await wait_finished(client, backend, number)
    os.close(r)
    await call(client, backend.unique_name, VMSTATE2, "Cancel")  # idempotent
    assert await get_state(client, backend) == "running"
    finished = [m for m in signals if m.member == "TransferFinished"]
    assert [m.body[:3] for m in finished] == [[number, "save", ErrorName.CANCELLED]]
    states = [m.body[1]["State"].value for m in signals if m.member == "PropertiesChanged"]
    assert states == ["saving", "running"]
    data = await save_bytes(client, backend)
    assert stream_state(data, "slow") == deterministic_state(16 << 20, 9)


async def test_a_call_without_its_fd_is_refused(client, memstate):
    memstate("guarded", "--size", "1K")
    [backend] = await list_backends(client)
    for member in ("Save", "Load"):
        reply = await client.call(Message(
            destination=backend.unique_name, path=OBJECT_PATH, interface=VMSTATE2, member=member,
            signature="ha{sv}", body=[0, {}],
        ))
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
        assert "file descriptor" in reply.body[0]
    assert await get_state(client, backend) == "running"
    with pytest.raises(InvalidState):
        await check(client, backend)  # nothing was started


async def test_no_fd_leaks_over_good_and_bad_calls(client, memstate):
    process = memstate("leaky", "--size", "256K", "--seed", "4")
    [backend] = await list_backends(client)
    await save_bytes(client, backend)  # warm up: threads, pipes, zstd
    before = count_fds(process.process.pid)
    for _ in range(10):
        await save_bytes(client, backend)
        with pytest.raises(Unsupported):
            await start(client, backend, "Save", lone_end(write=True), {"bogus": Variant("b", True)})
        with pytest.raises(Unsupported):
            await start(client, backend, "Load", lone_end(write=False), {"x": Variant("b", True)})
        with pytest.raises(Unsupported):
            await start(client, backend, "Save", lone_end(write=True), {"compression": Variant("s", "lz4")})
        for member, signature in (("NoSuchMethod", "h"), ("Save", "h"), ("Check", "h")):
            r, w = os.pipe2(os.O_CLOEXEC)
            reply = await client.call(Message(
                destination=backend.unique_name, path=OBJECT_PATH, interface=VMSTATE2, member=member,
                signature=signature, body=[0], unix_fds=[r],
            ))
            os.close(r)
            os.close(w)
            assert reply.message_type is MessageType.ERROR
        number = await load_bytes(client, backend, b"not a stream")
        with pytest.raises(StreamError):
            await wait_finished(client, backend, number)
    await asyncio.sleep(0.1)
    assert count_fds(process.process.pid) == before
    assert process.process.poll() is None


async def test_failing_load_callable_moves_to_error_until_reset(bus_address, client):
    from dbus_vmstate2.backend import Backend

    def broken_load(records):
        for _ in records:
            pass
        raise RuntimeError("disk full")

    async with Backend("fragile", lambda: b"x" * 1000, broken_load, address=bus_address):
        [backend] = await list_backends(client)
        stream = await save_bytes(client, backend)
        number = await load_bytes(client, backend, stream)
        with pytest.raises(BackendFailed) as raised:
            await wait_finished(client, backend, number)
        assert "RuntimeError" in str(raised.value) and "disk full" not in str(raised.value)
        assert await get_state(client, backend) == "error"
        with pytest.raises(InvalidState):
            await start(client, backend, "Save", lone_end(write=True))
        await call(client, backend.unique_name, VMSTATE2, "Reset")
        assert await get_state(client, backend) == "running"


def frame_offsets(stream: bytes) -> list[tuple[int, int]]:
    """(offset, length) in ``stream`` of each record's payload on the wire."""
    decoder = StreamDecoder()
    decoder.feed(stream)
    decoder.feed_eof()
    header = decoder.next_event()
    found, at = [], header.size
    while (event := decoder.next_event()) is not NEED_DATA:
        if hasattr(event, "wire_size"):
            found.append((at + RECORD_HEADER_SIZE, event.wire_size))
            at += RECORD_HEADER_SIZE + event.wire_size
    return found


async def test_a_damaged_zstd_record_reaches_the_daemon_as_the_streams_error(bus_address, client):
    # The back-end decompresses, and so verifies, a zstd record in the
    # daemon's thread just before handing it over (backend/transfers.py): the
    # daemon gets the records before the damaged one, then Corrupt from the
    # iterator, never the damaged record's bytes; and the load fails as the
    # stream's fault, not the daemon's.
    from dbus_vmstate2.backend import Backend

    blocks = [bytes(range(n, 256)) * 500 for n in range(4)]  # compressible: one zstd frame each
    seen, raised = [], []

    def load(records):
        try:
            for payload in records:
                seen.append(bytes(payload))
        except StreamError as exc:
            raised.append(exc)
            raise

    async with Backend("damaged", lambda: iter(blocks), load, address=bus_address):
        [backend] = await list_backends(client)
        stream = bytearray(await save_bytes(client, backend))  # zstd, the default
        offset, length = frame_offsets(stream)[2]
        stream[offset + length // 2] ^= 0x10
        number = await load_bytes(client, backend, bytes(stream))
        with pytest.raises(Corrupt, match="record 2"):
            await wait_finished(client, backend, number)
        assert seen == blocks[:2]
        assert [type(exc) for exc in raised] == [Corrupt]
        assert await get_state(client, backend) == "running"


async def test_capabilities(client, memstate):
    memstate("caps", "--size", "1K")
    [backend] = await list_backends(client)
    [caps] = await call(client, backend.unique_name, PROPERTIES, "Get", "ss", [VMSTATE2, "Capabilities"])
    caps = {k: v.value for k, v in caps.value.items()}
    assert caps["stream-versions"] == [1]
    assert set(caps["compression"]) == {"none", "zstd"}
    assert caps["inline-size-limit"] == 1 << 20
    assert caps["pre-copy"] is True  # memstate's DirtyStore is a PreCopyDaemon


async def test_load_callable_that_stops_early_moves_to_error(bus_address, client):
    from dbus_vmstate2.backend import Backend

    def hasty_load(records):
        next(iter(records))  # takes one record, commits, returns

    async with Backend("hasty", lambda: iter([b"a", b"b", b"c"]), hasty_load, address=bus_address):
        [backend] = await list_backends(client)
        stream = await save_bytes(client, backend)
        number = await load_bytes(client, backend, stream)
        with pytest.raises(BackendFailed) as raised:
            await wait_finished(client, backend, number)
        assert "before reading every record" in str(raised.value)
        assert await get_state(client, backend) == "error"


async def test_a_cancel_right_behind_a_save_is_not_lost(client, memstate):
    memstate("quick", "--size", "64M", "--seed", "1")
    [backend] = await list_backends(client)
    r, w = os.pipe2(os.O_CLOEXEC)
    saving = asyncio.ensure_future(
        call(client, backend.unique_name, VMSTATE2, "Save", "ha{sv}", [0, {}], unix_fds=[w])
    )
    cancelling = asyncio.ensure_future(call(client, backend.unique_name, VMSTATE2, "Cancel"))
    [number], _ = await asyncio.gather(saving, cancelling)
    os.close(w)
    with pytest.raises(Cancelled):
        await wait_finished(client, backend, number)
    os.close(r)


async def test_cancel_stops_only_the_callers_own_transfer(client, bus_address, memstate):
    memstate("owned", "--size", "16M", "--seed", "3")
    [backend] = await list_backends(client)
    r, w = os.pipe2(os.O_CLOEXEC)
    number = await start(client, backend, "Save", w, {"compression": Variant("s", "none")})
    other = await connect(bus_address)  # a second VMM helper on the same bus
    try:
        other_r, other_w = os.pipe2(os.O_CLOEXEC)
        with pytest.raises(Busy):
            await start(other, backend, "Save", other_w)
        os.close(other_r)
        await call(other, backend.unique_name, VMSTATE2, "Cancel")  # not its transfer: no effect
        await asyncio.sleep(0.2)
        assert (await check(client, backend))[:2] == [number, False]
        assert await call(other, backend.unique_name, VMSTATE2, "CancelTransfer", "t", [number + 1]) == [False]
        assert (await check(client, backend))[:2] == [number, False]
        # By its number, anyone may stop it (an operator's last resort).
        assert await call(other, backend.unique_name, VMSTATE2, "CancelTransfer", "t", [number]) == [True]
        with pytest.raises(Cancelled):
            await wait_finished(client, backend, number)
        assert await call(other, backend.unique_name, VMSTATE2, "CancelTransfer", "t", [number]) == [False]
    finally:
        os.close(r)
        other.disconnect()
        await other.wait_for_disconnect()
    data = await save_bytes(client, backend)
    assert stream_state(data, "owned") == deterministic_state(16 << 20, 3)


@pytest.mark.parametrize("member", ["Save", "Load"])
async def test_a_peer_that_neither_reads_nor_writes_ends_the_transfer_within_the_stall_timeout(client, memstate, member):
    memstate("stuck", "--size", "16M", "--seed", "2", "--stall-timeout", "1")
    [backend] = await list_backends(client)
    r, w = os.pipe2(os.O_CLOEXEC)
    mine, theirs = (r, w) if member == "Save" else (w, r)
    started = asyncio.get_running_loop().time()
    number = await start(client, backend, member, theirs, {"compression": Variant("s", "none")} if member == "Save" else {})
    # We keep our end open and never touch it: the pipe fills (save) or stays empty (load).
    with pytest.raises(Cancelled, match="nothing was (read|written) on the other end for 1 s"):
        await wait_finished(client, backend, number)
    assert asyncio.get_running_loop().time() - started < 10
    assert await get_state(client, backend) == "running"
    os.close(mine)
    data = await save_bytes(client, backend)
    assert stream_state(data, "stuck") == deterministic_state(16 << 20, 2)


async def test_after_a_cancelled_save_the_counters_are_what_reached_the_fd(client, memstate):
    """TransferFinished counts the stream bytes written into the fd, no more, and
    only the records written whole (they used to count a record as soon as it
    was queued, and not the part of a record a cancel cut short)."""
    from dbus_vmstate2.stream import NEED_DATA, Record, StreamDecoder

    memstate("counted", "--size", "16M", "--seed", "2")
    [backend] = await list_backends(client)
    finished: list[list] = []

    def on_message(msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == "TransferFinished":
            finished.append(msg.body)

    client.add_message_handler(on_message)
    await call(client, "org.freedesktop.DBus", "org.freedesktop.DBus", "AddMatch", "s", [f"type='signal',sender='{backend.unique_name}'"], path="/org/freedesktop/DBus")
    for compression in ("none", "zstd"):
        r, w = os.pipe2(os.O_CLOEXEC)
        number = await start(client, backend, "Save", w, {"compression": Variant("s", compression)})
        first = os.read(r, 1500)  # a record and a half in the pipe, then nobody reads
        await asyncio.sleep(0.3)
        await call(client, backend.unique_name, VMSTATE2, "Cancel")
        with pytest.raises(Cancelled):  # Check gives a failed transfer's error, not its counters
            await wait_finished(client, backend, number)
        received = first + await asyncio.to_thread(read_all, r)
        decoder, whole = StreamDecoder("counted", payloads=False), 0
        decoder.feed(received)
        while (event := decoder.next_event()) is not NEED_DATA:
            whole += isinstance(event, Record)
        for _ in range(100):
            if finished and finished[-1][0] == number:
                break
            await asyncio.sleep(0.02)
        transfer, operation, error_name, _, records, raw_bytes, stream_bytes = finished[-1]
        assert (transfer, operation, error_name) == (number, "save", ErrorName.CANCELLED)
        assert stream_bytes == len(received) and records == whole and raw_bytes == whole << 20, compression


@pytest.mark.parametrize("member, end", [("Save", "read"), ("SavePreCopy", "read"), ("Load", "write")])
async def test_an_fd_open_the_wrong_way_is_refused_at_once(client, memstate, member, end):
    """Save handed the read end of a pipe (or Load the write end) fails at once
    with InvalidArgs, starts nothing, and keeps nothing open."""
    process = memstate("direction", "--size", "1K")
    [backend] = await list_backends(client)
    await save_bytes(client, backend)  # warm up
    before = count_fds(process.process.pid)
    r, w = os.pipe2(os.O_CLOEXEC)
    ours, theirs = (w, r) if end == "read" else (r, w)
    reply = await client.call(Message(
        destination=backend.unique_name, path=OBJECT_PATH, interface=VMSTATE2, member=member,
        signature="ha{sv}", body=[0, {}], unix_fds=[theirs],
    ))  # fmt: skip
    os.close(theirs)
    assert reply.message_type is MessageType.ERROR
    assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
    wanted = "reading" if member == "Load" else "writing"
    assert f"open for {wanted}" in reply.body[0] and f"the {end} end of a pipe" in reply.body[0]
    assert await get_state(client, backend) == "running"
    latest, finished, *_ = await check(client, backend)
    assert (latest, finished) == (1, True)  # the warm-up: nothing new started
    os.close(ours)
    await asyncio.sleep(0.1)
    assert count_fds(process.process.pid) == before


async def test_check_after_reset_still_reports_the_failed_load(bus_address, client):
    """Reset changes the state, not the record of the latest transfer."""
    from dbus_vmstate2.backend import Backend

    def broken_load(records):
        for _ in records:
            pass
        raise RuntimeError("disk full")

    async with Backend("reset-check", lambda: b"x" * 1000, broken_load, address=bus_address):
        [backend] = await list_backends(client)
        number = await load_bytes(client, backend, await save_bytes(client, backend))
        with pytest.raises(BackendFailed):
            await wait_finished(client, backend, number)
        assert await get_state(client, backend) == "error"
        await call(client, backend.unique_name, VMSTATE2, "Reset")
        assert await get_state(client, backend) == "running"
        with pytest.raises(BackendFailed, match="RuntimeError"):
            await check(client, backend)


@pytest.mark.parametrize("options, refused", [
    ({"level": Variant("x", 3)}, "level must be of D-Bus type 'i', got 'x'"),
    ({"level": Variant("u", 3)}, "level must be of D-Bus type 'i', got 'u'"),
    ({"workers": Variant("i", 1)}, "workers must be of D-Bus type 'u', got 'i'"),
    ({"compression": Variant("u", 0)}, "compression must be of D-Bus type 's', got 'u'"),
    ({"level": Variant("i", 23)}, "level must be -128..22, got 23"),
    ({"level": Variant("i", -129), "compression": Variant("s", "none")}, "level must be -128..22, got -129"),
    ({"workers": Variant("u", 257)}, "workers must be 0..256, got 257"),
    ({"compression": Variant("s", "lz4")}, "unknown compression 'lz4'"),
])  # fmt: skip
async def test_save_options_have_one_type_and_a_range(client, memstate, options, refused):
    memstate("options", "--size", "1K")
    [backend] = await list_backends(client)
    with pytest.raises(Unsupported, match=refused):
        await start(client, backend, "Save", lone_end(write=True), options)
    with pytest.raises(InvalidState):
        await check(client, backend)  # nothing started


async def test_level_with_no_compression_is_accepted_and_ignored(client, memstate):
    memstate("plain", "--size", "64K", "--seed", "3")
    [backend] = await list_backends(client)
    data = await save_bytes(client, backend, {"compression": Variant("s", "none"), "level": Variant("i", 19),
                                              "workers": Variant("u", 2)})  # fmt: skip
    decoded = decode_stream(data, "plain")
    assert (decoded.header.compression.name, decoded.header.level) == ("NONE", 0)
