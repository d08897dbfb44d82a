"""``migrate``: a live save whose container goes to a destination, with a confirmed handover.

The sequence (docs/migration.md): connect (TLS when asked); HELLO with the
back-ends' Ids in stream order; the destination checks it has exactly those
back-ends, starts a two-phase Load on each and answers READY (or REFUSED:
nothing started anywhere).  Then :func:`~.live.save_live` runs unchanged,
with a :class:`WireWriter` in place of the saved file: pre-copy, the
switch-over, stop-copy, the index and the footer.  Its commit is the wait
for the destination's answer: COMMITTED once every back-end's stream has
verified and every back-end has committed, or FAILED naming what failed.

Until COMMITTED arrives the source can go back: on any failure (the link, the
destination's refusal or death, a back-end, a timeout, a cancellation)
save_live cancels the transfers and resumes every source back-end, state
intact.  After it, the source back-ends stay ``stopped``: their state lives
on at the destination (as QEMU leaves a migrated VM's source paused).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from ..errors import LinkFailed, PeerRefused, StreamError
from ..stream.container import ContainerWriter, StreamInfo
from ._precopy_values import Backlog
from .discovery import BackendInfo
from .live import save_live
from .control import resume
from .precopy import PreCopyConfig, Status, Summary
from .pump import CLOSE_TIMEOUT
from .qemu import QemuSource
from .transfers import Progress, wait_regardless
from .transport import CONNECT_TIMEOUT, IO_TIMEOUT, Connection, TlsCreds, connect
from .uri import FileUri, Uri
from .wire import Kind, Message, MessageReader, encode, progress_buffered, ready_setup_seconds

ACK_TIMEOUT = 120.0
"""Default seconds the source waits, once it has sent everything, for the
destination's answer (its back-ends verify the rest and commit meanwhile)."""

READ_SIZE = 64 << 10


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every wait of a migration, in seconds."""

    connect: float = CONNECT_TIMEOUT
    """To connect, and to finish the TLS handshake."""
    io: float = IO_TIMEOUT
    """A send or a receive that makes no progress; also the handshake's answer."""
    ack: float = ACK_TIMEOUT
    """The destination's answer once the whole container is sent."""


@dataclass(frozen=True, slots=True)
class MigrationSummary:
    """How a migration went: the live save's figures plus the handover's."""

    uri: str
    live: Summary
    """The pre-copy plan's summary (its downtime ends at the last stop-copy end)."""
    wire_bytes: int
    """Bytes sent on the connection (the container and the messages)."""
    downtime: float | None
    """Seconds from the switch-over (the back-ends quiesce) to the destination's acknowledgement."""
    ack_wait: float | None
    """Seconds from the footer sent to the acknowledgement (the destination's verification and commit)."""

    def as_dict(self) -> dict[str, Any]:
        live = self.live.as_dict()
        return {
            **live, "uri": self.uri, "wire_bytes": self.wire_bytes,
            "stop_copy_time": live["downtime"], "downtime": _round(self.downtime), "ack_wait": _round(self.ack_wait),
        }  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class WireWriter:
    """A :class:`~.savefile.ContainerSink` that sends the container on a connection.

    Its :meth:`commit` sends the index and the footer, then waits up to
    ``ack_timeout`` for the destination's answer (``answer``, read by the
    event loop): it returns on COMMITTED and raises otherwise.  ``handover``
    estimates, in seconds, how long that answer takes once the last byte
    is through (:meth:`backlog`).
    """

    def __init__(
        self, conn: Connection, answer: asyncio.Future[Message], ack_timeout: float, handover: float = 0.0,
    ) -> None:
        self._conn = conn
        self._answer = answer
        self._ack_timeout = ack_timeout
        self._handover = handover
        self.destination_holds = 0
        """What the destination last said it holds that its back-ends have not read (PROGRESS)."""
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._container = ContainerWriter()
        self._abandoned = False
        self.footer_sent_at: float | None = None
        self.acked_at: float | None = None
        self._queue(self._container.start())  # sent with what follows

    def open_stream(self, expected_id: str | None = None) -> int:
        with self._lock:
            return self._container.open_stream(expected_id)

    def write(self, stream: int, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self._queue(self._container.write(stream, data))
        self._drain()

    def close_stream(self, stream: int) -> StreamInfo:
        with self._lock:
            return self._container.close_stream(stream)

    def commit(self) -> None:
        """Send the index and footer; wait for COMMITTED (in a worker thread).

        Raises:
            PeerRefused: the destination answered FAILED.
            LinkFailed: the link failed, or no answer came within the timeout.
        """
        with self._lock:
            self._queue(self._container.finish())
            self.footer_sent_at = time.monotonic()  # before an answer can come
        self._drain()
        waiting = asyncio.run_coroutine_threadsafe(self._await_answer(), self._loop)
        waiting.result()
        self.acked_at = time.monotonic()

    async def _answer_within(self, seconds: float) -> Message:
        async with asyncio.timeout(seconds):
            return await asyncio.shield(self._answer)

    async def _await_answer(self) -> Message:
        try:
            return await self._answer_within(self._ack_timeout)
        except TimeoutError:
            self._conn.abort()
            raise LinkFailed(
                f"{self._conn.peer} did not acknowledge the migration within {self._ack_timeout:g} s after "
                "the last byte (the acknowledgement timeout): nothing is known to be applied there"
            ) from None

    def backlog(self) -> Backlog:
        """What the switch-over will wait for beyond the back-ends: the bytes
        on their way to the destination's back-ends, and the handover; and
        what they have taken so far, whose rate is the channel's."""
        queued = self._conn.unsent() + self.destination_holds
        return Backlog(queued, self._handover, max(0, self._conn.sent - queued))

    def abandon(self) -> None:
        """Drop the connection (from the event loop): every send and the commit's wait end at once."""
        self._abandoned = True
        self._conn.abort()

    def abort(self) -> None:
        self._conn.abort()

    def _queue(self, chunks: list) -> None:
        """Queue ``chunks`` for the connection, in container order (call under the lock)."""
        queue = self._conn.queue_from_thread if _in_thread(self._loop) else self._conn.queue
        for chunk in chunks:
            queue(chunk)

    def _drain(self) -> None:
        """Wait until the connection took what was queued (outside the lock:
        the event loop takes the lock too, in open_stream and close_stream,
        and must never wait behind a slow link)."""
        try:
            self._conn.drain_from_thread()
        except LinkFailed as exc:
            raise self._why(exc) from exc

    def _why(self, exc: LinkFailed) -> BaseException:
        """The destination's own refusal, if it explains a lost connection (waits at most 2 s)."""
        if self._abandoned:
            return exc
        try:
            asyncio.run_coroutine_threadsafe(self._answer_within(2.0), self._loop).result()
        except (PeerRefused, LinkFailed) as refused:
            return refused if isinstance(refused, PeerRefused) else exc
        except Exception:
            pass
        return exc


def _in_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is not loop
    except RuntimeError:
        return True


async def read_message(conn: Connection, reader: MessageReader, timeout: float | None, what: str) -> Message:
    """The next message from ``conn``.

    Raises:
        LinkFailed: the connection ended or failed, nothing came within
            ``timeout``, or the peer sent something that is not a message
            of ours (a wrong peer, or damage).
    """
    while True:
        try:
            message = reader.next_message()
        except StreamError as exc:
            raise LinkFailed(f"{conn.peer} sent something other than {what}: {type(exc).__name__}: {exc}") from exc
        if isinstance(message, Message):
            return message
        data = await conn.recv(READ_SIZE, timeout)
        if not data:
            if reader.buffered:
                reader.feed_eof()
                continue
            raise LinkFailed(
                f"the connection to {conn.peer} ended without {what}: the peer exited or was killed, or the link "
                "failed"
            )
        reader.feed(data)


def refusal(message: Message, peer: str) -> PeerRefused:
    """The error a REFUSED or FAILED message stands for."""
    body = message.body
    error = PeerRefused(f"the destination ({peer}) {'refused' if message.kind is Kind.REFUSED else 'failed'}: "
                        f"{body.get('message') or 'no reason given'}")  # fmt: skip
    error.peer_error = body.get("error") if isinstance(body.get("error"), str) else None
    return error


async def _handshake(conn: Connection, backends: Sequence[BackendInfo], reader: MessageReader) -> Message:
    await conn.send(encode(Message(Kind.HELLO, {"backends": [b.id for b in backends], "progress": True})))
    answer = await read_message(conn, reader, conn.io_timeout, "its READY answer to our HELLO")
    if answer.kind in (Kind.REFUSED, Kind.FAILED):  # FAILED: its loads could not start
        raise refusal(answer, conn.peer)
    if answer.kind is not Kind.READY:
        raise LinkFailed(f"{conn.peer} answered our HELLO with {answer.kind.name}, expected READY or REFUSED")
    return answer


def _handover(conn: Connection, ready: Message, handshake: float) -> float:
    """Seconds the handover should take after the last byte: the destination's
    commit costs about what its READY did (a bus call to each back-end), and
    its answer a round trip on the link.  Never more than the whole handshake,
    which is the estimate when the destination does not say (an older one)."""
    setup = ready_setup_seconds(ready)
    return handshake if setup is None else min(handshake, setup + conn.round_trip())


async def _answer(conn: Connection, reader: MessageReader, writer: list[WireWriter]) -> Message:
    """Read the destination's final answer, whenever it comes, and its PROGRESS meanwhile."""
    while (message := await read_message(conn, reader, None, "its answer (COMMITTED or FAILED)")).kind is Kind.PROGRESS:
        if writer and (holds := progress_buffered(message)) is not None:
            writer[0].destination_holds = holds
    if message.kind is Kind.COMMITTED:
        if not writer or writer[0].footer_sent_at is None:
            raise LinkFailed(f"{conn.peer} acknowledged the migration before the end of the container was sent")
        return message
    if message.kind is Kind.FAILED:
        raise refusal(message, conn.peer)
    raise LinkFailed(f"{conn.peer} sent {message.kind.name} during the transfer, expected COMMITTED or FAILED")


async def migrate(
    bus: MessageBus,
    backends: Sequence[BackendInfo],
    uri: Uri,
    options: dict[str, Variant] | None = None,
    config: PreCopyConfig | None = None,
    progress: Progress | None = None,
    *,
    tls: TlsCreds | None = None,
    timeouts: Timeouts = Timeouts(),
    on_status: Callable[[Status], None] | None = None,
    on_connected: Callable[[Connection], None] | None = None,
    switch_over: asyncio.Event | None = None,
    max_bandwidth: float | None = None,
    verify: bool = True,
    close_timeout: float = CLOSE_TIMEOUT,
    qemu: QemuSource | None = None,
) -> MigrationSummary:
    """Migrate ``backends`` live to the destination at ``uri``.

    ``file:PATH`` is the live save into PATH (no destination to confirm).
    With ``qemu``, QEMU's own migration runs beside ours and paces it: the
    back-ends switch over only when QEMU reports ``pre-switchover`` (or
    ``switch_over`` is set), QEMU continues only once the destination
    acknowledged, and any failure cancels QEMU's migration too.

    Returns:
        The summary, once the destination acknowledged: every back-end
        committed there; the source back-ends stay ``stopped``.

    Raises:
        LinkFailed: the connection failed or timed out (says where and when).
        PeerRefused: the destination refused or failed (says which back-end).
        MigrationAborted, VMStateError: the live save failed at the source.
        In every case every source back-end serves on with its state intact.
    """
    progress = progress or Progress()
    switched: list[float] = []
    if isinstance(uri, FileUri):
        summary = await save_live(
            bus, backends, uri.path, options, config, progress, on_status=on_status, on_switch_over=switched.append,
            switch_over=switch_over, max_bandwidth=max_bandwidth, verify=verify, close_timeout=close_timeout,
        )  # fmt: skip
        return MigrationSummary(str(uri), summary, 0, summary.downtime, None)
    if qemu is not None:
        config = replace(config or PreCopyConfig(), wait_for_trigger=True)
        switch_over = switch_over or asyncio.Event()
    progress.phase = "connecting"
    conn = await connect(uri, tls=tls, connect_timeout=timeouts.connect, io_timeout=timeouts.io)
    answer: asyncio.Future[Message] | None = None
    helpers: list[asyncio.Future[Any]] = []
    try:
        if on_connected is not None:
            on_connected(conn)
        reader = MessageReader()
        began = time.monotonic()
        ready = await _handshake(conn, backends, reader)
        handover = _handover(conn, ready, time.monotonic() - began)
        made: list[WireWriter] = []
        answer = asyncio.ensure_future(_answer(conn, reader, made))
        watch: asyncio.Future[Any] = answer
        if qemu is not None:
            await qemu.start()
            helpers.append(asyncio.ensure_future(_relay(qemu.pre_switchover, switch_over)))
            watch = asyncio.ensure_future(_first_failure(answer, qemu.failed))
            helpers.append(watch)
        writer = WireWriter(conn, answer, timeouts.ack, handover=handover)
        made.append(writer)
        summary = await save_live(
            bus, backends, writer, options, config, progress, on_status=on_status, on_switch_over=switched.append,
            switch_over=switch_over, watch=watch, max_bandwidth=max_bandwidth, verify=verify,
            close_timeout=close_timeout,
        )  # fmt: skip
        downtime = writer.acked_at - switched[0] if switched and writer.acked_at else None
        ack_wait = writer.acked_at - writer.footer_sent_at if writer.acked_at and writer.footer_sent_at else None
        if qemu is not None:
            progress.phase = "qemu"
            try:
                await qemu.finish()
            except BaseException:
                # The destination's back-ends committed, but the VM does not
                # move: ours are stopped with their state, and serve on.
                for backend in backends:
                    await wait_regardless(asyncio.ensure_future(resume(bus, backend)))
                raise
        return MigrationSummary(str(uri), summary, conn.sent, downtime, ack_wait)
    except BaseException:
        if qemu is not None:
            await wait_regardless(asyncio.ensure_future(qemu.cancel()))
        raise
    finally:
        for helper in helpers:
            helper.cancel()
        for task in [*helpers, *([answer] if answer is not None else [])]:
            if not task.done():
                task.cancel()
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # retrieved: save_live raised the one that matters
        if qemu is not None:
            await qemu.close()
        await conn.close()


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _first_failure(answer: asyncio.Future[Message], failed: asyncio.Future[None]) -> Message:
    """The destination's answer, unless QEMU's migration fails first."""
    await asyncio.wait({answer, failed}, return_when=asyncio.FIRST_COMPLETED)
    if failed.done() and not failed.cancelled():
        failed.result()
    return await answer
