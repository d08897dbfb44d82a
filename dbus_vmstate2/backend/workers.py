"""The back-end's worker threads, made and warmed up before the daemon sandboxes itself.

Theory of operation: a daemon calls ``Backend.start()`` and then sandboxes
itself (a seccomp filter that kills on ``open`` or ``socket``, namespaces
where no file is reachable).  So whatever the library will ever need must
exist when start() returns; nothing may be made on first use:

* every blocking thing the library does (the daemon's plain-function
  callables, the body of a transfer, the save's writer) runs in the one pool
  of :data:`WORKERS` threads made here, never in asyncio's default executor
  (made on first use, and sized with ``os.cpu_count()``, which reads
  /sys/devices/system/cpu/online);
* the pool's size is given, so ``os.cpu_count()`` is never called, and every
  thread is started at once (a ThreadPoolExecutor starts them one submit at a
  time, and only while none is idle);
* each thread, and the loop's, runs :func:`warm_up` once, which uses what
  loads or reads something on its first use:

  - zstd, CRC-32 and SHA-256: a tiny stream is encoded and decoded with
    every compression method;
  - malloc: glibc makes a thread's arena on its first malloc, and reads
    /proc/sys/vm/overcommit_memory on the first trim of a thread's heap
    (once per process).  The warm-up frees 3 MiB, which is trimmed unless
    the process freed a block of over about 1.4 MiB before (glibc then
    raised its trim threshold): the README's sandbox contract says what
    glibc may still read, and how to stop it;
  - strerror(): Python makes the message of every OSError with it (a
    transfer meets EAGAIN on every full or empty pipe), and glibc loads its
    message catalog for the locale on the first call.

Once every thread is warm, :func:`settle_malloc` frees one block of
:data:`SETTLE_BLOCK` bytes, so that the buffers of about 1 MiB that every
call makes (a VMState1 blob, dbus-fast's copy of it, a record) come from
the heap and are used again, instead of being mapped, faulted in and
unmapped on each call.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..stream import Compression, decode_stream, encode_stream

WORKERS = 3
"""At most one transfer runs at a time (a second one gets Busy).  A save uses
two threads at once, its body (which also runs the daemon's iterator) and its
writer; a load, or a daemon's plain-function callable, uses one.  The third
is a spare, so that a save never waits for a thread: not even behind a
daemon callable left running when its transfer's task was cancelled (the loop
shutting down)."""

THREAD_NAME = "dbus-vmstate2-worker"
"""Threads are named ``dbus-vmstate2-worker_0`` .. ``_2`` (Python's names)."""

START_TIMEOUT = 30.0


def warm_up() -> None:
    """Use, in the calling thread, every codec a transfer uses (encode and
    decode a tiny stream with each compression method), malloc and strerror."""
    for compression in Compression:
        stream = encode_stream("warm-up", [bytes(4096), b"dbus-vmstate2"], compression)
        decode_stream(stream, expected_id="warm-up")
    # Blocks under glibc's mmap threshold (128 KiB at least) come from the
    # thread's arena; freeing them all leaves a top chunk over its trim
    # threshold (twice the mmap threshold) unless that was raised over 1.5 MiB.
    blocks = [bytearray(64 << 10) for _ in range(48)]
    del blocks
    os.strerror(errno.EAGAIN)


SETTLE_BLOCK = 2 << 20
"""The block :func:`settle_malloc` frees: above the largest buffer a VMState1
call makes (a 1 MiB blob, and dbus-fast's marshalling of it, which grows to
about 1.13 MiB)."""


def settle_malloc() -> None:
    """Raise glibc's dynamic mmap threshold to :data:`SETTLE_BLOCK` bytes.

    glibc maps every block above its mmap threshold (128 KiB at first) on its
    own, faults in its pages on first touch and unmaps it when freed; freeing
    such a block raises the threshold to that block's size, and the trim
    threshold to twice that.  Without it, a VMState1 Save of 1 MiB paid 479
    page faults and 1.5 ms of CPU per call on our 2-core machine (3.2 ms
    instead of 1.7: benchmarks/bench_inline.py), its buffers being just over
    the threshold left by the last block freed.  So one block of
    SETTLE_BLOCK bytes is made and freed (calloc'd: no page is touched).
    Called after the warm-up, whose trim must come first (see the module
    docstring).  A daemon that set ``M_MMAP_THRESHOLD`` itself (memstate)
    keeps its setting: glibc then adjusts nothing.  Not glibc: an allocation
    and a free, nothing more.
    """
    block = bytes(SETTLE_BLOCK)
    del block


def _start_thread(barrier: threading.Barrier) -> None:
    # Each of the first WORKERS tasks holds its thread until all of them are
    # running: so the pool cannot hand two of them to one idle thread.
    barrier.wait(START_TIMEOUT)
    warm_up()


class Workers:
    """A fixed pool of :data:`WORKERS` threads, all running after :meth:`start`."""

    def __init__(self, size: int = WORKERS) -> None:
        self.size = size
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start every thread and warm it up, and warm up the calling (loop) thread.

        Raises:
            RuntimeError: a thread could not be started.
            threading.BrokenBarrierError: the threads did not all start in time.
        """
        if self._pool is not None:
            raise RuntimeError("the back-end is already started")
        warm_up()
        pool = ThreadPoolExecutor(self.size, thread_name_prefix=THREAD_NAME)
        try:
            barrier = threading.Barrier(self.size)
            started = [asyncio.wrap_future(pool.submit(_start_thread, barrier)) for _ in range(self.size)]
            await asyncio.gather(*started)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        settle_malloc()
        self._pool = pool

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in a worker thread and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._started(), fn, *args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a worker thread; callable from any thread."""
        return self._started().submit(fn, *args)

    def shutdown(self) -> None:
        """Let the threads end once idle; work not yet started is dropped.

        Does not wait: call it once the transfers have ended, and the threads
        end at once (the interpreter joins them at exit in any case).
        """
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _started(self) -> ThreadPoolExecutor:
        if self._pool is None:
            raise RuntimeError("the back-end is not started")
        return self._pool
