"""``dbus-vmstate2 migrate`` and ``incoming``: arguments, output and exit codes.

The work is in :mod:`dbus_vmstate2.vmm.migrate` and
:mod:`dbus_vmstate2.vmm.incoming`; this module only declares the options
(the pre-copy ones are ``save --live``'s, by the same helpers) and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from .cli import (
    EXIT_OK,
    _add_bus_options,
    _add_json,
    _add_stall_timeout,
    _err,
    _json,
    _on_bus,
    _out,
    _positive,
    add_live_options,
    add_save_options,
    precopy_config,
    save_options,
)
from .display import StatusLine, live_line, progress_line
from .units import duration, size
from .vmm import Progress, Session
from .vmm.incoming import IncomingSummary, IncomingTimeouts, incoming
from .vmm.migrate import ACK_TIMEOUT, MigrationSummary, Timeouts, migrate
from .vmm.precopy import Status
from .vmm.qemu import QEMU_TIMEOUT, QemuDestination, QemuSource
from .vmm.pump import CLOSE_TIMEOUT
from .vmm.loading import load_from_file
from .vmm.transport import ACCEPT_TIMEOUT, CONNECT_TIMEOUT, IO_TIMEOUT, Listener, TlsCreds
from .vmm.uri import BadUri, FileUri, StdioUri, TcpUri, Uri, parse_uri

_TRANSPORTS = (
    "URI: tcp:HOST:PORT (TLS with --tls-creds, or plain with --insecure-plain-tcp), unix:PATH, exec:COMMAND "
    "(talk over its standard input and output, e.g. exec:'ssh HOST dbus-vmstate2 incoming stdio:'), file:PATH"
)


def _uri(incoming: bool):
    def parse(text: str) -> Uri:
        try:
            return parse_uri(text, incoming=incoming)
        except BadUri as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _add_link_options(p: argparse.ArgumentParser, side: str) -> argparse._ArgumentGroup:
    link = p.add_argument_group(
        "the link",
        "tcp: carries the state in TLS, each side verifying the other against the CA, unless "
        "--insecure-plain-tcp says otherwise; unix: and exec: (ssh) rely on the socket's permissions and on ssh.",
    )
    files = "ca-cert.pem, client-cert.pem and client-key.pem" if side == "source" else "ca-cert.pem, server-cert.pem and server-key.pem"
    link.add_argument("--tls-creds", metavar="DIR",
                      help=f"x509 credentials, as QEMU's tls-creds-x509 directory: {files}")
    if side == "source":
        link.add_argument("--tls-hostname", metavar="NAME",
                          help="the name the destination's certificate must carry (default: the URI's host)")
    link.add_argument("--insecure-plain-tcp", action="store_true",
                      help="allow tcp: without TLS: the state crosses unencrypted and neither side is authenticated "
                      "(loopback, or a private network you trust)")
    link.add_argument("--connect-timeout", type=_positive(float), default=CONNECT_TIMEOUT, metavar="S",
                      help=f"to connect and finish the TLS handshake (default {CONNECT_TIMEOUT:g})")
    link.add_argument("--io-timeout", type=_positive(float), default=IO_TIMEOUT, metavar="S",
                      help=f"fail when the link moves nothing for S seconds while we send or wait for the peer's "
                      f"next message; also bounds a dead TCP link (default {IO_TIMEOUT:g})")
    return link


def _tls(args: argparse.Namespace) -> TlsCreds | None:
    """The TLS credentials to use; refuses an unsafe or meaningless combination (exit 2)."""
    uri = args.uri
    if args.tls_creds is not None:
        if not isinstance(uri, TcpUri):
            raise argparse.ArgumentTypeError(f"--tls-creds is for tcp: URIs, not {uri}")
        return TlsCreds(args.tls_creds, getattr(args, "tls_hostname", None))
    if isinstance(uri, TcpUri) and not args.insecure_plain_tcp:
        raise argparse.ArgumentTypeError(
            f"{uri} needs --tls-creds DIR (TLS, each side verifying the other), or --insecure-plain-tcp to send "
            "the state unencrypted and unauthenticated"
        )
    return None


def _usage(args: argparse.Namespace, message: str) -> int:
    _err(f"dbus-vmstate2 {args.command}: {message}")
    return 2


# migrate --------------------------------------------------------------------------


def add_migrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate", help="migrate the back-ends' state live to another host",
        description="Migrate every back-end on the bus (or --id-list) live to 'dbus-vmstate2 incoming' at URI: "
        "pre-copy while the daemons serve on, then stop-copy within the downtime limit, all over one connection "
        "(the bytes of a saved file). The destination loads every back-end all or nothing and acknowledges; until "
        "then any failure resumes every back-end here, state intact. After success the back-ends here stay "
        "stopped (their state lives on at the destination). SIGUSR1 switches over at once.",
        epilog=_TRANSPORTS,
    )
    p.add_argument("uri", type=_uri(False), metavar="URI", help="where the destination listens (see below)")
    _add_bus_options(p)
    add_save_options(p)
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="only skim each stream here (the destination verifies every stream in any case)")
    p.add_argument("--close-timeout", type=_positive(float), default=CLOSE_TIMEOUT, metavar="S",
                   help=f"how long a back-end has to close its end of the pipe once its stream has ended "
                   f"(default {CLOSE_TIMEOUT:g})")
    _add_stall_timeout(p, "with something pending sends nothing")
    add_live_options(p.add_argument_group("pre-copy", "As for save --live."))
    link = _add_link_options(p, "source")
    link.add_argument("--ack-timeout", type=_positive(float), default=ACK_TIMEOUT, metavar="S",
                      help=f"how long to wait, once everything is sent, for the destination's acknowledgement "
                      f"(its verification and commit; default {ACK_TIMEOUT:g})")
    qemu = p.add_argument_group(
        "in step with QEMU",
        "With --qmp, QEMU's own migration (to --qemu-uri) runs beside ours and paces it: pre-switchover is "
        "enabled, the back-ends switch over when QEMU has stopped the VM, and QEMU continues only once the "
        "destination acknowledged; any failure cancels QEMU's migration (the source VM runs on).",
    )
    qemu.add_argument("--qmp", metavar="PATH", help="the source QEMU's QMP unix socket")
    qemu.add_argument("--qemu-uri", metavar="URI", help="where QEMU migrates its own state (its migrate URI)")
    qemu.add_argument("--qemu-timeout", type=_positive(float), default=QEMU_TIMEOUT, metavar="S",
                      help=f"for QEMU to complete its migration after migrate-continue (default {QEMU_TIMEOUT:g})")
    _add_json(p)
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    try:
        tls = _tls(args)
    except argparse.ArgumentTypeError as exc:
        return _usage(args, str(exc))
    if (args.qmp is None) != (args.qemu_uri is None):
        return _usage(args, "--qmp and --qemu-uri go together")
    if args.qmp is not None and isinstance(args.uri, FileUri):
        return _usage(args, "--qmp is for a migration to another host, not file:")
    config = precopy_config(args)
    timeouts = Timeouts(connect=args.connect_timeout, io=args.io_timeout, ack=args.ack_timeout)
    progress = Progress()
    latest: list[Status] = []
    where = str(args.uri)

    async def run(session: Session) -> MigrationSummary:
        switch_over = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, switch_over.set)
        try:
            async with StatusLine(lambda now: _migrate_line(latest, progress, where, now), lambda: progress.phase):
                qemu = QemuSource(args.qmp, args.qemu_uri, args.qemu_timeout) if args.qmp else None
                return await migrate(
                    session.bus, session.backends, args.uri, save_options(args), config, progress, tls=tls,
                    timeouts=timeouts, on_status=lambda s: latest.__setitem__(slice(None), [s]),
                    switch_over=switch_over, max_bandwidth=args.max_bandwidth, verify=args.verify,
                    close_timeout=args.close_timeout, qemu=qemu,
                )  # fmt: skip
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    summary = _on_bus(args, run, require=True)
    if args.json:
        _json({"command": "migrate", **summary.as_dict()})
    else:
        live = summary.live
        down = f"{summary.downtime * 1000:.0f} ms" if summary.downtime is not None else "unknown"
        stop = f"{live.downtime * 1000:.0f} ms" if live.downtime is not None else "unknown"
        _out(
            f"migrated {len(live.backends)} back-end(s) to {summary.uri}: {size(live.stream_bytes)} in {live.rounds} "
            f"round(s) over {live.total_time:.1f} s; downtime {down} from quiesce to the destination's "
            f"acknowledgement (stop-copy {stop}, limit {live.downtime_limit * 1000:.0f} ms, {live.switch_reason}); "
            "the back-ends here are stopped" + ("; QEMU's migration completed" if args.qmp else "")
        )
    return EXIT_OK


def _migrate_line(latest: list[Status], progress: Progress, where: str, now: float) -> str:
    if progress.phase == "connecting":
        return f"connecting to {where}..."
    if progress.phase == "syncing":
        return f"waiting for {where} to verify and commit..."
    if progress.phase == "qemu":
        return "the back-ends moved; waiting for QEMU's migration to complete..."
    return live_line(latest[-1] if latest else None, progress, where, now).replace("live save", "migration", 1)


# incoming -------------------------------------------------------------------------


def add_incoming(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "incoming", help="receive a migration and load it, all or nothing",
        description="Wait at URI for one 'dbus-vmstate2 migrate', check that this bus has exactly the back-ends "
        "it sends, and load them all or nothing: each back-end verifies and stages its stream, and they commit "
        "together only once the whole transfer verified; then the source gets its acknowledgement. On any "
        "failure every back-end here keeps its previous state, and the source is told why. Prints the address "
        "it listens on to standard error (with the port chosen for tcp:HOST:0).",
        epilog=_TRANSPORTS.replace("file:PATH", "file:PATH (a load), stdio: (our own standard input and output, "
                                   "for exec: at the source; the command's output then goes to standard error)"),
    )
    p.add_argument("uri", type=_uri(True), metavar="URI", help="where to listen (tcp::PORT listens on every address)")
    _add_bus_options(p)
    _add_stall_timeout(p, "reads nothing of its stream")
    link = _add_link_options(p, "destination")
    link.add_argument("--accept-timeout", type=_positive(float), default=ACCEPT_TIMEOUT, metavar="S",
                      help=f"how long to wait for the source to connect (default {ACCEPT_TIMEOUT:g})")
    p.add_argument("--commit-timeout", type=_positive(float), default=60.0, metavar="S",
                   help="how long a back-end holds its staged load waiting for the commit (default 60)")
    qemu = p.add_argument_group(
        "in step with QEMU",
        "With --qmp (QEMU started with -S and -incoming), the VM is resumed (cont) only once QEMU's incoming "
        "migration completed and every back-end committed; on any failure it stays stopped.",
    )
    qemu.add_argument("--qmp", metavar="PATH", help="the destination QEMU's QMP unix socket")
    qemu.add_argument("--qemu-timeout", type=_positive(float), default=QEMU_TIMEOUT, metavar="S",
                      help=f"for QEMU's incoming migration to complete once the back-ends committed "
                      f"(default {QEMU_TIMEOUT:g})")
    _add_json(p)
    p.set_defaults(func=cmd_incoming)


def cmd_incoming(args: argparse.Namespace) -> int:
    try:
        tls = _tls(args)
    except argparse.ArgumentTypeError as exc:
        return _usage(args, str(exc))
    if isinstance(args.uri, StdioUri) and args.json:
        return _usage(args, "--json cannot go with stdio: (standard output carries the migration)")
    if isinstance(args.uri, FileUri):
        if args.qmp:
            return _usage(args, "--qmp is for a migration from another host, not file:")
        return _incoming_file(args)
    timeouts = IncomingTimeouts(accept=args.accept_timeout, connect=args.connect_timeout, io=args.io_timeout,
                                stall=args.stall_timeout, commit=args.commit_timeout)  # fmt: skip
    progress = Progress()
    listening: list[str] = []

    def on_listening(listener: Listener) -> None:
        listening.append(listener.address)
        if not isinstance(args.uri, StdioUri):
            _err(f"dbus-vmstate2 incoming: listening on {listener.address}")

    async def run(session: Session) -> IncomingSummary:
        async with StatusLine(lambda now: _incoming_line(progress, listening, now), lambda: progress.phase):
            qemu = QemuDestination(args.qmp, args.qemu_timeout) if args.qmp else None
            return await incoming(session.bus, session.backends, args.uri, progress, tls=tls, timeouts=timeouts,
                                  on_listening=on_listening, qemu=qemu)  # fmt: skip

    summary = _on_bus(args, run, require=True)
    if args.json:
        _json({"command": "incoming", "uri": listening[0] if listening else str(args.uri), **summary.as_dict()})
    else:
        raw = sum(i.raw_bytes for i in summary.streams)
        text = (f"received {len(summary.streams)} back-end(s), {size(raw)} of state, from {summary.source} in "
                f"{duration(summary.seconds)}; every back-end committed"
                + ("; QEMU's migration completed and the VM resumed" if args.qmp else ""))  # fmt: skip
        (_err if isinstance(args.uri, StdioUri) else _out)(text)
    return EXIT_OK


def _incoming_line(progress: Progress, listening: list[str], now: float) -> str:
    if progress.phase == "waiting":
        return f"waiting for the source on {listening[0] if listening else '...'}"
    if progress.phase == "receiving":
        done = sum(progress.done.values())
        elapsed = now - progress.started
        return f"receiving {progress.backends} back-end(s): {size(done)}, {size(done / elapsed if elapsed > 0 else 0)}/s"
    if progress.phase == "committing":
        return "every stream verified; committing every back-end..."
    if progress.phase == "qemu":
        return "every back-end committed; waiting for QEMU's incoming migration to complete..."
    return f"{progress.phase}..."


def _incoming_file(args: argparse.Namespace) -> int:
    path = args.uri.path
    progress = Progress()
    started = time.monotonic()

    async def run(session: Session) -> list:
        async with StatusLine(lambda now: progress_line(progress, path, now), lambda: progress.phase):
            return await load_from_file(session.bus, session.backends, path, progress, stall_timeout=args.stall_timeout)

    infos = _on_bus(args, run, require=True)
    if args.json:
        _json({"command": "incoming", "uri": str(args.uri), "seconds": round(time.monotonic() - started, 3),
               "backends": [{"id": i.backend_id, "raw_bytes": i.raw_bytes, "stream_bytes": i.stream_bytes} for i in infos]})
    else:
        _out(f"loaded {len(infos)} back-end(s), {size(sum(i.raw_bytes for i in infos))} of state, from {path}")
    return EXIT_OK
