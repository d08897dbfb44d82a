"""The VMM helper: dbus-vmstate2 list, save, load and inspect against real back-ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dbus_fast import NameFlag

from dbus_vmstate2.backend import Backend
from dbus_vmstate2.backend.vmstate1 import VMState1Interface
from dbus_vmstate2.cli import EXIT_BACKEND_FAILED, EXIT_CORRUPT, EXIT_INTERRUPTED, main
from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.stream.container import FILE_HEADER_SIZE

from dbus_vmstate2.errors import LimitExceeded, Unsupported
from dbus_vmstate2.names import OBJECT_PATH, VMSTATE1, VMSTATE2
from dbus_vmstate2.vmm import connect, describe, list_backends, save_to_file

from .conftest import ROOT

SIZES = {"net0": 300 << 10, "fs0": 3 << 20, "gpu0": 0}


def start_sources(memstate):
    return {i: memstate(i, "--size", str(size), "--seed", str(n)) for n, (i, size) in enumerate(SIZES.items())}


def start_dests(memstate, tmp_path: Path, ids=SIZES):
    return {i: memstate(i, "--save-loaded", str(tmp_path / f"{i}.loaded")) for i in ids}


def cli(bus_address: str, *args: str) -> int:
    return main([*args, "--address", bus_address])


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_save_inspect_load_round_trip(bus_address, memstate, tmp_path, capsys):
    sources = start_sources(memstate)
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image)) == 0
    assert "saved 3 back-end(s)" in capsys.readouterr().out
    assert main(["inspect", "--json", str(image)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] and {s["id"]: s["raw_bytes"] for s in doc["streams"]} == SIZES
    for source in sources.values():
        source.stop()
    start_dests(memstate, tmp_path)
    assert cli(bus_address, "load", str(image)) == 0
    for n, (backend_id, size) in enumerate(SIZES.items()):
        assert (tmp_path / f"{backend_id}.loaded").read_bytes() == deterministic_state(size, n)


def test_list_table_and_json(bus_address, memstate, capsys):
    start_sources(memstate)
    assert cli(bus_address, "list") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert [line.split()[0] for line in table[1:]] == list(SIZES)
    assert all(" running " in line for line in table[1:])
    assert cli(bus_address, "list", "--json", "--id-list", "fs0") == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["id"] == "fs0" and entry["state"] == "running" and entry["capabilities"]["stream-versions"] == [1]


def test_id_list_with_a_missing_backend_fails_clearly(bus_address, memstate, tmp_path, capsys):
    start_sources(memstate)
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image), "--id-list", "net0,nope") == EXIT_BACKEND_FAILED
    assert "nope" in capsys.readouterr().err
    assert not image.exists() and not temp_files(tmp_path)


def test_usage_errors_exit_2(capsys):
    assert main(["save"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["save", "x", "--level", "many"]) == 2


def test_file_without_a_backends_state_is_refused(bus_address, memstate, tmp_path, capsys):
    sources = start_sources(memstate)
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image), "--id-list", "net0") == 0
    capsys.readouterr()
    assert cli(bus_address, "load", str(image), "--id-list", "net0,fs0") == EXIT_CORRUPT
    assert "holds no state for back-end 'fs0'" in capsys.readouterr().err
    del sources


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_or_truncated_file_is_refused_and_the_state_kept(bus_address, memstate, tmp_path, capsys, damage):
    sources = start_sources(memstate)
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image), "--compression", "none") == 0
    for source in sources.values():
        source.stop()
    data = bytearray(image.read_bytes())
    if damage == "flip":
        data[FILE_HEADER_SIZE + 1024 * 1024] ^= 0x01  # inside a payload: only its CRC can tell
    else:
        del data[len(data) // 2 :]
    image.write_bytes(data)
    # The destinations already hold a state of their own, which must survive.
    for n, backend_id in enumerate(SIZES):
        memstate(backend_id, "--size", "64K", "--seed", str(100 + n), "--save-loaded", str(tmp_path / f"{backend_id}.loaded"))
    assert cli(bus_address, "load", str(image)) == EXIT_CORRUPT
    capsys.readouterr()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".loaded"]
    again = tmp_path / "again.vmstate"
    assert cli(bus_address, "save", str(again)) == 0
    assert main(["inspect", "--json", str(again)]) == 0
    assert {s["id"]: s["raw_bytes"] for s in json.loads(capsys.readouterr().out.split("\n", 1)[1])["streams"]} == dict.fromkeys(SIZES, 64 << 10)


def run_cli(bus_address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dbus_vmstate2", *args, "--address", bus_address],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def growing_temp_file(directory: Path, over: int) -> bool:
    """A save into ``directory`` has written more than ``over`` bytes.

    A save writes an unnamed file (O_TMPFILE): it is found through the fds
    of the processes that hold it (``/proc/PID/fd`` links to
    ``DIRECTORY/#INODE (deleted)``); where the file system has no unnamed
    files, by its temporary name."""
    prefix = f"{directory}/#"
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = list(fds.iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for link in links:
            try:
                if os.readlink(link).startswith(prefix) and link.stat().st_size > over:
                    return True
            except OSError:
                continue
    return any(p.stat().st_size > over for p in temp_files(directory))


def backend_state(bus_address: str, backend) -> str:
    """The State property of a back-end process, read with busctl."""
    return subprocess.run(
        ["busctl", f"--address={bus_address}", "get-property", backend.unique_name, OBJECT_PATH, VMSTATE2, "State"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.split()[1].strip('"')


def test_backend_killed_in_mid_save(bus_address, memstate, tmp_path, capsys):
    small = memstate("small", "--size", "64K", "--seed", "1")
    huge = memstate("huge", "--size", "1G", "--seed", "2")
    image = tmp_path / "vm.vmstate"
    saver = run_cli(bus_address, "save", str(image), "--compression", "none")
    wait_for(lambda: growing_temp_file(tmp_path, 32 << 20), "the save to start")
    huge.process.kill()
    _, err = saver.communicate(timeout=120)
    assert saver.returncode == EXIT_BACKEND_FAILED, err
    assert "back-end 'huge'" in err and "Truncated" in err
    assert not image.exists() and not temp_files(tmp_path)
    # The other back-end was cancelled, not harmed: it serves on, state intact.
    assert backend_state(bus_address, small) == "running"
    assert cli(bus_address, "save", str(image)) == 0
    assert main(["inspect", "--json", str(image)]) == 0
    [entry] = json.loads(capsys.readouterr().out.split("\n", 1)[1])["streams"]
    assert (entry["id"], entry["raw_bytes"], entry["verified"]) == ("small", 64 << 10, True)


def test_vmm_killed_in_mid_save(bus_address, memstate, tmp_path, capsys):
    big = memstate("big", "--size", "1G", "--seed", "3")
    image = tmp_path / "vm.vmstate"
    saver = run_cli(bus_address, "save", str(image), "--compression", "none")
    wait_for(lambda: growing_temp_file(tmp_path, 32 << 20), "the save to start")
    saver.kill()
    saver.communicate()
    assert not image.exists()
    wait_for(lambda: backend_state(bus_address, big) == "running", "the back-end to end its transfer")
    # The back-end sees EPIPE, ends the transfer and serves on with its state.
    assert cli(bus_address, "save", str(image), "--id-list", "big", "--compression", "none") == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(image)]) == 0
    [entry] = json.loads(capsys.readouterr().out)["streams"]
    assert (entry["raw_bytes"], entry["verified"]) == (1 << 30, True)


def test_vmm_killed_in_mid_load(bus_address, memstate, tmp_path, capsys):
    source = memstate("big", "--size", "1G", "--seed", "4")
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image), "--compression", "none") == 0
    source.stop()
    dest = memstate("big", "--size", "1K", "--seed", "5", "--save-loaded", str(tmp_path / "big.loaded"))
    loader = run_cli(bus_address, "load", str(image), "--no-verify")
    wait_for(lambda: backend_state(bus_address, dest) == "resuming", "the load to start")
    loader.kill()
    loader.communicate()
    # The back-end reads a truncated stream, refuses it and keeps its state.
    wait_for(lambda: backend_state(bus_address, dest) == "running", "the back-end to end its transfer")
    assert not (tmp_path / "big.loaded").exists()
    capsys.readouterr()
    again = tmp_path / "again.vmstate"
    assert cli(bus_address, "save", str(again)) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(again)]) == 0
    [entry] = json.loads(capsys.readouterr().out)["streams"]
    assert (entry["raw_bytes"], entry["verified"]) == (1024, True)


def test_vmm_terminated_in_mid_load_cancels_and_cleans_up(bus_address, memstate, tmp_path, capsys):
    source = memstate("big", "--size", "512M", "--seed", "4")
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image), "--compression", "none") == 0
    source.stop()
    dest = memstate("big", "--size", "1K", "--seed", "5", "--save-loaded", str(tmp_path / "big.loaded"))
    loader = run_cli(bus_address, "load", str(image))
    # In mid-load, not in the command's start-up (a busy machine may take
    # longer than any fixed delay to get there).
    wait_for(lambda: backend_state(bus_address, dest) == "resuming" or loader.poll() is not None, "the load to start")
    loader.send_signal(signal.SIGTERM)
    _, err = loader.communicate(timeout=120)
    if loader.returncode == 0:
        pytest.skip("the load finished before SIGTERM arrived")
    assert loader.returncode == EXIT_INTERRUPTED, err
    assert not (tmp_path / "big.loaded").exists()
    capsys.readouterr()
    assert cli(bus_address, "list", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["state"] == "running"


class _OnlyVMState1:
    """A peer as stock helpers are: VMState1 only (no VMState2 at all)."""

    id = "legacy"

    async def save_inline(self) -> bytes:
        return b"x"


async def test_a_vmstate1_only_peer_is_listed_as_such_and_refused_by_save(bus_address, client, tmp_path):
    peer = await connect(bus_address)
    try:
        peer.export(OBJECT_PATH, VMState1Interface(_OnlyVMState1()))
        await peer.request_name(VMSTATE1, NameFlag.NONE)
        [info] = await list_backends(client)
        status = await describe(client, info)
        assert (status.id, status.state, status.capabilities) == ("legacy", "vmstate1-only", {})
        with pytest.raises(Unsupported) as raised:
            await save_to_file(client, [info], tmp_path / "vm.vmstate")
        assert "only org.qemu.VMState1" in str(raised.value)
        assert not list(tmp_path.iterdir())
    finally:
        peer.disconnect()
        await peer.wait_for_disconnect()


def test_an_unusable_bus_address_exits_2(capsys, tmp_path):
    assert main(["list", "--address", "junk"]) == 2
    assert "cannot use junk" in capsys.readouterr().err
    assert main(["save", str(tmp_path / "x"), "--address", f"unix:path={tmp_path}/none"]) == 2
    assert "cannot use" in capsys.readouterr().err


async def test_save_reports_the_backends_own_error(bus_address, client, tmp_path):
    def save():
        yield b"fine"
        yield bytes(17 << 20)  # over the 16 MiB record limit

    async with Backend("oversized", save, list, address=bus_address):
        [info] = await list_backends(client)
        with pytest.raises(LimitExceeded) as raised:
            await save_to_file(client, [info], tmp_path / "vm.vmstate")
    assert "back-end 'oversized'" in str(raised.value) and "yield smaller records" in str(raised.value)
    assert not list(tmp_path.iterdir())
