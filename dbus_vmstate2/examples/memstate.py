"""memstate: an example back-end whose whole state is a block of memory.

It serves deterministic bytes (``--size N --seed S``) or exactly the bytes
of a file (``--state-file F``), and can write what it receives by Load to a
file (``--save-loaded F``), so that tests, the demo and the benchmarks can
check a migration byte for byte.  The memory lives in a
:class:`~dbus_vmstate2.backend.dirty.DirtyStore`, as blocks of 1 MiB keyed by
their number, so it migrates iteratively as well (SavePreCopy): with
``--dirty-rate R`` a thread keeps rewriting random blocks at about R bytes a
second while it runs, and ``--report F`` appends a JSON line to F at every
quiesce and every successful load, so that a test can check that the
destination got the state the source had when it stopped.  With
``--sandbox`` it loads a seccomp filter right after registering that kills
it on any open, socket, exec or new thread (``--sandbox=threads``: new
threads allowed, for Save's workers option; :mod:`.sandbox`, needs the
pyseccomp package); the report file is opened before, and the dirtier thread
started before.  Once registered it prints one line, ``READY <unique bus
name>``, on standard output, and with ``--notify`` tells systemd it is
ready (``Type=notify``: packaging/systemd/).  It runs until SIGTERM, SIGINT
or the loss of its bus.

    python -m dbus_vmstate2.examples.memstate --address ADDR --id ID --size 1M --seed 1

It takes the option names libvirt gives its helpers as well:
``--dbus-address`` (``--address``), ``--dbus-id`` (``--id``), and
``--dbus-incoming``: a destination's helper.  Then memstate starts with no
memory and waits for the migrated state: its serving (the ``--dirty-rate``
writer) begins only once a Load has succeeded.

Its records: DATA records carry the memory as it is, block after block, so
that a one-shot save is exactly the raw state (as before the store, and as a
raw VMState1 blob, ``--vmstate1 legacy``, must be); DIRTY records carry the
store's entries (docs in backend/dirty.py), keyed by the block number as 8
bytes big-endian, so that key order is memory order.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from ..backend import Backend, InlineMode, ThreadedBackend
from ..units import parse_size
from ..backend.dirty import DirtyStore, Entry
from ..stream import Record, RecordType
from .sandbox import apply_kill_filter



BLOCK_SIZE = 1 << 20
"""The memory is kept, and sent, in blocks of this size (the last may be shorter)."""
_POOL = 64 << 20


def block_key(number: int) -> bytes:
    """The store key of block ``number``: 8 bytes big-endian, so that key order is memory order."""
    return number.to_bytes(8, "big")


def deterministic_blocks(size: int, seed: int) -> Iterator[bytes]:
    """The blocks of :func:`deterministic_state`, made one at a time.

    Blocks of 1 MiB are copied from a random pool of at most 64 MiB at
    offsets that vary per block, so gigabytes are made at memory speed and
    stay incompressible to zstd (a repeat is farther back than its window).
    """
    rng = random.Random(seed)
    pool = bytearray()
    for _ in range(0, min(size, _POOL) + BLOCK_SIZE, BLOCK_SIZE):
        pool += rng.randbytes(BLOCK_SIZE)
    span = len(pool) - BLOCK_SIZE
    pool_view = memoryview(pool)
    for number, offset in enumerate(range(0, size, BLOCK_SIZE)):
        start = (number * 2654435761) % span if span else 0  # Knuth's multiplicative hash
        yield bytes(pool_view[start : start + min(BLOCK_SIZE, size - offset)])


def deterministic_state(size: int, seed: int) -> bytearray:
    """``size`` pseudo-random bytes that depend only on ``seed``: the blocks
    of :func:`deterministic_blocks` end to end."""
    state = bytearray(size)
    for number, block in enumerate(deterministic_blocks(size, seed)):
        state[number * BLOCK_SIZE : number * BLOCK_SIZE + len(block)] = block
    return state


def file_blocks(path: Path) -> Iterator[bytes]:
    """The bytes of the file at ``path``, in blocks, read one at a time."""
    with path.open("rb") as file:
        while block := file.read(BLOCK_SIZE):
            yield block


class MemState(DirtyStore):
    """The daemon's state: its memory, as blocks in a DirtyStore.

    Block ``n`` (``BLOCK_SIZE`` bytes, the last one possibly fewer) is kept
    under :func:`block_key(n) <block_key>`.  Blocks are rewritten in place
    (:meth:`rewrite`), never added or removed, except by a load.

    Args:
        blocks: the memory, block after block, taken one at a time (the
            memory is never held twice).
        save_loaded: write the memory received by each Load to this file.
        report: a text file, open (and opened before the daemon sandboxes
            itself), to which one JSON line is written at each quiesce and
            after each successful load: ``{"event": "quiesced"|"loaded",
            "digest": SHA-256 of the memory (hex), "bytes": its size}``.

    Raises:
        ValueError: a block but the last is not ``BLOCK_SIZE`` bytes.
    """

    def __init__(
        self, blocks: Iterable[bytes] = (), *, save_loaded: Path | None = None, report: TextIO | None = None
    ) -> None:
        super().__init__(record_size=BLOCK_SIZE)
        self._save_loaded = save_loaded
        self._report = report
        self.loaded = threading.Event()
        """Set once a load has succeeded."""
        last = BLOCK_SIZE
        for number, block in enumerate(blocks):
            if last != BLOCK_SIZE:
                raise ValueError(f"block {number - 1} has {last} bytes: only the last block may have fewer than {BLOCK_SIZE}")
            self.put(block_key(number), block)
            last = len(block)

    def blocks(self) -> list[bytes]:
        """A snapshot of the memory, block after block (references to the blocks)."""
        return [block for _, block in sorted(self.items())]

    def memory_digest(self) -> tuple[str, int]:
        """The SHA-256 (hex) and size of the memory: equal to those of the
        ``--save-loaded`` file, and of :func:`deterministic_state`."""
        sha, size = hashlib.sha256(), 0
        for block in self.blocks():
            sha.update(block)
            size += len(block)
        return sha.hexdigest(), size

    def rewrite(self, number: int, data: bytes) -> None:
        """Replace block ``number`` with ``data`` of the same size (blocks while quiesced).

        Raises:
            KeyError: there is no such block.
            ValueError: ``data`` is not the size of the block.
        """
        key = block_key(number)
        old = self[key]
        if len(data) != len(old):
            raise ValueError(f"block {number} has {len(old)} bytes, not {len(data)}")
        self.put(key, data)

    # The DATA layout: the memory as it is (see the module docstring).

    def data_size(self, key: bytes, value: bytes) -> int:
        return len(value)

    def encode_data(self, entries: list[tuple[bytes, bytes]]) -> bytes:
        if len(entries) == 1:
            return entries[0][1]  # the block itself: bytes never change, so no copy
        return b"".join(block for _, block in entries)

    def data_decoder(self) -> _MemoryImage:
        return _MemoryImage()

    # The contract: report what the source froze and what the destination got.

    def quiesce(self) -> None:
        super().quiesce()
        self._report_event("quiesced")

    def load(self, records: Iterator[Record]) -> None:
        previous = self.total_bytes
        super().load(records)
        if self._save_loaded is not None:
            with self._save_loaded.open("wb") as file:
                for block in self.blocks():
                    file.write(block)
        if previous >= TRIM_AFTER:  # the previous memory, freed all over the heap
            give_back_memory()
        logging.info("loaded %d bytes of state", self.total_bytes)
        self._report_event("loaded")
        self.loaded.set()

    def _report_event(self, event: str) -> None:
        if self._report is None:
            return
        digest, size = self.memory_digest()
        self._report.write(json.dumps({"event": event, "digest": digest, "bytes": size}) + "\n")
        self._report.flush()


class _MemoryImage:
    """Decodes DATA payloads: the memory, cut into blocks wherever the records were cut.

    Each block is made with at most one copy (the least a daemon that keeps
    its state as ``bytes`` can do; two for a block pieced together from
    several reused buffers), as the load contract allows
    (backend/daemon.py): a payload that is a view of a whole ``bytes`` object
    is that object, kept as it is when it is exactly a block; a view of part
    of a ``bytes`` object is kept as a view until its block is complete (an
    immutable object, pinned for at most one block), and the pieces of a
    block are joined once; any other payload (a view of a buffer the library
    may reuse) is copied before the call returns.
    """

    def __init__(self) -> None:
        self._number = 0
        self._pieces: list[bytes | memoryview] = []
        self._filled = 0
        self._closed = False

    def feed(self, payload: memoryview) -> list[Entry]:
        if self._closed:
            raise ValueError("memory data after the DIRTY records began: the image must come first")
        view = memoryview(payload).cast("B")
        whole = view.obj
        immutable = type(whole) is bytes
        if immutable and not self._pieces and len(whole) == view.nbytes == BLOCK_SIZE:
            return [self._next(whole)]  # zstd's output, or a record the decoder joined: no copy
        blocks = []
        while view:
            take = min(BLOCK_SIZE - self._filled, len(view))
            piece, view = view[:take], view[take:]
            if immutable and piece.nbytes == len(whole):
                piece = whole
            self._pieces.append(piece if immutable else piece.tobytes())
            self._filled += take
            if self._filled == BLOCK_SIZE:
                blocks.append(self._next(self._join()))
        return blocks

    def close(self) -> list[Entry]:
        self._closed = True
        return [self._next(self._join())] if self._pieces else []

    def _join(self) -> bytes:
        """The block made of the pieces so far, copied once at most (a lone
        ``bytes`` piece is the block itself)."""
        pieces, self._pieces, self._filled = self._pieces, [], 0
        if len(pieces) == 1 and type(pieces[0]) is bytes:
            return pieces[0]
        return b"".join(pieces)

    def _next(self, block: bytes) -> Entry:
        self._number += 1
        return block_key(self._number - 1), block


class Dirtier(threading.Thread):
    """Rewrites randomly chosen blocks with new pseudo-random bytes at about ``rate`` bytes a second.

    A writer like any other: it blocks while the state is quiesced.  A
    daemon thread, so it never holds up the exit.  With ``after``, it
    begins only once that event is set (``--dbus-incoming``: a load).
    """

    TICK = 0.01

    POOL = 4 << 20
    """New contents are copied from a random pool at a random offset: making
    fresh random bytes costs some 12 ms of CPU per MiB, copying almost nothing."""

    TRIM_EVERY = 64 << 20
    """Bytes written between two trims of the heap (see give_back_memory)."""

    def __init__(self, state: MemState, rate: int, seed: int, after: threading.Event | None = None) -> None:
        super().__init__(name="memstate-dirtier", daemon=True)
        self._state, self._rate, self._rng = state, rate, random.Random(seed)
        self._after = after
        self._pool = memoryview(self._rng.randbytes(self.POOL + BLOCK_SIZE))
        self._stopping = threading.Event()
        self.rewritten = 0
        """Bytes rewritten so far."""

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while self._after is not None and not self._after.wait(self.TICK * 10):
            if self._stopping.is_set():
                return
        budget, last = 0.0, time.monotonic()
        while not self._stopping.wait(self.TICK):
            now = time.monotonic()
            budget, last = min(budget + (now - last) * self._rate, max(self._rate, BLOCK_SIZE)), now
            while (count := len(self._state)) and not self._stopping.is_set():
                number = self._rng.randrange(count)
                block = self._state.get(block_key(number))
                if block is None or len(block) > budget:
                    break  # (None: a load made the memory smaller meanwhile)
                try:
                    start = self._rng.randrange(self.POOL)
                    self._state.rewrite(number, bytes(self._pool[start : start + len(block)]))
                except (KeyError, ValueError):  # a load replaced the memory meanwhile
                    continue
                budget -= len(block)
                self.rewritten += len(block)
                if self.rewritten // self.TRIM_EVERY != (self.rewritten - len(block)) // self.TRIM_EVERY:
                    give_back_memory()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dbus_vmstate2.examples.memstate", description=__doc__.splitlines()[0])
    # --dbus-address, --dbus-id and --dbus-incoming: the names libvirt gives its helpers' options.
    parser.add_argument("--address", "--dbus-address", dest="address", help="D-Bus address (default: the session bus)")
    parser.add_argument("--id", "--dbus-id", dest="id", required=True, help="the back-end's Id")
    parser.add_argument(
        "--dbus-incoming", dest="incoming", action="store_true",
        help="start as a migration's destination: no memory until a Load, and --dirty-rate begins only after it",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--size", type=parse_size, default=0, help="serve this many deterministic bytes")
    source.add_argument("--state-file", type=Path, help="serve exactly the bytes of this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deterministic bytes (default 0)")
    parser.add_argument("--save-loaded", type=Path, metavar="FILE", help="write the state received by Load to FILE")
    parser.add_argument(
        "--dirty-rate", type=parse_size, default=0, metavar="BYTES_PER_SECOND",
        help="keep rewriting random blocks at about this many bytes a second (units as --size; default 0: never)",
    )
    parser.add_argument(
        "--report", type=Path, metavar="FILE",
        help='append {"event": "quiesced"|"loaded", "digest": ..., "bytes": ...} to FILE at each quiesce and load',
    )
    parser.add_argument("--threaded", action="store_true", help="use the threaded adapter instead of asyncio")
    parser.add_argument(
        "--stall-timeout", type=float, default=60.0, metavar="S",
        help="end a transfer whose peer neither reads nor writes for S seconds (default 60)",
    )
    parser.add_argument(
        "--allow-uid", type=int, action="append", metavar="UID",
        help="a Unix user that may call the back-end (repeatable; default: this process's user and root)",
    )
    parser.add_argument(
        "--one-shot-only", action="store_true",
        help="offer only one-shot saves (the library's save and load callables form), no pre-copy",
    )
    parser.add_argument(
        "--vmstate1", choices=[m.value for m in InlineMode], default=InlineMode.STREAM.value,
        help="serve QEMU's VMState1 with a stream blob (default), a raw legacy blob, or not at all (off)",
    )
    parser.add_argument(
        "--sandbox", nargs="?", const="strict", choices=["strict", "threads"],
        help="after registering, load a seccomp filter that kills the process on open, socket, exec or a new "
        "thread (=threads: new threads allowed, as a Save with workers needs); needs pyseccomp",
    )
    parser.add_argument(
        "--notify", action="store_true",
        help="tell systemd when it is on the bus (READY=1 to $NOTIFY_SOCKET, for a Type=notify unit) and what it does",
    )
    return parser


def _as_records(payloads: Iterable[memoryview]) -> Iterator[Record]:
    """The callables form hands load bare payloads: all DATA records."""
    for seq, payload in enumerate(payloads):
        yield Record(seq, RecordType.DATA, payload, len(payload), len(payload))


def _sandbox(mode: str) -> None:
    try:
        apply_kill_filter(allow_threads=mode == "threads")
    except ImportError as exc:
        raise SystemExit(f"--sandbox needs the pyseccomp package and libseccomp: {exc}") from None
    logging.info("sandboxed: open, socket, exec%s now kill this process", "" if mode == "threads" else " and new threads")


TRIM_AFTER = 64 << 20
"""A load that replaced at least this much memory trims the heap (a trim
costs milliseconds: a VMState1 Load of 1 MiB must not pay it)."""


def give_back_memory() -> None:
    """Return the free memory of glibc's heap to the kernel (``malloc_trim``).

    The library's buffers of about 1 MiB (a record read, a zstd frame's
    output and context) come from the heap and are used again: that is what
    makes a load fast (mapping each afresh, and faulting in its pages, took
    half of a load's time).  But blocks freed in the middle of the heap stay
    resident: a load frees the whole previous memory, and the dirtier frees a
    block for each it writes.  So memstate trims the heap after a load that
    replaced :data:`TRIM_AFTER` bytes or more, and every
    :data:`Dirtier.TRIM_EVERY` bytes the dirtier writes (a few
    milliseconds each).  Not glibc: nothing.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


try:  # looked up now: a sandboxed daemon may not look up anything later
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


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
    if args.incoming and (args.size or args.state_file is not None):
        parser.error("--dbus-incoming starts with no memory: its state comes by Load, not --size or --state-file")
    logging.basicConfig(level=logging.INFO, format=f"memstate[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    if args.state_file is not None:
        blocks = file_blocks(args.state_file)
    else:
        blocks = deterministic_blocks(args.size, args.seed)
    report = args.report.open("a") if args.report is not None else None  # now: a sandbox forbids open
    memstate = MemState(blocks, save_loaded=args.save_loaded, report=report)
    after = memstate.loaded if args.incoming else None
    dirtier = Dirtier(memstate, args.dirty_rate, args.seed, after) if args.dirty_rate else None
    if dirtier is not None:
        dirtier.start()
    if args.incoming:
        logging.info("incoming: waiting for the migrated state (a Load) before serving")
    options = {"address": args.address, "vmstate1": args.vmstate1, "notify": args.notify, "allowed_uids": args.allow_uid,
               "stall_timeout": args.stall_timeout}
    # A daemon object, or (without iterative support) its save and load callables.
    daemon = (memstate.save, lambda payloads: memstate.load(_as_records(payloads))) if args.one_shot_only else (memstate,)
    try:
        if args.threaded:
            _serve_threaded(ThreadedBackend(args.id, *daemon, **options), args.sandbox)
        else:
            asyncio.run(_serve_asyncio(Backend(args.id, *daemon, **options), args.sandbox))
    finally:
        if dirtier is not None:
            dirtier.stop()
        if report is not None:
            report.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
