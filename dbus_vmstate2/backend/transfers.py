"""The body of a VMState2 transfer, run in a worker thread.

Save pulls records from the daemon's save result, encodes them and writes
the stream into the channel; load reads and decodes the stream and hands the
records to the daemon's load callable as it pulls them.  Memory stays at a
few records whatever the size of the state: nothing is read ahead of what
the daemon consumes and nothing is encoded ahead of what the pipe takes.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import BackendFailed, Malformed, Unsupported, VMStateError, quote
from ..stream import NEED_DATA, Compression, CompressedRecord, Record, RecordType, StreamDecoder, StreamEncoder, StreamEnd
from ..stream._format import MAX_LEVEL, MIN_LEVEL
from .channel import Channel
from .boundary import daemon_failed, option_values
from .records import BytesLike, SaveResult, iter_records, nbytes
from .staging import StagedGate

log = logging.getLogger("dbus_vmstate2.backend")

READ_AHEAD = 2
"""Records a load reads ahead of the daemon."""


@dataclass
class Progress:
    """Counters of one transfer, written by its worker thread, read by the loop.

    They count what has passed through the fd, no more: a save's stream
    bytes as each write returns and its records once written whole; a
    load's stream bytes as read, and its records once verified.  So after a
    cancel they match what the other end received.
    """

    records: int = 0
    raw_bytes: int = 0
    stream_bytes: int = 0


@dataclass(frozen=True, slots=True)
class SaveOptions:
    """The options of a VMState2 Save (see interfaces/org.qemu.VMState2.xml)."""

    compression: Compression = Compression.ZSTD
    level: int = 1
    workers: int = 0

    TYPES: ClassVar[dict[str, str]] = {"compression": "s", "level": "i", "workers": "u"}
    """Each option's one D-Bus type (interfaces/org.qemu.VMState2.xml, Save)."""

    @classmethod
    def from_dbus(cls, options: dict[str, Any]) -> SaveOptions:
        """Build from Save's ``a{sv}``.

        Raises:
            Unsupported: an unknown option, one of another type than the XML
                gives, an unknown compression method or a value out of range.
        """
        values = option_values("Save", options, cls.TYPES)
        if "compression" in values:
            name = values["compression"]
            try:
                values["compression"] = Compression[name.upper()] if isinstance(name, str) else None
            except KeyError:
                values["compression"] = None
            if values["compression"] is None:
                known = ", ".join(c.name.lower() for c in Compression)
                raise Unsupported(f"unknown compression {quote(str(name))} (known: {known})")
        if not MIN_LEVEL <= values.get("level", MIN_LEVEL) <= MAX_LEVEL:  # checked with either compression
            raise Unsupported(f"the Save option level must be {MIN_LEVEL}..{MAX_LEVEL}, got {values['level']}")
        options = cls(**values)
        try:  # the encoder checks the ranges; ask it now, before anything starts
            StreamEncoder("check", options.compression, options.level, options.workers)
        except ValueError as exc:
            raise Unsupported(f"bad Save options: {exc}") from None
        return options


class Writer:
    """Writes a stream's chunks into a channel in a second thread, one batch
    in flight: the encoding (CRC-32 or zstd) of one record overlaps the write
    of the one before.  Both release the GIL, and each alone takes about half
    of a save's time.

    Args:
        submit: runs a write in another thread (the back-end's workers'
            ``submit``; no thread is made per save).
    """

    def __init__(self, channel: Channel, progress: Progress, submit: Callable[..., Future[None]]) -> None:
        self._channel = channel
        self._progress = progress
        self._submit = submit
        self._pending: Future[None] | None = None

    def put(self, chunks: list, raw: int | None = None) -> None:
        """Write ``chunks`` (one record of ``raw`` state bytes, or a header or
        trailer when None) once the previous batch is written.

        The progress counts what has reached the fd: stream bytes as each
        write returns, a record once all of its bytes are written.

        Raises:
            Cancelled, VMStateError: the channel was cancelled or broke.
        """
        self.flush()
        self._pending = self._submit(_write, self._channel, chunks, self._progress, raw)

    def flush(self) -> None:
        """Wait until everything put so far is written."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def abort(self) -> None:
        """Unblock a pending write and wait for it: the channel is closed
        once the transfer returns, and the write must not outlive it."""
        self._channel.cancel()
        if self._pending is not None:
            wait([self._pending])


def save_stream(
    channel: Channel,
    backend_id: str,
    state: SaveResult,
    options: SaveOptions,
    progress: Progress,
    submit: Callable[..., Future[None]],
) -> None:
    """Encode ``state`` and write the whole stream into ``channel``
    (a one-shot save: DATA records only).

    Raises:
        Cancelled, VMStateError: the channel was cancelled or broke.
        LimitExceeded, BackendFailed: the daemon's records are not usable.
    """
    encoder = StreamEncoder(backend_id, compression=options.compression, level=options.level, workers=options.workers)
    records = iter_records(state)
    writer = Writer(channel, progress, submit)
    try:
        writer.put(encoder.start())
        while (record := next_record(records)) is not None:
            writer.put(encoder.record(record), raw=nbytes(record))
        writer.put(encoder.finish())
        writer.flush()
    except BaseException:
        writer.abort()
        raise


def next_record(records: Iterator[BytesLike]) -> BytesLike | None:
    """The daemon's next record, None at the end; its failures become BackendFailed."""
    try:
        return next(records)
    except StopIteration:
        return None
    except VMStateError:
        raise
    except Exception as exc:
        raise daemon_failed("save", exc) from exc


def _write(channel: Channel, chunks: list, progress: Progress, raw: int | None) -> None:
    def written(size: int) -> None:
        progress.stream_bytes += size

    for chunk in chunks:
        channel.write(chunk, written)
    if raw is not None:
        progress.records += 1
        progress.raw_bytes += raw


class LoadOutcome(Exception):
    """The daemon's load callable failed for a reason of its own (not the
    stream's), or returned early: its state is not known to be good."""

    def __init__(self, error: VMStateError) -> None:
        super().__init__(str(error))
        self.error = error


def load_stream(
    channel: Channel,
    backend_id: str,
    load: Callable[[Iterator[Record]], Any],
    progress: Progress,
    iterative: bool,
    submit: Callable[..., Future[None]],
    staged: StagedGate | None = None,
) -> None:
    """Read and verify a stream from ``channel``, handing its records to ``load``.

    Args:
        submit: runs the reading thread (the back-end's workers' ``submit``).
        iterative: the daemon takes an iterative save's END_OF_INITIAL and
            DIRTY records; else they fail the load with Unsupported.
        staged: a two-phase load's gate: once the whole stream verified, the
            records end only when it is committed (backend/staging.py).

    Raises:
        StreamError, Cancelled, VMStateError: the stream or the channel
            failed; the daemon saw only verified records and, as the load
            contract asks, committed nothing.
        LoadOutcome: the daemon's load failed for its own reasons, or
            returned before the stream had verified; its state is not known
            to be good.  ``error`` holds the reason.
    """
    reader = _RecordReader(channel, backend_id, progress, iterative, staged, submit)
    try:
        _daemon_load(load, reader)
    finally:
        reader.stop()


def _daemon_load(load: Callable[[Iterator[Record]], Any], reader: _RecordReader) -> None:
    try:
        load(reader.records())
    except VMStateError as exc:
        if exc is reader.error:
            raise  # the stream's own failure, passed through the daemon's loop
        raise LoadOutcome(exc) from exc
    except Exception as exc:
        if reader.error is not None:
            raise reader.error from exc  # the daemon wrapped our error in its own
        raise LoadOutcome(daemon_failed("load", exc)) from exc
    if not reader.verified:
        # The daemon returned before the end: whatever it kept is unverified.
        # Read the rest only to say why; never stage it for a Commit.
        try:
            for _ in reader.records(stage=False):
                pass
        except VMStateError as exc:
            raise LoadOutcome(exc) from exc
        raise LoadOutcome(BackendFailed("the back-end's load returned before reading every record; its state may be incomplete"))


class _RecordReader:
    """Reads and verifies the stream ahead of the daemon, and yields its records.

    A second worker thread (``submit``) reads each record into a buffer of
    its own and checks it (its framing, and an uncompressed payload's
    CRC-32) while the daemon consumes the one before.  A zstd record is
    decompressed, and so verified, in the daemon's thread just before it is
    handed over: the reads, which first touch the page cache, overlap the
    decompression, which first touches the memory the daemon keeps, as
    ``zstd -dc`` overlaps them with its asynchronous reads (benchmarks/
    bench_load.py).  At most :data:`READ_AHEAD` records wait for the
    daemon, so memory stays at a few records.  The end of the stream (its
    trailer verified and the end of file seen) is yielded to no one: the
    record iterator just ends, after every record verified and a two-phase
    load's Commit.
    """

    def __init__(
        self,
        channel: Channel,
        backend_id: str,
        progress: Progress,
        iterative: bool,
        staged: StagedGate | None,
        submit: Callable[..., Future[None]],
    ) -> None:
        self._channel = channel
        self._iterative = iterative
        self._staged = staged
        self._submit = submit
        self._decoder = StreamDecoder(expected_id=backend_id, decompress=False)
        self._progress = progress
        self._ahead: queue.Queue[Record | CompressedRecord | BaseException | None] = queue.Queue(READ_AHEAD)
        self._producer: Future[None] | None = None
        self._stopping = False
        self.error: VMStateError | None = None
        self.verified = False

    def records(self, stage: bool = True) -> Iterator[Record]:
        """The verified records; with ``stage``, the end waits at a two-phase load's gate."""
        if self.error is not None:  # failed for good: asked again (a daemon that went on), fail again
            raise self.error
        try:
            yield from self._records(stage)
        except VMStateError as exc:
            self.error = exc
            raise

    def _records(self, stage: bool) -> Iterator[Record]:
        if self._producer is None:
            self._producer = self._submit(self._produce)
        while not self.verified:
            item = self._ahead.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:  # the whole stream verified, and its end of file seen
                if stage and self._staged is not None:
                    self._staged.wait()
                self.verified = True
            else:
                if isinstance(item, CompressedRecord):
                    item = item.decompress()  # verified before the daemon sees it
                self._progress.records += 1
                self._progress.raw_bytes += item.raw_size
                yield item

    def stop(self) -> None:
        """End the reading thread and wait for it (the transfer is over)."""
        if self._producer is None:
            return
        self._stopping = True
        if not self._producer.done():
            self._channel.cancel()  # wakes a read; the channel is closed only after we return
        while not self._producer.done():
            try:  # make room for a put that waits
                self._ahead.get(timeout=0.05)
            except queue.Empty:
                pass
        wait([self._producer])

    # -- in the reading thread -------------------------------------------------

    def _produce(self) -> None:
        try:
            self._read_stream()
        except BaseException as exc:  # the consumer raises it in the daemon's thread
            self._put(exc)
        else:
            self._put(None)

    def _put(self, item: Record | CompressedRecord | BaseException | None) -> None:
        while not self._stopping:
            try:
                self._ahead.put(item, timeout=0.05)
                return
            except queue.Full:
                pass

    def _read_stream(self) -> None:
        while not self._stopping:
            event = self._decoder.next_event()
            if event is NEED_DATA:
                # Exactly what completes the unit (a payload and the next
                # record's header), into a buffer of its own: one read per
                # record, and each payload a view of it, never joined.
                size = self._decoder.read_size()
                data = self._channel.read_exactly(size)
                self._progress.stream_bytes += len(data)
                if data:
                    self._decoder.feed(data)
                if len(data) < size:  # the end of file
                    self._decoder.feed_eof()
            elif isinstance(event, (Record, CompressedRecord)):
                if event.type is not RecordType.DATA and not self._iterative:
                    raise Unsupported(
                        f"the stream is an iterative save's (a {event.type.name} record), and this back-end's "
                        "daemon takes only one-shot saves"
                    )
                self._put(event)
            elif isinstance(event, StreamEnd):
                self._expect_eof()
                return

    def _expect_eof(self) -> None:
        # Checked before the daemon's loop ends, that is before it commits.
        extra = self._channel.read()
        if extra:
            raise Malformed(f"the stream has data after its trailer ({len(extra)} bytes or more), expected none")
