"""A migration's connection: TCP (with TLS, or plain when asked), unix, exec, stdio.

Everything here runs on the event loop (asyncio streams), so that TLS, the
peer's messages and a cancellation are all handled in one thread; the
pumps, which run in worker threads, send through :meth:`Connection.send_from_thread`.

Every wait has an end: connecting (``connect_timeout``), accepting
(``accept_timeout``), the TLS handshake (``connect_timeout``), and every
send or receive (``io_timeout``: no progress for that long fails it).  A TCP
connection also sets keep-alives and ``TCP_USER_TIMEOUT`` from
``io_timeout``, so that a cut link is noticed even while nothing is being
sent.

TLS, in the shape of QEMU's ``tls-creds-x509`` directory: ``ca-cert.pem`` to
verify the peer, ``server-cert.pem`` and ``server-key.pem`` on the
destination, ``client-cert.pem`` and ``client-key.pem`` on the source.  Each
side verifies the other against the CA; the source also checks the
destination's certificate names the host it connects to (or
``--tls-hostname``).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import ssl
import stat
import struct
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import LinkFailed
from .uri import ExecUri, FileUri, StdioUri, TcpUri, UnixUri, Uri

CONNECT_TIMEOUT = 30.0
"""Default seconds to connect (and finish the TLS handshake)."""
ACCEPT_TIMEOUT = 600.0
"""Default seconds ``incoming`` waits for its source to connect."""
IO_TIMEOUT = 30.0
"""Default seconds a send or a receive may make no progress."""

BUFFER = 1 << 20
"""Bytes buffered per direction before reading pauses or a send waits.  Small:
whatever is buffered at the switch-over still has to cross, and the plan's
expected downtime does not see it (a larger buffer measured no faster)."""

CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"


@dataclass(frozen=True, slots=True)
class TlsCreds:
    """A directory of x509 credentials, as QEMU's ``tls-creds-x509`` ``dir``."""

    directory: str
    hostname: str | None = None
    """The name the destination's certificate must carry (default: the URI's host)."""

    def client_context(self) -> ssl.SSLContext:
        """The source's context: its client certificate; verifies the destination's.

        Raises:
            FileNotFoundError: a file of the directory is missing (named).
            ssl.SSLError: a file is not a certificate or key.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        return self._load(context, CLIENT_CERT, CLIENT_KEY)

    def server_context(self) -> ssl.SSLContext:
        """The destination's context: its server certificate; requires and verifies the source's."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED
        return self._load(context, SERVER_CERT, SERVER_KEY)

    def _load(self, context: ssl.SSLContext, cert: str, key: str) -> ssl.SSLContext:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        ca, cert, key = (self._file(name) for name in (CA_CERT, cert, key))
        try:
            context.load_verify_locations(ca)
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ssl.SSLError(f"the TLS credentials in {self.directory} cannot be used: {exc}") from exc
        return context

    def _file(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                2, f"the TLS credentials directory {self.directory} has no {name} (expected {CA_CERT}, "
                f"{SERVER_CERT} and {SERVER_KEY} on the destination, {CA_CERT}, {CLIENT_CERT} and {CLIENT_KEY} "
                "on the source)", path,
            )
        return path


class Connection:
    """One migration connection: bytes both ways, every wait bounded.

    Args:
        peer: how messages name the other end (``tcp:10.0.0.2:4444``).
        io_timeout: seconds a send or a receive may make no progress.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, io_timeout: float = IO_TIMEOUT,
        *, process: asyncio.subprocess.Process | None = None, on_close: Callable[[], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.io_timeout = io_timeout
        self._process = process
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._dropped: LinkFailed | None = None
        self.sent = 0
        """Bytes sent so far."""
        try:
            writer.transport.set_write_buffer_limits(high=BUFFER)
        except (AttributeError, NotImplementedError):
            pass

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (copied: the caller may reuse its buffer at once).

        Raises:
            LinkFailed: the connection is lost, or the send made no progress
                for ``io_timeout`` seconds.
        """
        self.queue(data)
        await self.drain()

    def queue(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` to what goes out, without waiting (on the loop's thread)."""
        if self.writer.transport.is_closing():
            return  # drain() says why
        self.writer.write(bytes(data))
        self.sent += len(data)

    async def drain(self) -> None:
        """Wait until what was queued is down to the buffer's size.

        Raises:
            LinkFailed: as :meth:`send`.
        """
        if self.writer.transport.is_closing():
            raise LinkFailed(f"the connection to {self.peer} was lost (closed)")
        try:
            async with asyncio.timeout(self.io_timeout):
                await self.writer.drain()
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            if isinstance(exc, TimeoutError) and exc.errno is None:  # our own timeout, not ETIMEDOUT
                self._dropped = LinkFailed(
                    f"the link to {self.peer} took nothing for {self.io_timeout:g} s (the I/O timeout): "
                    "is it down, or the peer stuck?"
                )
                self.abort()
                raise self._dropped from None
            raise LinkFailed(f"the connection to {self.peer} was lost: {_reason(exc)}") from exc

    def unsent(self) -> int:
        """Bytes sent that have not reached the peer, as far as this end can
        see: our buffer and, on TCP, every byte not yet acknowledged (in the
        kernel's send queue, a traffic shaper's queue, or on the wire).  On
        the loop's thread."""
        transport = self.writer.transport
        unsent = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                unsent += _ioctl_int(sock.fileno(), termios.TIOCOUTQ)  # SIOCOUTQ: written, not yet acknowledged
            except (OSError, ValueError):  # closed meanwhile
                pass
        return unsent

    def unread(self) -> int:
        """Bytes that reached this end and that we have not read yet: the
        kernel's receive queue and our reader's buffer.  On the loop's thread."""
        # asyncio's StreamReader counts neither publicly: its buffer and its
        # transport are what it keeps them in.
        unread = len(getattr(self.reader, "_buffer", b""))
        transport = getattr(self.reader, "_transport", None)
        end = None if transport is None else transport.get_extra_info("socket") or transport.get_extra_info("pipe")
        try:
            unread += _ioctl_int(end.fileno(), termios.FIONREAD) if end is not None else 0
        except (OSError, ValueError):  # closed meanwhile
            pass
        return unread

    def round_trip(self) -> float:
        """The link's round-trip time as TCP measures it (its smoothed RTT),
        in seconds; 0 on a local socket, or where TCP cannot tell."""
        sock = self.writer.transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return 0.0
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_RTT + 4)
        except (OSError, ValueError):
            return 0.0
        return struct.unpack_from("I", info, _TCP_INFO_RTT)[0] / 1e6

    def queue_from_thread(self, data: bytes | bytearray | memoryview) -> None:
        """:meth:`queue` from a worker thread: pieces queued this way go out
        in the order of the calls (the loop runs its callbacks in order)."""
        self._loop.call_soon_threadsafe(self.queue, bytes(data))

    def drain_from_thread(self) -> None:
        """:meth:`drain` from a worker thread."""
        asyncio.run_coroutine_threadsafe(self.drain(), self._loop).result()

    async def recv(self, size: int, timeout: float | None = -1.0) -> bytes:
        """Receive up to ``size`` bytes; b"" at the end of the connection.

        Args:
            timeout: seconds to wait (default ``io_timeout``; None: no bound).

        Raises:
            LinkFailed: lost, nothing came within the timeout, or we dropped
                the connection because a send timed out (that send's error).
        """
        timeout = self.io_timeout if timeout is not None and timeout < 0 else timeout
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(size)
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            if isinstance(exc, TimeoutError) and exc.errno is None:  # our own timeout, not ETIMEDOUT
                raise LinkFailed(
                    f"nothing came from {self.peer} for {timeout:g} s (the I/O timeout): is the link down, "
                    "or the peer stuck?"
                ) from None
            raise LinkFailed(f"the connection to {self.peer} was lost: {_reason(exc)}") from exc
        if not data and self._dropped is not None:
            # The end of a connection we dropped because a send timed out: a
            # wait for the peer's answer must say that, not that the peer
            # left (it may only be stopped, or its link down).
            raise LinkFailed(str(self._dropped))
        return data

    def abort(self) -> None:
        """Drop the connection at once (on the loop's thread)."""
        self.writer.transport.abort()

    def abort_from_thread(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self.abort)
        except RuntimeError:  # the loop has closed
            pass

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection (and end an exec: command); never raises."""
        try:
            if not self.writer.transport.is_closing():
                self.writer.close()
            async with asyncio.timeout(timeout):
                await self.writer.wait_closed()
        except (Exception, asyncio.TimeoutError):
            self.abort()
        if self._process is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._process.wait()
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


_TCP_INFO_RTT = 68
"""Offset of ``tcpi_rtt`` (microseconds) in Linux's ``struct tcp_info``:
eight one-byte fields, then fifteen 32-bit ones before it."""


def pipe_fill(fd: int) -> int:
    """Bytes in the pipe (either end) ``fd``; 0 if it cannot tell."""
    try:
        return _ioctl_int(fd, termios.FIONREAD)
    except OSError:
        return 0


def _ioctl_int(fd: int, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the peer's certificate does not verify: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    return os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else (str(exc) or type(exc).__name__)


def _tune(writer: asyncio.StreamWriter, io_timeout: float) -> None:
    """Keep-alives and a user timeout on TCP: a dead link fails within about ``io_timeout``."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    step = max(1, int(io_timeout / 3))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, step)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, step // 2))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(io_timeout * 1000))


async def connect(
    uri: Uri, *, tls: TlsCreds | None = None, connect_timeout: float = CONNECT_TIMEOUT, io_timeout: float = IO_TIMEOUT,
) -> Connection:
    """Connect to a destination (``migrate``).

    Raises:
        LinkFailed: it cannot be reached, TLS fails, or the timeout passed.
        FileNotFoundError, ssl.SSLError: ``tls`` cannot be used.
    """
    if isinstance(uri, ExecUri):
        return await _exec(uri, io_timeout)
    if isinstance(uri, StdioUri | FileUri):
        raise ValueError(f"connect() takes no {uri}")
    context = tls.client_context() if tls is not None else None
    try:
        if isinstance(uri, TcpUri):
            opening = asyncio.open_connection(
                uri.host, uri.port, limit=BUFFER, ssl=context,
                server_hostname=(tls.hostname or uri.host) if tls is not None else None,
                ssl_handshake_timeout=connect_timeout if context else None,
            )  # fmt: skip
        else:
            if context is not None:
                raise ValueError("TLS is for tcp: (a unix socket is protected by its file permissions)")
            opening = asyncio.open_unix_connection(uri.path, limit=BUFFER)
        async with asyncio.timeout(connect_timeout):
            reader, writer = await opening
    except TimeoutError:
        raise LinkFailed(f"cannot connect to {uri}: no answer within {connect_timeout:g} s (the connect timeout)") from None
    except (OSError, ssl.SSLError) as exc:
        raise LinkFailed(f"cannot connect to {uri}: {_reason(exc)}") from exc
    _tune(writer, io_timeout)
    return Connection(reader, writer, str(uri), io_timeout)


async def _exec(uri: ExecUri, io_timeout: float) -> Connection:
    """Run the command with a socket as its standard input and output."""
    ours, theirs = socket.socketpair()
    try:
        process = await asyncio.create_subprocess_shell(uri.command, stdin=theirs, stdout=theirs)
    except OSError as exc:
        ours.close()
        raise LinkFailed(f"cannot run {uri}: {_reason(exc)}") from exc
    finally:
        theirs.close()
    reader, writer = await asyncio.open_connection(sock=ours, limit=BUFFER)
    return Connection(reader, writer, str(uri), io_timeout, process=process)


class Listener:
    """Where ``incoming`` waits for its one source.

    Attributes:
        address: the URI to give ``migrate`` (with the port chosen for port 0).
    """

    def __init__(self, uri: Uri, tls: TlsCreds | None, connect_timeout: float, io_timeout: float) -> None:
        self.uri = uri
        self.address = str(uri)
        self._tls = tls.server_context() if tls is not None else None
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        self._sock: socket.socket | None = None
        self._unlink: str | None = None

    def start(self) -> Listener:
        uri = self.uri
        try:
            if isinstance(uri, TcpUri):
                if uri.host:
                    family = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
                    self._sock = socket.create_server((uri.host, uri.port), family=family)
                elif socket.has_dualstack_ipv6():
                    self._sock = socket.create_server(("", uri.port), family=socket.AF_INET6, dualstack_ipv6=True)
                else:
                    self._sock = socket.create_server(("", uri.port))
                host, port = self._sock.getsockname()[:2]
                self.address = str(TcpUri(uri.host or host, port))
            elif isinstance(uri, UnixUri):
                if self._tls is not None:
                    raise ValueError("TLS is for tcp: (a unix socket is protected by its file permissions)")
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                self._sock.bind(uri.path)
                self._unlink = uri.path
                self._sock.listen(1)
        except OSError as exc:
            if self._sock is not None:
                self._sock.close()
            raise LinkFailed(f"cannot listen on {uri}: {_reason(exc)}") from exc
        if self._sock is not None:
            self._sock.setblocking(False)
        return self

    async def accept(self, timeout: float | None = ACCEPT_TIMEOUT) -> Connection:
        """Wait for the source (one only: the listener closes once it came).

        Raises:
            LinkFailed: no source within ``timeout``, or its TLS handshake failed.
        """
        if isinstance(self.uri, ExecUri):
            return await _exec(self.uri, self._io_timeout)
        if isinstance(self.uri, StdioUri):
            return await _stdio(self._io_timeout)
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                sock, peer = await loop.sock_accept(self._sock)
        except TimeoutError:
            raise LinkFailed(f"no source connected to {self.address} within {timeout:g} s (the accept timeout)") from None
        finally:
            await self.close()
        name = f"{self.address} (from {_peer_text(peer)})"
        reader = asyncio.StreamReader(limit=BUFFER)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            async with asyncio.timeout(self._connect_timeout + 1):
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=self._tls,
                    ssl_handshake_timeout=self._connect_timeout if self._tls else None,
                )  # fmt: skip
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            sock.close()
            why = f"no handshake within {self._connect_timeout:g} s" if isinstance(exc, TimeoutError) else _reason(exc)
            raise LinkFailed(f"the TLS handshake with the source on {name} failed: {why}") from exc
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        _tune(writer, self._io_timeout)
        return Connection(reader, writer, name, self._io_timeout)

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._unlink is not None:
            try:
                os.unlink(self._unlink)
            except FileNotFoundError:
                pass
            self._unlink = None


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return "a local process"


async def listen(
    uri: Uri, *, tls: TlsCreds | None = None, connect_timeout: float = CONNECT_TIMEOUT, io_timeout: float = IO_TIMEOUT,
) -> Listener:
    """Start listening for the source (``incoming``); :meth:`Listener.accept` waits for it.

    Raises:
        LinkFailed: the address cannot be listened on.
        FileNotFoundError, ssl.SSLError: ``tls`` cannot be used.
    """
    if isinstance(uri, FileUri):
        raise ValueError(f"listen() takes no {uri}")
    return Listener(uri, tls, connect_timeout, io_timeout).start()


async def _stdio(io_timeout: float) -> Connection:
    """Our own standard input and output, for the far end of ``exec:``.

    Standard output then carries the migration only: what the command would
    print there goes to standard error instead.  One socket as both (as
    ``exec:`` gives, and ssh may) is used as a socket; otherwise two pipes.
    """
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.dup(0), os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    into, out = os.fstat(read_fd), os.fstat(write_fd)
    if stat.S_ISSOCK(into.st_mode) and (into.st_dev, into.st_ino) == (out.st_dev, out.st_ino):
        os.close(write_fd)
        reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=read_fd), limit=BUFFER)
        return Connection(reader, writer, "stdio:", io_timeout)
    reader = asyncio.StreamReader(limit=BUFFER)
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0),
    )
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), os.fdopen(write_fd, "wb", buffering=0),
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return Connection(reader, writer, "stdio:", io_timeout, on_close=read_transport.close)
