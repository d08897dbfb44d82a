"""The back-end library's VMState1 face, against a private dbus-daemon."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import subprocess

import pytest

from dbus_vmstate2.backend import Backend, InlineMode, ThreadedBackend, inline_capacity
from dbus_vmstate2.backend.inline import SAMPLE_SIZE, SAMPLES, decode_inline, encode_inline, inline_blob, worth_compressing
from dbus_vmstate2.bus import open_bus
from dbus_vmstate2.errors import BackendFailed, ErrorName, IdMismatch, LimitExceeded, StreamError
from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.names import OBJECT_PATH, VMSTATE1, VMSTATE1_SIZE_LIMIT, VMSTATE2
from dbus_vmstate2.stream import Compression, encode_stream
from dbus_vmstate2.vmm import list_backends
from dbus_vmstate2.vmm.calls import BUS_NAME, PROPERTIES, call
from dbus_vmstate2.vmm.vmstate1 import load_inline, save_inline

from .introspection import described_from_busctl, described_from_xml, members_from_busctl, members_from_xml


class Store:
    """A daemon's state and the two callables the library asks for."""

    def __init__(self, state: bytes = b"") -> None:
        self.state = state
        self.loads = 0

    def save(self) -> bytes:
        return self.state

    def load(self, records) -> None:
        self.state = b"".join(records)
        self.loads += 1


async def test_registers_and_answers_getall(bus_address, client):
    async with Backend("disk0", Store().save, Store().load, address=bus_address) as backend:
        [owners] = await call(client, BUS_NAME, BUS_NAME, "ListQueuedOwners", "s", [VMSTATE1], path="/org/freedesktop/DBus")
        assert owners == [backend.unique_name]
        [props] = await call(client, backend.unique_name, "org.freedesktop.DBus.Properties", "GetAll", "s", [VMSTATE1])
        assert props["Id"].value == "disk0"


async def test_several_backends_queue_on_the_one_name(bus_address, client, memstate):
    started = [memstate(f"helper{i}", "--size", "1K", "--seed", str(i)) for i in range(3)]
    [owners] = await call(client, BUS_NAME, BUS_NAME, "ListQueuedOwners", "s", [VMSTATE1], path="/org/freedesktop/DBus")
    assert owners == [b.unique_name for b in started]
    found = await list_backends(client)
    assert [(b.id, b.unique_name) for b in found] == [(f"helper{i}", s.unique_name) for i, s in enumerate(started)]
    # Only the first is the primary owner; the queued ones must keep serving.
    assert all(b.process.poll() is None for b in started)


async def test_round_trip_between_processes(bus_address, client, memstate, tmp_path):
    source = memstate("net0", "--size", "300K", "--seed", "7")
    [info] = await list_backends(client)
    blob = await save_inline(client, info)
    assert source.stop() == 0
    loaded = tmp_path / "loaded"
    memstate("net0", "--save-loaded", str(loaded))
    [info] = await list_backends(client)
    await load_inline(client, info, blob)
    assert hashlib.sha256(loaded.read_bytes()).digest() == hashlib.sha256(deterministic_state(300 << 10, 7)).digest()


@pytest.mark.parametrize("records", [[], [b""], [b"a"], [b"I'am\0idA!", b"", b"\0" * 5000]])
async def test_records_come_back_in_order(bus_address, client, records):
    received = []
    async with (
        Backend("a", lambda: iter(records), lambda r: received.extend(r), address=bus_address) as source,
    ):
        [info] = await list_backends(client)
        blob = await save_inline(client, info)
    assert blob, "QEMU rejects an empty Save reply"
    async with Backend("a", lambda: b"", lambda r: received.extend(r), address=bus_address):
        [info] = await list_backends(client)
        await load_inline(client, info, blob)
    assert received == records
    del source


async def test_state_over_1mib_is_refused_with_a_named_error(bus_address, client, caplog):
    incompressible = deterministic_state(VMSTATE1_SIZE_LIMIT + 1, 3)
    async with Backend("big", Store(bytes(incompressible)).save, Store().load, address=bus_address):
        [info] = await list_backends(client)
        with caplog.at_level(logging.WARNING), pytest.raises(LimitExceeded) as raised:
            await save_inline(client, info)
    assert raised.value.remote_name == ErrorName.LIMIT_EXCEEDED
    assert "VMState2" in str(raised.value)
    assert any("VMState2" in r.getMessage() and "big" in r.getMessage() for r in caplog.records)


async def test_compressible_state_over_1mib_fits(bus_address, client):
    state = b"inode=1234 handle=abcd path=/srv/share\n" * 100_000  # 3.9 MiB, compresses well
    loaded = Store()
    async with Backend("fs", Store(state).save, loaded.load, address=bus_address):
        [info] = await list_backends(client)
        blob = await save_inline(client, info)
        assert len(blob) <= VMSTATE1_SIZE_LIMIT
        await load_inline(client, info, blob)
    assert loaded.state == state


async def test_failing_load_is_a_dbus_error_that_leaks_nothing(bus_address, client, caplog):
    def load(records):
        raise ValueError("secret internal detail")

    async with Backend("x", Store(b"abc").save, load, address=bus_address):
        [info] = await list_backends(client)
        blob = await save_inline(client, info)
        with caplog.at_level(logging.ERROR), pytest.raises(BackendFailed) as raised:
            await load_inline(client, info, blob)
    assert raised.value.remote_name == ErrorName.FAILED
    assert "ValueError" in str(raised.value) and "secret" not in str(raised.value)
    assert any("secret internal detail" in r.getMessage() or r.exc_info for r in caplog.records)


async def test_bad_blobs_are_refused_and_the_state_kept(bus_address, client):
    async with Backend("a", Store(b"state of a").save, Store().load, address=bus_address):
        [info] = await list_backends(client)
        blob = await save_inline(client, info)
    target = Store(b"previous")
    async with Backend("b", target.save, target.load, address=bus_address):
        [info] = await list_backends(client)
        with pytest.raises(IdMismatch):
            await load_inline(client, info, blob)
    async with Backend("a", target.save, target.load, address=bus_address):
        [info] = await list_backends(client)
        flipped = bytearray(blob)
        flipped[-9] ^= 0x40
        with pytest.raises(StreamError):
            await load_inline(client, info, bytes(flipped))
        with pytest.raises(StreamError):
            await load_inline(client, info, blob[: len(blob) // 2])
        with pytest.raises(StreamError):
            await load_inline(client, info, b"garbage")
    assert target.state == b"previous" and target.loads == 0


def test_threaded_daemon_served_through_busctl(bus_address):
    """A daemon with no event loop of its own, driven by the real busctl."""
    store = Store(b"\x01\x02\x03")
    with ThreadedBackend("threaded", store.save, store.load, address=bus_address) as backend:
        out = subprocess.run(
            ["busctl", f"--address={bus_address}", "call", backend.unique_name, OBJECT_PATH, VMSTATE1, "Save"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.split()
        assert out[0] == "ay" and int(out[1]) == len(out) - 2 > 0
        got = subprocess.run(
            ["busctl", f"--address={bus_address}", "get-property", backend.unique_name, OBJECT_PATH, VMSTATE1, "Id"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout
        assert got.strip() == 's "threaded"'
        subprocess.run(
            ["busctl", f"--address={bus_address}", "call", backend.unique_name, OBJECT_PATH, VMSTATE1, "Load", *out],
            check=True, capture_output=True, text=True, timeout=30,
        )
    assert store.state == b"\x01\x02\x03" and store.loads == 1


def test_threaded_start_fails_clearly_without_a_bus(tmp_path):
    with pytest.raises(OSError):
        ThreadedBackend("x", bytes, list, address=f"unix:path={tmp_path}/nobus").start()


async def test_busctl_introspection_matches_the_xml(bus_address):
    async with Backend("introspected", Store().save, Store().load, address=bus_address) as backend:
        live = await asyncio.to_thread(members_from_busctl, bus_address, backend.unique_name, OBJECT_PATH, VMSTATE1)
        served = await asyncio.to_thread(described_from_busctl, bus_address, backend.unique_name, OBJECT_PATH, VMSTATE1)
    assert live == members_from_xml(VMSTATE1)
    assert (".Save", "method", "-", "ay") in live
    # Everything the XML says, argument names and directions included.
    assert served == described_from_xml(VMSTATE1)
    assert ("method", "Save", (("name", "Save"),), (("arg", "data", (("direction", "out"), ("name", "data"), ("type", "ay")), ()),)) in served


VMSTATE1_XML_SHA256 = "02411ff5bf893060ab9fe81e0b95db1f40b96f1626f58f894bb7e498f7f7223c"
"""SHA-256 of QEMU's backends/dbus-vmstate1.xml (1484 bytes, unchanged since it was added)."""


def test_the_vmstate1_xml_is_qemus_byte_for_byte():
    """interfaces/org.qemu.VMState1.xml is QEMU's backends/dbus-vmstate1.xml (since QEMU 5.0): never edit it."""
    import hashlib

    from .introspection import INTERFACES

    data = (INTERFACES / "org.qemu.VMState1.xml").read_bytes()
    assert hashlib.sha256(data).hexdigest() == VMSTATE1_XML_SHA256


@pytest.mark.parametrize("bad", ["", "a,b", "x" * 256, "nul\0"])
def test_unusable_ids_are_refused(bad):
    with pytest.raises((ValueError, LimitExceeded)):
        Backend(bad, bytes, list)


async def test_an_incompressible_state_fits_up_to_the_stated_capacity(bus_address, client):
    capacity = inline_capacity("edge")
    assert capacity == VMSTATE1_SIZE_LIMIT - 112 - len("edge")
    state = bytes(deterministic_state(capacity, 5))
    loaded = Store()
    async with Backend("edge", Store(state).save, loaded.load, address=bus_address):
        [info] = await list_backends(client)
        blob = await save_inline(client, info)
        assert len(blob) == VMSTATE1_SIZE_LIMIT  # exactly QEMU's limit, which QEMU accepts
        assert blob[12] == Compression.NONE  # zstd would not have shrunk it: sent uncompressed
        await load_inline(client, info, blob)
    assert loaded.state == state
    async with Backend("edge", Store(state + b"!").save, loaded.load, address=bus_address):
        [info] = await list_backends(client)
        with pytest.raises(LimitExceeded, match=f"at most {capacity} bytes fits"):
            await save_inline(client, info)


async def test_legacy_mode_serves_and_takes_raw_blobs_of_up_to_exactly_1mib(bus_address, client):
    state = bytes(deterministic_state(VMSTATE1_SIZE_LIMIT, 6))
    loaded = Store(b"previous")
    async with Backend("old", Store(state).save, loaded.load, address=bus_address, vmstate1="legacy"):
        [info] = await list_backends(client)
        blob = await save_inline(client, info)
        assert blob == state  # what a hand-written back-end would have returned
        await load_inline(client, info, blob)
        assert loaded.state == state
        await load_inline(client, info, b"")  # an empty raw state is a state too
        assert loaded.state == b""
    # It also takes the stream blobs of an upgraded source, verified as ever.
    async with Backend("old", Store(b"upgraded").save, Store().load, address=bus_address):
        [info] = await list_backends(client)
        stream_blob = await save_inline(client, info)
    async with Backend("old", loaded.save, loaded.load, address=bus_address, vmstate1="legacy"):
        [info] = await list_backends(client)
        await load_inline(client, info, stream_blob)
        assert loaded.state == b"upgraded"
        with pytest.raises(StreamError):
            await load_inline(client, info, stream_blob[:-1])
        assert loaded.state == b"upgraded"
    async with Backend("old", Store(state + b"!").save, loaded.load, address=bus_address, vmstate1="legacy"):
        [info] = await list_backends(client)
        with pytest.raises(LimitExceeded):
            await save_inline(client, info)


async def test_stream_mode_refuses_a_raw_blob(bus_address, client):
    target = Store(b"previous")
    async with Backend("new", target.save, target.load, address=bus_address):
        [info] = await list_backends(client)
        with pytest.raises(StreamError):
            await load_inline(client, info, b"a raw state from an old daemon")
    assert target.state == b"previous"


async def test_vmstate1_calls_are_numbered_transfers_with_their_real_counters(bus_address, client):
    """A VMState1 Save or Load takes the next transfer number and is reported by
    Check and TransferFinished like a VMState2 transfer, with its real counters."""
    from dbus_fast import Message, MessageType

    from dbus_vmstate2.names import VMSTATE2

    finished: list[list] = []

    def on_message(msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == "TransferFinished":
            finished.append(msg.body)

    client.add_message_handler(on_message)
    await call(client, BUS_NAME, BUS_NAME, "AddMatch", "s", ["type='signal',member='TransferFinished'"], path="/org/freedesktop/DBus")
    store = Store(b"state " * 1000)
    async with Backend("numbered", store.save, store.load, address=bus_address, compression=Compression.NONE) as backend:
        [info] = await list_backends(client)
        blob = await save_inline(client, info)
        assert await call(client, backend.unique_name, VMSTATE2, "Check") == [1, True, 1, 6000, len(blob)]
        await load_inline(client, info, blob)
        assert await call(client, backend.unique_name, VMSTATE2, "Check") == [2, True, 1, 6000, len(blob)]
        for _ in range(100):
            if len(finished) == 2:
                break
            await asyncio.sleep(0.02)
    assert finished == [[1, "save", "", "", 1, 6000, len(blob)], [2, "load", "", "", 1, 6000, len(blob)]]
    assert store.state == b"state " * 1000 and store.loads == 1


async def test_a_vmstate1_reply_goes_before_the_signals_its_call_causes(bus_address, client):
    """The reply is downtime, the signals are news: each call's State changes
    and TransferFinished follow its reply (or error), in order."""
    from dbus_fast import Message, MessageType

    calls: list[Message] = []
    seen: list[str] = []

    def on_message(msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == "PropertiesChanged":
            seen.append(msg.body[1]["State"].value)
        elif msg.message_type is MessageType.SIGNAL and msg.member == "TransferFinished":
            seen.append(f"finished {msg.body[1]}{' ' + msg.body[2] if msg.body[2] else ''}")
        elif msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR) and any(
            msg.reply_serial == c.serial for c in calls
        ):
            seen.append("error reply" if msg.message_type is MessageType.ERROR else "reply")

    client.add_message_handler(on_message)
    store = Store(random.Random(3).randbytes(512 << 10))
    async with Backend("ordered", store.save, store.load, address=bus_address) as backend:
        rule = f"type='signal',sender='{backend.unique_name}'"
        await call(client, BUS_NAME, BUS_NAME, "AddMatch", "s", [rule], path="/org/freedesktop/DBus")

        async def vmstate1(member: str, *body: bytes) -> Message:
            msg = Message(destination=backend.unique_name, path=OBJECT_PATH, interface=VMSTATE1, member=member,
                          signature="ay" if body else "", body=list(body))
            calls.append(msg)
            return await client.call(msg)

        blob = (await vmstate1("Save")).body[0]
        await vmstate1("Load", blob)
        await vmstate1("Load", blob[:-1])  # truncated: refused with an error reply
        for _ in range(100):
            if seen.count("running") == 3:
                break
            await asyncio.sleep(0.02)
    truncated = ErrorName.TRUNCATED.value
    assert seen == ["reply", "saving", "running", "finished save",
                    "reply", "resuming", "running", "finished load",
                    "error reply", "resuming", "running", f"finished load {truncated}"]  # fmt: skip


# -- how a blob is made: pure, no bus ------------------------------------------------


def mildly_compressible(size: int, seed: int) -> bytes:
    """Bytes that zstd level 1 shrinks by about 5 %: random, but never 200 or over."""
    return bytes(b % 200 for b in random.Random(seed).randbytes(size))


def sampled_random_elsewhere_zero(size: int) -> bytes:
    """Zeros, except random bytes exactly where worth_compressing samples."""
    state = bytearray(size)
    step = size // SAMPLES
    for start in range(0, SAMPLES * step, step):
        state[start : start + SAMPLE_SIZE] = random.Random(start).randbytes(SAMPLE_SIZE)
    return bytes(state)


def compression_of(blob: bytes) -> Compression:
    return Compression(blob[12])  # docs/stream-format.md §2


@pytest.mark.parametrize(
    ("state", "worth"),
    [
        (bytes(deterministic_state(900_000, 1)), False),
        (mildly_compressible(900_000, 2), False),
        (b"inode=1234 handle=abcd path=/srv/share\n" * 20_000, True),
        (bytes(900_000), True),
        (b"", False),
        (b"tiny", False),
    ],
    ids=["random", "shrinks-5%", "text", "zeros", "empty", "tiny"],
)
def test_zstd_is_tried_only_on_a_state_whose_sample_shrinks_by_a_tenth(state, worth):
    assert worth_compressing([state]) is worth
    # cut anywhere into records, the sample is the same
    assert worth_compressing([state[:1000], state[1000:300_000], state[300_000:]]) is worth
    blob = encode_inline("w", [state])
    assert compression_of(blob) is (Compression.ZSTD if worth else Compression.NONE)
    assert b"".join(r.payload for r in decode_inline("w", blob)) == state


def test_the_sample_decides_only_whether_to_try_on_a_state_that_fits_uncompressed():
    fits = sampled_random_elsewhere_zero(inline_capacity("s") - 10_000)
    assert not worth_compressing([fits])
    assert compression_of(encode_inline("s", [fits])) is Compression.NONE  # though the whole would shrink
    too_large = sampled_random_elsewhere_zero(VMSTATE1_SIZE_LIMIT + 10_000)
    assert not worth_compressing([too_large])
    blob = encode_inline("s", [too_large])  # compressed, since it fits no other way
    assert compression_of(blob) is Compression.ZSTD and len(blob) < VMSTATE1_SIZE_LIMIT // 2
    assert b"".join(r.payload for r in decode_inline("s", blob)) == too_large


def test_blobs_compressed_before_the_sample_still_load():
    # Before, any state that zstd shrank at all was sent compressed.
    state = mildly_compressible(300_000, 4)
    old = encode_stream("old", [state], Compression.ZSTD)
    assert compression_of(old) is Compression.ZSTD and len(old) < len(state)
    assert compression_of(encode_inline("old", [state])) is Compression.NONE
    assert b"".join(r.payload for r in decode_inline("old", old)) == state


def test_a_legacy_blob_of_one_bytes_record_is_that_record():
    state = bytes(deterministic_state(1000, 1))
    assert encode_inline("l", [state], mode=InlineMode.LEGACY) is state


@pytest.mark.parametrize("mode", [InlineMode.STREAM, InlineMode.LEGACY])
def test_a_blob_holds_bytes_records_as_they_are_and_copies_the_others(mode):
    # The reply is written after Save returned: a record the daemon could
    # still change must be copied, one that cannot need not be.
    fixed = bytes(deterministic_state(200_000, 1))
    mutable = bytearray(deterministic_state(200_000, 2))
    state = fixed + bytes(mutable) + bytes(mutable[:100_000])
    blob = inline_blob("b", [fixed, mutable, memoryview(mutable)[:100_000]], Compression.NONE, mode)
    mutable[:] = bytes(len(mutable))
    assert any(piece is fixed for piece in blob.pieces)
    assert b"".join(r.payload for r in decode_inline("b", bytes(blob), mode)) == state


async def test_a_query_while_a_large_reply_goes_out_leaves_the_backend_on_its_bus(bus_address, client, memstate):
    """dbus-fast drops a connection whose socket is full as it sends
    (dbus_vmstate2/bus.py): a back-end that answered a status query while its
    1 MiB VMState1 Save reply was still going out lost its bus."""
    backend = memstate("fs", "--size", str(VMSTATE1_SIZE_LIMIT - 4096))
    other = await open_bus(bus_address)
    [info] = await list_backends(client)
    saving = True

    async def query() -> int:
        asked = 0
        while saving:
            await call(other, backend.unique_name, PROPERTIES, "Get", "ss", [VMSTATE2, "State"])
            asked += 1
        return asked

    querying = asyncio.ensure_future(query())
    try:
        for _ in range(150):
            assert len(await save_inline(client, info)) > VMSTATE1_SIZE_LIMIT - 4096
    finally:
        saving = False
        asked = await querying
        other.disconnect()
        await other.wait_for_disconnect()
    assert asked > 100 and backend.process.poll() is None
