"""The demo: back-ends migrated through a private bus, verified byte for byte.

It starts a private dbus-daemon and example back-ends (memstate), saves their
state the way stock QEMU's dbus-vmstate does (VMState1, at most 1 MiB each),
loads it into fresh back-ends, checks every byte, and prints a summary.
Run it with ``bash scripts/demo.sh``.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from .errors import LimitExceeded
from .examples.memstate import deterministic_state
from .privatebus import PrivateBus
from .vmm import connect, list_backends
from .vmm.vmstate1 import load_inline, save_inline

BACKENDS = {"slirp0": 64 << 10, "conntrack0": 512 << 10, "virtiofs0": 4 << 20}


async def _spawn(address: str, backend_id: str, *args: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dbus_vmstate2.examples.memstate", "--address", address, "--id", backend_id, *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    if not line.startswith(b"READY "):
        raise RuntimeError(f"back-end {backend_id} did not start")
    return process


async def _stop(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        await process.wait()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


async def run_demo(workdir: Path) -> int:
    rows: list[tuple[str, str, str, str]] = []
    failures = 0
    with PrivateBus() as bus:
        print(f"private bus: {bus.address}")
        sources = [
            await _spawn(bus.address, backend_id, "--size", str(size), "--seed", str(seed))
            for seed, (backend_id, size) in enumerate(BACKENDS.items())
        ]
        client = await connect(bus.address)
        try:
            blobs: dict[str, bytes] = {}
            for info in await list_backends(client):
                started = time.perf_counter()
                try:
                    blobs[info.id] = await save_inline(client, info)
                except LimitExceeded as exc:
                    rows.append((info.id, f"{BACKENDS[info.id]:,}", "refused", f"VMState1: {exc.remote_name}"))
                    continue
                rows.append((info.id, f"{BACKENDS[info.id]:,}", f"{len(blobs[info.id]):,}",
                             f"saved in {1000 * (time.perf_counter() - started):.1f} ms"))
            await _stop(sources)

            dests = [
                await _spawn(bus.address, backend_id, "--save-loaded", str(workdir / backend_id))
                for backend_id in blobs
            ]
            for info in await list_backends(client):
                await load_inline(client, info, blobs[info.id])
            await _stop(dests)
        finally:
            client.disconnect()
            await client.wait_for_disconnect()

    print(f"\n{'back-end':<12} {'state bytes':>12} {'VMState1 blob':>14}  result")
    for seed, (backend_id, size) in enumerate(BACKENDS.items()):
        row = next(r for r in rows if r[0] == backend_id)
        if backend_id in blobs:
            loaded = (workdir / backend_id).read_bytes()
            ok = _digest(loaded) == _digest(bytes(deterministic_state(size, seed)))
            failures += not ok
            verdict = f"{row[3]}, loaded and verified (sha256 {_digest(loaded)})" if ok else "LOADED STATE DIFFERS"
        else:
            verdict = f"{row[3]} (over QEMU's 1 MiB limit: use VMState2)"
        print(f"{row[0]:<12} {row[1]:>12} {row[2]:>14}  {verdict}")
    print("\ndemo " + ("passed" if not failures else f"FAILED: {failures} back-end(s) differ"))
    return 1 if failures else 0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dbus-vmstate2-demo-") as workdir:
        return asyncio.run(run_demo(Path(workdir)))


if __name__ == "__main__":
    sys.exit(main())
