"""``dbus-vmstate2``: argument parsing, output and exit codes only.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its
arguments and sets ``func`` to a ``cmd_<name>(args) -> int`` handler; the
handlers raise our typed errors and :func:`main` turns every exception into
an exit code in exactly one place (:func:`exit_code_for`).  The work on the
bus is in :mod:`dbus_vmstate2.vmm`; SIGINT and SIGTERM are caught by
:mod:`dbus_vmstate2.entry`, the installed command's entry point, which runs
this module's :func:`main`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from dbus_fast import Variant

from . import entry
from .display import StatusLine, live_line, progress_line
from .units import parse_size, size
from .errors import LinkFailed, PeerRefused, StreamError, VMStateError
from .stream.container import StreamInfo
from .vmm import (
    CancelReport,
    Progress,
    ResetReport,
    Session,
    StatusReport,
    cancel_latest,
    describe,
    load_from_file,
    open_session,
    reset,
    resume,
    save_to_file,
    status,
)
from .vmm.live import save_live
from .vmm.qemu import QemuFailed
from .vmm.pump import CLOSE_TIMEOUT
from .vmm.transfers import STALL_TIMEOUT
from .vmm.precopy import PreCopyConfig, Status, Summary
from .vmm.savefile import SaveFileReader, read_index, save_target, verify_streams

T = TypeVar("T")

EXIT_OK = 0
EXIT_BACKEND_FAILED = 1
EXIT_USAGE = 2
EXIT_CORRUPT = 3
EXIT_MIGRATION = 4
EXIT_INTERRUPTED = entry.EXIT_INTERRUPTED  # 130, as a shell reports SIGINT
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE  # 141, as a shell reports a tool killed by SIGPIPE


class StdoutClosed(Exception):
    """Standard output was closed before all of the output was written (``| head``)."""


# First match wins, so subclasses come before their bases.
_EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (KeyboardInterrupt, EXIT_INTERRUPTED),  # SIGINT or SIGTERM (see entry.py)
    (StdoutClosed, EXIT_STDOUT_CLOSED),
    (LinkFailed, EXIT_MIGRATION),  # a migration's connection failed or timed out
    (QemuFailed, EXIT_MIGRATION),  # QEMU's side of a coordinated migration failed
    (PeerRefused, EXIT_MIGRATION),  # a migration's destination refused or failed
    (StreamError, EXIT_CORRUPT),  # a corrupt, truncated or mismatched saved file (a back-end's bad stream: BackendFailed)
    (VMStateError, EXIT_BACKEND_FAILED),  # a back-end refused or failed, or is missing
    (OSError, EXIT_USAGE),  # a file or bus named on the command line cannot be used
]


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code for an error, or None if it is a bug (let it propagate)."""
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return None


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="dbus-vmstate2",
        description="List, save, load, inspect and migrate the device state of D-Bus VMState back-ends.",
        epilog="Exit codes: 0 ok, 1 a back-end failed or is missing (or sent a stream that does not verify), "
        "2 usage error or unusable file or bus, 3 corrupt or mismatched saved file or stream, 4 a migration's "
        "link, destination or QEMU failed (the source runs on), 130 interrupted, "
        "141 standard output closed.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list(sub)
    _add_status(sub)
    _add_save(sub)
    _add_load(sub)
    _add_cancel(sub)
    _add_reset(sub)
    _add_resume(sub)
    _add_inspect(sub)
    from .cli_migrate import add_incoming, add_migrate  # it uses this module's helpers

    add_migrate(sub)
    add_incoming(sub)
    return parser


class _VersionAction(argparse._VersionAction):  # its class, so that shtab's completions know it
    """``--version``, which looks the version up only when asked: importing
    importlib.metadata takes 30 to 45 ms, which every command used to pay."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        self.version = f"%(prog)s {_version()}"
        super().__call__(parser, *args)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dbus-vmstate2")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (tests call this directly)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2): argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except BrokenPipeError:  # --help | head -1
        _silence_stdout()
        return EXIT_STDOUT_CLOSED
    try:
        code = args.func(args)
        _flush()
        if entry.received() is not None:  # it came while the work was ending
            raise KeyboardInterrupt
        return code
    except (KeyboardInterrupt, Exception) as exc:
        code = exit_code_for(exc)
        if code is None:
            raise
        _report_failure(args, exc, code)
        return code


def _report_failure(args: argparse.Namespace, exc: BaseException, code: int) -> None:
    """One line on stderr; with --json, an error document on stdout too."""
    if isinstance(exc, StdoutClosed):
        _silence_stdout()  # nobody reads it: say nothing more
        return
    if isinstance(exc, KeyboardInterrupt):
        signum = entry.received() or signal.SIGINT
        message = f"interrupted ({signal.Signals(signum).name})"
    elif isinstance(exc, StreamError):  # a damaged file or stream: name the fault (docs/stream-format.md §6.3)
        message = f"{type(exc).__name__}: {exc}"
    else:
        message = str(exc) or type(exc).__name__
    _err(f"dbus-vmstate2 {args.command}: {message}")
    if getattr(args, "json", False):
        doc: dict[str, Any] = {"command": args.command}
        if hasattr(args, "file"):
            doc["file"] = args.file
        doc["exit_code"] = code
        doc["error"] = _error_doc(exc, message)
        try:
            _out(json.dumps(doc, indent=2))
            _flush()
        except StdoutClosed:
            _silence_stdout()


def _error_doc(exc: BaseException, message: str | None = None) -> dict[str, Any]:
    if isinstance(exc, KeyboardInterrupt):
        kind, dbus_name = "Interrupted", None
    elif isinstance(exc, VMStateError):
        kind, dbus_name = type(exc).__name__, exc.remote_name or exc.dbus_name.value
    else:
        kind, dbus_name = type(exc).__name__, None
    return {"type": kind, "dbus_name": dbus_name, "message": message if message is not None else str(exc)}


# output -----------------------------------------------------------------------


def _out(text: str) -> None:
    """Write a line to stdout.

    Raises:
        StdoutClosed: nobody reads stdout any more.
    """
    try:
        print(text)
    except BrokenPipeError as exc:
        raise StdoutClosed from exc


def _flush() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise StdoutClosed from exc


def _silence_stdout() -> None:
    # Whatever is still buffered must not fail again when Python exits.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _err(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


def _columns(lines: list[list[str]]) -> str:
    """Rows in aligned columns; the last column runs free."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1] for line in lines)


def _json(doc: object) -> None:
    _out(json.dumps(doc, indent=2))


# running on a bus --------------------------------------------------------------


def _add_bus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the D-Bus address of the VM's bus (default: the session bus)")
    p.add_argument(
        "--id-list", type=_id_list, metavar="ID,ID",
        help="only these back-ends, each required (like QEMU's dbus-vmstate id-list)",
    )


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for programs instead of text")


def _id_list(text: str) -> list[str]:
    ids = [i for i in text.split(",") if i]
    if not ids:
        raise argparse.ArgumentTypeError("give at least one Id")
    return ids


def _on_bus(args: argparse.Namespace, work: Callable[[Session], Awaitable[T]], *, require: bool = False) -> T:
    """Connect, find the back-ends, run ``work``, leave."""

    async def run() -> T:
        async with open_session(args.address, args.id_list, require=require) as session:
            return await work(session)

    return _run(run)


def _run(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` in an event loop.  A SIGINT or SIGTERM (see entry.py)
    cancels it, and the operation cleans up before KeyboardInterrupt is raised."""
    running: list[Any] = []  # the loop and the task, once started

    def cancel() -> None:  # in the main thread, between two bytecodes: only schedule
        if running:
            loop, task = running
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop has closed; main() sees entry.received()

    async def main_task() -> T:
        running[:] = [asyncio.get_running_loop(), asyncio.current_task()]
        if entry.received() is not None:
            raise asyncio.CancelledError  # it came before there was a task to cancel
        return await work()

    with entry.deferred(cancel):
        try:
            return asyncio.run(main_task())
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None


# list, status --------------------------------------------------------------------


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list", help="list the back-ends on a bus and what they can do",
        description="List the back-ends queued on org.qemu.VMState1: Id, unique name, State and capabilities.",
    )
    _add_bus_options(p)
    _add_json(p)
    p.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    """Print each back-end's Id, unique name, state and capabilities."""

    async def run(session: Session) -> list[Any]:
        return [await describe(session.bus, b) for b in session.backends]

    statuses = _on_bus(args, run)
    if args.json:
        _json([{"id": s.id, "unique_name": s.unique_name, "state": s.state, "capabilities": s.capabilities} for s in statuses])
        return EXIT_OK
    lines = [["ID", "NAME", "STATE", "CAPABILITIES"]]
    for s in statuses:
        caps = s.capabilities
        summary = (
            f"stream v{','.join(map(str, caps.get('stream-versions', [])))}, {'/'.join(caps.get('compression', []))}, "
            f"records <= {size(caps.get('max-record-size', 0))}, pre-copy {'yes' if caps.get('pre-copy') else 'no'}, "
            f"VMState1 {caps.get('vmstate1', 'stream')}"
        ) if caps else "VMState1 only (<= 1 MiB)"
        lines.append([s.id, s.unique_name, s.state, summary])
    _out(_columns(lines))
    if not statuses:
        _out("(no back-ends on this bus)")
    return EXIT_OK


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="show each back-end's state and latest transfer",
        description="Show each back-end's State and its latest transfer (from Check): its number, whether it "
        "is running, its counters, or the error it failed with.",
    )
    _add_bus_options(p)
    _add_json(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    async def run(session: Session) -> list[StatusReport]:
        return [await status(session.bus, b) for b in session.backends]

    reports = _on_bus(args, run)
    if args.json:
        _json([_status_doc(r) for r in reports])
    else:
        lines = [["ID", "NAME", "STATE", "LATEST TRANSFER"]]
        lines += [[r.id, r.unique_name, r.state, _transfer_text(r)] for r in reports]
        _out(_columns(lines))
        if not reports:
            _out("(no back-ends on this bus)")
    return _exit_code_of(r.error for r in reports)


def _status_doc(r: StatusReport) -> dict[str, Any]:
    transfer = None
    if r.transfer is not None:
        t = r.transfer
        transfer = {
            "number": t.number, "finished": t.finished, "records": t.records, "raw_bytes": t.raw_bytes,
            "stream_bytes": t.stream_bytes, "error": _error_doc(t.error) if t.error else None,
        }  # fmt: skip
    return {"id": r.id, "unique_name": r.unique_name, "state": r.state, "transfer": transfer,
            "error": _error_doc(r.error) if r.error else None}  # fmt: skip


def _transfer_text(r: StatusReport) -> str:
    if r.error is not None:
        return f"cannot ask it: {r.error}"
    t = r.transfer
    if t is None:
        return "none yet" if r.state != "vmstate1-only" else "-"
    if t.error is not None:
        return f"failed: {type(t.error).__name__}: {t.error}"
    counters = f"{t.records} records, {size(t.raw_bytes or 0)} of state, {size(t.stream_bytes or 0)} of stream"
    return f"#{t.number} {'done' if t.finished else 'running'}: {counters}"


def _exit_code_of(errors: Any) -> int:
    """The exit code of the first error of a per-back-end command, 0 if none."""
    for error in errors:
        if error is not None:
            return exit_code_for(error) or EXIT_BACKEND_FAILED
    return EXIT_OK


# save, load ---------------------------------------------------------------------


def _add_save(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "save", help="save the back-ends' state to a file",
        description="Save every back-end on the bus (or --id-list) through VMState2, in parallel, into one file. "
        "The file appears only once every back-end's stream has verified (a temporary file in the same "
        "directory, fsynced, renamed), so FILE must be a regular file or a new name: a FIFO, a device, "
        "a directory or a dangling link is refused; a link to a regular file is followed.",
    )
    p.add_argument("file", help="the file to write (replaced atomically)")
    _add_bus_options(p)
    add_save_options(p)
    p.add_argument(
        "--no-verify", dest="verify", action="store_false",
        help="only skim each stream as it arrives (framing, counts, digest), without decoding its payloads: "
        "exit 0 then no longer proves that the file will load",
    )
    p.add_argument(
        "--close-timeout", type=_positive(float), default=CLOSE_TIMEOUT, metavar="S",
        help=f"how long a back-end has to close its end of the pipe once its stream has ended or it reported "
        f"its transfer finished (default {CLOSE_TIMEOUT:g})",
    )
    _add_stall_timeout(p, "sends nothing in the middle of its stream")
    live = p.add_argument_group(
        "live save",
        "--live saves iteratively: the daemons serve on while their state is sent, then the changes, round "
        "after round, until what is left fits the downtime limit at the measured rate; then each back-end is "
        "quiesced (stop-copy) and the rest written. SIGUSR1 switches over at once. The back-ends stay stopped "
        "afterwards, their state frozen as saved, unless --resume.",
    )
    live.add_argument("--live", action="store_true", help="save iteratively while the back-ends run (pre-copy)")
    add_live_options(live)
    live.add_argument("--resume", action="store_true", help="resume the back-ends once the file is saved")
    _add_json(p)
    p.set_defaults(func=cmd_save)


def add_live_options(live: argparse._ArgumentGroup) -> None:
    """The pre-copy options of ``save --live`` and ``migrate``: one set of names."""
    live.add_argument("--downtime-limit", type=_positive(float), default=300.0, metavar="MS",
                      help="the longest acceptable stop-copy, in milliseconds (default 300, as QEMU's)")
    live.add_argument("--max-rounds", type=_positive(int), default=30, metavar="N",
                      help="rounds of changed data before giving up on converging (default 30)")
    live.add_argument("--force", action="store_true",
                      help="after --max-rounds, switch over anyway and accept the longer downtime")
    live.add_argument("--timeout", type=_positive(float), default=300.0, metavar="S",
                      help="give up a pre-copy that has not switched over after S seconds (default 300)")
    live.add_argument("--max-bandwidth", type=_positive(parse_size), metavar="BYTES_PER_SECOND",
                      help="cap the rate read from the back-ends, in total (e.g. 100M; default: no cap)")


def add_save_options(p: argparse.ArgumentParser) -> None:
    """The stream options of ``save`` and ``migrate``."""
    p.add_argument("--compression", choices=["zstd", "none"], default="zstd", help="default: zstd")
    p.add_argument("--level", type=int, default=1, help="zstd level (default 1)")
    p.add_argument("--workers", type=_non_negative_int, default=0, help="zstd worker threads per back-end (default 0)")


def save_options(args: argparse.Namespace) -> dict[str, Variant]:
    return {
        "compression": Variant("s", args.compression),
        "level": Variant("i", args.level),
        "workers": Variant("u", args.workers),
    }


def precopy_config(args: argparse.Namespace, **more: Any) -> PreCopyConfig:
    return PreCopyConfig(
        downtime_limit=args.downtime_limit / 1000, max_rounds=args.max_rounds, force=args.force,
        timeout=args.timeout, stall_timeout=args.stall_timeout, **more,
    )


def _add_stall_timeout(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--stall-timeout", type=_positive(float), default=STALL_TIMEOUT, metavar="S",
                   help=f"fail if a back-end {what} for S seconds (a stopped or hung one; default {STALL_TIMEOUT:g})")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
        return value

    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def cmd_save(args: argparse.Namespace) -> int:
    save_target(args.file)  # before the bus: a refused target touches no back-end
    options = save_options(args)
    if args.live:
        return _save_live(args, options)
    progress = Progress()
    started = time.monotonic()

    async def run(session: Session) -> list[StreamInfo]:
        async with StatusLine(lambda now: progress_line(progress, args.file, now), lambda: progress.phase):
            return await save_to_file(session.bus, session.backends, args.file, options, progress,
                                      verify=args.verify, close_timeout=args.close_timeout,
                                      stall_timeout=args.stall_timeout)  # fmt: skip

    infos = _on_bus(args, run, require=True)
    seconds = time.monotonic() - started
    if args.json:
        _json(_transfer_doc("save", args.file, infos, progress, seconds))
    else:
        total, stored = sum(i.raw_bytes for i in infos), sum(i.stream_bytes for i in infos)
        _out(f"saved {len(infos)} back-end(s), {size(total)} of state in {size(stored)}, to {args.file} in {seconds:.1f} s")
    return EXIT_OK


def _save_live(args: argparse.Namespace, options: dict[str, Variant]) -> int:
    config = precopy_config(args)
    progress = Progress()
    latest: list[Status] = []

    def note(status: Status) -> None:
        latest[:] = [status]

    async def run(session: Session) -> Summary:
        switch_over = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, switch_over.set)
        try:
            async with StatusLine(lambda now: live_line(latest[-1] if latest else None, progress, args.file, now),
                                  lambda: progress.phase):  # fmt: skip
                return await save_live(
                    session.bus, session.backends, args.file, options, config, progress,
                    on_status=note,
                    switch_over=switch_over, resume=args.resume, max_bandwidth=args.max_bandwidth,
                    verify=args.verify, close_timeout=args.close_timeout,
                )
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    summary = _on_bus(args, run, require=True)
    if args.json:
        _json({"command": "save", "file": args.file, "live": True, **summary.as_dict()})
    else:
        downtime = f"{summary.downtime * 1000:.0f} ms" if summary.downtime is not None else "unknown"
        _out(
            f"saved {len(summary.backends)} back-end(s) live, {size(summary.stream_bytes)} in {summary.rounds} round(s) "
            f"over {summary.total_time:.1f} s, to {args.file}; downtime {downtime} "
            f"(limit {summary.downtime_limit * 1000:.0f} ms, {summary.switch_reason}); "
            + ("the back-ends run on" if args.resume else "the back-ends are stopped (dbus-vmstate2 resume)")
        )
    return EXIT_OK


def _add_load(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "load", help="load the back-ends' state from a file",
        description="Load every back-end on the bus (or --id-list) from its stream in a saved file, in parallel, "
        "all or nothing: each back-end verifies its whole stream and holds it staged, and all are committed only "
        "once every one is staged; if any fails, every back-end keeps its state. The file is read once. FILE must "
        "be a regular file: its index, at its end, is read first (a pipe or <(...) is refused).",
    )
    p.add_argument("file", help="a file written by 'dbus-vmstate2 save'")
    _add_bus_options(p)
    p.add_argument(
        "--no-verify", dest="verify", action="store_false",
        help="a back-end that cannot load in two phases (an older version) makes load verify the whole file "
        "first, so that a damaged file touches no back-end; this skips that pass (each back-end still verifies "
        "its own stream)",
    )
    _add_stall_timeout(p, "reads nothing of its stream")
    _add_json(p)
    p.set_defaults(func=cmd_load)


def cmd_load(args: argparse.Namespace) -> int:
    read_index(args.file)  # before the bus: a file that cannot be read touches no back-end
    progress = Progress()
    started = time.monotonic()

    async def run(session: Session) -> list[StreamInfo]:
        async with StatusLine(lambda now: progress_line(progress, args.file, now), lambda: progress.phase):
            return await load_from_file(session.bus, session.backends, args.file, progress, verify=args.verify,
                                        stall_timeout=args.stall_timeout)  # fmt: skip

    infos = _on_bus(args, run, require=True)
    seconds = time.monotonic() - started
    if args.json:
        _json(_transfer_doc("load", args.file, infos, progress, seconds))
    else:
        _out(f"loaded {len(infos)} back-end(s), {size(sum(i.raw_bytes for i in infos))} of state, from {args.file} in {seconds:.1f} s")
    return EXIT_OK


def _transfer_doc(command: str, file: str, infos: list[StreamInfo], progress: Progress, seconds: float) -> dict[str, Any]:
    return {
        "command": command,
        "file": file,
        "seconds": round(seconds, 3),
        "backends": [
            {"id": i.backend_id, "records": i.records, "raw_bytes": i.raw_bytes, "stream_bytes": i.stream_bytes,
             "seconds": round(progress.seconds.get(i.backend_id, 0.0), 3)}  # fmt: skip
            for i in infos
        ],
    }


# cancel, reset ------------------------------------------------------------------


def _add_cancel(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cancel", help="stop the back-ends' running transfers, whoever started them",
        description="Stop the running transfer of each back-end (CancelTransfer with its number, from Check), "
        "whichever VMM helper started it, and wait up to --wait seconds for it to end. Each back-end keeps "
        "its state.",
    )
    _add_bus_options(p)
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS", help="how long to wait for each to end (default 10)")
    _add_json(p)
    p.set_defaults(func=cmd_cancel)


def cmd_cancel(args: argparse.Namespace) -> int:
    async def run(session: Session) -> list[CancelReport]:
        return list(await asyncio.gather(*(cancel_latest(session.bus, b, args.wait) for b in session.backends)))

    reports = _on_bus(args, run)
    if args.json:
        _json([{"id": r.id, "unique_name": r.unique_name, "transfer": r.transfer, "cancelled": r.cancelled,
                "outcome": _error_doc(r.outcome) if r.outcome else None, "note": r.note,
                "error": _error_doc(r.error) if r.error else None} for r in reports])  # fmt: skip
    else:
        for r in reports:
            _out(f"{r.id}: {_cancel_text(r)}")
        if not reports:
            _out("(no back-ends on this bus)")
    return _exit_code_of(r.error for r in reports)


def _cancel_text(r: CancelReport) -> str:
    if r.error is not None:
        return f"cannot cancel: {r.error}"
    if not r.cancelled:
        return r.note
    ended = f"it ended: {type(r.outcome).__name__}" if r.outcome else r.note or "it ended without an error"
    return f"cancelled transfer #{r.transfer} ({ended})"


def _add_reset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reset", help="return back-ends from 'error' to 'running'",
        description="Call Reset on each back-end: the way out of 'error', saying that you know its state may be "
        "bad (you will load it again or give it up). A back-end in 'running' is left as it is; one in the "
        "middle of a transfer refuses (cancel it first).",
    )
    _add_bus_options(p)
    _add_json(p)
    p.set_defaults(func=cmd_reset)


def cmd_reset(args: argparse.Namespace) -> int:
    return _change_state(args, reset, "reset", "reset")


def _add_resume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "resume", help="let back-ends in 'stopped' serve again",
        description="Call Resume on each back-end: the way out of 'stopped', where a live save leaves a back-end "
        "quiesced with its state frozen as saved. Resume a source whose migration failed, or after a snapshot. "
        "A back-end in 'running' is left as it is.",
    )
    _add_bus_options(p)
    _add_json(p)
    p.set_defaults(func=cmd_resume)


def cmd_resume(args: argparse.Namespace) -> int:
    return _change_state(args, resume, "resume", "resumed")


def _change_state(args: argparse.Namespace, change: Callable[..., Awaitable[ResetReport]], verb: str, done: str) -> int:
    async def run(session: Session) -> list[ResetReport]:
        return [await change(session.bus, b) for b in session.backends]

    reports = _on_bus(args, run)
    if args.json:
        _json([{"id": r.id, "unique_name": r.unique_name, "before": r.before, "after": r.after,
                "error": _error_doc(r.error) if r.error else None} for r in reports])  # fmt: skip
    else:
        for r in reports:
            if r.error is not None:
                _out(f"{r.id}: not {done} ({r.before}): {type(r.error).__name__}: {r.error}")
            elif r.before == r.after:
                _out(f"{r.id}: {r.after} (nothing to {verb})")
            else:
                _out(f"{r.id}: {r.before} -> {r.after}")
        if not reports:
            _out("(no back-ends on this bus)")
    return _exit_code_of(r.error for r in reports)


# inspect ------------------------------------------------------------------------


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list and verify the back-end states in a saved file",
        description="List each back-end stream in a saved file and verify it by decoding it completely.",
    )
    p.add_argument("file", help="a file written by 'dbus-vmstate2 save' (a regular file)")
    _add_json(p)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the index of a saved file and whether each stream verifies.

    Returns:
        0 if every stream verifies, 3 otherwise.

    Raises:
        StreamError: the file itself (header, index, segments) is corrupt.
        OSError: the file cannot be read (UnusableFile: it is not a regular file).
    """
    with SaveFileReader(args.file) as reader:
        errors = verify_streams(reader)
        rows = [_row(info, err) for info, err in zip(reader.streams, errors, strict=True)]
    if args.json:
        _json({"file": args.file, "verified": not any(errors), "streams": rows})
    else:
        _print_table(rows)
    return EXIT_CORRUPT if any(errors) else EXIT_OK


def _row(info: StreamInfo, error: str | None) -> dict:
    return {
        "id": info.backend_id,
        "format_version": info.version,
        "compression": info.compression.name.lower(),
        "level": info.level,
        "records": info.records,
        "raw_bytes": info.raw_bytes,
        "stored_bytes": info.stream_bytes,
        "ratio": round(info.ratio, 3),
        "verified": error is None,
        "error": error,
    }


def _print_table(rows: list[dict]) -> None:
    head = ["ID", "VERSION", "COMPRESSION", "RECORDS", "RAW", "STORED", "RATIO", "VERIFIED"]
    lines = [head]
    for r in rows:
        comp = r["compression"] + (f"-{r['level']}" if r["compression"] != "none" else "")
        ok = "yes" if r["verified"] else f"NO: {r['error']}"
        lines.append([r["id"], str(r["format_version"]), comp, str(r["records"]), size(r["raw_bytes"]),
                      size(r["stored_bytes"]), f"{r['ratio']:.2f}", ok])  # fmt: skip
    _out(_columns(lines))
    if not rows:
        _out("(no back-ends in this file)")
