"""Only allowed users may drive a back-end: the library's caller check, with
a second real user (``nobody``) calling through busctl under setpriv."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from dbus_vmstate2.errors import ErrorName
from dbus_vmstate2.names import OBJECT_PATH, VMSTATE1, VMSTATE2
from dbus_vmstate2.privatebus import OPEN_POLICY, PrivateBus

from .as_user import NOBODY, call_as
from .conftest import count_fds, start_memstate


pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to call as a second user"
)

ADMIT_EVERYONE = OPEN_POLICY.replace("<allow own=\"*\"/>", "<allow own=\"*\"/>\n    <allow user=\"*\"/>")


@pytest.fixture
def shared_bus():
    with PrivateBus(ADMIT_EVERYONE, shared=True) as bus:
        yield bus.address


def busctl(address: str, *args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    prefix = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.run(
        [*prefix, "busctl", f"--address={address}", *args],
        capture_output=True, text=True, timeout=30,
    )


def call_with_fd_as(user: int, address: str, name: str, member: str, fd: int) -> str:
    """Call ``member(fd, {})`` as ``user`` over a connection of its own
    (busctl cannot pass an fd: tests/as_user.py forks a child that can);
    return the error name of the reply ("" for success)."""
    return call_as(user, address, name, VMSTATE2, member, "ha{sv}", [0, {}], [fd])[0]


def state(address: str, name: str, user: int | None = None) -> str:
    done = busctl(address, "get-property", name, OBJECT_PATH, VMSTATE2, "State", user=user)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1].strip('"')


def test_another_user_may_read_but_not_drive(shared_bus, tmp_path):
    backend = start_memstate(shared_bus, "fs", "--size", "4M", "--seed", "1", "--save-loaded", str(tmp_path / "loaded"))
    try:
        name = backend.unique_name
        fds = count_fds(backend.process.pid)
        assert state(shared_bus, name, user=NOBODY) == "running"  # properties stay readable
        for interface, member in ((VMSTATE2, "Reset"), (VMSTATE2, "Cancel"), (VMSTATE2, "Check"), (VMSTATE1, "Save")):
            refused = busctl(shared_bus, "call", name, OBJECT_PATH, interface, member, user=NOBODY)
            assert refused.returncode != 0 and "not one of the users allowed" in refused.stderr, (member, refused)
        for member in ("Save", "SavePreCopy", "Load"):
            r, w = os.pipe()
            mine, theirs = (r, w) if member != "Load" else (w, r)
            assert call_with_fd_as(NOBODY, shared_bus, name, member, theirs) == ErrorName.ACCESS_DENIED
            os.close(theirs)
            if member != "Load":
                assert os.read(mine, 1) == b""  # the back-end closed the fd it was sent: nothing was written
            os.close(mine)
        assert state(shared_bus, name) == "running"
        assert not (tmp_path / "loaded").exists()
        assert count_fds(backend.process.pid) == fds
        # Its own user (root here) drives it as before.
        assert busctl(shared_bus, "call", name, OBJECT_PATH, VMSTATE2, "Reset").returncode == 0
    finally:
        backend.stop()


def test_an_allowed_second_user_may_drive(shared_bus):
    backend = start_memstate(shared_bus, "fs", "--size", "1M", "--allow-uid", str(NOBODY))
    try:
        done = busctl(shared_bus, "call", backend.unique_name, OBJECT_PATH, VMSTATE2, "Reset", user=NOBODY)
        assert done.returncode == 0, done.stderr
        # ... and root, no longer in the list, may not.
        refused = busctl(shared_bus, "call", backend.unique_name, OBJECT_PATH, VMSTATE2, "Reset")
        assert refused.returncode != 0 and "uid 0" in refused.stderr, refused
    finally:
        backend.stop()
