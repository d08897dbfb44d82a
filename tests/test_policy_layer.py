"""The bus policy is a layer of its own: packaging/dbus's configurations,
loaded by a real dbus-daemon, refuse a caller they do not name before the
back-end sees the call, even a back-end whose own allow-list would admit it.

The caller is ``nobody``, on a bus whose socket it can reach; the refusal is
the bus's ``org.freedesktop.DBus.Error.AccessDenied``, not the library's
``org.qemu.VMState2.Error.AccessDenied`` (tests/test_access.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.names import VMSTATE1, VMSTATE2

from .as_user import NOBODY, call_as
from .conftest import ROOT, count_fds, start_memstate
from .test_file_targets import transfers_seen
from .test_units import BUS_CONF, BUS_UNIT, SYSTEM_BUS_CONF, system_like_bus, unit_settings
from .test_vmm import backend_state, cli

pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root to call as a second user"
)

BUS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

CALLS_WITHOUT_FDS = [
    (VMSTATE2, "Cancel", "", []),
    (VMSTATE2, "Reset", "", []),
    (VMSTATE2, "CancelTransfer", "t", [1]),
    (VMSTATE2, "StopCopy", "t", [1]),
    (VMSTATE2, "Resume", "", []),
    (VMSTATE2, "Check", "", []),
    (VMSTATE2, "Pending", "", []),
    (VMSTATE1, "Save", "", []),
    (VMSTATE1, "Load", "ay", [b"any blob"]),
]


def reachable_directory() -> Path:
    """A fresh directory that every user may enter (pytest's tmp_path is root's only)."""
    directory = Path(tempfile.mkdtemp(prefix="dbus-vmstate2-policy-"))
    directory.chmod(0o755)
    return directory


def stop(daemon: subprocess.Popen[str]) -> None:
    daemon.terminate()
    daemon.wait()
    if daemon.stdout is not None:
        daemon.stdout.close()


def vm_bus(directory: Path) -> tuple[subprocess.Popen[str], str]:
    """dbus-daemon as dbus-vmstate2-bus@.service runs it, with the installed
    configuration unchanged (the VMM's user is root, as here)."""
    argv, _ = unit_settings(BUS_UNIT)
    argv = ["dbus-daemon", *argv[1:-1], f"--config-file={BUS_CONF}", "--print-address=1"]
    daemon = subprocess.Popen(argv, env={**os.environ, "XDG_RUNTIME_DIR": str(directory)}, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert daemon.stdout is not None and daemon.stdout.readline().startswith(f"unix:path={directory}/bus,")
    return daemon, f"unix:path={directory}/bus"


@pytest.fixture(params=["private VM bus", "system bus"])
def policy_bus(request) -> Iterator[str]:
    """A bus configured by one of packaging/dbus's files, its socket open to every user."""
    if request.param == "system bus" and not SYSTEM_BUS_CONF.is_file():
        pytest.skip(f"no {SYSTEM_BUS_CONF} (Debian's dbus-system-bus-common)")
    directory = reachable_directory()
    make = vm_bus if request.param == "private VM bus" else lambda d: system_like_bus(d, with_policy=True)
    daemon, address = make(directory)
    try:
        yield address
    finally:
        stop(daemon)
        shutil.rmtree(directory, ignore_errors=True)


def test_the_bus_refuses_a_caller_its_policy_does_not_name(policy_bus, tmp_path):
    loaded = tmp_path / "loaded"
    # The back-end itself would admit nobody: only the bus stands in the way.
    backend = start_memstate(policy_bus, "fs", "--size", "4M", "--seed", "1", "--save-loaded", str(loaded),
                             "--allow-uid", "0", "--allow-uid", str(NOBODY))  # fmt: skip
    try:
        name = backend.unique_name
        fds = count_fds(backend.process.pid)
        for interface, member, signature, body in CALLS_WITHOUT_FDS:
            error, _ = call_as(NOBODY, policy_bus, name, interface, member, signature, body)
            assert error == BUS_DENIED, (interface, member, error)
        for member in ("Save", "SavePreCopy", "Load"):
            r, w = os.pipe()
            mine, theirs = (w, r) if member == "Load" else (r, w)
            error, _ = call_as(NOBODY, policy_bus, name, VMSTATE2, member, "ha{sv}", [0, {}], fds=[theirs])
            os.close(theirs)
            assert error == BUS_DENIED, (member, error)
            # The bus dropped its copy of the fd: no one else holds the other end.
            if member == "Load":
                with pytest.raises(BrokenPipeError):
                    os.write(mine, b"x")
            else:
                assert os.read(mine, 1) == b""
            os.close(mine)
        # Nothing moved: the state, the transfer record, the fds.
        assert backend_state(policy_bus, backend) == "running"
        assert "no transfer has been started" in transfers_seen(policy_bus, backend)
        assert not loaded.exists()
        assert count_fds(backend.process.pid) == fds
        # The VMM's user (root) still drives it, one-shot and back.
        image = tmp_path / "vm.vmstate"
        assert cli(policy_bus, "save", str(image)) == 0
        assert cli(policy_bus, "load", str(image)) == 0
        assert loaded.read_bytes() == deterministic_state(4 << 20, 1)
    finally:
        assert backend.stop() == 0



def test_who_may_own_the_names(policy_bus, request):
    """On a VM's bus, whoever reaches the socket may queue a back-end (the
    socket's directory decides who can); on the system bus, only the users
    a policy file names (here root)."""
    asked = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "busctl", f"--address={policy_bus}",
         "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName", "su",
         VMSTATE2, "0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if request.node.callspec.params["policy_bus"] == "system bus":
        assert (asked.returncode, asked.stderr) == (1, "Call failed: Access denied\n")
    else:
        assert (asked.returncode, asked.stdout) == (0, "u 1\n"), asked.stderr


OVERSIZED_CALL = """
import asyncio, sys
from dbus_fast import Message
from dbus_vmstate2.vmm import connect

async def main():
    bus = await connect(sys.argv[1])
    try:
        reply = await bus.call(Message(destination=sys.argv[2], path="/org/qemu/VMState1", interface="org.qemu.VMState1",
                                       member="Load", signature="ay", body=[bytes(int(sys.argv[3]))]))
        print(reply.message_type.name, reply.error_name)
    except (ConnectionError, EOFError) as exc:
        print("disconnected", type(exc).__name__)

asyncio.run(main())
"""


def test_the_private_bus_carries_a_vmstate1_blob_and_nothing_much_larger(tmp_path):
    """dbus-vmstate2-bus.conf caps a message at 2 MiB: QEMU's 1 MiB VMState1
    blob passes both ways, and a larger message costs the back-end nothing:
    the bus drops its sender before the back-end sees a byte of it."""
    directory = reachable_directory()
    daemon, address = vm_bus(directory)
    backend = start_memstate(address, "net", "--size", "1M", "--seed", "3", "--vmstate1", "legacy",
                             "--save-loaded", str(tmp_path / "loaded"))  # fmt: skip
    try:
        blob = subprocess.run(["busctl", f"--address={address}", "--json=short", "call", backend.unique_name,
                               "/org/qemu/VMState1", VMSTATE1, "Save"], capture_output=True, text=True, check=True)  # fmt: skip
        assert len(blob.stdout) > 1 << 20  # the whole 1 MiB blob came back
        peak = peak_kib(backend.process.pid)

        def load(size: int) -> str:
            done = subprocess.run([sys.executable, "-c", OVERSIZED_CALL, address, backend.unique_name, str(size)],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        assert load(1 << 20) == "METHOD_RETURN None"  # a blob of QEMU's largest size is loaded
        assert (tmp_path / "loaded").read_bytes() == bytes(1 << 20)
        assert load(3 << 20).startswith("disconnected")
        assert backend_state(address, backend) == "running"
        assert peak_kib(backend.process.pid) - peak < 8 << 10  # the 1 MiB load's copies, not 3 MiB's
    finally:
        assert backend.stop() == 0
        stop(daemon)
        shutil.rmtree(directory, ignore_errors=True)


def peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
