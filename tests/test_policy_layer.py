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
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.names import VMSTATE1, VMSTATE2

from .as_user import NOBODY, call_as
from .conftest import count_fds, start_memstate
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
