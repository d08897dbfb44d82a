"""Back-ends built with the library, migrated by stock QEMU's dbus-vmstate.

QEMU saves to a file through ``exec:`` and loads back with ``-incoming defer``
and ``migrate-incoming`` (``file:`` URIs only exist from QEMU 8.2).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dbus_vmstate2.backend import inline_capacity
from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.names import VMSTATE1_SIZE_LIMIT
from dbus_vmstate2.privatebus import PrivateBus

from .conftest import start_memstate, start_ready
from .qmp import QMP

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")]


def start_qemu(workdir: Path, name: str, bus_address: str, id_list: str | None, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start QEMU with a dbus-vmstate object; ``id_list`` None: no id-list (every back-end queued on VMState1)."""
    qmp_path = str(workdir / f"{name}.qmp")
    dbus_vmstate = f"dbus-vmstate,id=dv,addr={bus_address}"
    if id_list is not None:
        dbus_vmstate += f",id-list={id_list.replace(',', ',,')}"
    with open(workdir / f"{name}.log", "wb") as log:
        process = subprocess.Popen(
            [
                "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
                "-object", dbus_vmstate,
                "-qmp", f"unix:{qmp_path},server=on,wait=off",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    return process, qmp_path


async def stop_qemu(process: subprocess.Popen, qmp: QMP | None) -> int:
    if qmp is not None and process.poll() is None:
        try:
            await qmp.execute("quit")
        except ConnectionError:
            pass
    if qmp is not None:
        await qmp.close()
    return await asyncio.to_thread(process.wait, 30)


async def qemu_save(workdir: Path, bus_address: str, id_list: str | None, image: Path) -> None:
    process, qmp_path = start_qemu(workdir, "source", bus_address, id_list)
    qmp = await QMP.connect(qmp_path)
    try:
        await qmp.execute("migrate", uri=f"exec:cat > {image}")
        status = await qmp.wait_migration()
        assert status["status"] == "completed", (status, (workdir / "source.log").read_text())
    finally:
        await stop_qemu(process, qmp)


async def qemu_load(workdir: Path, bus_address: str, id_list: str | None, image: Path) -> tuple[str, int | None, str]:
    """Load ``image``; return the migration status, QEMU's exit code if it exited, and its log."""
    process, qmp_path = start_qemu(workdir, "dest", bus_address, id_list, "-incoming", "defer")
    qmp = await QMP.connect(qmp_path)
    try:
        await qmp.execute("migrate-incoming", uri=f"exec:cat {image}")
        try:
            status = (await qmp.wait_migration())["status"]
        except ConnectionError:  # QEMU 7.2 exits on a failed incoming migration
            status = "failed"
    finally:
        code = await stop_qemu(process, qmp)
    return status, code, (workdir / "dest.log").read_text(errors="replace")


async def save_through_qemu(
    workdir: Path, bus_address: str, sources: list, image: Path, id_list: str | None = "idA,idB"
) -> None:
    """Save ``sources`` (started back-ends) with QEMU, then stop them."""
    try:
        await qemu_save(workdir, bus_address, id_list, image)
    finally:
        for backend in sources:
            backend.stop()


@pytest.fixture
def two_buses():
    with PrivateBus() as source, PrivateBus() as dest:
        yield source.address, dest.address


async def test_qemu_migrates_two_backends_through_a_file(tmp_path, two_buses):
    source_bus, dest_bus = two_buses
    state_b = tmp_path / "b.state"
    state_b.write_bytes(b"I'am\0idB!" * 1000)
    sources = [
        start_memstate(source_bus, "idA", "--size", "200K", "--seed", "11"),
        start_memstate(source_bus, "idB", "--state-file", str(state_b)),
    ]
    image = tmp_path / "vm.image"
    await save_through_qemu(tmp_path, source_bus, sources, image)
    assert b"dbus-vmstate/dbus-vmstate" in image.read_bytes()

    dests = [
        start_memstate(dest_bus, "idB", "--save-loaded", str(tmp_path / "b.loaded")),
        start_memstate(dest_bus, "idA", "--save-loaded", str(tmp_path / "a.loaded")),
    ]
    try:
        status, _, log = await qemu_load(tmp_path, dest_bus, "idA,idB", image)
    finally:
        for backend in dests:
            backend.stop()
    assert status == "completed", log
    assert (tmp_path / "a.loaded").read_bytes() == deterministic_state(200 << 10, 11)
    assert (tmp_path / "b.loaded").read_bytes() == state_b.read_bytes()


async def test_qemu_load_fails_when_a_backend_is_missing(tmp_path, two_buses):
    source_bus, dest_bus = two_buses
    sources = [start_memstate(source_bus, i, "--size", "4K", "--seed", "1") for i in ("idA", "idB")]
    image = tmp_path / "vm.image"
    await save_through_qemu(tmp_path, source_bus, sources, image)

    only_a = start_memstate(dest_bus, "idA", "--save-loaded", str(tmp_path / "a.loaded"))
    try:
        status, code, log = await qemu_load(tmp_path, dest_bus, "idA,idB", image)
    finally:
        only_a.stop()
    assert status == "failed" or code not in (0, None), log
    assert "idB" in log, log


async def test_qemu_without_id_list_leaves_vmstate2_only_backends_alone(tmp_path, two_buses):
    # A manager that lets QEMU find its helpers (no id-list) keeps the large
    # back-ends out of QEMU's way with vmstate1="off"; dbus-vmstate2 moves them.
    source_bus, dest_bus = two_buses
    sources = [
        start_memstate(source_bus, "small", "--size", "64K", "--seed", "1"),
        start_memstate(source_bus, "large", "--size", "8M", "--seed", "2", "--vmstate1", "off"),
    ]
    image = tmp_path / "vm.image"
    await save_through_qemu(tmp_path, source_bus, sources, image, id_list=None)
    dests = [
        start_memstate(dest_bus, "small", "--save-loaded", str(tmp_path / "small.loaded")),
        start_memstate(dest_bus, "large", "--vmstate1", "off", "--save-loaded", str(tmp_path / "large.loaded")),
    ]
    try:
        status, _, log = await qemu_load(tmp_path, dest_bus, None, image)
    finally:
        for backend in dests:
            backend.stop()
    assert status == "completed", log
    assert (tmp_path / "small.loaded").read_bytes() == deterministic_state(64 << 10, 1)
    assert not (tmp_path / "large.loaded").exists()


def start_legacy(bus_address: str, backend_id: str, state: Path, loaded: Path):
    """The hand-written raw-blob back-end of tests/legacy_backend.py."""
    return start_ready([sys.executable, "-m", "tests.legacy_backend", bus_address, backend_id, str(state), str(loaded)], backend_id)


async def test_a_raw_blob_daemon_upgrades_to_the_library_without_breaking_migration(tmp_path, two_buses):
    # Old (hand-written, raw blobs) -> new (the library, vmstate1="legacy"),
    # and back: mixed versions migrate through stock QEMU both ways, with
    # the raw state at QEMU's limit of exactly 1 MiB.
    source_bus, dest_bus = two_buses
    state = tmp_path / "fs.state"
    state.write_bytes(deterministic_state(VMSTATE1_SIZE_LIMIT, 7))
    image = tmp_path / "old-to-new.image"
    await save_through_qemu(
        tmp_path, source_bus, [start_legacy(source_bus, "idA", state, tmp_path / "unused")], image, id_list="idA"
    )
    new = start_memstate(dest_bus, "idA", "--vmstate1", "legacy", "--save-loaded", str(tmp_path / "new.loaded"))
    try:
        status, _, log = await qemu_load(tmp_path, dest_bus, "idA", image)
    finally:
        new.stop()
    assert status == "completed", log
    assert (tmp_path / "new.loaded").read_bytes() == state.read_bytes()

    image = tmp_path / "new-to-old.image"
    await save_through_qemu(
        tmp_path, source_bus, [start_memstate(source_bus, "idA", "--state-file", str(state), "--vmstate1", "legacy")],
        image, id_list="idA",
    )
    old = start_legacy(dest_bus, "idA", state, tmp_path / "old.loaded")
    try:
        status, _, log = await qemu_load(tmp_path, dest_bus, "idA", image)
    finally:
        old.stop()
    assert status == "completed", log
    assert (tmp_path / "old.loaded").read_bytes() == state.read_bytes()


async def test_an_incompressible_state_at_the_stated_capacity_migrates(tmp_path, two_buses):
    source_bus, dest_bus = two_buses
    size = inline_capacity("idA")
    image = tmp_path / "vm.image"
    await save_through_qemu(
        tmp_path, source_bus, [start_memstate(source_bus, "idA", "--size", str(size), "--seed", "8")], image, id_list="idA"
    )
    dest = start_memstate(dest_bus, "idA", "--save-loaded", str(tmp_path / "a.loaded"))
    try:
        status, _, log = await qemu_load(tmp_path, dest_bus, "idA", image)
    finally:
        dest.stop()
    assert status == "completed", log
    assert (tmp_path / "a.loaded").read_bytes() == deterministic_state(size, 8)
