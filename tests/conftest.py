"""Real parts only: a private dbus-daemon per test, real back-end processes."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dbus_vmstate2.privatebus import PrivateBus
from dbus_vmstate2.vmm import connect

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bus_address() -> Iterator[str]:
    """The address of a dbus-daemon private to this test."""
    with PrivateBus() as bus:
        yield bus.address


@pytest.fixture
async def client(bus_address: str) -> AsyncIterator:
    """A connection to the test's bus, as the VMM helper makes one."""
    bus = await connect(bus_address)
    yield bus
    bus.disconnect()
    await bus.wait_for_disconnect()


@dataclass
class BackendProcess:
    process: subprocess.Popen[str]
    unique_name: str

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        code = self.process.wait(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


def start_memstate(address: str, backend_id: str, *args: str, timeout: float = 60.0) -> BackendProcess:
    """Start the example back-end and wait for its READY line."""
    return start_ready(
        [sys.executable, "-m", "dbus_vmstate2.examples.memstate", "--address", address, "--id", backend_id, *args],
        backend_id, timeout,
    )


def start_ready(argv: list[str], what: str, timeout: float = 60.0) -> BackendProcess:
    """Start a back-end process and wait for its ``READY <unique name>`` line."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("READY "):
        process.kill()
        process.wait()
        process.stdout.close()
        raise RuntimeError(f"back-end {what!r} did not become ready (got {line!r})")
    return BackendProcess(process, line.split()[1])


@pytest.fixture
def memstate(bus_address: str) -> Iterator:
    """A factory of memstate back-ends on the test's bus, all stopped at the end."""
    started: list[BackendProcess] = []

    def spawn(backend_id: str, *args: str, address: str | None = None) -> BackendProcess:
        backend = start_memstate(address or bus_address, backend_id, *args)
        started.append(backend)
        return backend

    yield spawn
    for backend in started:
        backend.stop()


def count_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
