"""2 GiB through a file in flat memory, with the bus answering all along."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time

import pytest

from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.names import VMSTATE2
from dbus_vmstate2.vmm import list_backends
from dbus_vmstate2.vmm.calls import PROPERTIES, call

from .conftest import ROOT

pytestmark = pytest.mark.slow

STATE = 2 << 30
MEMORY_BUDGET = 100 << 20  # the bound, beyond the daemon's own state


def reset_peak(pid: int) -> int:
    """Reset the peak RSS of a live process (so that making its state does
    not count) and return its RSS now, in bytes."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return memory(pid)["VmRSS"]


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a live process, in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def run_measured(*args: str) -> tuple[int, int, str]:
    """Run the dbus-vmstate2 command; return its exit code, its own peak RSS and its stderr."""
    # A child's ru_maxrss starts from its parent's peak RSS (the kernel records
    # the peak of the memory it leaves at exec, which is the parent's after a
    # vfork): reset ours first, or a test that made 2 GiB here before is
    # counted as the helper's.
    reset_peak(os.getpid())
    process = subprocess.Popen(
        [sys.executable, "-m", "dbus_vmstate2", *args], cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert process.stderr is not None
    stderr = process.stderr.read()
    process.stderr.close()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss * 1024, stderr


async def slowest_answer(client, backend, done: asyncio.Event) -> float:
    """Call GetAll and Check on ``backend`` until ``done``; return the slowest reply in seconds."""
    slowest = 0.0
    while not done.is_set():
        for member, signature, body, interface in (("GetAll", "s", [VMSTATE2], PROPERTIES), ("Check", "", [], VMSTATE2)):
            started = time.monotonic()
            try:
                await call(client, backend.unique_name, interface, member, signature, body)
            except Exception:  # Check before the first transfer: InvalidState is an answer too
                pass
            slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.05)
    return slowest


async def transfer_watching(client, backend, *args: str) -> tuple[int, int, str, float]:
    done = asyncio.Event()
    watcher = asyncio.ensure_future(slowest_answer(client, backend, done))
    try:
        code, peak, stderr = await asyncio.to_thread(run_measured, *args)
    finally:
        done.set()
    return code, peak, stderr, await watcher


async def test_two_gib_round_trip_in_flat_memory(bus_address, client, memstate, tmp_path):
    image, loaded = tmp_path / "big.vmstate", tmp_path / "big.loaded"
    try:
        source = memstate("big", "--size", "2G", "--seed", "7")
        [backend] = await list_backends(client)
        before = reset_peak(source.process.pid)
        code, vmm_peak, stderr, slowest = await transfer_watching(client, backend, "save", str(image), "--address", bus_address)
        assert code == 0, stderr
        growth = memory(source.process.pid)["VmHWM"] - before
        assert vmm_peak < MEMORY_BUDGET, f"the VMM helper peaked at {vmm_peak >> 20} MiB saving 2 GiB"
        assert growth < MEMORY_BUDGET, f"the source back-end grew by {growth >> 20} MiB saving 2 GiB"
        assert slowest < 1.0, f"the source took {slowest:.3f} s to answer during the save"
        source.stop()

        dest = memstate("big", "--save-loaded", str(loaded))
        [backend] = await list_backends(client)
        before = reset_peak(dest.process.pid)
        code, vmm_peak, stderr, slowest = await transfer_watching(client, backend, "load", str(image), "--address", bus_address)
        assert code == 0, stderr
        growth = memory(dest.process.pid)["VmHWM"] - before - STATE
        assert vmm_peak < MEMORY_BUDGET, f"the VMM helper peaked at {vmm_peak >> 20} MiB loading 2 GiB"
        assert growth < MEMORY_BUDGET, f"the destination grew by {growth >> 20} MiB beyond its 2 GiB of state"
        assert slowest < 1.0, f"the destination took {slowest:.3f} s to answer during the load"

        assert loaded.stat().st_size == STATE
        expected = hashlib.sha256(deterministic_state(STATE, 7)).digest()
        with loaded.open("rb") as f:
            assert hashlib.file_digest(f, "sha256").digest() == expected
    finally:
        for path in (image, loaded):
            path.unlink(missing_ok=True)
