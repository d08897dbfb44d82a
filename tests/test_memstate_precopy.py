"""A live iterative migration of memstate on real buses: SavePreCopy on the
source while its dirtier rewrites blocks, a pipe into Load on the
destination, StopCopy; the destination gets exactly what the source had when
it quiesced (the --report lines, the --save-loaded file)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading

import pytest

from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.names import VMSTATE2
from dbus_vmstate2.privatebus import PrivateBus
from dbus_vmstate2.vmm import connect, list_backends
from dbus_vmstate2.vmm.calls import call

from .conftest import start_memstate
from .test_vmstate2 import get_state, start, wait_finished

SIZE = 24 << 20


def forward(source: int, dest: int) -> None:
    """Copy one pipe into another until the first ends: the network, for this test."""
    try:
        while data := os.read(source, 1 << 20):
            view = memoryview(data)
            while view:
                view = view[os.write(dest, view) :]
    finally:
        os.close(source)
        os.close(dest)


def report(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("threaded", [False, True], ids=["asyncio", "threaded"])
async def test_live_precopy_while_the_source_keeps_writing(tmp_path, threaded):
    extra = ["--threaded"] if threaded else []
    with PrivateBus() as source_bus, PrivateBus() as dest_bus:
        source = start_memstate(
            source_bus.address, "mem", "--size", "24M", "--seed", "3", "--dirty-rate", "16M",
            "--report", str(tmp_path / "source.jsonl"), *extra,
        )
        dest = start_memstate(
            dest_bus.address, "mem", "--report", str(tmp_path / "dest.jsonl"),
            "--save-loaded", str(tmp_path / "loaded"), *extra,
        )
        source_client, dest_client = await connect(source_bus.address), await connect(dest_bus.address)
        try:
            [src] = await list_backends(source_client)
            [dst] = await list_backends(dest_client)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            pump = threading.Thread(target=forward, args=(out_r, in_w), daemon=True)
            pump.start()
            loading = await start(dest_client, dst, "Load", in_r)
            saving = await start(source_client, src, "SavePreCopy", out_w)

            async def pending() -> list[int]:
                return await call(source_client, src.unique_name, VMSTATE2, "Pending")

            initial, dirty, stop_copy, rounds = await pending()
            assert stop_copy <= SIZE + (SIZE >> 4)
            for _ in range(400):  # the initial data goes, then rounds of what the dirtier rewrote
                initial, dirty, stop_copy, rounds = await pending()
                if initial == 0 and rounds >= 3:
                    break
                await asyncio.sleep(0.05)
            assert (initial, rounds >= 3) == (0, True), "pre-copy made no progress"
            assert await get_state(source_client, src) == "pre-copy"

            await call(source_client, src.unique_name, VMSTATE2, "StopCopy", "t", [saving])
            await wait_finished(source_client, src, saving)
            await wait_finished(dest_client, dst, loading)
            await asyncio.to_thread(pump.join, 10)
            assert await get_state(source_client, src) == "stopped"
            assert await get_state(dest_client, dst) == "running"

            [quiesced] = report(tmp_path / "source.jsonl")
            [loaded] = report(tmp_path / "dest.jsonl")
            assert quiesced["event"] == "quiesced" and loaded["event"] == "loaded"
            assert (loaded["digest"], loaded["bytes"]) == (quiesced["digest"], quiesced["bytes"]) == (
                hashlib.sha256((tmp_path / "loaded").read_bytes()).hexdigest(), SIZE,
            )
            assert quiesced["digest"] != hashlib.sha256(deterministic_state(SIZE, 3)).hexdigest(), "nothing was rewritten"

            await call(source_client, src.unique_name, VMSTATE2, "Resume")
            assert await get_state(source_client, src) == "running"
        finally:
            for client in (source_client, dest_client):
                client.disconnect()
                await client.wait_for_disconnect()
            source.stop()
            dest.stop()
