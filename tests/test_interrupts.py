"""SIGTERM and SIGINT at any moment of a command: one line, exit 130, nothing left behind.

The command runs as a subprocess with warnings as errors, so that a
"Task exception was never retrieved", an unclosed socket or a traceback shows
up in its stderr, which must be exactly the one "interrupted" line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dbus_vmstate2.cli import EXIT_INTERRUPTED, main
from dbus_vmstate2.names import VMSTATE2
from dbus_vmstate2.vmm.calls import PROPERTIES, call

from .conftest import ROOT
from .test_file_targets import transfers_seen
from .test_vmm import backend_state, cli, growing_temp_file, temp_files, wait_for

ENV = {**os.environ, "PYTHONWARNINGS": "error"}


def spawn(bus_address: str, *args: str, blocked: bool = False) -> subprocess.Popen[str]:
    """Start the command; with ``blocked``, SIGINT and SIGTERM start out blocked
    (the child inherits the mask), so that one sent at once is pending from the
    very first instruction of the interpreter."""
    argv = [sys.executable, "-m", "dbus_vmstate2", *args, "--address", bus_address]
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if blocked else None
    try:
        return subprocess.Popen(argv, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def interrupted(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> str:
    """Wait for the command; it must end as interrupted, with one clean line."""
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert re.fullmatch(rf"dbus-vmstate2( save| load)?: interrupted \({signal.Signals(signum).name}\)\n", err), err
    return out


def serves_intact(bus_address: str, tmp_path: Path, capsys, sizes: dict[str, int]) -> None:
    """The back-ends are running and a new save holds all of their state."""
    check = tmp_path / "check.vmstate"
    assert cli(bus_address, "save", str(check), "--compression", "none") == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(check)]) == 0
    assert {s["id"]: s["raw_bytes"] for s in json.loads(capsys.readouterr().out)["streams"]} == sizes
    check.unlink()


SIZES = {"small": 64 << 10, "big": 512 << 20}


@pytest.fixture
def backends(memstate):
    return {i: memstate(i, "--size", str(size), "--seed", str(n)) for n, (i, size) in enumerate(SIZES.items())}


def test_a_signal_pending_at_spawn_interrupts_before_anything_is_touched(bus_address, backends, tmp_path, capsys):
    image = tmp_path / "vm.vmstate"
    saver = spawn(bus_address, "save", str(image), "--compression", "none", blocked=True)
    saver.send_signal(signal.SIGTERM)
    assert interrupted(saver) == ""
    assert not list(tmp_path.iterdir())
    assert all("no transfer has been started" in transfers_seen(bus_address, b) for b in backends.values())


def test_a_signal_while_the_command_is_starting(bus_address, backends, tmp_path, capsys):
    # As soon as the handler is in place: the imports are still running.
    image = tmp_path / "vm.vmstate"
    saver = spawn(bus_address, "save", str(image), "--compression", "none")
    wait_for(lambda: catches_sigterm(saver.pid), "the handler to be installed", timeout=30)
    saver.send_signal(signal.SIGTERM)
    interrupted(saver)
    assert not image.exists() and not temp_files(tmp_path)
    serves_intact(bus_address, tmp_path, capsys, SIZES)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_mid_save(bus_address, backends, tmp_path, capsys, signum):
    image = tmp_path / "vm.vmstate"
    saver = spawn(bus_address, "save", str(image), "--compression", "none", "--json")
    wait_for(lambda: growing_temp_file(tmp_path, 16 << 20), "the save to start")
    saver.send_signal(signum)
    doc = json.loads(interrupted(saver, signum))
    assert doc["exit_code"] == EXIT_INTERRUPTED and doc["error"]["type"] == "Interrupted"
    assert not image.exists() and not temp_files(tmp_path)
    assert all(backend_state(bus_address, b) == "running" for b in backends.values())
    serves_intact(bus_address, tmp_path, capsys, SIZES)


def test_a_signal_in_mid_load(bus_address, backends, memstate, tmp_path, capsys):
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image), "--compression", "none") == 0
    for backend in backends.values():
        backend.stop()
    dests = {i: memstate(i, "--size", "1K", "--seed", "9", "--save-loaded", str(tmp_path / f"{i}.loaded")) for i in SIZES}
    loader = spawn(bus_address, "load", str(image), "--no-verify")
    wait_for(lambda: backend_state(bus_address, dests["big"]) == "resuming", "the load to start")
    loader.send_signal(signal.SIGTERM)
    interrupted(loader)
    wait_for(lambda: backend_state(bus_address, dests["big"]) == "running", "the back-end to end its transfer")
    assert not (tmp_path / "big.loaded").exists()  # it kept the state it had
    (tmp_path / "small.loaded").unlink(missing_ok=True)  # it may have finished first: that is allowed
    assert "the transfer was cancelled" in transfers_seen(bus_address, dests["big"])  # not cut: cancelled


def test_a_signal_while_verifying(bus_address, backends, tmp_path, capsys):
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image), "--compression", "zstd") == 0
    capsys.readouterr()
    loader = spawn(bus_address, "load", str(image))
    wait_for(lambda: _reading(loader.pid, image), "the verification to start")
    loader.send_signal(signal.SIGTERM)
    interrupted(loader)
    serves_intact(bus_address, tmp_path, capsys, SIZES)


def _reading(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return False


async def test_a_cancellation_that_lands_with_a_reply_is_never_lost(client, memstate):
    """SIGTERM cancels the command's task; a bus call it is in must end with
    the cancellation even when the reply arrives in the same moment (Python
    3.11's ``asyncio.wait_for`` returned the reply instead, and a live
    migration then ran on for minutes after SIGTERM)."""
    backend = memstate("fs", "--size", "4K")

    async def ask_forever() -> None:
        while True:
            await call(client, backend.unique_name, PROPERTIES, "Get", "ss", [VMSTATE2, "State"])

    for attempt in range(400):
        task = asyncio.ensure_future(ask_forever())
        await asyncio.sleep(attempt % 40 / 10_000)  # 0 to 4 ms: across a call's round trip
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        while not task.done():  # swallowed: stop it before failing
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        assert done and task.cancelled(), f"attempt {attempt}: the cancellation was swallowed"


def test_the_package_waits_with_asyncio_timeout_not_wait_for():
    """Python 3.11's ``asyncio.wait_for`` can swallow the cancellation (above):
    every bounded wait is ``async with asyncio.timeout(...)`` instead."""
    used = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "dbus_vmstate2").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "asyncio.wait_for(" in line
    ]
    assert not used
