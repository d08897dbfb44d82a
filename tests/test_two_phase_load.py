"""Two-phase loads on a real bus: staged until Commit, discarded by Cancel,
by the commit timeout and by the VMM leaving the bus; the daemon's state
changes only on Commit."""

from __future__ import annotations

import asyncio
import time

import pytest
from dbus_fast import Message, Variant

from dbus_vmstate2.backend import Backend
from dbus_vmstate2.errors import BackendFailed, Busy, Cancelled, InvalidState, Unsupported
from dbus_vmstate2.names import VMSTATE2
from dbus_vmstate2.vmm import connect, list_backends
from dbus_vmstate2.vmm.calls import SignalWatch, call

from .test_vmstate2 import check, get_state, load_bytes, lone_end, save_bytes, start, wait_finished

EXPLICIT = {"commit": Variant("s", "explicit")}


class Store:
    """A daemon that stages what it loads and applies it when its loop ends."""

    def __init__(self, state: bytes) -> None:
        self.state = state
        self.loads = 0

    def save(self) -> list[bytes]:
        return [self.state[i : i + 4096] for i in range(0, len(self.state), 4096)]

    def load(self, records) -> None:
        staged = b"".join(bytes(r.payload) for r in records)
        self.state = staged
        self.loads += 1


class Staged(SignalWatch):
    MEMBER = "LoadStaged"

    def __init__(self, bus) -> None:
        super().__init__(bus)
        self.numbers: list[int] = []
        self.event = asyncio.Event()

    def on_signal(self, msg: Message) -> None:
        self.numbers.append(msg.body[0])
        self.event.set()


async def staged_load(client, backend, data: bytes, options=None) -> int:
    """Feed ``data`` to a two-phase Load and wait until it is staged."""
    async with Staged(client) as staged:
        number = await load_bytes(client, backend, data, {**EXPLICIT, **(options or {})})
        await asyncio.wait_for(staged.event.wait(), 30)
    assert staged.numbers == [number]
    return number


@pytest.fixture
async def pair(bus_address, client):
    """A source back-end and a destination with another state, same Id."""
    source, dest = Store(b"new state " * 5000), Store(b"old state")
    async with Backend("two-phase", source, address=bus_address) as backend:
        [info] = await list_backends(client)
        stream = await save_bytes(client, info)
    async with Backend("two-phase", dest, address=bus_address):
        [info] = await list_backends(client)
        yield info, stream, source, dest


async def test_a_staged_load_is_applied_only_on_commit(client, pair):
    backend, stream, source, dest = pair
    number = await staged_load(client, backend, stream)
    assert await get_state(client, backend) == "staged"
    assert dest.state == b"old state" and dest.loads == 0
    latest, finished, records, raw, _ = await check(client, backend)
    assert (latest, finished, raw) == (number, False, len(source.state))
    with pytest.raises(Busy):
        await start(client, backend, "Save", lone_end(write=True))
    with pytest.raises(InvalidState, match="not the running transfer"):
        await call(client, backend.unique_name, VMSTATE2, "Commit", "t", [number + 1])
    await call(client, backend.unique_name, VMSTATE2, "Commit", "t", [number])
    await wait_finished(client, backend, number)
    assert dest.state == source.state and await get_state(client, backend) == "running"
    with pytest.raises(InvalidState, match="Commit is not allowed in state running"):
        await call(client, backend.unique_name, VMSTATE2, "Commit", "t", [number])


@pytest.mark.parametrize("how", ["Cancel", "CancelTransfer"])
async def test_cancel_discards_a_staged_load(client, pair, how):
    backend, stream, _, dest = pair
    number = await staged_load(client, backend, stream)
    if how == "Cancel":
        await call(client, backend.unique_name, VMSTATE2, "Cancel")
    else:
        assert await call(client, backend.unique_name, VMSTATE2, "CancelTransfer", "t", [number]) == [True]
    with pytest.raises(Cancelled, match="discarded"):
        await wait_finished(client, backend, number)
    assert dest.state == b"old state" and dest.loads == 0
    assert await get_state(client, backend) == "running"


async def test_no_commit_within_the_timeout_discards_it(client, pair):
    backend, stream, _, dest = pair
    number = await staged_load(client, backend, stream, {"commit-timeout": Variant("u", 1)})
    began = time.monotonic()
    with pytest.raises(Cancelled, match="commit timeout of 1 s"):
        await wait_finished(client, backend, number)
    assert time.monotonic() - began < 10
    assert dest.state == b"old state" and await get_state(client, backend) == "running"


async def test_a_vmm_that_leaves_the_bus_discards_its_staged_load(bus_address, client, pair):
    backend, stream, _, dest = pair
    vmm = await connect(bus_address)
    number = await staged_load(vmm, backend, stream)
    vmm.disconnect()
    await vmm.wait_for_disconnect()
    with pytest.raises(Cancelled, match="left the bus before Commit"):
        await wait_finished(client, backend, number)
    assert dest.state == b"old state" and await get_state(client, backend) == "running"


async def test_auto_commit_is_the_default(client, pair):
    backend, stream, source, dest = pair
    number = await load_bytes(client, backend, stream, {"commit": Variant("s", "auto")})
    await wait_finished(client, backend, number)
    assert dest.state == source.state


@pytest.mark.parametrize("options, refused", [
    ({"commit": Variant("s", "later")}, "unknown Load commit mode 'later'"),
    ({"commit": Variant("b", True)}, "commit must be of D-Bus type 's', got 'b'"),
    ({"commit-timeout": Variant("u", 0)}, "commit-timeout must be 1..3600 seconds, got 0"),
    ({"commit-timeout": Variant("i", 5)}, "commit-timeout must be of D-Bus type 'u', got 'i'"),
    ({"verify": Variant("b", True)}, "unknown Load options: .verify."),
])  # fmt: skip
async def test_load_options_have_one_type_and_a_range(client, pair, options, refused):
    backend, *_ = pair
    with pytest.raises(Unsupported, match=refused):
        await start(client, backend, "Load", lone_end(write=False), options)


async def test_a_daemon_that_swallows_the_discard_is_in_error(bus_address, client):
    def stubborn_load(records) -> None:
        try:
            for _ in records:
                pass
        except Cancelled:
            pass  # wrong: it may apply what it staged

    async with Backend("stubborn", lambda: [b"x" * 100], stubborn_load, address=bus_address):
        [backend] = await list_backends(client)
        stream = await save_bytes(client, backend)
        number = await staged_load(client, backend, stream)
        await call(client, backend.unique_name, VMSTATE2, "Cancel")
        with pytest.raises((Cancelled, BackendFailed)):
            await wait_finished(client, backend, number)
        assert await get_state(client, backend) == "error"


async def test_a_daemon_that_returns_early_is_never_staged_for_commit(bus_address, client):
    def hasty_load(records) -> None:
        next(iter(records))  # takes one record, "commits", returns

    async with Backend("hasty", lambda: [b"a" * 100, b"b" * 100], hasty_load, address=bus_address):
        [backend] = await list_backends(client)
        stream = await save_bytes(client, backend)
        async with Staged(client) as staged:
            number = await load_bytes(client, backend, stream, EXPLICIT)
            with pytest.raises(BackendFailed, match="before reading every record"):
                await wait_finished(client, backend, number)
        assert staged.numbers == [] and await get_state(client, backend) == "error"


async def test_capability(client, pair):
    backend, *_ = pair
    [caps] = await call(client, backend.unique_name, "org.freedesktop.DBus.Properties", "Get", "ss",
                        [VMSTATE2, "Capabilities"])  # fmt: skip
    assert caps.value["two-phase-load"].value is True
