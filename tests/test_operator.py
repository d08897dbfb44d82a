"""The operator commands: status, cancel and reset, with no busctl and no
unique names to look up."""

from __future__ import annotations

import json
import signal

import pytest

from dbus_vmstate2.backend import ThreadedBackend
from dbus_vmstate2.cli import EXIT_BACKEND_FAILED, EXIT_OK

from .test_vmm import backend_state, cli, growing_temp_file, run_cli, temp_files, wait_for


def status(bus_address, capsys, *args: str) -> dict[str, dict]:
    capsys.readouterr()
    assert cli(bus_address, "status", "--json", *args) == EXIT_OK
    return {entry["id"]: entry for entry in json.loads(capsys.readouterr().out)}


def test_status_shows_the_state_and_the_latest_transfer(bus_address, memstate, tmp_path, capsys):
    memstate("net0", "--size", "300K", "--seed", "1")
    memstate("fs0", "--size", "3M", "--seed", "2")
    before = status(bus_address, capsys)
    assert {i: (e["state"], e["transfer"], e["error"]) for i, e in before.items()} == {
        "net0": ("running", None, None), "fs0": ("running", None, None)}  # fmt: skip
    assert cli(bus_address, "save", str(tmp_path / "vm.vmstate"), "--id-list", "fs0") == EXIT_OK
    after = status(bus_address, capsys)
    assert after["net0"]["transfer"] is None
    transfer = after["fs0"]["transfer"]
    assert transfer["number"] == 1 and transfer["finished"] is True and transfer["error"] is None
    assert transfer["records"] == 3 and transfer["raw_bytes"] == 3 << 20 and transfer["stream_bytes"] > 3 << 20
    capsys.readouterr()
    assert cli(bus_address, "status") == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "NAME", "STATE", "LATEST", "TRANSFER"]
    assert table[1].split()[2:] == ["running", "none", "yet"]
    assert table[2].split()[2:5] == ["running", "#1", "done:"] and "3.0 MiB of state" in table[2]


@pytest.fixture
def held_save(bus_address, memstate, tmp_path):
    """A save command stopped (SIGSTOP) in the middle of 'big', as a stuck VMM helper."""
    backends = {"small": memstate("small", "--size", "64K", "--seed", "1"), "big": memstate("big", "--size", "256M", "--seed", "2")}
    saver = run_cli(bus_address, "save", str(tmp_path / "stuck.vmstate"), "--compression", "none")
    wait_for(lambda: growing_temp_file(tmp_path, 16 << 20), "the save to start")
    saver.send_signal(signal.SIGSTOP)
    yield saver, backends
    saver.send_signal(signal.SIGCONT)
    saver.communicate(timeout=120)


def test_cancel_stops_another_helpers_stuck_transfer(bus_address, held_save, tmp_path, capsys):
    saver, backends = held_save
    running = status(bus_address, capsys)
    assert running["big"]["state"] == "saving" and running["big"]["transfer"]["finished"] is False
    assert running["small"]["transfer"]["finished"] is True
    capsys.readouterr()
    assert cli(bus_address, "cancel") == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["small: nothing running (transfer #1 has ended)", "big: cancelled transfer #1 (it ended: Cancelled)"]
    assert backend_state(bus_address, backends["big"]) == "running"
    after = status(bus_address, capsys)
    assert after["big"]["transfer"]["error"]["type"] == "Cancelled"
    # The stuck helper, once it runs again, learns that it was cancelled.
    saver.send_signal(signal.SIGCONT)
    _, err = saver.communicate(timeout=120)
    assert saver.returncode == EXIT_BACKEND_FAILED and "back-end 'big'" in err and "cancelled" in err
    assert not temp_files(tmp_path)
    # Nothing is left to cancel.
    assert cli(bus_address, "cancel", "--json") == EXIT_OK
    assert [(e["id"], e["cancelled"], e["note"]) for e in json.loads(capsys.readouterr().out)] == [
        ("small", False, "nothing running (transfer #1 has ended)"),
        ("big", False, "nothing running (the latest transfer failed: Cancelled)"),
    ]


def test_cancel_json(bus_address, held_save, capsys):
    capsys.readouterr()
    assert cli(bus_address, "cancel", "--json", "--id-list", "big") == EXIT_OK
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["id"] == "big" and entry["transfer"] == 1 and entry["cancelled"] is True
    assert entry["outcome"]["dbus_name"] == "org.qemu.VMState2.Error.Cancelled" and entry["error"] is None


def test_reset_brings_a_backend_out_of_error(bus_address, memstate, tmp_path, capsys):
    image = tmp_path / "vm.vmstate"
    source = memstate("fragile", "--size", "1M", "--seed", "3")
    assert cli(bus_address, "save", str(image)) == EXIT_OK
    source.stop()

    def load(records):
        for _ in records:
            pass
        raise OSError("the daemon's disk is full")  # after the stream verified: state unknown

    backend = ThreadedBackend("fragile", lambda: b"its own state", load, address=bus_address)
    backend.start()
    try:
        assert cli(bus_address, "load", str(image)) == EXIT_BACKEND_FAILED
        entry = status(bus_address, capsys)["fragile"]
        assert entry["state"] == "error" and entry["transfer"]["error"]["type"] == "BackendFailed"
        capsys.readouterr()
        assert cli(bus_address, "reset") == EXIT_OK
        assert capsys.readouterr().out == "fragile: error -> running\n"
        assert cli(bus_address, "reset", "--json") == EXIT_OK
        assert json.loads(capsys.readouterr().out) == [
            {"id": "fragile", "unique_name": entry["unique_name"], "before": "running", "after": "running", "error": None}]  # fmt: skip
    finally:
        backend.stop()


def test_reset_refuses_in_mid_transfer(bus_address, held_save, capsys):
    capsys.readouterr()
    assert cli(bus_address, "reset") == EXIT_BACKEND_FAILED
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "small: running (nothing to reset)"
    assert lines[1].startswith("big: not reset (saving): InvalidState: ")


def test_the_stuck_helpers_file_is_never_written_after_cancel(bus_address, held_save, tmp_path, capsys):
    saver, _ = held_save
    assert cli(bus_address, "cancel", "--id-list", "big") == EXIT_OK
    saver.send_signal(signal.SIGCONT)
    saver.communicate(timeout=120)
    assert not (tmp_path / "stuck.vmstate").exists()
