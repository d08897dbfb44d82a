"""VMState1 inline benchmark: the library against a minimal hand-written GDBus back-end.

Run (after `source scripts/setup.sh` made .venv; the baseline needs a Python
with PyGObject: Debian's python3 with `apt-get install python3-gi gir1.2-glib-2.0`):

    .venv/bin/python benchmarks/bench_inline.py [--rounds 15] [--calls 10] [--gdbus-python /usr/bin/python3] [--quick]

QEMU's dbus-vmstate calls ``Save()`` on every helper inside the VM's
downtime, and ``Load(ay)`` on the destination before the VM resumes, with
at most 1 MiB per helper: the cost of one call is downtime.  This times, in
one run and from one client, the Save and the Load of a state of 1 MiB - 4
KiB (QEMU's 1 MiB limit applies to the blob, and the library's stream
framing must fit in it too), served by:

* ``gdbus``: benchmarks/gdbus_vmstate1.py, a hand-written back-end on
  GDBus that returns its state as it is and keeps what Load gives it, run
  under --gdbus-python: the least a VMState1 helper can do;
* ``dbus-fast``: the same by hand on dbus-fast, the D-Bus binding the
  library is built on (an async method returning the bytes): the floor of
  any back-end on that binding;
* ``lib none``: a library back-end (``Backend``, the default ``stream``
  VMState1 mode) whose daemon is memstate's store (``MemState``), with
  compression none;
* ``lib zstd``: the same with the library's default compression (zstd);
* ``memstate``: the example back-end as users run it
  (``python -m dbus_vmstate2.examples.memstate --state-file``, zstd), in a
  process of its own.

Each with two states: ``random`` (incompressible) and ``compressible``
(JSON-lines-like text between zero pages, as device state often is).  The
client is the project's VMM helper (``dbus_vmstate2.vmm.vmstate1``, on
dbus-fast), the same for every back-end, in this process.  Each of --rounds
rounds makes --calls Save calls then --calls Load calls on every back-end in
turn (the order rotating per round), so that all of them see the same
machine; a call's time is from sending it to its reply.  The figures are the
medians of the calls, and their ratio to gdbus's (library / hand-written)
with the same state: the machine is shared and noisy, and the ratio is what
the issue's target (1.2x) is about.  Load is given the blob the same back-end
saved.  No figure is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_transfer import table  # noqa: E402

from dbus_vmstate2.names import VMSTATE1_SIZE_LIMIT  # noqa: E402
from dbus_vmstate2.privatebus import PrivateBus  # noqa: E402

STATE_SIZE = VMSTATE1_SIZE_LIMIT - 4096
GDBUS_BACKEND = Path(__file__).resolve().parent / "gdbus_vmstate1.py"


def random_state(size: int) -> bytes:
    return random.Random(1).randbytes(size)


def compressible_state(size: int) -> bytes:
    """JSON lines of a toy connection table, with a zero page every 64 KiB."""
    rng = random.Random(2)
    out = bytearray()
    n = 0
    while len(out) < size:
        if len(out) % (64 << 10) < 200 and n % 7 == 0:
            out += bytes(4096)
        entry = {"id": n, "proto": rng.choice(["tcp", "udp"]), "src": f"10.0.{rng.randrange(256)}.{rng.randrange(256)}",
                 "sport": rng.randrange(1024, 65536), "dst": f"192.168.1.{rng.randrange(256)}", "dport": 443,
                 "state": rng.choice(["ESTABLISHED", "TIME_WAIT", "SYN_SENT"]), "timeout": rng.randrange(3600)}
        out += json.dumps(entry).encode() + b"\n"
        n += 1
    return bytes(out[:size])


STATES = {"random": random_state, "compressible": compressible_state}


def serve_library(address: str, backend_id: str, state_file: str, compression: str) -> int:
    """A library back-end whose daemon is memstate's store, serving ``state_file``."""
    from dbus_vmstate2.backend import Backend
    from dbus_vmstate2.examples.memstate import MemState, file_blocks
    from dbus_vmstate2.stream import Compression

    state = MemState(file_blocks(Path(state_file)))

    async def main() -> None:
        backend = Backend(backend_id, state, address=address, compression=Compression[compression.upper()])
        await backend.start()
        print(f"READY {backend.unique_name}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await backend.stop()

    asyncio.run(main())
    return 0


def serve_dbus_fast(address: str, backend_id: str, state_file: str) -> int:
    """The hand-written back-end on dbus-fast: Id, Save and Load, nothing else."""
    from dbus_fast.aio import MessageBus
    from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method

    # dbus-fast reads the D-Bus signatures from the annotations, which this
    # module's ``from __future__ import annotations`` turns into source text:
    # so they are set here, as signatures, before each member is decorated.
    class VMState1(ServiceInterface):
        def __init__(self, state: bytes) -> None:
            super().__init__("org.qemu.VMState1")
            self.state = state

        def Id(self):  # noqa: ANN202, N802
            return backend_id

        async def Save(self):  # noqa: ANN202, N802
            return self.state

        async def Load(self, data):  # noqa: ANN001, ANN202, N802
            self.state = data

        Id.__annotations__ = {"return": "s"}
        Save.__annotations__ = {"return": "ay"}
        Load.__annotations__ = {"data": "ay", "return": None}
        Id = dbus_property(access=PropertyAccess.READ)(Id)
        Save = method()(Save)
        Load = method()(Load)

    async def main() -> None:
        bus = await MessageBus(bus_address=address).connect()
        bus.export("/org/qemu/VMState1", VMState1(Path(state_file).read_bytes()))
        await bus.request_name("org.qemu.VMState1", 0)  # queued, as QEMU expects
        print(f"READY {bus.unique_name}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        bus.disconnect()

    asyncio.run(main())
    return 0


def start(argv: list[str], log: Path) -> subprocess.Popen[str]:
    with log.open("a") as log_file:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                   cwd=ROOT)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("READY "):
        process.kill()
        raise RuntimeError(f"{argv} did not become ready (got {line!r}); see {log}")
    return process


async def measure(address: str, ids: list[str], rounds: int, calls: int) -> dict[str, dict[str, list[float]]]:
    """Per back-end Id, the seconds of every Save and every Load call."""
    from dbus_vmstate2.vmm import connect, list_backends
    from dbus_vmstate2.vmm.vmstate1 import load_inline, save_inline

    bus = await connect(address)
    try:
        backends = {b.id: b for b in await list_backends(bus, ids)}
        times: dict[str, dict[str, list[float]]] = {i: {"save": [], "load": []} for i in ids}
        blobs = {i: await save_inline(bus, backends[i]) for i in ids}  # warm-up, and the blobs Load gets
        for i in ids:
            await load_inline(bus, backends[i], blobs[i])
        for number in range(rounds):
            shift = number % len(ids)
            for backend_id in ids[shift:] + ids[:shift]:
                backend = backends[backend_id]
                for _ in range(calls):
                    t0 = time.perf_counter()
                    blobs[backend_id] = await save_inline(bus, backend)
                    times[backend_id]["save"].append(time.perf_counter() - t0)
                for _ in range(calls):
                    t0 = time.perf_counter()
                    await load_inline(bus, backend, blobs[backend_id])
                    times[backend_id]["load"].append(time.perf_counter() - t0)
        times["blob sizes"] = {i: [len(b)] for i, b in blobs.items()}  # type: ignore[assignment]
        return times
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds over all back-ends (default 15)")
    parser.add_argument("--calls", type=int, default=10, help="Save and Load calls per back-end per round (default 10)")
    parser.add_argument("--gdbus-python", default="/usr/bin/python3",
                        help="a Python with PyGObject for the hand-written back-end (default /usr/bin/python3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 3 calls")
    parser.add_argument("--serve", nargs=4, metavar=("ADDR", "ID", "STATE_FILE", "COMPRESSION"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-dbus-fast", nargs=3, metavar=("ADDR", "ID", "STATE_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_library(*args.serve)
    if args.serve_dbus_fast:
        return serve_dbus_fast(*args.serve_dbus_fast)
    if args.quick:
        args.rounds, args.calls = 3, 3

    started = time.perf_counter()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-inline-")))
        log = work / "processes.log"
        bus = stack.enter_context(PrivateBus())
        print(f"bench_inline: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.rounds} rounds of "
              f"{args.calls} calls, load average {os.getloadavg()[0]:.2f}", flush=True)
        for kind, make in STATES.items():
            path = work / f"{kind}.state"
            path.write_bytes(make(STATE_SIZE))
            here = str(Path(__file__).resolve())
            processes = {
                f"{kind}-gdbus": [args.gdbus_python, str(GDBUS_BACKEND), bus.address, f"{kind}-gdbus", str(path)],
                f"{kind}-dbus-fast": [sys.executable, here, "--serve-dbus-fast", bus.address, f"{kind}-dbus-fast", str(path)],
                **{f"{kind}-lib-{c}": [sys.executable, here, "--serve", bus.address, f"{kind}-lib-{c}", str(path), c]
                   for c in ("none", "zstd")},
                f"{kind}-memstate": [sys.executable, "-m", "dbus_vmstate2.examples.memstate", "--address", bus.address,
                                     "--id", f"{kind}-memstate", "--state-file", str(path)],
            }
            running = [start(argv, log) for argv in processes.values()]
            try:
                results[kind] = asyncio.run(measure(bus.address, list(processes), args.rounds, args.calls))
            finally:
                for process in running:
                    process.terminate()
                for process in running:
                    process.wait(timeout=30)
                    assert process.stdout is not None
                    process.stdout.close()

    print()
    print(f"VMState1 inline, a state of {STATE_SIZE} bytes (1 MiB - 4 KiB): median ms per call, and the ratio")
    print("library / hand-written GDBus back-end with the same state (target: <= 1.2)")
    rows = [["state", "back-end", "blob bytes", "Save ms", "Save ratio", "Load ms", "Load ratio"]]
    for kind, times in results.items():
        base = {op: statistics.median(times[f"{kind}-gdbus"][op]) for op in ("save", "load")}
        for name in (f"{kind}-{b}" for b in ("gdbus", "dbus-fast", "lib-none", "lib-zstd", "memstate")):
            med = {op: statistics.median(times[name][op]) for op in ("save", "load")}
            rows.append([kind, name.removeprefix(f"{kind}-").replace("lib-", "lib "), str(times["blob sizes"][name][0]),
                         f"{1000 * med['save']:.2f}", f"{med['save'] / base['save']:.2f}",
                         f"{1000 * med['load']:.2f}", f"{med['load'] / base['load']:.2f}"])
    table(rows)
    print()
    print(f"bench_inline: done in {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
