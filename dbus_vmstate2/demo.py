"""The demo: back-ends migrated through a private bus, verified byte for byte.

It starts a private dbus-daemon and three example back-ends (memstate), one
of them with 256 MiB of state.  First it saves them the way stock QEMU's
dbus-vmstate does (VMState1, one D-Bus message of at most 1 MiB each), which
the big one cannot pass; then it saves all three through VMState2 (fd-passed
streams, in parallel, into one file), loads that file into fresh back-ends,
checks every byte, and prints a summary.  Run it with ``bash scripts/demo.sh``.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from .errors import VMStateError
from .examples.memstate import deterministic_state
from .privatebus import PrivateBus
from .vmm import connect, list_backends, load_from_file, save_to_file
from .vmm.savefile import SaveFileReader
from .vmm.vmstate1 import save_inline

BACKENDS = {"slirp0": 64 << 10, "conntrack0": 512 << 10, "virtiofs0": 256 << 20}


async def _spawn(address: str, backend_id: str, *args: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dbus_vmstate2.examples.memstate", "--address", address, "--id", backend_id, *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    async with asyncio.timeout(120):
        line = await process.stdout.readline()
    if not line.startswith(b"READY "):
        raise RuntimeError(f"back-end {backend_id} did not start")
    return process


async def _stop(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        await process.wait()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.2f} MiB"


def _digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


async def run_demo(workdir: Path) -> int:
    image = workdir / "vm.vmstate"
    vmstate1: dict[str, str] = {}
    with PrivateBus() as bus:
        print(f"private bus {bus.address}; back-ends: " + ", ".join(f"{i} ({_mib(s)})" for i, s in BACKENDS.items()))
        sources = [
            await _spawn(bus.address, backend_id, "--size", str(size), "--seed", str(seed))
            for seed, (backend_id, size) in enumerate(BACKENDS.items())
        ]
        client = await connect(bus.address)
        try:
            backends = await list_backends(client)
            for info in backends:  # what stock QEMU's dbus-vmstate would get
                try:
                    blob = await save_inline(client, info)
                    vmstate1[info.id] = f"ok, {_mib(len(blob))} inline"
                except VMStateError as exc:
                    vmstate1[info.id] = f"refused: {exc.remote_name.rsplit('.', 1)[-1] if exc.remote_name else exc}"

            started = time.perf_counter()
            await save_to_file(client, backends, image)
            save_s = time.perf_counter() - started
            await _stop(sources)

            dests = [
                await _spawn(bus.address, backend_id, "--save-loaded", str(workdir / f"{backend_id}.loaded"))
                for backend_id in BACKENDS
            ]
            started = time.perf_counter()
            await load_from_file(client, await list_backends(client), image)
            load_s = time.perf_counter() - started
            await _stop(dests)
        finally:
            client.disconnect()
            await client.wait_for_disconnect()

    with SaveFileReader(image) as reader:
        stored = {info.backend_id: info.stream_bytes for info in reader.streams}
    total = sum(BACKENDS.values())
    print(f"\nVMState2: saved {_mib(total)} to one file in {save_s:.2f} s, loaded it back in {load_s:.2f} s\n")
    print(f"{'back-end':<11} {'state':>12}  {'VMState1 (QEMU, 1 MiB wall)':<30} {'VMState2 stream':>16}  loaded state")
    failures = 0
    for seed, (backend_id, size) in enumerate(BACKENDS.items()):
        loaded = (workdir / f"{backend_id}.loaded").read_bytes()
        ok = _digest(loaded) == _digest(deterministic_state(size, seed))
        failures += not ok
        verdict = f"verified, sha256 {_digest(loaded)}" if ok else "DIFFERS from the source"
        print(f"{backend_id:<11} {_mib(size):>12}  {vmstate1[backend_id]:<30} {_mib(stored[backend_id]):>16}  {verdict}")
    print("\ndemo " + ("passed" if not failures else f"FAILED: {failures} back-end(s) differ"))
    return 1 if failures else 0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dbus-vmstate2-demo-") as workdir:
        return asyncio.run(run_demo(Path(workdir)))


if __name__ == "__main__":
    sys.exit(main())
