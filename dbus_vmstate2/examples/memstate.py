"""memstate: an example back-end whose whole state is a block of memory.

It serves deterministic bytes (``--size N --seed S``) or exactly the bytes
of a file (``--state-file F``), and can write what it receives by Load to a
file (``--save-loaded F``), so that tests, the demo and the benchmarks can
check a migration byte for byte.  With ``--sandbox`` it loads a seccomp
filter right after registering that kills it on any open, socket, exec or
new thread (``--sandbox=threads``: new threads allowed, for Save's workers
option; :mod:`.sandbox`, needs the pyseccomp package).  Once registered it
prints one line, ``READY <unique bus name>``, on standard output.  It runs
until SIGTERM, SIGINT or the loss of its bus.

    python -m dbus_vmstate2.examples.memstate --address ADDR --id ID --size 1M --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from ..backend import Backend, InlineMode, ThreadedBackend
from .sandbox import apply_kill_filter

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``256M``, ``2G`` -> bytes (binary units)."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    try:
        value = int(text[: len(text) - len(unit)]) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 256M, 2G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return value


_BLOCK = 1 << 20
_POOL = 64 << 20


def deterministic_state(size: int, seed: int) -> bytearray:
    """``size`` pseudo-random bytes that depend only on ``seed``.

    Blocks of 1 MiB are copied from a random pool of at most 64 MiB at
    offsets that vary per block, so gigabytes are made at memory speed and
    stay incompressible to zstd (a repeat is farther back than its window).
    """
    rng = random.Random(seed)
    pool = bytearray()
    for _ in range(0, min(size, _POOL) + _BLOCK, _BLOCK):
        pool += rng.randbytes(_BLOCK)
    state = bytearray(size)
    span = len(pool) - _BLOCK
    pool_view = memoryview(pool)
    for number, offset in enumerate(range(0, size, _BLOCK)):
        start = (number * 2654435761) % span if span else 0  # Knuth's multiplicative hash
        state[offset : offset + _BLOCK] = pool_view[start : start + min(_BLOCK, size - offset)]
    return state


class MemState:
    """The daemon's state and its save and load callables."""

    def __init__(self, state: bytearray, save_loaded: Path | None) -> None:
        self.state = state
        self._save_loaded = save_loaded

    def save(self) -> memoryview:
        # One bytes-like object: the library sends it as 1 MiB records
        # without copying it.
        return memoryview(self.state)

    def load(self, records: Iterator[bytes]) -> None:
        # Stage, then commit: the iterator raises if anything fails its
        # check, and then the live state is untouched.
        staged = bytearray()
        for record in records:
            staged += record
        self.state = staged
        if self._save_loaded is not None:
            self._save_loaded.write_bytes(self.state)
        logging.info("loaded %d bytes of state", len(staged))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dbus_vmstate2.examples.memstate", description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="D-Bus address (default: the session bus)")
    parser.add_argument("--id", required=True, help="the back-end's Id")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--size", type=parse_size, default=0, help="serve this many deterministic bytes")
    source.add_argument("--state-file", type=Path, help="serve exactly the bytes of this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deterministic bytes (default 0)")
    parser.add_argument("--save-loaded", type=Path, metavar="FILE", help="write the state received by Load to FILE")
    parser.add_argument("--threaded", action="store_true", help="use the threaded adapter instead of asyncio")
    parser.add_argument(
        "--vmstate1", choices=[m.value for m in InlineMode], default=InlineMode.STREAM.value,
        help="serve QEMU's VMState1 with a stream blob (default), a raw legacy blob, or not at all (off)",
    )
    parser.add_argument(
        "--sandbox", nargs="?", const="strict", choices=["strict", "threads"],
        help="after registering, load a seccomp filter that kills the process on open, socket, exec or a new "
        "thread (=threads: new threads allowed, as a Save with workers needs); needs pyseccomp",
    )
    return parser


def _sandbox(mode: str) -> None:
    try:
        apply_kill_filter(allow_threads=mode == "threads")
    except ImportError as exc:
        raise SystemExit(f"--sandbox needs the pyseccomp package and libseccomp: {exc}") from None
    logging.info("sandboxed: open, socket, exec%s now kill this process", "" if mode == "threads" else " and new threads")


def _print_ready(unique_name: str) -> None:
    print(f"READY {unique_name}", flush=True)


async def _serve_asyncio(backend: Backend, sandbox: str | None) -> None:
    await backend.start()
    if sandbox:
        _sandbox(sandbox)
    _print_ready(backend.unique_name)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    closed = asyncio.ensure_future(backend.wait_closed())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    await backend.stop()
    await closed


def _serve_threaded(backend: ThreadedBackend, sandbox: str | None) -> None:
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backend.start()
    if sandbox:
        _sandbox(sandbox)
    _print_ready(backend.unique_name)
    while not stop and not backend.wait_closed(timeout=0.2):
        pass
    backend.stop()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sandbox and args.save_loaded is not None:
        parser.error("--save-loaded writes a file, which --sandbox forbids")
    logging.basicConfig(level=logging.INFO, format=f"memstate[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    if args.state_file is not None:
        state = bytearray(args.state_file.read_bytes())
    else:
        state = deterministic_state(args.size, args.seed)
    memstate = MemState(state, args.save_loaded)
    options = {"address": args.address, "vmstate1": args.vmstate1}
    if args.threaded:
        _serve_threaded(ThreadedBackend(args.id, memstate.save, memstate.load, **options), args.sandbox)
    else:
        asyncio.run(_serve_asyncio(Backend(args.id, memstate.save, memstate.load, **options), args.sandbox))
    return 0


if __name__ == "__main__":
    sys.exit(main())
