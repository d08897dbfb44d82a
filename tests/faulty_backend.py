"""A back-end whose save and load callables fail, sandboxed right after
start() as ``memstate --sandbox`` is: the library must log the failures (with
their tracebacks) without opening a file.

    python -m tests.faulty_backend --address ADDR --id ID [--threaded]

Prints ``READY <unique name>`` once sandboxed; runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from collections.abc import Iterator

from dbus_vmstate2.backend import Backend, ThreadedBackend
from dbus_vmstate2.examples.sandbox import apply_kill_filter


def save() -> Iterator[bytes]:
    yield b"the first record"
    raise RuntimeError("the daemon's save broke")


def load(records: Iterator[bytes]) -> None:
    for _ in records:
        pass
    raise RuntimeError("the daemon's load broke")


async def serve_asyncio(args: argparse.Namespace) -> None:
    backend = Backend(args.id, save, load, address=args.address)
    await backend.start()
    apply_kill_filter()
    print(f"READY {backend.unique_name}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await backend.stop()


def serve_threaded(args: argparse.Namespace) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    backend = ThreadedBackend(args.id, save, load, address=args.address)
    backend.start()
    apply_kill_filter()
    print(f"READY {backend.unique_name}", flush=True)
    while not stop.wait(0.2):
        pass
    backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--threaded", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threaded:
        serve_threaded(args)
    else:
        asyncio.run(serve_asyncio(args))


if __name__ == "__main__":
    main()
