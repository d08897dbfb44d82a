"""The dbus-vmstate2 command's surface: --version, --json documents, an empty
bus, a closed stdout, and the progress line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from dbus_vmstate2.cli import EXIT_BACKEND_FAILED, EXIT_CORRUPT, EXIT_OK, EXIT_USAGE, main
from dbus_vmstate2.stream.container import FILE_HEADER_SIZE

from .conftest import ROOT
from .test_vmm import cli, growing_temp_file, run_cli, temp_files, wait_for

SIZES = {"net0": 300 << 10, "fs0": 3 << 20}


@pytest.fixture
def sources(memstate):
    return {i: memstate(i, "--size", str(size), "--seed", str(n)) for n, (i, size) in enumerate(SIZES.items())}


def test_version(capsys):
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out == f"dbus-vmstate2 {metadata.version('dbus-vmstate2')}\n"


# an empty bus ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["save", "load"])
def test_save_and_load_on_a_bus_with_no_backends_say_so(bus_address, sources, tmp_path, capsys, command):
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image)) == 0
    for source in sources.values():
        source.stop()
    target = tmp_path / "new.vmstate" if command == "save" else image
    capsys.readouterr()
    assert cli(bus_address, command, str(target)) == EXIT_BACKEND_FAILED
    assert capsys.readouterr().err == (
        f"dbus-vmstate2 {command}: no back-ends on {bus_address}: nothing is queued on org.qemu.VMState1\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.vmstate"]


@pytest.mark.parametrize("command", ["list", "status", "cancel", "reset"])
def test_the_other_commands_report_an_empty_bus(bus_address, capsys, command):
    assert cli(bus_address, command) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1] == "(no back-ends on this bus)"


# --json ---------------------------------------------------------------------------


def test_save_and_load_json(bus_address, sources, memstate, tmp_path, capsys):
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", "--json", str(image)) == EXIT_OK
    saved = json.loads(capsys.readouterr().out)
    assert saved["command"] == "save" and saved["file"] == str(image) and saved["seconds"] > 0
    assert [b["id"] for b in saved["backends"]] == list(SIZES)
    for entry, size in zip(saved["backends"], SIZES.values(), strict=True):
        assert entry["raw_bytes"] == size and entry["records"] >= 1 and entry["stream_bytes"] > 0 and entry["seconds"] > 0
    for source in sources.values():
        source.stop()
    for backend_id in SIZES:
        memstate(backend_id)
    assert cli(bus_address, "load", "--json", str(image)) == EXIT_OK
    loaded = json.loads(capsys.readouterr().out)
    assert loaded["command"] == "load" and loaded["file"] == str(image)
    strip = lambda doc: [{k: v for k, v in b.items() if k != "seconds"} for b in doc["backends"]]  # noqa: E731
    assert strip(loaded) == strip(saved)


def test_json_error_documents_keep_the_exit_code(bus_address, sources, tmp_path, capsys):
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", "--json", str(image), "--id-list", "net0,nope") == EXIT_BACKEND_FAILED
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc == {
        "command": "save", "file": str(image), "exit_code": EXIT_BACKEND_FAILED,
        "error": {"type": "DiscoveryError", "dbus_name": "org.qemu.VMState2.Error.Failed",
                  "message": "required back-ends are not on the bus: nope"},
    }  # fmt: skip
    assert err == "dbus-vmstate2 save: required back-ends are not on the bus: nope\n"

    assert cli(bus_address, "save", str(image), "--compression", "none") == EXIT_OK
    data = bytearray(image.read_bytes())
    data[FILE_HEADER_SIZE + 200_000] ^= 1  # inside net0's payload
    image.write_bytes(data)
    capsys.readouterr()
    assert cli(bus_address, "load", "--json", str(image)) == EXIT_CORRUPT
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["type"], error["dbus_name"]) == ("Corrupt", "org.qemu.VMState2.Error.Integrity")

    assert cli(bus_address, "save", "--json", str(tmp_path / "no" / "dir")) == EXIT_USAGE
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["type"], error["dbus_name"]) == ("UnusableFile", None) and "does not exist" in error["message"]


def test_a_busy_backend_in_json(bus_address, memstate, tmp_path, capsys):
    memstate("big", "--size", "256M")
    holder = run_cli(bus_address, "save", str(tmp_path / "first.vmstate"), "--compression", "none")
    try:
        wait_for(lambda: growing_temp_file(tmp_path, 16 << 20), "the first save to start")
        holder.send_signal(signal.SIGSTOP)
        assert cli(bus_address, "save", "--json", str(tmp_path / "second.vmstate")) == EXIT_BACKEND_FAILED
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.communicate(timeout=120)
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["type"] == "Busy" and error["dbus_name"] == "org.qemu.VMState2.Error.Busy"
    assert error["message"] == "back-end 'big': busy with save #1 (state saving)"
    assert holder.returncode == 0


# a closed stdout ------------------------------------------------------------------


def closed_stdout_run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the command with its stdout a pipe that nobody reads any more."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "dbus_vmstate2", *args], cwd=ROOT, stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "error"})  # fmt: skip
    finally:
        os.close(w)


def test_every_command_exits_quietly_on_a_closed_stdout(bus_address, sources, tmp_path):
    image = tmp_path / "vm.vmstate"
    bus = ["--address", bus_address]
    for args in (["save", "--json", str(image), *bus], ["inspect", "--json", str(image)], ["inspect", str(image)],
                 ["load", str(image), *bus], ["list", *bus], ["status", "--json", *bus], ["cancel", *bus],
                 ["reset", *bus]):  # fmt: skip
        done = closed_stdout_run(*args)
        assert (done.returncode, done.stderr) == (141, ""), args
    assert image.exists()  # the save was done; only its report was lost
    # An error still goes to stderr, and its JSON document is dropped quietly.
    done = closed_stdout_run("save", "--json", str(tmp_path / "no" / "x"), *bus)
    assert done.returncode == EXIT_USAGE and done.stderr.endswith("does not exist\n")
    # argparse's --help and --version ignore a failed write: 0.
    for args in (["--help"], ["save", "--help"], ["--version"]):
        assert (closed_stdout_run(*args).returncode, closed_stdout_run(*args).stderr) == (0, ""), args


def test_inspect_json_into_head(tmp_path):
    # 1,000 streams: far more JSON than the pipe holds, so the write surely
    # fails once head has gone.
    from dbus_vmstate2.stream import Compression, encode_stream
    from dbus_vmstate2.vmm.savefile import SaveFileWriter

    image = tmp_path / "many.vmstate"
    with SaveFileWriter(image) as writer:
        for n in range(1000):
            stream = writer.open_stream(f"backend-{n}")
            writer.write(stream, encode_stream(f"backend-{n}", [b"x"], Compression.NONE))
            writer.close_stream(stream)
    done = subprocess.run(["bash", "-c", f'set -o pipefail; "{sys.executable}" -m dbus_vmstate2 inspect --json "{image}" | head -1'],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (141, "{\n", "")


# the progress line ----------------------------------------------------------------


def test_progress_line_text():
    from dbus_vmstate2.cli import progress_line
    from dbus_vmstate2.vmm import Progress

    p = Progress(backends=2)
    p.begin("verifying", {"a": 3 << 30, "b": 1 << 30})
    p.done = {"a": 1 << 30}
    line = progress_line(p, "vm.vmstate", p.started + 2.0)
    assert line == "verifying vm.vmstate: 1.0 GiB of 4.0 GiB (25%), 512.0 MiB/s, ETA 6 s"
    p.begin("loading", {"a": 3 << 30, "b": 1 << 30})
    p.done = {"a": 3 << 30, "b": 0}
    assert progress_line(p, "vm.vmstate", p.started + 60.0) == "loading 2 back-end(s): 3.0 GiB of 4.0 GiB (75%), 51.2 MiB/s, ETA 20 s"
    p.done = {"a": 3 << 30, "b": 512 << 20}
    assert progress_line(p, "f", p.started + 300.0).endswith(", 11.9 MiB/s, ETA 43 s")
    p.done = {"a": 100 << 20}
    assert progress_line(p, "f", p.started + 10.0).endswith("(2%), 10.0 MiB/s, ETA 6 min 40 s")
    p.done = {"a": 3 << 30, "b": 1 << 30}
    assert progress_line(p, "f", p.started + 10.0).endswith("4.0 GiB of 4.0 GiB (100%), 409.6 MiB/s")
    p.begin("saving")
    p.done = {"a": 100 << 20}
    assert progress_line(p, "f", p.started + 1.0) == "saving 2 back-end(s): 100.0 MiB, 100.0 MiB/s"
    p.begin("syncing")
    assert progress_line(p, "vm.vmstate", p.started) == "syncing vm.vmstate to disk..."


def read_terminal(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` with its stderr on a pseudo-terminal; return its exit code and what it showed."""
    import pty

    master, slave = pty.openpty()
    process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not data:
            break
        shown += data
    os.close(master)
    return process.wait(timeout=120), shown.decode()


def test_progress_shows_the_phase_total_percentage_rate_and_eta(bus_address, memstate, tmp_path):
    source = memstate("big", "--size", "1G", "--seed", "6")
    image = tmp_path / "vm.vmstate"
    command = [sys.executable, "-m", "dbus_vmstate2"]
    code, shown = read_terminal([*command, "save", str(image), "--address", bus_address, "--compression", "none"])
    assert code == 0, shown
    saving = [line for line in shown.split("\r") if line.startswith("saving 1 back-end(s): ")]
    assert saving and all("/s" in line for line in saving)
    source.stop()
    memstate("big")
    code, shown = read_terminal([*command, "load", str(image), "--address", bus_address])
    assert code == 0, shown
    lines = [line.removesuffix("\x1b[K") for line in shown.split("\r")]
    loading = [line for line in lines if line.startswith("loading 1 back-end(s): ")]
    assert loading and all(" of 1.0 GiB (" in line and "%), " in line for line in loading), lines
    assert any(", ETA " in line for line in loading), lines
    assert not [line for line in lines if line.startswith("verifying")], lines  # the file is read once


def test_no_progress_when_stderr_is_not_a_terminal(bus_address, memstate, tmp_path):
    memstate("fs0", "--size", "64M")
    quiet = subprocess.run([sys.executable, "-m", "dbus_vmstate2", "save", str(tmp_path / "b.vmstate"), "--address", bus_address],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert not temp_files(tmp_path)


def test_unknown_commands_and_options_still_exit_2(capsys):
    assert main(["status", "--bogus"]) == EXIT_USAGE
    assert main(["cancel", "--wait", "soon"]) == EXIT_USAGE
    assert main(["load", "--json"]) == EXIT_USAGE
    capsys.readouterr()


def test_missing_file_for_load_is_usage(bus_address, tmp_path: Path, capsys):
    assert cli(bus_address, "load", "--json", str(tmp_path / "missing")) == EXIT_USAGE
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "FileNotFoundError"
