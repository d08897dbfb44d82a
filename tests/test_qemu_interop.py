"""Back-ends built with the library, migrated by stock QEMU's dbus-vmstate.

QEMU saves to a file through ``exec:`` and loads back with ``-incoming defer``
and ``migrate-incoming`` (``file:`` URIs only exist from QEMU 8.2).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.privatebus import PrivateBus

from .conftest import start_memstate
from .qmp import QMP

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


def start_qemu(workdir: Path, name: str, bus_address: str, id_list: str, *extra: str) -> tuple[subprocess.Popen, str]:
    qmp_path = str(workdir / f"{name}.qmp")
    with open(workdir / f"{name}.log", "wb") as log:
        process = subprocess.Popen(
            [
                "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
                "-object", f"dbus-vmstate,id=dv,addr={bus_address},id-list={id_list.replace(',', ',,')}",
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


async def qemu_save(workdir: Path, bus_address: str, id_list: str, image: Path) -> None:
    process, qmp_path = start_qemu(workdir, "source", bus_address, id_list)
    qmp = await QMP.connect(qmp_path)
    try:
        await qmp.execute("migrate", uri=f"exec:cat > {image}")
        status = await qmp.wait_migration()
        assert status["status"] == "completed", (status, (workdir / "source.log").read_text())
    finally:
        await stop_qemu(process, qmp)


async def qemu_load(workdir: Path, bus_address: str, id_list: str, image: Path) -> tuple[str, int | None, str]:
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


async def save_through_qemu(workdir: Path, bus_address: str, sources: list, image: Path) -> None:
    """Save ``sources`` (started back-ends) with QEMU, then stop them."""
    try:
        await qemu_save(workdir, bus_address, "idA,idB", image)
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
