"""Deployments the back-end must survive: strict bus policies, and back-ends
that stay out of QEMU's own dbus-vmstate (``vmstate1="off"``)."""

from __future__ import annotations

import asyncio
import logging
import subprocess

import pytest

from dbus_vmstate2.backend import Backend, ThreadedBackend
from dbus_vmstate2.names import OBJECT_PATH, VMSTATE1, VMSTATE2
from dbus_vmstate2.privatebus import PrivateBus
from dbus_vmstate2.vmm import connect, describe, list_backends, load_from_file, save_to_file
from dbus_vmstate2.vmm.calls import BUS_NAME, call
from dbus_vmstate2.vmm.vmstate1 import load_inline, save_inline


def owning_only(*names: str) -> str:
    """A policy that lets peers call anything but own only ``names``
    (QEMU's own test bus allows only org.qemu.VMState1)."""
    owns = "\n".join(f'    <allow own="{n}"/>' for n in names)
    return f"""  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <deny own="*"/>
{owns}
  </policy>"""


class Store:
    def __init__(self, state: bytes = b"") -> None:
        self.state = state

    def save(self) -> bytes:
        return self.state

    def load(self, records) -> None:
        self.state = b"".join(records)


async def queued(client, name: str) -> list[str]:
    try:
        [owners] = await call(client, BUS_NAME, BUS_NAME, "ListQueuedOwners", "s", [name], path="/org/freedesktop/DBus")
    except Exception:
        return []
    return owners


async def test_a_bus_that_refuses_vmstate2_still_serves_vmstate1(caplog):
    with PrivateBus(owning_only(VMSTATE1)) as bus:
        client = await connect(bus.address)
        source, dest = Store(b"the state"), Store()
        try:
            with caplog.at_level(logging.WARNING, logger="dbus_vmstate2"):
                async with Backend("net0", source.save, dest.load, address=bus.address) as backend:
                    assert await queued(client, VMSTATE1) == [backend.unique_name]
                    assert await queued(client, VMSTATE2) == []
                    [info] = await list_backends(client)
                    await load_inline(client, info, await save_inline(client, info))
        finally:
            client.disconnect()
    assert dest.state == b"the state"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "refused org.qemu.VMState2" in warning and "VMState1" in warning and "still works" in warning


async def test_a_bus_that_lets_only_vmstate2_be_owned_still_finds_the_backend(tmp_path):
    with PrivateBus(owning_only(VMSTATE2)) as bus:
        client = await connect(bus.address)
        store = Store(b"x" * 100_000)
        try:
            async with Backend("fs0", store.save, store.load, address=bus.address) as backend:
                assert await queued(client, VMSTATE1) == []
                [info] = await list_backends(client)
                assert (info.id, info.unique_name) == ("fs0", backend.unique_name)
                await save_to_file(client, [info], tmp_path / "saved")
                store.state = b""
                await load_from_file(client, [info], tmp_path / "saved")
        finally:
            client.disconnect()
    assert store.state == b"x" * 100_000


async def test_a_bus_that_refuses_every_name_fails_start_clearly():
    with PrivateBus(owning_only()) as bus:
        backend = Backend("nothing", Store().save, Store().load, address=bus.address)
        with pytest.raises(PermissionError, match="refused every name") as raised:
            await backend.start()
        assert VMSTATE1 in str(raised.value) and VMSTATE2 in str(raised.value)
        threaded = ThreadedBackend("nothing", Store().save, Store().load, address=bus.address)
        with pytest.raises(PermissionError, match="refused every name"):
            threaded.start()


async def test_a_vmstate2_only_backend_stays_out_of_qemus_queue(bus_address, client, tmp_path):
    big = Store(bytes(range(256)) * 8192)  # 2 MiB: more than VMState1 could carry
    async with (
        Backend("small", Store(b"s").save, Store().load, address=bus_address) as small,
        Backend("big", big.save, big.load, address=bus_address, vmstate1="off") as only2,
    ):
        assert await queued(client, VMSTATE1) == [small.unique_name]
        assert await queued(client, VMSTATE2) == [small.unique_name, only2.unique_name]
        introspection = (await asyncio.to_thread(  # the back-ends answer on this loop
            subprocess.run, ["busctl", f"--address={bus_address}", "introspect", only2.unique_name, OBJECT_PATH],
            capture_output=True, text=True, check=True,
        )).stdout
        assert VMSTATE2 in introspection and VMSTATE1 + " " not in introspection
        infos = await list_backends(client)
        assert [(i.id, i.unique_name) for i in infos] == [("small", small.unique_name), ("big", only2.unique_name)]
        status = await describe(client, infos[1])
        assert status.capabilities["vmstate1"] == "off"
        await save_to_file(client, [infos[1]], tmp_path / "big.saved")
        big.state = b""
        await load_from_file(client, [infos[1]], tmp_path / "big.saved")
    assert big.state == bytes(range(256)) * 8192


def test_a_bad_vmstate1_mode_is_refused():
    with pytest.raises(ValueError):
        Backend("x", Store().save, Store().load, vmstate1="raw")
