"""What `save` may write to and what `load` and `inspect` may read from.

A save writes a temporary file beside its target and renames it over the
target: a FIFO, a device or a /dev/stdout-like link would be replaced by a
regular file, so they are refused before any back-end is touched.  Load and
inspect read the index at the end of the file first: a pipe cannot do that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbus_vmstate2.cli import EXIT_USAGE, main
from dbus_vmstate2.names import OBJECT_PATH, VMSTATE2
from .conftest import ROOT
from .test_vmm import cli, temp_files


def transfers_seen(bus_address: str, backend) -> str:
    """busctl's answer to Check: InvalidState while the back-end has had no transfer."""
    out = subprocess.run(
        ["busctl", f"--address={bus_address}", "call", backend.unique_name, OBJECT_PATH, VMSTATE2, "Check"],
        capture_output=True, text=True, timeout=30,
    )
    return out.stdout + out.stderr


def make_target(tmp_path: Path, kind: str) -> Path:
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "device link":
        target.symlink_to("/dev/null")
    elif kind == "fifo link":
        os.mkfifo(tmp_path / "fifo")
        target.symlink_to(tmp_path / "fifo")
    elif kind == "dangling link":
        target.symlink_to(tmp_path / "nowhere")
    return target


KINDS = {"fifo": "a FIFO", "directory": "a directory", "device link": "a character device",
         "fifo link": "a FIFO", "dangling link": "does not exist"}  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_refuses_what_it_would_replace(bus_address, memstate, tmp_path, capsys, kind):
    backend = memstate("fs0", "--size", "64K")
    target = make_target(tmp_path, kind)
    before = os.lstat(target)
    assert cli(bus_address, "save", str(target)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"refusing to save to {target}" in err and KINDS[kind] in err, err
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # the same thing, untouched
    assert not temp_files(tmp_path)
    assert "no transfer has been started" in transfers_seen(bus_address, backend)


def test_save_through_a_link_like_dev_stdout_is_refused(bus_address, memstate, tmp_path):
    # /dev/stdout is a link to /proc/self/fd/1; run as root, a save used to
    # rename a regular file over it.  The same link in a scratch directory:
    stdout_link = tmp_path / "stdout"
    stdout_link.symlink_to("/proc/self/fd/1")
    backend = memstate("fs0", "--size", "64K")
    out = subprocess.run([sys.executable, "-m", "dbus_vmstate2", "save", str(stdout_link), "--address", bus_address],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    assert out.returncode == EXIT_USAGE, out.stderr
    assert out.stderr.startswith(f"dbus-vmstate2 save: refusing to save to {stdout_link}: it is a symbolic link to a FIFO")
    assert stdout_link.is_symlink() and os.readlink(stdout_link) == "/proc/self/fd/1"
    assert "no transfer has been started" in transfers_seen(bus_address, backend)


def test_dev_stdout_itself_is_refused(tmp_path):
    # Only the check, which writes nothing; stdout a pipe, then a deleted
    # file (its /proc link names no path that could be renamed over).
    check = "from dbus_vmstate2.vmm.savefile import save_target; save_target('/dev/stdout')"
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert "UnusableFile: refusing to save to /dev/stdout: it is a symbolic link to a FIFO" in out.stderr
    with open(tmp_path / "gone", "wb") as gone:
        os.unlink(tmp_path / "gone")
        out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, stdout=gone, stderr=subprocess.PIPE, text=True, timeout=60)
    assert "UnusableFile: refusing to save to /dev/stdout: it is a symbolic link to a file that has no name to replace" in out.stderr
    assert not list(tmp_path.iterdir())


def test_save_through_a_link_to_a_regular_file_replaces_the_file_and_keeps_the_link(bus_address, memstate, tmp_path, capsys):
    memstate("fs0", "--size", "64K")
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "vm.vmstate"
    real.write_bytes(b"an older save")
    link = tmp_path / "latest.vmstate"
    link.symlink_to(Path("real") / "vm.vmstate")  # relative, as people write them
    assert cli(bus_address, "save", str(link)) == 0
    capsys.readouterr()
    assert link.is_symlink() and os.readlink(link) == "real/vm.vmstate"
    assert main(["inspect", "--json", str(real)]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)["streams"]] == ["fs0"]
    assert not temp_files(tmp_path) and not temp_files(tmp_path / "real")


def test_a_missing_directory_is_named(bus_address, memstate, tmp_path, capsys):
    backend = memstate("fs0", "--size", "64K")
    assert cli(bus_address, "save", str(tmp_path / "no" / "such" / "vm.vmstate")) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"the directory {tmp_path / 'no' / 'such'} does not exist" in err and ".tmp" not in err, err
    assert "no transfer has been started" in transfers_seen(bus_address, backend)


def test_an_unwritable_directory_is_named_not_the_temporary_file(tmp_path):
    from dbus_vmstate2.vmm.savefile import SaveFileWriter, UnusableFile

    # (root may write anywhere: /proc takes no new files, even from root)
    with pytest.raises(UnusableFile) as raised:
        SaveFileWriter("/proc/vm.vmstate")
    assert "cannot create a file in /proc" in str(raised.value) and ".tmp" not in str(raised.value)


@pytest.fixture
def saved(bus_address, memstate, tmp_path, capsys) -> Path:
    memstate("fs0", "--size", "64K")
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image)) == 0
    capsys.readouterr()
    return image


@pytest.mark.parametrize("command", ["load", "inspect"])
def test_load_and_inspect_of_a_pipe_say_why(bus_address, saved, capsys, command):
    # What `dbus-vmstate2 load <(cat vm.vmstate)` gets: /dev/fd/N, a pipe.
    r, w = os.pipe()
    try:
        os.write(w, saved.read_bytes()[:4096])
        os.close(w)
        args = [command, f"/dev/fd/{r}"] + (["--address", bus_address] if command == "load" else [])
        assert main(args) == EXIT_USAGE
    finally:
        os.close(r)
    err = capsys.readouterr().err
    assert "it is a FIFO (named pipe); a saved file must be a regular file, because its index is at its end" in err, err


@pytest.mark.parametrize("command", ["load", "inspect"])
def test_load_and_inspect_of_a_fifo_with_no_writer_neither_hang_nor_say_corrupt(bus_address, saved, tmp_path, capsys, command):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = [command, str(fifo)] + (["--address", bus_address] if command == "load" else [])
    assert main(args) == EXIT_USAGE
    assert "a saved file must be a regular file" in capsys.readouterr().err
