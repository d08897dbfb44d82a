"""Iterative pre-copy on a real bus: SavePreCopy, Pending, StopCopy, Resume.

The source's pipe feeds the destination's Load directly, as a live
migration's channel would; memstate keeps changing its state meanwhile
(``--dirty-rate``) and reports the digest of what it froze at quiesce and of
what it loaded (``--report``).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant

from dbus_vmstate2.errors import Cancelled, InvalidState, StreamError, Unsupported
from dbus_vmstate2.names import VMSTATE2
from dbus_vmstate2.privatebus import PrivateBus
from dbus_vmstate2.vmm import connect, list_backends
from dbus_vmstate2.vmm.calls import PROPERTIES, call

from .conftest import count_fds, start_memstate

NONE = {"compression": Variant("s", "none")}


@pytest.fixture
async def two_buses():
    with PrivateBus() as source, PrivateBus() as dest:
        src_client, dst_client = await connect(source.address), await connect(dest.address)
        yield (source.address, src_client), (dest.address, dst_client)
        for client in (src_client, dst_client):
            client.disconnect()


async def state(client, backend) -> str:
    [value] = await call(client, backend.unique_name, PROPERTIES, "Get", "ss", [VMSTATE2, "State"])
    return value.value


async def pending(client, backend) -> list[int]:
    return await call(client, backend.unique_name, VMSTATE2, "Pending")


async def start(client, backend, member, fd, options=None) -> int:
    try:
        [number] = await call(client, backend.unique_name, VMSTATE2, member, "ha{sv}", [0, options or {}], unix_fds=[fd])
    finally:
        os.close(fd)
    return number


async def outcome(client, backend, number, timeout=60.0) -> list:
    """Wait until transfer ``number`` ends; its Check counters, or its error raised."""
    for _ in range(int(timeout / 0.05)):
        latest, finished, *counters = await call(client, backend.unique_name, VMSTATE2, "Check")
        assert latest == number
        if finished:
            return counters
        await asyncio.sleep(0.05)
    raise TimeoutError(f"transfer {number} did not finish")


def reports(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def watch(client, backend, member: str) -> list[Message]:
    seen: list[Message] = []

    def on_message(msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == member and msg.sender == backend.unique_name:
            seen.append(msg)

    client.add_message_handler(on_message)
    rule = f"type='signal',sender='{backend.unique_name}',member='{member}'"
    await call(client, "org.freedesktop.DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule], path="/org/freedesktop/DBus")
    return seen


async def test_a_live_save_into_a_load_carries_the_state_at_quiesce(tmp_path, two_buses):
    (src_bus, src), (dst_bus, dst) = two_buses
    src_report, dst_report = tmp_path / "src.jsonl", tmp_path / "dst.jsonl"
    source = start_memstate(src_bus, "fs", "--size", "32M", "--seed", "4", "--dirty-rate", "16M", "--report", str(src_report))
    dest = start_memstate(dst_bus, "fs", "--report", str(dst_report))
    try:
        [s], [d] = await list_backends(src), await list_backends(dst)
        [caps] = await call(src, s.unique_name, PROPERTIES, "Get", "ss", [VMSTATE2, "Capabilities"])
        assert caps.value["pre-copy"].value is True
        initial_sent = await watch(src, s, "InitialDataSent")
        before = await pending(src, s)
        assert before[0] == 0 and before[2] >= 32 << 20  # outside pre-copy: the whole state's size
        r, w = os.pipe2(os.O_CLOEXEC)
        number = await start(src, s, "SavePreCopy", w, NONE)
        loading = await start(dst, d, "Load", r)
        assert await state(src, s) == "pre-copy" and await state(dst, d) == "resuming"
        for _ in range(400):  # the initial data goes, rounds of changes follow
            initial, dirty, stop_copy, rounds = await pending(src, s)
            if initial_sent and rounds >= 3:
                break
            await asyncio.sleep(0.05)
        assert initial == 0 and rounds >= 3 and stop_copy == initial + dirty, (initial, dirty, stop_copy, rounds)
        assert [m.body for m in initial_sent] == [[number]]
        with pytest.raises(InvalidState):
            await call(src, s.unique_name, VMSTATE2, "StopCopy", "t", [number + 1])
        await call(src, s.unique_name, VMSTATE2, "StopCopy", "t", [number])
        await outcome(src, s, number)
        await outcome(dst, d, loading)
        assert await state(src, s) == "stopped" and await state(dst, d) == "running"
        quiesced = [e for e in reports(src_report) if e["event"] == "quiesced"]
        loaded = [e for e in reports(dst_report) if e["event"] == "loaded"]
        assert len(quiesced) == 1 and len(loaded) == 1
        assert loaded[0]["digest"] == quiesced[0]["digest"] and loaded[0]["bytes"] == 32 << 20
        # Stopped stays stopped (its state may run on the destination now) until Resume.
        r2, w2 = os.pipe2(os.O_CLOEXEC)
        with pytest.raises(InvalidState):
            await start(src, s, "Save", w2)
        os.close(r2)
        await asyncio.sleep(0.3)
        assert await state(src, s) == "stopped" and (await pending(src, s))[1] == 0
        await call(src, s.unique_name, VMSTATE2, "Resume")
        assert await state(src, s) == "running"
    finally:
        source.stop()
        dest.stop()


@pytest.mark.parametrize("phase", ["pre-copy", "stop-copy"])
async def test_cancel_returns_the_source_to_serving_and_the_destination_keeps_its_state(tmp_path, two_buses, phase):
    (src_bus, src), (dst_bus, dst) = two_buses
    src_report, dst_report = tmp_path / "src.jsonl", tmp_path / "dst.jsonl"
    source = start_memstate(src_bus, "fs", "--size", "16M", "--seed", "5", "--dirty-rate", "4M", "--report", str(src_report))
    dest = start_memstate(dst_bus, "fs", "--size", "1M", "--seed", "6", "--report", str(dst_report))
    try:
        [s], [d] = await list_backends(src), await list_backends(dst)
        fds = count_fds(source.process.pid)
        r, w = os.pipe2(os.O_CLOEXEC)
        number = await start(src, s, "SavePreCopy", w, NONE)
        relay_r, relay_w = os.pipe2(os.O_CLOEXEC)
        loading = await start(dst, d, "Load", relay_r)
        # Relay only the first 4 MiB: the source then blocks on a full pipe.
        await asyncio.to_thread(lambda: os.write(relay_w, os.read(r, 4 << 20)))
        if phase == "stop-copy":
            await call(src, s.unique_name, VMSTATE2, "StopCopy", "t", [number])
            for _ in range(100):
                if [e for e in reports(src_report) if e["event"] == "quiesced"]:
                    break
                await asyncio.sleep(0.05)
        assert await state(src, s) == phase
        await call(src, s.unique_name, VMSTATE2, "Cancel")
        with pytest.raises(Cancelled):
            await outcome(src, s, number)
        assert await state(src, s) == "running"
        os.close(relay_w)
        with pytest.raises(StreamError):
            await outcome(dst, d, loading)
        assert await state(dst, d) == "running" and not [e for e in reports(dst_report) if e["event"] == "loaded"]
        os.close(r)
        # The source serves on, resumed: its state changes again, and saves whole.
        total = (await pending(src, s))[2]
        assert total == 16 << 20
        r, w = os.pipe2(os.O_CLOEXEC)
        again = await start(src, s, "Save", w, NONE)
        data = await asyncio.to_thread(_read_all, r)
        await outcome(src, s, again)
        assert len(data) > 16 << 20
        assert count_fds(source.process.pid) == fds
    finally:
        source.stop()
        dest.stop()


async def test_a_reader_that_goes_away_in_pre_copy_leaves_the_source_running(two_buses):
    (src_bus, src), _ = two_buses
    source = start_memstate(src_bus, "fs", "--size", "8M", "--seed", "7", "--dirty-rate", "1M")
    try:
        [s] = await list_backends(src)
        r, w = os.pipe2(os.O_CLOEXEC)
        number = await start(src, s, "SavePreCopy", w)
        os.read(r, 1 << 16)
        os.close(r)  # the VMM helper died
        with pytest.raises(Exception, match="reader"):
            await outcome(src, s, number)
        assert await state(src, s) == "running"
    finally:
        source.stop()


async def test_a_daemon_without_iterative_support_refuses_pre_copy_and_keeps_save(client, memstate):
    memstate("plain", "--size", "1M", "--seed", "1", "--one-shot-only")
    [b] = await list_backends(client)
    [caps] = await call(client, b.unique_name, PROPERTIES, "Get", "ss", [VMSTATE2, "Capabilities"])
    assert caps.value["pre-copy"].value is False
    r, w = os.pipe2(os.O_CLOEXEC)
    with pytest.raises(Unsupported, match="Save"):
        await start(client, b, "SavePreCopy", w)
    os.close(r)
    assert (await pending(client, b))[:2] == [0, 0]
    r, w = os.pipe2(os.O_CLOEXEC)
    number = await start(client, b, "Save", w)
    data = await asyncio.to_thread(_read_all, r)
    await outcome(client, b, number)
    assert len(data) > 1 << 20


def _read_all(fd: int) -> bytes:
    chunks = []
    while data := os.read(fd, 1 << 20):
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks)


@pytest.mark.parametrize("phase", ["pre-copy", "stop-copy"])
async def test_a_killed_destination_leaves_the_source_serving(tmp_path, two_buses, phase):
    (src_bus, src), (dst_bus, dst) = two_buses
    src_report = tmp_path / "src.jsonl"
    source = start_memstate(src_bus, "fs", "--size", "64M", "--seed", "8", "--dirty-rate", "4M", "--report", str(src_report))
    dest = start_memstate(dst_bus, "fs")
    try:
        [s], [d] = await list_backends(src), await list_backends(dst)
        fds = count_fds(source.process.pid)
        r, w = os.pipe2(os.O_CLOEXEC)
        number = await start(src, s, "SavePreCopy", w, NONE)
        await start(dst, d, "Load", r)  # the destination alone now holds the read end
        for _ in range(200):
            if (await pending(src, s))[0] < 48 << 20:
                break
            await asyncio.sleep(0.05)
        if phase == "stop-copy":
            await call(src, s.unique_name, VMSTATE2, "StopCopy", "t", [number])
        dest.process.kill()
        with pytest.raises(Exception, match="reader"):
            await outcome(src, s, number)
        assert await state(src, s) == "running"
        r, w = os.pipe2(os.O_CLOEXEC)
        again = await start(src, s, "Save", w, NONE)
        data = await asyncio.to_thread(_read_all, r)
        await outcome(src, s, again)
        assert len(data) > 64 << 20
        assert count_fds(source.process.pid) == fds
    finally:
        source.stop()
        dest.stop()


async def test_a_daemon_without_iterative_support_loads_data_records_only(client, memstate, tmp_path):
    """docs/stream-format.md §3.2: pre-copy false takes DATA records only; an
    END_OF_INITIAL or DIRTY record fails the Load with Unsupported, and the
    daemon applies nothing."""
    from dbus_vmstate2.stream import Compression, RecordType, encode_stream

    loaded = tmp_path / "loaded"
    memstate("plain", "--one-shot-only", "--save-loaded", str(loaded))
    [b] = await list_backends(client)
    iterative = encode_stream("plain", [b"data", (RecordType.END_OF_INITIAL, b""), (RecordType.DIRTY, b"more")],
                              Compression.NONE)  # fmt: skip
    for data, ok in ((iterative, False), (encode_stream("plain", [b"da", b"ta"], Compression.NONE), True)):
        r, w = os.pipe2(os.O_CLOEXEC)
        number = await start(client, b, "Load", r)
        await asyncio.to_thread(os.write, w, data)
        os.close(w)
        if ok:
            await outcome(client, b, number)
            assert loaded.read_bytes() == b"data"
        else:
            with pytest.raises(Unsupported, match="END_OF_INITIAL record"):
                await outcome(client, b, number)
            assert not loaded.exists()
        assert await state(client, b) == "running"


async def test_cancel_ends_an_idle_pre_copy(two_buses):
    # Nothing changes, so no round writes anything: the Cancel must still be seen.
    (src_bus, src), _ = two_buses
    source = start_memstate(src_bus, "idle", "--size", "1M", "--seed", "9")
    try:
        [s] = await list_backends(src)
        r, w = os.pipe2(os.O_CLOEXEC)
        number = await start(src, s, "SavePreCopy", w, NONE)
        data = await asyncio.to_thread(os.read, r, 4 << 20)  # the initial data; the stream then waits for changes
        assert data
        await asyncio.sleep(0.3)
        assert await state(src, s) == "pre-copy"
        await call(src, s.unique_name, VMSTATE2, "Cancel")
        with pytest.raises(Cancelled):
            await outcome(src, s, number, timeout=5)
        assert await state(src, s) == "running"
        os.close(r)
    finally:
        source.stop()
