"""Saved files on disk: an atomic writer and a reader (docs/stream-format.md §7).

The byte layout lives in :mod:`dbus_vmstate2.stream.container`; this module
only moves bytes between it and the file system, synchronously (run it in a
thread from asyncio).

The writer never leaves a half-written file under the final name: it writes an
unnamed file in the same directory (O_TMPFILE, so that nothing is left even if
the process is killed), fsyncs it, links it under a temporary name and renames
that over the final name, and fsyncs the directory; on any failure the file
is removed.  (Where the file system cannot make an unnamed file, the file has
its temporary name from the start.)
That is why a save target must be a regular file or a new name (see
:func:`save_target`): renaming over a FIFO, a device or ``/dev/stdout`` would
replace it.  The reader needs a regular file too: it reads the index at the
file's end before anything else, which a pipe cannot give.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Protocol

from ..errors import Cancelled, Corrupt, Malformed, StreamError, Truncated
from ..stream import NEED_DATA, StreamDecoder, StreamEnd, StreamHeader
from ._precopy_values import Backlog
from ..stream.container import (
    FILE_HEADER_SIZE,
    FOOTER_SIZE,
    SEGMENT_HEADER_SIZE,
    ContainerWriter,
    StreamInfo,
    parse_file_header,
    parse_footer,
    parse_index,
    parse_segment_header,
)

Buffer = bytes | bytearray | memoryview

WRITEBACK_STEP = 64 << 20

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
"""Non-blocking on the pipe: a full pipe raises BlockingIOError, to be waited
for with poll() (the file side may still wait for the disk)."""
"""The writer starts writeback of every this many bytes (see _put)."""


class UnusableFile(OSError):
    """A path that cannot be saved to or read from as a saved file: not a
    regular file (a FIFO, a device, a directory, a dangling link), or in a
    directory that does not exist.  Nothing was written or read."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def save_target(path: str | os.PathLike[str]) -> str:
    """Check that ``path`` can take a saved file; return the path to write.

    A save writes a temporary file in the target's directory and renames it
    over the target, so the target must be a regular file or a new name in
    an existing directory.  A symbolic link to a regular file is followed:
    the file it points to is replaced and the link is kept.

    Raises:
        UnusableFile: anything else (a FIFO, a device such as
            ``/dev/stdout``, a directory, a dangling link, a missing
            directory), before anything is written.
    """
    path = os.fspath(path)
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UnusableFile(f"cannot save to {path}: the directory {directory} does not exist") from None
        return path
    if stat.S_ISREG(link.st_mode):
        return path
    if not stat.S_ISLNK(link.st_mode):
        raise UnusableFile(f"refusing to save to {path}: it is {_kind(link.st_mode)}; {_WHY_REGULAR}")
    target = os.path.realpath(path)
    try:
        pointed = os.stat(path)
    except FileNotFoundError:
        raise UnusableFile(f"refusing to save to {path}: it is a symbolic link to {target}, which does not exist") from None
    if not stat.S_ISREG(pointed.st_mode):
        raise UnusableFile(f"refusing to save to {path}: it is a symbolic link to {_kind(pointed.st_mode)}; {_WHY_REGULAR}")
    try:
        named = os.stat(target)
    except OSError:
        named = None
    if named is None or (named.st_dev, named.st_ino) != (pointed.st_dev, pointed.st_ino):
        # A /proc/self/fd link to a deleted file resolves to "... (deleted)".
        raise UnusableFile(f"refusing to save to {path}: it is a symbolic link to a file that has no name to replace")
    return target


_WHY_REGULAR = ("a save writes a temporary file beside its target and renames it over the target, "
                "so the target must be a regular file or a new name")  # fmt: skip


class ContainerSink(Protocol):
    """Where a save puts its container: :class:`SaveFileWriter`, or a
    migration's connection (:class:`~.migrate.WireWriter`).  ``write`` may be
    called from several threads; ``commit`` runs in a worker thread and
    ``abandon`` (from the event loop's thread) makes it stop early;
    ``backlog`` (from the event loop's thread) says what remains to do after
    the back-ends' last byte, for the live save's plan."""

    def open_stream(self, expected_id: str | None = None) -> int: ...
    def write(self, stream: int, data: Buffer) -> None: ...
    def close_stream(self, stream: int) -> StreamInfo: ...
    def commit(self) -> None: ...
    def abandon(self) -> None: ...
    def abort(self) -> None: ...
    def backlog(self) -> Backlog: ...


class SaveFileWriter:
    """Write several back-ends' streams into one file, atomically.

    Use as a context manager: leaving the block normally commits (the file
    appears under ``path``), leaving it by an exception aborts (nothing
    appears).  :meth:`write` may be called from several threads.

    Args:
        path: the final file name: a regular file, a new name, or a link to a
            regular file (which is replaced; the link stays).
        mode: permission bits of the new file (default 0o600: state is private).

    Raises:
        UnusableFile: ``path`` cannot take a saved file (see :func:`save_target`),
            or no temporary file can be made in its directory.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o600) -> None:
        self.path = save_target(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, self._tmp = _new_file(directory, f".{os.path.basename(self.path)}.")
        except OSError as exc:  # name the directory, not the random temporary name
            raise UnusableFile(f"cannot save to {os.fspath(path)}: cannot create a file in {directory}: {exc.strerror}") from exc
        self._file = os.fdopen(fd, "wb")
        self._lock = threading.Lock()
        self._container = ContainerWriter()
        self._done = False
        self._abandoned = False
        self._written = self._flushed = 0
        try:
            os.fchmod(fd, mode)
            self._put(self._container.start())
        except BaseException:
            self.abort()
            raise

    def open_stream(self, expected_id: str | None = None) -> int:
        """Add a back-end's stream; return its number for :meth:`write`.

        Args:
            expected_id: the Id its stream header must carry, if known.
        """
        with self._lock:
            return self._container.open_stream(expected_id)

    def write(self, stream: int, data: Buffer) -> None:
        """Append the next bytes of a stream (skimmed on the way; not copied).

        Raises:
            StreamError: the bytes are not a valid continuation of the stream.
            OSError: the file system failed.
        """
        with self._lock:
            self._put(self._container.write(stream, data))

    def close_stream(self, stream: int) -> StreamInfo:
        """Mark a stream complete; return its index entry.

        Raises:
            Truncated: the stream ended before its trailer.
        """
        with self._lock:
            return self._container.close_stream(stream)

    def commit(self) -> None:
        """Write the index and footer, fsync, and rename to the final name.

        Raises:
            RuntimeError: a stream is still open.
            Cancelled: :meth:`abandon` was called before the rename (the
                temporary file is removed).
            OSError: the file system failed (the temporary file is removed).
        """
        with self._lock:
            try:
                self._put(self._container.finish())
                self._file.flush()
                os.fsync(self._file.fileno())
                if self._abandoned:
                    raise Cancelled(f"the save to {self.path} was abandoned before its file was renamed into place")
                if self._tmp is None:  # unnamed until now: a name of its own, a moment before the rename
                    self._tmp = _name_file(self._file.fileno(), os.path.dirname(os.path.abspath(self.path)),
                                           f".{os.path.basename(self.path)}.")  # fmt: skip
                self._file.close()
                os.replace(self._tmp, self.path)
                self._done = True
                _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            except BaseException:
                self.abort()
                raise

    def backlog(self) -> Backlog:
        """None: what is written is in the page cache at once, and the
        commit's fsync is not downtime (the back-ends' ends are)."""
        return Backlog()

    def abandon(self) -> None:
        """Make a :meth:`commit` running in another thread stop before it
        renames the file (it then removes the temporary file itself)."""
        self._abandoned = True

    def abort(self) -> None:
        """Discard the temporary file; the final name is left untouched."""
        if self._done:
            return
        self._done = True
        try:
            if self._tmp is not None:  # (an unnamed file goes with its last fd)
                os.unlink(self._tmp)  # first: closing may fail (it flushes onto a full disk)
        except FileNotFoundError:
            pass
        try:
            self._file.close()
        except OSError:  # ENOSPC or EIO again, from the flush: the file is gone anyway
            pass

    def _put(self, chunks: list) -> None:
        for chunk in chunks:
            self._written += self._file.write(chunk)
        if self._written - self._flushed >= WRITEBACK_STEP:
            # Start the disk writes of what is done, so that commit's fsync
            # does not wait for gigabytes at once; DONTNEED also keeps the
            # state from crowding the page cache.
            self._file.flush()
            os.posix_fadvise(self._file.fileno(), self._flushed, self._written - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = self._written

    def __enter__(self) -> SaveFileWriter:
        return self

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if etype is None:
            self.commit()
        else:
            self.abort()


def _new_file(directory: str, prefix: str) -> tuple[int, str | None]:
    """A new file in ``directory`` for a save: an unnamed one (O_TMPFILE),
    which vanishes with the process however it ends, even by SIGKILL; where
    the file system cannot make one, a named temporary file.

    Returns:
        The fd, and the temporary file's name (None while it has none).
    """
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600), None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    return tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")


def _name_file(fd: int, directory: str, prefix: str) -> str:
    """Give the unnamed file ``fd`` a temporary name in ``directory``, to rename.

    linkat(2) of ``/proc/self/fd/N`` with AT_SYMLINK_FOLLOW, as open(2)'s
    page shows for O_TMPFILE; Python calls linkat only when given a
    directory fd (else plain link(2), which would link the /proc link itself).
    """
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            name = f"{prefix}{secrets.token_hex(4)}.tmp"
            try:
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                return os.path.join(directory, name)
            except FileExistsError:
                continue
    finally:
        os.close(dir_fd)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SaveFileReader:
    """Read a saved file: its index, and its streams' bytes.

    Opening checks the file header, footer and index.  The segment iterators
    check every segment header and, when they reach the end, that each
    stream's byte and segment counts match the index.  Reads use ``pread``, so
    several iterators (one thread per back-end) may run at once.

    Args:
        path: the saved file, a regular file (or a link to one).

    Raises:
        UnusableFile: ``path`` is not a regular file (a pipe, ``<(...)``, a
            FIFO, a device, a directory): the index is at the end, so it is
            read first.
        StreamError: not a saved file, or a corrupt or truncated one.
        OSError: the file cannot be read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # O_NONBLOCK: opening a FIFO that has no writer must not hang; it is
        # refused just below (and means nothing for a regular file).
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            info = os.fstat(self._fd)
            if not stat.S_ISREG(info.st_mode):
                raise UnusableFile(
                    f"cannot read {self.path}: it is {_kind(info.st_mode)}; a saved file must be a regular file, "
                    "because its index is at its end and is read first (copy it to a file)"
                )
            size = info.st_size
            # Its streams are read front to back: so told (as cat tells its
            # input), Linux reads twice as far ahead of a cold file.  Advice
            # only: nothing else changes whether it is taken or not.
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if size < FILE_HEADER_SIZE + FOOTER_SIZE:
                raise Truncated(f"saved file of {size} bytes, expected at least {FILE_HEADER_SIZE + FOOTER_SIZE}")
            parse_file_header(self._read(0, FILE_HEADER_SIZE))
            self._index_offset, length = parse_footer(self._read(size - FOOTER_SIZE, FOOTER_SIZE), size)
            self.streams: list[StreamInfo] = parse_index(self._read(self._index_offset, length))
            """The index: one entry per back-end, by stream number."""
        except BaseException:
            os.close(self._fd)
            raise

    def find(self, backend_id: str) -> int:
        """Return the stream number of ``backend_id``, or raise KeyError."""
        for number, info in enumerate(self.streams):
            if info.backend_id == backend_id:
                return number
        raise KeyError(backend_id)

    def segments(self, chunk_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
        """Yield (stream number, bytes) for every segment, in file order.

        Args:
            chunk_size: largest piece to yield (a segment may be split).

        Raises:
            StreamError: a bad segment header, or counts that differ from the index.
        """
        return self._walk(None, chunk_size)

    def stream_chunks(self, stream: int, chunk_size: int = 1 << 20) -> Iterator[Buffer]:
        """Yield the bytes of one stream, in order, skipping the others.

        Raises:
            StreamError: as segments().
        """
        return (data for _, data in self._walk(stream, chunk_size))

    def stream_extents(self, stream: int, chunk_size: int = 1 << 20) -> Iterator[tuple[int, int]]:
        """Yield (file offset, size) of the pieces of one stream, in order,
        without reading them: for :meth:`splice`.

        Raises:
            StreamError: as segments().
        """
        return ((offset, size) for _, offset, size in self._extents(stream, chunk_size))

    def splice(self, offset: int, size: int, pipe: int) -> int:
        """Move up to ``size`` bytes of the file at ``offset`` into ``pipe``
        (its write end) without copying them through this process (splice(2)).

        Returns:
            How many bytes moved (at least 1).

        Raises:
            BlockingIOError: the pipe is full; nothing moved.
            Truncated: the file ends before ``offset``.
            OSError: as splice(2), e.g. BrokenPipeError.
        """
        moved = os.splice(self._fd, pipe, size, offset_src=offset, flags=_SPLICE_FLAGS)
        if not moved:
            raise Truncated(f"{self.path}: the file ends at {offset}, expected {size} more bytes there")
        return moved

    def read_ahead(self, offset: int, size: int) -> None:
        """Ask the kernel to read ``size`` bytes at ``offset`` into the page
        cache in the background (``POSIX_FADV_WILLNEED``), without waiting for it.
        Advice only: nothing else changes whether it is taken or not."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, offset, size, os.POSIX_FADV_WILLNEED)

    def read(self, offset: int, size: int, buffer: memoryview) -> memoryview:
        """Read ``size`` bytes at ``offset`` (at most ``len(buffer)``) into ``buffer``; return the view of them.

        Raises:
            Truncated: the file ends before.
        """
        return self._read(offset, min(size, len(buffer)), buffer)  # type: ignore[return-value]

    def _walk(self, only: int | None, chunk_size: int) -> Iterator[tuple[int, Buffer]]:
        for stream, offset, size in self._extents(only, chunk_size):
            yield stream, self._read(offset, size)

    def _extents(self, only: int | None, chunk_size: int) -> Iterator[tuple[int, int, int]]:
        """(stream, file offset, size) of every piece of the streams (of ``only``), in file order."""
        count = len(self.streams)
        seen_bytes, seen_segments = [0] * count, [0] * count
        pos = FILE_HEADER_SIZE
        while pos < self._index_offset:
            if self._index_offset - pos < SEGMENT_HEADER_SIZE:
                raise Malformed(
                    f"{self._index_offset - pos} bytes at {pos} before the index at {self._index_offset}, "
                    f"too few for a segment header ({SEGMENT_HEADER_SIZE} bytes)"
                )
            stream, length = parse_segment_header(self._read(pos, SEGMENT_HEADER_SIZE), count)
            pos += SEGMENT_HEADER_SIZE
            if pos + length > self._index_offset:
                raise Malformed(f"segment data at {pos} of {length} bytes runs into the index at {self._index_offset}")
            seen_bytes[stream] += length
            seen_segments[stream] += 1
            if only is None or stream == only:
                for start in range(pos, pos + length, chunk_size):
                    yield stream, start, min(chunk_size, pos + length - start)
            pos += length
        for number, info in enumerate(self.streams):
            if (seen_bytes[number], seen_segments[number]) != (info.stream_bytes, info.segments):
                raise Corrupt(
                    f"stream {number} ({info.backend_id!r}): {seen_bytes[number]} bytes in "
                    f"{seen_segments[number]} segments, the index says {info.stream_bytes} in {info.segments}"
                )

    def _read(self, offset: int, size: int, buffer: memoryview | None = None) -> Buffer:
        if buffer is None:
            data: Buffer = os.pread(self._fd, size, offset)
        else:
            data = buffer[: os.preadv(self._fd, [buffer[:size]], offset)]
        if len(data) != size:
            raise Truncated(f"{self.path}: read {len(data)} bytes at {offset}, expected {size}")
        return data

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SaveFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_index(path: str | os.PathLike[str]) -> list[StreamInfo]:
    """Check a saved file's header, footer and index, and return the index.

    Raises:
        UnusableFile, StreamError, OSError: as :class:`SaveFileReader`.
    """
    with SaveFileReader(path) as reader:
        return reader.streams


def verify_streams(
    reader: SaveFileReader,
    on_data: Callable[[str, int], None] | None = None,
    stop: threading.Event | None = None,
) -> list[str | None]:
    """Decode every stream of ``reader`` fully; return an error message per stream (None if fine).

    Args:
        on_data: called with a stream's back-end Id and the number of its
            bytes just verified (for a progress display).
        stop: set from another thread to stop early.

    Raises:
        StreamError: the container itself is corrupt.
        Cancelled: ``stop`` was set.
    """
    decoders = [StreamDecoder(info.backend_id) for info in reader.streams]
    errors: list[str | None] = [None] * len(decoders)
    ends: list[StreamEnd | None] = [None] * len(decoders)

    def pump(n: int, data: bytes | None) -> None:
        if errors[n] is not None:
            return
        try:
            if data is None:
                decoders[n].feed_eof()
            else:
                decoders[n].feed(data)
            while (event := decoders[n].next_event()) is not NEED_DATA:
                if isinstance(event, StreamEnd):
                    ends[n] = event
        except StreamError as exc:
            errors[n] = f"{type(exc).__name__}: {exc}"

    for n, data in reader.segments():
        if stop is not None and stop.is_set():
            raise Cancelled(f"the verification of {reader.path} was stopped")
        pump(n, data)
        if on_data is not None:
            on_data(reader.streams[n].backend_id, len(data))
    for n, info in enumerate(reader.streams):
        pump(n, None)
        end, head = ends[n], decoders[n].header
        if errors[n] is None and end is not None and head is not None:
            differ = index_differences(info, head, end)
            if differ:
                errors[n] = f"Corrupt: the index entry does not match the stream: {'; '.join(differ)}"
    return errors


def index_differences(info: StreamInfo, head: StreamHeader, end: StreamEnd) -> list[str]:
    """What an index entry says that its verified stream does not (§7.3), in words."""
    pairs = [
        ("format version", info.version, head.version),
        ("compression", info.compression.name.lower(), head.compression.name.lower()),
        ("level", info.level, head.level),
        ("records", info.records, end.records),
        ("raw bytes", info.raw_bytes, end.raw_bytes),
        ("stream bytes", info.stream_bytes, end.wire_bytes),
        ("digest", info.digest.hex(), end.digest.hex()),
    ]
    return [f"{what}: the index says {said}, the stream has {has}" for what, said, has in pairs if said != has]
