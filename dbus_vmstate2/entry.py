"""The ``dbus-vmstate2`` command's entry point: SIGINT and SIGTERM come first.

Importing the command (dbus-fast, the stream codecs) takes a few hundred
milliseconds on a busy machine, and a signal in that time used to kill the
process by the default action.  So this module imports nothing heavy: it
installs one handler for both signals, unblocks them, and only then imports
and runs :func:`dbus_vmstate2.cli.main`.  From then on every SIGINT or SIGTERM
ends the command with one line, ``interrupted``, and exit code 130.  (The
interpreter's own start-up, before this module runs, is the only window
left; nothing has been opened or touched by then.)

The one handler, for the whole run:

* while the command is imported, a signal is only noted, and the command
  does not start: raising KeyboardInterrupt inside a module's import can
  leave a compiled (Cython) module half made, and makes CPython end the
  process with SIGINT instead of our exit code;
* outside a bus operation (argument parsing, ``inspect``, output) the first
  signal raises :class:`KeyboardInterrupt` in the main thread;
* while a bus operation runs, the command registers a callback with
  :func:`deferred`, and the signal only calls it: it asks the event loop to
  cancel the operation, which stops its transfers, waits for its threads and
  removes its temporary file before the command exits;
* later signals are ignored: the clean-up the first one started must not be
  cut short.

A signal the parent process ignored (``SIG_IGN``, as a shell does for
background jobs) stays ignored.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT

_received: int | None = None
_callback: Callable[[], None] | None = None
_raising = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _received
    if _received is not None:
        return  # the first one is being handled
    _received = signum
    if _callback is not None:
        _callback()
    elif _raising:
        raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT and SIGTERM from now on (see the module docstring)."""
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
    # A launcher may start us with the signals blocked so that none sent
    # before this point is lost: a pending one is delivered right here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def received() -> int | None:
    """The first SIGINT or SIGTERM received, or None (always None unless installed)."""
    return _received


@contextmanager
def deferred(callback: Callable[[], None]) -> Iterator[None]:
    """Within the block, a signal calls ``callback`` (in the main thread,
    between two bytecodes) instead of raising KeyboardInterrupt.

    Does nothing when the handlers are not installed (``cli.main`` called
    from a test or a program).
    """
    global _callback
    previous, _callback = _callback, callback
    try:
        yield
    finally:
        _callback = previous


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


def _reuse_large_blocks() -> None:
    """Let glibc's malloc reuse the blocks of a record's size (1 to 16 MiB)
    instead of mapping and unmapping each one.

    Verifying a stream as it is saved allocates a few blocks per record (the
    joined payload, zstd's output).  With glibc's default a block of 1 MiB
    or more gets a mapping of its own, and every one of its pages faults on
    first touch: zstd verification ran at a third of its speed.  Blocks up
    to 32 MiB now come from the heap, and freed memory is given back only
    above 64 MiB, so the helper's memory stays bounded by what its records
    need.  Not glibc: nothing.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (ImportError, OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Install the handlers, then import and run the command; return its exit code."""
    global _raising
    install()
    _reuse_large_blocks()
    from .cli import main as run_command  # the slow part: a signal now is only noted

    code: int | None = None
    if _received is None:
        _raising = True
        try:
            code = run_command(argv)
        except KeyboardInterrupt:
            pass
        finally:
            _raising = False  # from here on a signal is only noted
    if code is None or (_received is not None and code != EXIT_INTERRUPTED):
        try:
            name = signal.Signals(_received).name if _received is not None else "SIGINT"
            print(f"dbus-vmstate2: interrupted ({name})", file=sys.stderr, flush=True)
        except OSError:
            pass
        return EXIT_INTERRUPTED
    return code
