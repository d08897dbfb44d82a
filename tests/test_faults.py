"""Faults around a save and a load: the disk, the processes, the bus.

After each: a clear error within a bounded time, no partial file under the
final name and no temporary file, no fd leaked by the back-ends, and the
back-ends serving with their state intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbus_vmstate2.examples.memstate import deterministic_state

from .conftest import ROOT, count_fds
from .test_vmm import backend_state, temp_files, wait_for

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONWARNINGS": "error"}


def run(bus_address: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "dbus_vmstate2", *args, "--address", bus_address]
    return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def intact(bus_address: str, tmp_path: Path, sources: dict, size: int, seed: int) -> None:
    """Every back-end runs, and a save and a load of it round-trip its state."""
    for source in sources.values():
        assert backend_state(bus_address, source) == "running"
    check = tmp_path / "check.vmstate"
    done = run(bus_address, "save", str(check), "--compression", "none")
    assert done.returncode == 0, done.stderr
    assert check.stat().st_size > size


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB file system of its own (tmpfs), to fill up."""
    if os.getuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("this machine cannot mount a tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_the_save_cleanly(bus_address, memstate, tmp_path, small_disk):
    sources = {i: memstate(i, "--size", "24M", "--seed", "1") for i in ("a", "b")}
    fds = {i: count_fds(s.process.pid) for i, s in sources.items()}
    target = small_disk / "vm.vmstate"
    started = time.monotonic()
    done = run(bus_address, "save", str(target), "--compression", "none")
    assert done.returncode == 2, done.stderr
    assert "No space left on device" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert time.monotonic() - started < 60
    assert not target.exists() and not temp_files(small_disk)
    for i, source in sources.items():
        wait_for(lambda s=source: backend_state(bus_address, s) == "running", "running")
        assert count_fds(source.process.pid) == fds[i]
    intact(bus_address, tmp_path, sources, 48 << 20, 1)


def test_a_read_only_directory_is_refused_before_any_backend_moves(bus_address, memstate, tmp_path):
    sources = {"a": memstate("a", "--size", "1M", "--seed", "1")}
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    if os.access(directory, os.W_OK):  # root ignores the mode: make the file system say no
        subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(directory)], check=True)
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)])
        if remount.returncode != 0 or os.access(directory, os.W_OK) and _writable(directory):
            subprocess.run(["umount", str(directory)])
            pytest.skip("cannot make a read-only directory here")
    try:
        done = run(bus_address, "save", str(directory / "vm.vmstate"))
        assert done.returncode == 2, done.stderr
        assert "Read-only file system" in done.stderr or "Permission denied" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert list(directory.iterdir()) == []
        assert backend_state(bus_address, sources["a"]) == "running"
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True)


def _writable(directory: Path) -> bool:
    try:
        (directory / ".probe").touch()
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


@pytest.mark.parametrize("operation", ["save", "load"])
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_the_backend_killed_or_stopped_mid_transfer(bus_address, memstate, tmp_path, operation, fault):
    sources = {"small": memstate("small", "--size", "1M", "--seed", "2"),
               "big": memstate("big", "--size", "256M", "--seed", "3", "--stall-timeout", "2")}  # fmt: skip
    image = tmp_path / "vm.vmstate"
    if operation == "load":
        assert run(bus_address, "save", str(image), "--compression", "none").returncode == 0
    target = tmp_path / "new.vmstate" if operation == "save" else image
    process = subprocess.Popen(
        [sys.executable, "-m", "dbus_vmstate2", operation, str(target), "--address", bus_address, "--stall-timeout", "3",
         *(["--compression", "none"] if operation == "save" else [])],
        cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: backend_state(bus_address, sources["big"]) in ("saving", "resuming"), "the transfer")
        victim = sources["big"].process
        if fault == "kill":
            victim.kill()
        else:
            victim.send_signal(signal.SIGSTOP)
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        if fault == "stop":
            sources["big"].process.send_signal(signal.SIGCONT)
    assert process.returncode == 1, err
    assert "'big'" in err and "Traceback" not in err, err
    assert not temp_files(tmp_path)
    if operation == "save":
        assert not target.exists()
    assert backend_state(bus_address, sources["small"]) == "running"
    if fault == "stop":
        wait_for(lambda: backend_state(bus_address, sources["big"]) == "running", "the stopped back-end to run on")
