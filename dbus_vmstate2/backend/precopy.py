"""The body of an iterative save (VMState2 SavePreCopy), run in a worker thread.

The stream is the one of docs/stream-format.md, written in phases on one fd:

1. the initial data (DATA records from the daemon's ``initial_records``),
   while the daemon serves and changes its state (tracked from
   ``precopy_start`` on); then one END_OF_INITIAL record, and the loop is
   told (``InitialDataSent``);
2. rounds of what changed meanwhile (DIRTY records from ``dirty_records``),
   one after another, paced so that an idle daemon does not spin;
3. once the VMM asks for stop-copy (:meth:`PreCopyControl.request_stop_copy`)
   the daemon is quiesced at the next record boundary, one last round sends
   what changed up to then, and the trailer ends the stream.

Cancel works through the channel (every write raises Cancelled) and wakes a
pacing wait at once.  Whatever happens, ``precopy_end`` is called; the
daemon is never resumed here: the state machine decides that
(``Effect.RESUME_DAEMON``), using :attr:`PreCopyControl.quiesced`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future

from ..stream import RecordType, StreamEncoder
from .channel import Channel
from .daemon import PreCopyDaemon
from .records import BytesLike, iter_records, nbytes
from .transfers import Progress, SaveOptions, Writer, next_record

ROUND_INTERVAL = 0.05
"""The shortest time between the starts of two rounds, in seconds, unless a
round has a whole record to send: rounds of a few bytes would only spin."""


class PreCopyControl:
    """What the loop and the worker thread of one iterative save share."""

    def __init__(self, on_initial_sent: Callable[[], None]) -> None:
        self._on_initial_sent = on_initial_sent
        self._stop_copy = threading.Event()
        self._wake = threading.Event()
        self.rounds = 0
        """Rounds of changed data written so far (read by Pending)."""
        self.quiesced = False
        """True from the daemon's quiesce() until the adapter resumes it."""

    def request_stop_copy(self) -> None:
        """StopCopy: quiesce at the next record boundary and finish."""
        self._stop_copy.set()
        self._wake.set()

    def wake(self) -> None:
        """Cut a pacing wait short (Cancel: the next write raises)."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop_copy.is_set()

    def pause(self, seconds: float) -> None:
        if seconds > 0 and self._wake.wait(seconds):
            self._wake.clear()


def precopy_stream(
    channel: Channel,
    backend_id: str,
    daemon: PreCopyDaemon,
    options: SaveOptions,
    progress: Progress,
    submit: Callable[..., Future[None]],
    control: PreCopyControl,
) -> None:
    """Write an iterative save of ``daemon`` into ``channel`` until stop-copy.

    Raises:
        Cancelled, VMStateError: the channel was cancelled or broke.
        LimitExceeded, BackendFailed: the daemon's records are not usable,
            or one of its calls raised.
    """
    encoder = StreamEncoder(backend_id, compression=options.compression, level=options.level, workers=options.workers)
    writer = Writer(channel, progress, submit)
    daemon.precopy_start()
    try:
        writer.put(encoder.start())
        _send(writer, encoder, daemon, daemon.initial_records(), RecordType.DATA, control)
        writer.put(encoder.record(b"", RecordType.END_OF_INITIAL))
        writer.flush()
        control._on_initial_sent()
        while True:
            final = _quiesce_if_asked(daemon, control)
            started = time.monotonic()
            sent = _send(writer, encoder, daemon, daemon.dirty_records(), RecordType.DIRTY, control)
            if sent:
                control.rounds += 1
            if final:
                break
            if sent < (1 << 20):
                control.pause(ROUND_INTERVAL - (time.monotonic() - started))
        writer.put(encoder.finish())
        writer.flush()
    except BaseException:
        writer.abort()
        raise
    finally:
        daemon.precopy_end()


def _send(
    writer: Writer, encoder: StreamEncoder, daemon: PreCopyDaemon, records: Iterable[BytesLike],
    kind: RecordType, control: PreCopyControl,
) -> int:
    """Write ``records`` as ``kind``; return their raw bytes.  Quiesces the
    daemon at a record boundary as soon as stop-copy is asked for."""
    sent = 0
    records = iter_records(records if not isinstance(records, bytes | bytearray | memoryview) else [records])
    while (record := next_record(records)) is not None:
        writer.put(encoder.record(record, kind), raw=nbytes(record))
        sent += nbytes(record)
        _quiesce_if_asked(daemon, control)
    return sent


def _quiesce_if_asked(daemon: PreCopyDaemon, control: PreCopyControl) -> bool:
    """Quiesce the daemon once stop-copy is asked for; True once quiesced."""
    if control.stopping and not control.quiesced:
        daemon.quiesce()
        control.quiesced = True
    return control.quiesced
