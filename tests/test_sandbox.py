"""The sandbox promise: after start() a back-end opens no file or socket,
runs no program and starts no thread.

The back-ends here load a real seccomp filter right after start()
(dbus_vmstate2.examples.sandbox, through libseccomp): any open, openat,
openat2, creat, socket, socketpair, connect, execve, execveat, clone or
clone3 kills the whole process with SIGSYS, from any thread (TSYNC), the
library's own threads included.  Then every kind of transfer runs through
each kind of back-end (asyncio Backend, ThreadedBackend), and the back-end
must still be alive and exit normally at SIGTERM.  Only a Save with the
``workers`` option starts threads (libzstd's): it runs with clone allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import linecache
import os
import re
import signal
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dbus_fast import Variant

from dbus_vmstate2.backend.boundary import format_traceback
from dbus_vmstate2.backend.workers import WORKERS
from dbus_vmstate2.errors import BackendFailed, Cancelled, Corrupt, LimitExceeded
from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.names import VMSTATE1, VMSTATE2
from dbus_vmstate2.stream import Compression, encode_stream
from dbus_vmstate2.vmm import list_backends
from dbus_vmstate2.vmm.calls import call

from .conftest import ROOT
from .test_vmstate2 import check, get_state, load_bytes, save_bytes, start, stream_state, wait_finished

KINDS = ["asyncio", "threaded"]


def filtered_threads(pid: int) -> list[str]:
    """The process's threads, each checked to run under the seccomp filter."""
    tasks = sorted(Path(f"/proc/{pid}/task").iterdir())
    for task in tasks:
        status = (task / "status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.M), f"thread {task.name} is not filtered"
        assert re.search(r"^Seccomp_filters:\s+1$", status, re.M), f"thread {task.name} has not exactly our filter"
    return [task.name for task in tasks]


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@contextlib.asynccontextmanager
async def dies_loudly(process: subprocess.Popen[str]) -> AsyncIterator[None]:
    """If anything inside fails because the back-end died, say how it died."""
    try:
        yield
    except Exception as exc:
        try:
            code = await asyncio.to_thread(process.wait, 5)
        except subprocess.TimeoutExpired:
            raise exc from None
        pytest.fail(f"the back-end died ({describe_exit(code)}): {exc}")


CONTROLS = {
    # An open in a thread that was started before the filter (TSYNC).
    "open": "go.wait() and open('/dev/null')",
    "new thread": "go.wait() and threading.Thread(target=print).start()",
}


@pytest.mark.parametrize("action", CONTROLS)
def test_the_filter_kills_the_process(action):
    """The control: the filter is real, and it covers every thread."""
    script = (
        "import threading\n"
        "from dbus_vmstate2.examples.sandbox import apply_kill_filter\n"
        "go = threading.Event()\n"
        f"worker = threading.Thread(target=lambda: {CONTROLS[action]})\n"
        "worker.start()\n"
        "apply_kill_filter()\n"
        "go.set()\n"
        "worker.join()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGSYS, describe_exit(done.returncode)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_sandboxed_backend_serves_every_transfer(client, memstate, kind):
    size, backend_id = 8 << 20, "sandboxed"
    process = memstate(backend_id, "--size", "8M", "--seed", "7", "--sandbox", *(["--threaded"] if kind == "threaded" else []))
    threads = filtered_threads(process.process.pid)
    # The main thread, the worker threads and, threaded, the loop's own thread.
    assert len(threads) == 1 + WORKERS + (kind == "threaded")
    async with dies_loudly(process.process):
        [backend] = await list_backends(client)
        state = deterministic_state(size, 7)

        # Save, with each compression.
        for options in ({}, {"compression": Variant("s", "none")}):
            assert stream_state(await save_bytes(client, backend, options), backend_id) == state

        # VMState1 refuses a state that does not fit in QEMU's 1 MiB.
        with pytest.raises(LimitExceeded):
            await call(client, backend.unique_name, VMSTATE1, "Save")
        assert await get_state(client, backend) == "running"

        # Cancel of a save blocked on a full pipe.
        r, w = os.pipe2(os.O_CLOEXEC)
        number = await start(client, backend, "Save", w, {"compression": Variant("s", "none")})
        await asyncio.sleep(0.2)
        assert (await check(client, backend))[:2] == [number, False]
        await call(client, backend.unique_name, VMSTATE2, "Cancel")
        with pytest.raises(Cancelled):
            await wait_finished(client, backend, number)
        os.close(r)

        # A corrupt stream fails its load and leaves the state as it was.
        replacement = deterministic_state(3 << 20, 8)
        stream = encode_stream(backend_id, [replacement[i : i + (1 << 20)] for i in range(0, len(replacement), 1 << 20)])
        corrupt = bytearray(stream)
        corrupt[len(corrupt) // 2] ^= 0xFF
        with pytest.raises(Corrupt):
            await wait_finished(client, backend, await load_bytes(client, backend, bytes(corrupt)))
        assert stream_state(await save_bytes(client, backend), backend_id) == state

        # A good load replaces the state byte for byte.
        await wait_finished(client, backend, await load_bytes(client, backend, bytes(stream)))
        assert stream_state(await save_bytes(client, backend), backend_id) == replacement

        # VMState1, as stock QEMU drives it.
        small = b"a state that fits in one message" * 100
        await call(client, backend.unique_name, VMSTATE1, "Load", "ay", [encode_stream(backend_id, [small], Compression.ZSTD)])
        [blob] = await call(client, backend.unique_name, VMSTATE1, "Save")
        assert stream_state(blob, backend_id) == small

        assert filtered_threads(process.process.pid) == threads
    code = process.stop()
    assert code == 0, describe_exit(code)


async def test_a_save_with_zstd_workers_in_the_sandbox(client, memstate):
    """libzstd's worker threads open nothing either (glibc 2.34 and later
    size a new thread's malloc arena without reading /sys)."""
    process = memstate("workers", "--size", "8M", "--seed", "3", "--sandbox=threads")
    threads = filtered_threads(process.process.pid)
    async with dies_loudly(process.process):
        [backend] = await list_backends(client)
        data = await save_bytes(client, backend, {"workers": Variant("u", 4), "level": Variant("i", 3)})
        assert stream_state(data, "workers") == deterministic_state(8 << 20, 3)
        assert filtered_threads(process.process.pid) == threads  # libzstd's have ended
    code = process.stop()
    assert code == 0, describe_exit(code)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_daemons_failures_are_logged_in_the_sandbox(client, bus_address, kind):
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.faulty_backend", "--address", bus_address, "--id", "faulty",
         *(["--threaded"] if kind == "threaded" else [])],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
        assert line.startswith("READY "), line
        async with dies_loudly(process):
            [backend] = await list_backends(client)
            with pytest.raises(BackendFailed, match="save raised RuntimeError"):
                await save_bytes(client, backend)
            number = await load_bytes(client, backend, encode_stream("faulty", [b"a record"]))
            with pytest.raises(BackendFailed, match="load raised RuntimeError"):
                await wait_finished(client, backend, number)
            assert await get_state(client, backend) == "error"
            await call(client, backend.unique_name, VMSTATE2, "Reset")
            assert await get_state(client, backend) == "running"
    finally:
        if process.poll() is None:
            process.terminate()
        _, log = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, f"{describe_exit(process.returncode)}\n{log}"
    module = str(ROOT / "tests" / "faulty_backend.py")
    # The tracebacks name the daemon's frames, without reading their source lines.
    for name, text in (("save", "the daemon's save broke"), ("load", "the daemon's load broke")):
        assert re.search(rf'^  File "{re.escape(module)}", line \d+, in {name}$', log, re.M), log
        assert f"RuntimeError: {text}" in log
    assert "raise RuntimeError" not in log


def test_a_traceback_is_formatted_without_reading_a_source_file(monkeypatch):
    def inner() -> None:
        raise KeyError("inner")

    def outer() -> None:
        try:
            inner()
        except KeyError as exc:
            raise ValueError("outer") from exc

    def handler() -> None:
        try:
            outer()
        except ValueError:
            raise RuntimeError("while handling")  # noqa: B904 - the implicit chain is the point

    with pytest.raises(RuntimeError) as raised:
        handler()

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("linecache was used")

    with monkeypatch.context() as patch:
        for name in ("getline", "getlines", "updatecache", "checkcache", "lazycache"):
            patch.setattr(linecache, name, no_reading)
        text = format_traceback(raised.value)
    # The standard layout, less the source lines (and their ^^^ markers).
    standard = "".join(traceback.format_exception(raised.value)).splitlines()
    assert text.splitlines() == [line for line in standard if not line.startswith("    ")]
    assert "raise KeyError" not in text
