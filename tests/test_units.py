"""packaging/systemd and packaging/dbus: the units verify, the per-VM bus's
configuration runs a real dbus-daemon on which the memstate unit's own
command line registers and the VMM helper works, and the system-bus policy
lets root, and only what it names, through."""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbus_vmstate2.backend import Backend
from dbus_vmstate2.names import VMSTATE1, VMSTATE2
from dbus_vmstate2.vmm import connect, list_backends

from .conftest import ROOT, BackendProcess, start_ready
from .test_bus_policy import queued
from .test_notify import Receiver
from .test_vmm import cli

SYSTEMD = ROOT / "packaging" / "systemd"
BUS_UNIT = SYSTEMD / "dbus-vmstate2-bus@.service"
MEMSTATE_UNIT = SYSTEMD / "dbus-vmstate2-memstate@.service"
BUS_CONF = ROOT / "packaging" / "dbus" / "dbus-vmstate2-bus.conf"
SYSTEM_CONF = ROOT / "packaging" / "dbus" / "dbus-vmstate2-system.conf"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze (Debian's systemd) is not installed")
def test_the_units_verify(tmp_path):
    for unit in (BUS_UNIT, MEMSTATE_UNIT):
        shutil.copy(unit, tmp_path)
    # A template is verified through an instance; the unit path (ours first,
    # then the system's: the trailing colon) lets the memstate unit find the bus's.
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "dbus-vmstate2-bus@vm1.service", "dbus-vmstate2-memstate@vm1.service"],
        cwd=tmp_path, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# the per-VM bus ------------------------------------------------------------------


def unit_settings(unit: Path) -> tuple[list[str], dict[str, str]]:
    """A unit's ExecStart= and its Environment= defaults."""
    text = unit.read_text()
    environment: dict[str, str] = {}
    for line in re.findall(r"^Environment=(.*)$", text, re.MULTILINE):
        environment.update(item.split("=", 1) for item in shlex.split(line))
    [exec_start] = re.findall(r"^ExecStart=(.*)$", text, re.MULTILINE)
    return shlex.split(exec_start), environment


def bus_config(runtime_dir: Path) -> Path:
    """The per-VM bus's configuration as installed, with the VMM's user made
    the user who runs this test, if that is not root."""
    user = getpass.getuser()
    if user == "root":
        return BUS_CONF
    config = runtime_dir.parent / "bus.conf"
    config.write_text(BUS_CONF.read_text().replace('<policy user="root">', f'<policy user="{user}">'))
    return config


@pytest.fixture
def vm_bus(tmp_path) -> Iterator[str]:
    """dbus-daemon as dbus-vmstate2-bus@.service runs it, its runtime directory in tmp_path."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    argv, environment = unit_settings(BUS_UNIT)
    assert argv[0] == "/usr/bin/dbus-daemon" and argv[-1] == "--config-file=${DBUS_VMSTATE2_BUS_CONFIG}"
    assert environment["XDG_RUNTIME_DIR"] == "%t/dbus-vmstate2/%i"
    argv = ["dbus-daemon", *argv[1:-1], f"--config-file={bus_config(runtime)}", "--print-address=1"]
    daemon = subprocess.Popen(argv, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)}, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert daemon.stdout is not None
    printed = daemon.stdout.readline()
    assert printed.startswith(f"unix:path={runtime}/bus,"), printed
    yield f"unix:path={runtime}/bus"
    daemon.terminate()
    daemon.wait()
    daemon.stdout.close()


def start_memstate_unit(address: str, vm: str, *extra: str) -> BackendProcess:
    """memstate started with the memstate unit's own command line."""
    argv, environment = unit_settings(MEMSTATE_UNIT)
    assert argv[0] == "/usr/bin/python3"
    words = [sys.executable]
    for word in argv[1:]:
        if word == "$MEMSTATE_ARGS":
            words += shlex.split(environment["MEMSTATE_ARGS"])
            continue
        word = word.replace("unix:path=/run/dbus-vmstate2/%i/bus", address).replace("%i", vm)
        words.append(word.replace("${MEMSTATE_SIZE}", environment["MEMSTATE_SIZE"]))
    return start_ready(words + list(extra), vm)


def busctl(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    # Not with the test's NOTIFY_SOCKET: busctl reports its failures there
    # (ERRNO=), and blocks once the receiver's queue is full of memstate's
    # STATUS= lines.
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.run(["busctl", f"--address={address}", *args], capture_output=True, text=True, timeout=60, env=env)


def test_the_private_bus_configuration_lets_backends_register_and_the_vmm_drive_them(vm_bus, tmp_path, monkeypatch, capsys):
    receiver = Receiver(str(tmp_path / "notify"), str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    first = start_memstate_unit(vm_bus, "vm1")
    second = start_memstate_unit(vm_bus, "vm1", "--dbus-id=second", "--size=1M")  # queued behind the first
    try:
        assert receiver.next()["READY"] == "1" and receiver.next()["READY"] == "1"
        assert cli(vm_bus, "list", "--json") == 0
        listed = {b["id"]: b["unique_name"] for b in json.loads(capsys.readouterr().out)}
        assert listed == {"memstate-vm1": first.unique_name, "second": second.unique_name}
        # The VMM's user calls both, the queued one by its unique name too.
        image = tmp_path / "vm.vmstate"
        assert cli(vm_bus, "save", str(image)) == 0
        assert cli(vm_bus, "load", str(image)) == 0
        state = busctl(vm_bus, "get-property", second.unique_name, "/org/qemu/VMState1", VMSTATE2, "State")
        assert state.stdout == 's "running"\n', state.stderr
        # No other name may be owned on a VM's bus.
        other = busctl(vm_bus, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                       "RequestName", "su", "org.example.Other", "0")  # fmt: skip
        assert (other.returncode, other.stderr) == (1, "Call failed: Access denied\n")
    finally:
        assert first.stop() == 0 and second.stop() == 0
        receiver.socket.close()


# the system bus ------------------------------------------------------------------

SYSTEM_BUS_CONF = Path("/usr/share/dbus-1/system.conf")

SYSTEM_LIKE = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  {default_policy}
  {include}
</busconfig>
"""
"""A bus with the system bus's default policy, taken from its configuration."""


def system_like_bus(directory: Path, with_policy: bool) -> tuple[subprocess.Popen[str], str]:
    socket = directory / ("bus" if with_policy else "bare")
    config = directory / f"{socket.name}.conf"
    include = f"<include>{SYSTEM_CONF}</include>" if with_policy else ""
    default_policy = re.search(r'<policy context="default">.*?</policy>', SYSTEM_BUS_CONF.read_text(), re.DOTALL)
    assert default_policy is not None
    config.write_text(SYSTEM_LIKE.format(socket=socket, default_policy=default_policy.group(0), include=include))
    daemon = subprocess.Popen(["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={config}", "--print-address=1"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert daemon.stdout is not None and daemon.stdout.readline()
    return daemon, f"unix:path={socket}"


class Store:
    def save(self) -> bytes:
        return b"state"

    def load(self, records) -> None:
        pass


@pytest.mark.skipif(os.geteuid() != 0, reason="the system-bus policy names root: run as root to check it")
@pytest.mark.skipif(not SYSTEM_BUS_CONF.is_file(), reason=f"no {SYSTEM_BUS_CONF} (Debian's dbus-system-bus-common)")
async def test_the_system_bus_policy_lets_root_queue_and_call_backends(tmp_path):
    daemons = []
    try:
        daemon, address = system_like_bus(tmp_path, with_policy=True)
        daemons.append(daemon)
        client = await connect(address)
        try:
            async with Backend("net0", Store().save, Store().load, address=address) as one, \
                       Backend("fs0", Store().save, Store().load, address=address) as two:  # fmt: skip
                assert await queued(client, VMSTATE1) == [one.unique_name, two.unique_name]
                assert await queued(client, VMSTATE2) == [one.unique_name, two.unique_name]
                assert [b.id for b in await list_backends(client)] == ["net0", "fs0"]  # Id read from each
        finally:
            client.disconnect()
        # Without the file, the system bus's rules refuse the names.
        daemon, address = system_like_bus(tmp_path, with_policy=False)
        daemons.append(daemon)
        with pytest.raises(PermissionError, match="refused every name"):
            await Backend("net0", Store().save, Store().load, address=address).start()
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait()
            assert daemon.stdout is not None
            daemon.stdout.close()
