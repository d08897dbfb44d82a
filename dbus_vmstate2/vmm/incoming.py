"""``incoming``: receive a migration and load it, all or nothing.

The destination's side of docs/migration.md: accept one source, read its
HELLO, check that this bus has exactly the back-ends it announces (else
REFUSED, and nothing starts), start a two-phase Load on every one
(:class:`~.loading.StagedLoads`), answer READY, then read the container front
to back (:class:`~dbus_vmstate2.stream.container.ContainerReader`) and hand
each stream's bytes to its back-end as they come, ending its input when its
trailer has passed.  Once the footer has come and the index matches every
stream as received, every back-end is committed together; only then does the
source get COMMITTED.  Any failure discards every staged load (each back-end
keeps its previous state) and, if the link still works, tells the source
why (FAILED).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from dbus_fast.aio import MessageBus

from ..errors import (
    BackendFailed,
    Corrupt,
    DiscoveryError,
    IdMismatch,
    LinkFailed,
    StreamError,
    Truncated,
    Unsupported,
    VMStateError,
)
from ..names import VMSTATE2
from ..stream import NEED_DATA
from ..stream.container import ContainerEnd, ContainerReader, ContainerWriter, SegmentData, StreamInfo
from .calls import call
from .discovery import BackendInfo
from .loading import StagedLoads, two_phase_support, write_all
from .migrate import read_message
from .qemu import QemuDestination
from .transfers import STALL_TIMEOUT, Progress, in_thread, labelled
from .transport import ACCEPT_TIMEOUT, CONNECT_TIMEOUT, IO_TIMEOUT, Connection, Listener, TlsCreds, listen, pipe_fill
from .uri import Uri
from .wire import PROGRESS_INTERVAL, Kind, Message, MessageReader, encode, hello_backends

READ_SIZE = 1 << 20
LINGER = 2.0
"""Seconds a destination that failed keeps reading (and dropping) what the
source still sends, so that its FAILED reaches the source before the close."""


@dataclass(frozen=True, slots=True)
class IncomingTimeouts:
    """Every wait of ``incoming``, in seconds."""

    accept: float | None = ACCEPT_TIMEOUT
    """For the source to connect."""
    connect: float = CONNECT_TIMEOUT
    """For the TLS handshake."""
    io: float = IO_TIMEOUT
    """A receive or a send that makes no progress (the link down, the source stuck)."""
    stall: float | None = STALL_TIMEOUT
    """A back-end that reads nothing of its stream."""
    commit: float = 60.0
    """The back-ends' staged loads, waiting for the commit (their commit-timeout)."""


@dataclass(frozen=True, slots=True)
class IncomingSummary:
    source: str
    streams: list[StreamInfo]
    wire_bytes: int
    seconds: float
    """From the source's HELLO to the COMMITTED sent."""
    load_seconds: dict[str, float]
    """Each back-end's load, from its Load to its outcome."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "wire_bytes": self.wire_bytes, "seconds": round(self.seconds, 3),
            "backends": [
                {"id": i.backend_id, "records": i.records, "raw_bytes": i.raw_bytes, "stream_bytes": i.stream_bytes,
                 "digest": i.digest.hex()}
                for i in self.streams
            ],
        }  # fmt: skip


async def incoming(
    bus: MessageBus,
    backends: Sequence[BackendInfo],
    uri: Uri,
    progress: Progress | None = None,
    *,
    tls: TlsCreds | None = None,
    timeouts: IncomingTimeouts = IncomingTimeouts(),
    on_listening: Callable[[Listener], None] | None = None,
    qemu: QemuDestination | None = None,
) -> IncomingSummary:
    """Wait for a source at ``uri`` and load what it sends into ``backends``, all or nothing.

    With ``qemu`` (QEMU started with ``-S`` and ``-incoming``), once every
    back-end committed, wait for QEMU's incoming migration to complete and
    only then resume the VM (``cont``); on any failure the VM stays stopped.

    Raises:
        LinkFailed: no source came, TLS failed, the link failed or the
            source left before the end.
        DiscoveryError: the source's back-ends are not this bus's (REFUSED).
        StreamError: the container or a stream does not verify.
        VMStateError: a back-end failed its load or its commit (named).
        In every case no back-end here applied anything.
    """
    progress = progress or Progress()
    try:
        if qemu is not None:
            await qemu.start()  # before anything: QEMU must be waiting, stopped
        listener = await listen(uri, tls=tls, connect_timeout=timeouts.connect, io_timeout=timeouts.io)
        try:
            if on_listening is not None:
                on_listening(listener)
            progress.phase = "waiting"
            conn = await listener.accept(timeouts.accept)
        finally:
            await listener.close()
        try:
            summary = await _receive(bus, backends, conn, progress, timeouts)
        finally:
            await conn.close()
        if qemu is not None:
            progress.phase = "qemu"
            await qemu.resume_when_complete()
        return summary
    finally:
        if qemu is not None:
            await qemu.close()


async def _receive(
    bus: MessageBus, backends: Sequence[BackendInfo], conn: Connection, progress: Progress, timeouts: IncomingTimeouts,
) -> IncomingSummary:
    reader = MessageReader()
    hello = await read_message(conn, reader, timeouts.io, "a HELLO")
    started = time.monotonic()
    try:
        if hello.kind is not Kind.HELLO:
            raise LinkFailed(f"{conn.peer} began with {hello.kind.name}, expected HELLO: is it a dbus-vmstate2 source?")
        try:
            ids = hello_backends(hello)
        except StreamError as exc:
            raise LinkFailed(f"{conn.peer}: {exc}") from exc
        ordered = _match(ids, backends)
    except VMStateError as exc:
        await _tell(conn, Kind.REFUSED, exc)
        raise
    told = False
    try:
        two_phase = await two_phase_support(bus, ordered)
        if not all(two_phase.values()):  # refused before any Load starts
            raise Unsupported(
                "a back-end here has no two-phase load (Capabilities two-phase-load): it would apply its "
                "stream alone, before the others verified; update it to migrate all or nothing"
            )
        async with StagedLoads(bus, ordered, progress, stall_timeout=timeouts.stall,
                               commit_timeout=max(1, int(timeouts.commit)), two_phase=two_phase) as loads:  # fmt: skip
            try:
                ready = {"backends": ids, "setup_seconds": round(time.monotonic() - started, 6)}
                await conn.send(encode(Message(Kind.READY, ready)))
                progress.begin("receiving")
                progress.backends = len(ids)
                try:
                    streams = await _demux(conn, reader, loads, ids, progress, timeouts,
                                           hello.body.get("progress") is True)  # fmt: skip
                except _StoppedReading as exc:
                    raise await _why_stopped(bus, ordered[exc.stream]) from exc
                progress.phase = "committing"
                seconds = await loads.commit()
            except BaseException as exc:
                # Before the loads are discarded: that waits for each back-end
                # to answer its cancel, and a stopped one takes the whole
                # timeout, while the source, waiting, would fail first and
                # blame its own side.
                told = True
                await _tell(conn, Kind.FAILED, exc)
                raise
        await conn.send(encode(Message(Kind.COMMITTED, {"backends": ids})))
        progress.phase = "done"
    except BaseException as exc:
        if not told:
            await _tell(conn, Kind.FAILED, exc)
        raise
    return IncomingSummary(conn.peer, streams, conn.sent, time.monotonic() - started, seconds)


def _match(ids: list[str], backends: Sequence[BackendInfo]) -> list[BackendInfo]:
    """Our back-ends in the source's stream order; exactly the same set, or DiscoveryError."""
    ours = {b.id: b for b in backends}
    missing = [i for i in ids if i not in ours]
    extra = [i for i in ours if i not in ids]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"this destination has no back-end {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"the source sends nothing for {', '.join(map(repr, extra))}")
        raise DiscoveryError(
            f"the source's back-ends ({', '.join(ids) or 'none'}) are not this destination's "
            f"({', '.join(ours) or 'none'}): {'; '.join(parts)}; each must have its counterpart (or use --id-list)"
        )
    return [ours[i] for i in ids]


async def _tell(conn: Connection, kind: Kind, exc: BaseException) -> None:
    """Tell the source why we fail, if the link still works; never raises."""
    if isinstance(exc, LinkFailed) and kind is Kind.FAILED:
        return  # the link is what failed
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        error, text = "Cancelled", "the destination was interrupted (SIGINT or SIGTERM); nothing was applied"
    else:
        error, text = type(exc).__name__, f"{type(exc).__name__}: {exc}" if isinstance(exc, StreamError) else str(exc)
        text = text or error
        if kind is Kind.FAILED:
            text += "; nothing was applied"
    try:
        async with asyncio.timeout(5.0):
            await conn.send(encode(Message(kind, {"error": error, "message": text})))
        conn.writer.write_eof()
        deadline = time.monotonic() + LINGER
        while (left := deadline - time.monotonic()) > 0:
            if not await conn.recv(READ_SIZE, left):
                break
    except (Exception, asyncio.CancelledError):
        pass


async def _demux(
    conn: Connection, messages: MessageReader, loads: Any, ids: list[str], progress: Progress, timeouts: IncomingTimeouts,
    report: bool = False,
) -> list[StreamInfo]:
    """Read the container, feed each back-end its stream; return the verified index.

    With ``report``, tell the source every PROGRESS_INTERVAL what we hold
    that the back-ends have not read: its plan counts it as on its way.
    """
    reader = ContainerReader(len(ids))
    skim = ContainerWriter()  # the index, rebuilt from the streams as received
    skim.start()
    for backend_id in ids:
        skim.open_stream(backend_id)
    ended: set[int] = set()
    stop = threading.Event()
    leftover = messages.take_buffered()
    end: ContainerEnd | None = None
    # One batch is written into the pipes (in a worker thread) while the next
    # is read from the connection: the link and the back-ends work at once.
    delivering: asyncio.Future[set[int]] | None = None
    handed = 0  # payload bytes given to the writer thread so far

    def held() -> int:
        in_pipes = sum(pipe_fill(fd) for fd in loads.fds.values())
        return conn.unread() + handed - sum(progress.done.values()) + in_pipes

    async def tell() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            await conn.send(encode(Message(Kind.PROGRESS, {"buffered": held()})))

    telling = asyncio.ensure_future(tell()) if report else None

    async def delivered() -> None:
        nonlocal delivering, ended
        if delivering is not None:
            done, delivering = await delivering, None
            for number in sorted(done - ended):
                loads.end_input(ids[number])
            ended |= done

    try:
        while end is None:
            try:
                data = leftover or await conn.recv(READ_SIZE, timeouts.io)
            except LinkFailed as exc:
                # A source that exits with our PROGRESS messages unread in its
                # socket resets the connection instead of closing it (the
                # kernel's choice), and a PROGRESS sent then meets a broken
                # pipe: the same end as a close, said the same way.
                if not isinstance(exc.__cause__, ConnectionResetError | BrokenPipeError):
                    raise
                raise _source_gone(conn, reader) from exc
            leftover = b""
            if not data:
                raise _source_gone(conn, reader)
            reader.feed(data)
            pieces: list[SegmentData] = []
            while (event := reader.next_event()) is not NEED_DATA:
                if isinstance(event, SegmentData):
                    pieces.append(event)
                else:
                    end = event
            await delivered()
            if pieces:
                handed += sum(len(p.data) for p in pieces)
                delivering = asyncio.ensure_future(in_thread(
                    _deliver, pieces, skim, loads.fds, ids, timeouts.stall, stop, progress, stop=stop.set,
                ))  # fmt: skip
        await delivered()
    finally:
        if telling is not None:  # before any answer: nothing follows COMMITTED or FAILED
            telling.cancel()
            await asyncio.wait({telling})
            if not telling.cancelled():
                telling.exception()  # a link that failed: the reads say so
        if delivering is not None:  # failed meanwhile: stop the writer and wait for it
            stop.set()
            await asyncio.wait({delivering})
            if not delivering.cancelled():
                delivering.exception()
    return _verify(end, skim, ids)


def _source_gone(conn: Connection, reader: ContainerReader) -> LinkFailed:
    return LinkFailed(
        f"the connection from {conn.peer} ended after {reader.offset} bytes, before the end of the container: "
        "the source gave up or was killed"
    )


def _deliver(
    pieces: list[SegmentData], skim: ContainerWriter, fds: dict[str, int], ids: list[str], stall: float | None,
    stop: threading.Event, progress: Progress,
) -> set[int]:
    """Skim and write pieces into the back-ends' pipes (a worker thread); return the streams complete so far."""
    complete = set()
    for piece in pieces:
        backend_id = ids[piece.stream]
        try:
            skim.write(piece.stream, piece.data)
        except StreamError as exc:
            raise type(exc)(f"the stream for back-end {backend_id!r}: {exc}") from exc
        try:
            write_all(fds[backend_id], piece.data, stall, stop, "the migration")
        except BrokenPipeError:
            raise _StoppedReading(piece.stream) from None
        except VMStateError as exc:
            raise type(exc)(f"back-end {backend_id!r}: {exc}") from exc
        progress.done[backend_id] = progress.done.get(backend_id, 0) + len(piece.data)
        if skim.trailer_seen(piece.stream):
            complete.add(piece.stream)
    return complete


class _StoppedReading(Exception):
    """A back-end closed its end of the pipe before its stream's end: its load failed."""

    def __init__(self, stream: int) -> None:
        super().__init__(stream)
        self.stream = stream


async def _why_stopped(bus: MessageBus, backend: BackendInfo, wait: float = 5.0) -> VMStateError:
    """The back-end's own error for a load that stopped reading (from Check, within ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        try:
            _, finished, *_ = await call(bus, backend.unique_name, VMSTATE2, "Check", timeout=left)
        except VMStateError as exc:
            return labelled(backend, exc)
        if finished:
            break
        await asyncio.sleep(0.05)
    return labelled(backend, BackendFailed("it stopped reading its stream before the end, and gave no reason"))


def _verify(end: ContainerEnd, skim: ContainerWriter, ids: list[str]) -> list[StreamInfo]:
    """The index that came must be the one the streams make (docs/stream-format.md §7.5 steps 6-7)."""
    got = []
    for number, (backend_id, info) in enumerate(zip(ids, end.streams, strict=True)):
        if info.backend_id != backend_id:
            raise IdMismatch(f"the index names stream {number} {info.backend_id!r}, the HELLO {backend_id!r}")
        try:
            made = skim.close_stream(number)
        except Truncated as exc:
            raise Truncated(f"the stream for back-end {backend_id!r} ended before its trailer: {exc}") from exc
        made = replace(made, segments=info.segments)  # counted as the pieces came; the reader checked the segments
        if made != info:
            differ = "; ".join(
                f"{f.name.replace('_', ' ')}: the index says {getattr(info, f.name)!r}, the stream has {getattr(made, f.name)!r}"
                for f in fields(StreamInfo) if getattr(info, f.name) != getattr(made, f.name)
            )  # fmt: skip
            raise Corrupt(f"the index entry for back-end {backend_id!r} does not match its stream as received: {differ}")
        got.append(info)
    return got
