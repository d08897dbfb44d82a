"""Migrations in step with two stock QEMU processes (``-M none``), through QMP.

The source QEMU runs; the destination QEMU waits with ``-S -incoming``. The
helpers drive them (``migrate --qmp --qemu-uri``, ``incoming --qmp``): QEMU's
own migration pauses at ``pre-switchover`` while the back-ends switch over,
continues only once the destination acknowledged, and the destination VM is
resumed only once its back-ends committed and QEMU's incoming completed.
Each QEMU has a second QMP socket for the test to watch it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dbus_vmstate2.privatebus import PrivateBus
from dbus_vmstate2.vmm.qemu import QMP

from .migration import reap_commands  # noqa: F401 (the fixture)
from .migration import Incoming, run
from .test_live_save import events
from .test_migrate import assert_moved, pair

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")]


class Qemu:
    def __init__(self, workdir: Path, name: str, *extra: str) -> None:
        self.helper_qmp = str(workdir / f"{name}-helper.qmp")
        self.test_qmp = str(workdir / f"{name}-test.qmp")
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                 "-qmp", f"unix:{self.helper_qmp},server=on,wait=off", "-qmp", f"unix:{self.test_qmp},server=on,wait=off",
                 *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not (Path(self.helper_qmp).exists() and Path(self.test_qmp).exists()):
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.02)

    def ask(self, command: str, **arguments):
        async def go():
            qmp = await QMP.connect(self.test_qmp)
            try:
                return await qmp.execute(command, **arguments)
            finally:
                await qmp.close()

        return asyncio.run(go())

    def status(self) -> str:
        return self.ask("query-status")["status"]

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask("quit")
            except Exception:
                self.process.kill()
        self.process.wait(30)


@pytest.fixture
def dest_bus():
    with PrivateBus() as bus:
        yield bus.address


@pytest.fixture
def qemus(tmp_path):
    started = []

    def start(name: str, *extra: str) -> Qemu:
        qemu = Qemu(tmp_path, name, *extra)
        started.append(qemu)
        return qemu

    yield start
    for qemu in started:
        qemu.stop()


class Watch:
    """Polls the destination VM's status; notes whether it ever ran before its back-ends loaded."""

    def __init__(self, qemu: Qemu, loaded: Path) -> None:
        self.too_early = False
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(qemu, loaded), daemon=True)
        self._thread.start()

    def _run(self, qemu: Qemu, loaded: Path) -> None:
        while not self._stop.is_set() and qemu.process.poll() is None:
            try:
                status = qemu.status()
            except Exception:
                break
            if not self.seen or self.seen[-1] != status:
                self.seen.append(status)
            if status == "running" and not events(loaded, "loaded"):
                self.too_early = True
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_a_coordinated_migration_completes_and_resumes_the_destination_vm_last(bus_address, dest_bus, memstate, qemus, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="8M", dirty="2M")
    source = qemus("src")
    dest = qemus("dst", "-S", "-incoming", f"unix:{tmp_path / 'qemu.sock'}")
    assert source.status() == "running" and dest.status() == "inmigrate"
    watch = Watch(dest, reports["fs"][1])
    incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}", "--qmp", dest.helper_qmp)
    done = run(bus_address, "migrate", incoming.address, "--qmp", source.helper_qmp,
               "--qemu-uri", f"unix:{tmp_path / 'qemu.sock'}", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    code, out, err = incoming.finish()
    watch.stop()
    assert code == 0, err
    assert "QEMU's migration completed and the VM resumed" in out
    assert not watch.too_early, watch.seen
    assert dest.status() == "running" and source.status() == "postmigrate"
    assert_moved(reports)


def test_a_backend_that_refuses_its_load_fails_the_migration_and_the_source_vm_runs_on(bus_address, dest_bus, memstate, qemus, tmp_path):
    memstate("fs", "--size", "4M", "--seed", "1", "--report", str(tmp_path / "fs.src"))
    broken = subprocess.Popen([sys.executable, "-m", "tests.faulty_backend", "--address", dest_bus, "--id", "fs"],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    try:
        assert broken.stdout.readline().startswith("READY ")
        source = qemus("src")
        dest = qemus("dst", "-S", "-incoming", f"unix:{tmp_path / 'qemu.sock'}")
        incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}", "--qmp", dest.helper_qmp)
        done = run(bus_address, "migrate", incoming.address, "--qmp", source.helper_qmp,
                   "--qemu-uri", f"unix:{tmp_path / 'qemu.sock'}")  # fmt: skip
        assert done.returncode == 4, done.stderr
        # Its daemon takes one-shot streams only: it refuses the iterative one, before anything is staged.
        assert "the destination (unix:" in done.stderr and "failed: back-end 'fs':" in done.stderr, done.stderr
        assert "takes only one-shot saves; nothing was applied" in done.stderr
        code, _, err = incoming.finish()
        assert code in (1, 3) and "back-end 'fs':" in err
        # QEMU's migration was cancelled: the source VM runs, as do its back-ends.
        deadline = time.monotonic() + 30
        while source.status() != "running":
            assert time.monotonic() < deadline, source.ask("query-migrate")
            time.sleep(0.05)
        assert source.ask("query-migrate")["status"] == "cancelled"
        states = [line.split()[2] for line in run(bus_address, "status").stdout.splitlines()[1:]]
        assert states == ["running"]
        assert dest.process.poll() is not None or dest.status() != "running"
    finally:
        broken.terminate()
        broken.communicate(timeout=30)


def test_without_a_destination_vm_waiting_incoming_refuses_to_start(dest_bus, memstate, qemus, tmp_path):
    memstate("fs", address=dest_bus)
    running = qemus("dst")
    done = run(dest_bus, "incoming", f"unix:{tmp_path / 'mig.sock'}", "--qmp", running.helper_qmp)
    assert done.returncode == 4 and "already running: start QEMU with -S and -incoming" in done.stderr
