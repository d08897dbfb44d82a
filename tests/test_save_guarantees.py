"""What `save`'s exit 0 proves, and that no back-end can make it wait for ever.

The back-ends here are tests/rogue_backend.py, written by hand without the
library, each misbehaving in one way on a real bus: a stream whose payload is
damaged under right framing, a zstd bomb, a stream for another Id, a cut
stream, and an fd kept open after TransferFinished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dbus_vmstate2.cli import EXIT_BACKEND_FAILED, EXIT_CORRUPT, EXIT_INTERRUPTED, EXIT_OK, main

from .conftest import ROOT, start_ready


@pytest.fixture
def rogue(bus_address):
    """A factory of rogue back-ends on the test's bus, all stopped at the end."""
    started = []

    def spawn(mode: str, backend_id: str = "rogue"):
        backend = start_ready([sys.executable, "-m", "tests.rogue_backend", bus_address, backend_id, mode], mode)
        started.append(backend)
        return backend

    yield spawn
    for backend in started:
        backend.stop()


def save(bus_address: str, path, *args: str) -> int:
    return main(["save", str(path), "--address", bus_address, *args])


def test_a_well_behaved_hand_written_backend_saves(bus_address, rogue, tmp_path):
    rogue("good")
    assert save(bus_address, tmp_path / "vm.vmstate") == EXIT_OK
    assert main(["inspect", str(tmp_path / "vm.vmstate")]) == EXIT_OK


@pytest.mark.parametrize(
    "mode, error",
    [
        ("damaged-payload", "Corrupt: record 0: payload CRC"),
        ("zstd-bomb", "Corrupt: record 0: zstd frame gave 1001+ bytes"),
        ("other-id", "IdMismatch"),
        ("truncated", "Truncated"),
    ],
)
def test_a_stream_that_would_not_load_fails_the_save_as_the_backends_failure(bus_address, rogue, tmp_path, capsys, mode, error):
    rogue(mode)
    assert save(bus_address, tmp_path / "vm.vmstate", "--json") == EXIT_BACKEND_FAILED
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["type"] == "BackendFailed" and doc["error"]["dbus_name"] == "org.qemu.VMState2.Error.Failed"
    assert "back-end 'rogue': its stream does not verify" in doc["error"]["message"]
    assert error in doc["error"]["message"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["damaged-payload", "zstd-bomb"])
def test_no_verify_only_skims_and_then_only_load_finds_out(bus_address, rogue, tmp_path, mode):
    rogue(mode)
    image = tmp_path / "vm.vmstate"
    assert save(bus_address, image, "--no-verify") == EXIT_OK
    assert main(["inspect", str(image)]) == EXIT_CORRUPT


@pytest.mark.parametrize("mode, why", [
    ("kept-open", "its stream ended"),
    ("truncated-kept-open", "it reported its save finished"),
])  # fmt: skip
def test_a_backend_that_keeps_its_end_open_fails_the_save_after_the_close_timeout(bus_address, rogue, tmp_path, capsys, mode, why):
    rogue(mode)
    started = time.monotonic()
    assert save(bus_address, tmp_path / "vm.vmstate", "--close-timeout", "1") == EXIT_BACKEND_FAILED
    assert 1 <= time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert why in err and "has not closed its end of the pipe" in err and "close timeout of 1 s" in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_ends_a_save_held_by_a_backend_that_keeps_its_end_open(bus_address, rogue, tmp_path):
    backend = rogue("kept-open")
    saver = subprocess.Popen(
        [sys.executable, "-m", "dbus_vmstate2", "save", str(tmp_path / "vm.vmstate"), "--address", bus_address,
         "--close-timeout", "600"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert backend.process.stdout.readline().startswith("FINISHED")  # the save now waits for an end of file
    time.sleep(0.5)
    saver.send_signal(signal.SIGTERM)
    out, err = saver.communicate(timeout=20)
    assert saver.returncode == EXIT_INTERRUPTED, err
    assert "interrupted (SIGTERM)" in err
    assert list(tmp_path.iterdir()) == []
    os.kill(backend.process.pid, 0)  # still there: only the save ended
