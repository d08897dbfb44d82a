"""The body of an iterative save (VMState2 SavePreCopy), run in a worker thread.

The stream is the one of docs/stream-format.md, written in phases on one fd:

1. the initial data (DATA records from the daemon's ``initial_records``),
   while the daemon serves and changes its state (tracked from
   ``precopy_start`` on); then one END_OF_INITIAL record, and the loop is
   told (``InitialDataSent``);
2. rounds of what changed meanwhile (DIRTY records from ``dirty_records``),
   one after another, paced so that an idle daemon does not spin;
3. once the VMM asks for stop-copy (:meth:`PreCopyControl.request_stop_copy`)
   the daemon is quiesced at once in a spare worker thread (this one may be
   blocked on a full pipe); once it is, one last round sends what changed up
   to then, and the trailer ends the stream.

Cancel works through the channel (every write raises Cancelled) and wakes a
pacing wait at once.  Whatever happens, ``precopy_end`` is called; the
daemon is resumed only when the state machine says so
(``Effect.RESUME_DAEMON``, :meth:`PreCopyControl.resume`).
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
from .boundary import daemon_failed
from .transfers import Progress, SaveOptions, Writer, next_record

ROUND_INTERVAL = 0.05
"""The shortest time between the starts of two rounds, in seconds, unless a
round has a whole record to send: rounds of a few bytes would only spin."""


class PreCopyControl:
    """What the loop, the transfer's worker thread and the quiescing thread
    of one iterative save share."""

    def __init__(self, on_initial_sent: Callable[[], None]) -> None:
        self.on_initial_sent = on_initial_sent
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_copy = False
        self._quiesced = threading.Event()
        self._abandoned = False
        self.quiesce_error: BaseException | None = None
        self.rounds = 0
        """Rounds of changed data written so far (read by Pending)."""

    @property
    def quiesced(self) -> bool:
        """True once the daemon's quiesce() has returned (and until resume)."""
        return self._quiesced.is_set()

    def request_stop_copy(self, run: Callable[..., object], daemon: PreCopyDaemon) -> None:
        """StopCopy: quiesce the daemon at once, with ``run`` (a spare worker
        thread: the transfer's own may be blocked on a full pipe), so that its
        state stops changing when the VM stops; the worker then sends the last
        round and the trailer."""
        self._stop_copy = True
        run(self._quiesce, daemon)

    def _quiesce(self, daemon: PreCopyDaemon) -> None:
        try:
            daemon.quiesce()
        except BaseException as exc:
            self.quiesce_error = exc
        else:
            with self._lock:
                self._quiesced.set()
                abandoned = self._abandoned
            if abandoned:  # the transfer ended while we quiesced: serve again
                self.resume(daemon)
        self._wake.set()

    def resume(self, daemon: PreCopyDaemon) -> None:
        """Let the daemon serve again (Effect.RESUME_DAEMON); a quiesce still
        under way resumes it as soon as it ends."""
        with self._lock:
            if not self._quiesced.is_set():
                self._abandoned = self._stop_copy
                return
            self._quiesced.clear()
        daemon.resume()

    def wake(self) -> None:
        """Cut a pacing wait short (Cancel: the next write raises)."""
        self._wake.set()

    def final_round(self) -> bool:
        """True once the daemon is quiesced: the next round is the last.

        Raises:
            BackendFailed: the daemon's quiesce() raised.
        """
        if self.quiesce_error is not None:
            error = self.quiesce_error
            raise daemon_failed("quiesce", error) if isinstance(error, Exception) else error
        return self._quiesced.is_set()

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
        _send(writer, encoder, daemon.initial_records(), RecordType.DATA)
        writer.put(encoder.record(b"", RecordType.END_OF_INITIAL), raw=0)
        writer.flush()
        control.on_initial_sent()
        while True:
            # A round with nothing to send writes nothing, so a Cancel would
            # otherwise never be seen while the daemon is idle.
            channel.check()
            final = control.final_round()
            started = time.monotonic()
            sent = _send(writer, encoder, daemon.dirty_records(), RecordType.DIRTY)
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


def _send(writer: Writer, encoder: StreamEncoder, records: Iterable[BytesLike], kind: RecordType) -> int:
    """Write the daemon's ``records`` as ``kind``; return their raw bytes."""
    sent = 0
    records = iter_records(records if not isinstance(records, bytes | bytearray | memoryview) else [records])
    while (record := next_record(records)) is not None:
        writer.put(encoder.record(record, kind), raw=nbytes(record))
        sent += nbytes(record)
    return sent
