"""Two VMM helpers (or two operations of one) on the same back-ends: the one
that gets Busy must stop only the transfers it started itself."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import pytest

from dbus_vmstate2.backend import Backend
from dbus_vmstate2.cli import EXIT_BACKEND_FAILED, main
from dbus_vmstate2.errors import Busy
from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.vmm import describe, list_backends, save_to_file

from .test_vmm import backend_state, cli, growing_temp_file, run_cli, temp_files, wait_for


async def wait_state(client, info, state: str) -> None:
    for _ in range(1200):
        if (await describe(client, info)).state == state:
            return
        await asyncio.sleep(0.025)
    raise TimeoutError(f"{info.id} never reached {state}")


async def test_a_busy_save_on_the_same_connection_leaves_the_running_one_alone(bus_address, client, tmp_path):
    # One VMM process, one bus connection, two operations: Cancel() is
    # per-connection, so only the transfer number tells them apart.
    gate = threading.Event()

    def save():
        yield b"first record"
        gate.wait(60)
        yield b"second record"

    async with Backend("slow", save, list, address=bus_address), Backend("free", lambda: b"free state", list, address=bus_address):
        slow, free = await list_backends(client)
        first = asyncio.ensure_future(save_to_file(client, [slow], tmp_path / "first.vmstate"))
        try:
            await wait_state(client, slow, "saving")
            with pytest.raises(Busy, match="back-end 'slow'"):
                await save_to_file(client, [free, slow], tmp_path / "second.vmstate")
            # The second save started on 'free' too, and stopped that one
            # (its end is the back-end's: it may come a moment after the error).
            await wait_state(client, free, "running")
            assert (await describe(client, slow)).state == "saving"
        finally:
            gate.set()
        [info] = await first
    assert (info.backend_id, info.records, info.raw_bytes) == ("slow", 2, len(b"first record" + b"second record"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.vmstate"]


def test_a_second_save_command_gets_busy_and_the_first_completes(bus_address, memstate, tmp_path, capsys):
    memstate("small", "--size", "64K", "--seed", "1")
    memstate("big", "--size", "256M", "--seed", "2")
    first = tmp_path / "first.vmstate"
    saver = run_cli(bus_address, "save", str(first), "--compression", "none")
    try:
        wait_for(lambda: growing_temp_file(tmp_path, 16 << 20), "the first save to start")
        # Hold the first helper still: its transfer of 'big' stays running
        # (the back-end blocks on the full pipe) while the second one runs.
        saver.send_signal(signal.SIGSTOP)
        second = run_cli(bus_address, "save", str(tmp_path / "second.vmstate"), "--compression", "none")
        _, err = second.communicate(timeout=120)
        assert second.returncode == EXIT_BACKEND_FAILED, err
        assert "back-end 'big': busy with save" in err
    finally:
        saver.send_signal(signal.SIGCONT)
        _, err = saver.communicate(timeout=120)
    assert saver.returncode == 0, err
    assert not temp_files(tmp_path) and not (tmp_path / "second.vmstate").exists()
    assert main(["inspect", "--json", str(first)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] and {s["id"]: s["raw_bytes"] for s in doc["streams"]} == {"small": 64 << 10, "big": 256 << 20}


def test_the_first_saves_file_loads(bus_address, memstate, tmp_path, capsys):
    # The same as above, then the first file is loaded into fresh back-ends.
    sources = [memstate("small", "--size", "64K", "--seed", "1"), memstate("big", "--size", "256M", "--seed", "2")]
    first = tmp_path / "first.vmstate"
    saver = run_cli(bus_address, "save", str(first), "--compression", "none")
    try:
        wait_for(lambda: growing_temp_file(tmp_path, 16 << 20), "the first save to start")
        saver.send_signal(signal.SIGSTOP)
        assert cli(bus_address, "save", str(tmp_path / "second.vmstate")) == EXIT_BACKEND_FAILED
        assert backend_state(bus_address, sources[1]) == "saving"
    finally:
        saver.send_signal(signal.SIGCONT)
        _, err = saver.communicate(timeout=120)
    assert saver.returncode == 0, err
    for source in sources:
        source.stop()
    for backend_id in ("small", "big"):
        memstate(backend_id, "--save-loaded", str(tmp_path / f"{backend_id}.loaded"))
    capsys.readouterr()
    assert cli(bus_address, "load", str(first)) == 0
    assert (tmp_path / "small.loaded").read_bytes() == deterministic_state(64 << 10, 1)
    assert (tmp_path / "big.loaded").read_bytes() == deterministic_state(256 << 20, 2)
