"""systemd's readiness protocol: the Notifier on real sockets, and memstate
--notify as a Type=notify unit runs it (READY=1 once it is on the bus, its
state as STATUS=, STOPPING=1), under its seccomp sandbox; and memstate's
libvirt-style options."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dbus_vmstate2.backend import Notifier
from dbus_vmstate2.examples.memstate import deterministic_state

from .conftest import ROOT, start_memstate, start_ready
from .test_vmm import cli


class Receiver:
    """systemd's end: a datagram socket that NOTIFY_SOCKET names."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(bind_to)
        self.socket.settimeout(30)

    def next(self) -> dict[str, str]:
        data = self.socket.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def until(self, key: str, value: str | None = None) -> list[dict[str, str]]:
        """Datagrams up to and including the first with ``key`` (= ``value``)."""
        seen = []
        while True:
            seen.append(self.next())
            if key in seen[-1] and (value is None or value in seen[-1][key]):
                return seen


@pytest.fixture(params=["path", "abstract"])
def receiver(request, tmp_path) -> Iterator[Receiver]:
    if request.param == "path":
        path = str(tmp_path / "notify")
        r = Receiver(path, path)
    else:
        name = f"dbus-vmstate2-test-{os.getpid()}-{id(request)}"
        r = Receiver("@" + name, "\0" + name)
    yield r
    r.socket.close()


def test_the_notifier_sends_one_datagram_per_call(receiver):
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": receiver.address})
    assert notifier.enabled
    assert notifier.ready("up")
    assert receiver.next() == {"READY": "1", "STATUS": "up"}
    assert notifier.status("saving") and notifier.stopping()
    assert [receiver.next(), receiver.next()] == [{"STATUS": "saving"}, {"STOPPING": "1"}]
    notifier.close()
    assert not notifier.ready()


def test_without_notify_socket_the_notifier_does_nothing():
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and not notifier.ready() and not notifier.stopping()


def test_an_unusable_notify_socket_is_an_error_at_once(tmp_path):
    with pytest.raises(ValueError, match="only a path or an @abstract name"):
        Notifier("vsock:2:1234")
    with pytest.raises(FileNotFoundError, match="cannot connect to NOTIFY_SOCKET="):
        Notifier(str(tmp_path / "nobody"))


@pytest.mark.parametrize("kind", ["asyncio", "threaded"])
def test_memstate_notifies_readiness_state_and_stop_under_its_sandbox(bus_address, receiver, tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    extra = ["--threaded"] if kind == "threaded" else []
    # --sandbox: after start() a new socket or connect kills the process, so
    # the notification socket must have been connected inside start().
    backend = start_memstate(bus_address, "net0", "--size", "2M", "--notify", "--sandbox", *extra)
    try:
        ready = receiver.next()
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"back-end 'net0' is {backend.unique_name}, running"
        assert cli(bus_address, "list", "--json") == 0  # it was on the bus when it said so
        assert [b["unique_name"] for b in json.loads(capsys.readouterr().out)] == [backend.unique_name]
        assert cli(bus_address, "save", str(tmp_path / "vm.vmstate")) == 0
        statuses = [d["STATUS"] for d in receiver.until("STATUS", "running")]
        assert statuses == [f"back-end 'net0' is {backend.unique_name}, {s}" for s in ("saving", "running")]
    finally:
        code = backend.stop()
    assert code == 0  # not killed by its sandbox
    assert receiver.next() == {"STOPPING": "1"}


def test_memstate_without_notify_sends_nothing(bus_address, tmp_path, monkeypatch):
    path = tmp_path / "notify"
    r = Receiver(str(path), str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    backend = start_memstate(bus_address, "net0", "--size", "64K")
    backend.stop()
    r.socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        r.socket.recv(4096)
    r.socket.close()


# libvirt's option names ----------------------------------------------------------


def memstate_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "dbus_vmstate2.examples.memstate", *args]


def test_memstate_takes_libvirts_option_names_and_loads_as_an_incoming_helper(bus_address, tmp_path, capsys):
    mac_id = "slirp-52:54:00:12:34:56"
    source = start_ready(memstate_argv(f"--dbus-address={bus_address}", f"--dbus-id={mac_id}", "--size", "3M", "--seed", "4"), mac_id)
    image = tmp_path / "vm.vmstate"
    try:
        assert cli(bus_address, "list", "--json") == 0
        assert [b["id"] for b in json.loads(capsys.readouterr().out)] == [mac_id]
        assert cli(bus_address, "save", str(image)) == 0
    finally:
        source.stop()
    report = tmp_path / "report"
    argv = memstate_argv(f"--dbus-address={bus_address}", f"--dbus-id={mac_id}", "--dbus-incoming",
                         "--dirty-rate", "1M", "--report", str(report))  # fmt: skip
    dest = start_ready(argv, mac_id)
    try:
        assert cli(bus_address, "load", str(image)) == 0
        assert cli(bus_address, "save", str(tmp_path / "after.vmstate")) == 0  # the state it serves on with
    finally:
        dest.stop()
    [loaded] = [json.loads(line) for line in report.read_text().splitlines()]
    assert loaded == {"event": "loaded", "digest": hashlib.sha256(deterministic_state(3 << 20, 4)).hexdigest(), "bytes": 3 << 20}


def test_dbus_incoming_refuses_an_initial_state():
    done = subprocess.run(memstate_argv("--dbus-id", "x", "--dbus-incoming", "--size", "1M"),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "--dbus-incoming starts with no memory" in done.stderr


def test_memstate_help_names_the_libvirt_options():
    done = subprocess.run(memstate_argv("--help"), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--dbus-address", "--dbus-id", "--dbus-incoming", "--notify"):
        assert option in done.stdout
