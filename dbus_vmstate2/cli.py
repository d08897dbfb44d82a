"""``dbus-vmstate2``: argument parsing, output and exit codes only.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its
arguments and sets ``func`` to a ``cmd_<name>(args) -> int`` handler; the
handlers raise our typed errors and :func:`main` turns them into exit codes
in exactly one place (:func:`exit_code_for`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dbus_fast import Variant

from .errors import StreamError, VMStateError
from .stream.container import StreamInfo
from .vmm import BackendInfo, Progress, connect, describe, list_backends, load_from_file, save_to_file
from .vmm.savefile import SaveFileReader, verify_streams

EXIT_OK = 0
EXIT_BACKEND_FAILED = 1
EXIT_USAGE = 2
EXIT_CORRUPT = 3
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT

# First match wins, so subclasses come before their bases.
_EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (StreamError, EXIT_CORRUPT),  # a corrupt, truncated or mismatched stream or file
    (VMStateError, EXIT_BACKEND_FAILED),  # a back-end refused or failed
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
        description="List, save, load and inspect the device state of D-Bus VMState back-ends.",
        epilog="Exit codes: 0 ok, 1 a back-end failed, 2 usage error, 3 corrupt or mismatched stream or file.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list(sub)
    _add_save(sub)
    _add_load(sub)
    _add_inspect(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (tests call this directly)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"dbus-vmstate2 {args.command}: interrupted; the back-ends keep their state", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"dbus-vmstate2 {args.command}: {exc}", file=sys.stderr)
        return code


# list, save, load: the VMM helper on a bus -----------------------------------


def _add_bus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the D-Bus address of the VM's bus (default: the session bus)")
    p.add_argument(
        "--id-list", type=_id_list, metavar="ID,ID",
        help="only these back-ends, each required (like QEMU's dbus-vmstate id-list)",
    )


def _id_list(text: str) -> list[str]:
    ids = [i for i in text.split(",") if i]
    if not ids:
        raise argparse.ArgumentTypeError("give at least one Id")
    return ids


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the back-ends on a bus", description="List the back-ends queued on org.qemu.VMState1.")
    _add_bus_options(p)
    p.add_argument("--json", action="store_true", help="print JSON for programs instead of a table")
    p.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    """Print each back-end's Id, unique name, state and capabilities."""

    async def run(bus: Any, backends: list[BackendInfo]) -> list[Any]:
        return [await describe(bus, b) for b in backends]

    statuses = _on_bus(args, run)
    if args.json:
        doc = [{"id": s.id, "unique_name": s.unique_name, "state": s.state, "capabilities": s.capabilities} for s in statuses]
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    lines = [["ID", "NAME", "STATE", "CAPABILITIES"]]
    for s in statuses:
        caps = s.capabilities
        summary = (
            f"stream v{','.join(map(str, caps.get('stream-versions', [])))}, {'/'.join(caps.get('compression', []))}, "
            f"records <= {_size(caps.get('max-record-size', 0))}, pre-copy {'yes' if caps.get('pre-copy') else 'no'}"
        ) if caps else "VMState1 only (<= 1 MiB)"
        lines.append([s.id, s.unique_name, s.state, summary])
    _print_columns(lines)
    if not statuses:
        print("(no back-ends on this bus)")
    return EXIT_OK


def _add_save(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "save", help="save the back-ends' state to a file",
        description="Save every back-end on the bus (or --id-list) through VMState2, in parallel, into one file. "
        "The file appears only once every back-end's stream has verified.",
    )
    p.add_argument("file", help="the file to write (replaced atomically)")
    _add_bus_options(p)
    p.add_argument("--compression", choices=["zstd", "none"], default="zstd", help="default: zstd")
    p.add_argument("--level", type=int, default=1, help="zstd level (default 1)")
    p.add_argument("--workers", type=int, default=0, help="zstd worker threads per back-end (default 0)")
    p.set_defaults(func=cmd_save)


def cmd_save(args: argparse.Namespace) -> int:
    options = {
        "compression": Variant("s", args.compression),
        "level": Variant("i", args.level),
        "workers": Variant("u", args.workers),
    }

    async def run(bus: Any, backends: list[BackendInfo]) -> list[Any]:
        progress = Progress()
        async with _progress_display("saving", progress):
            return await save_to_file(bus, backends, args.file, options, progress)

    infos = _on_bus(args, run)
    total = sum(i.raw_bytes for i in infos)
    stored = sum(i.stream_bytes for i in infos)
    print(f"saved {len(infos)} back-end(s), {_size(total)} of state in {_size(stored)}, to {args.file}")
    return EXIT_OK


def _add_load(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "load", help="load the back-ends' state from a file",
        description="Load every back-end on the bus (or --id-list) from its stream in a saved file, in parallel. "
        "Each back-end applies its state only once its stream has verified.",
    )
    p.add_argument("file", help="a file written by 'dbus-vmstate2 save'")
    _add_bus_options(p)
    p.add_argument(
        "--no-verify", dest="verify", action="store_false",
        help="skip verifying the whole file before loading (each back-end still verifies its own stream)",
    )
    p.set_defaults(func=cmd_load)


def cmd_load(args: argparse.Namespace) -> int:
    async def run(bus: Any, backends: list[BackendInfo]) -> list[Any]:
        progress = Progress()
        async with _progress_display("loading", progress):
            return await load_from_file(bus, backends, args.file, progress, verify=args.verify)

    infos = _on_bus(args, run)
    print(f"loaded {len(infos)} back-end(s), {_size(sum(i.raw_bytes for i in infos))} of state, from {args.file}")
    return EXIT_OK


def _on_bus(args: argparse.Namespace, work: Callable[[Any, list[BackendInfo]], Awaitable[Any]]) -> Any:
    """Connect, find the back-ends, run ``work``; SIGTERM and Ctrl-C cancel it cleanly."""

    async def run() -> Any:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def cancel_once() -> None:
            # The first signal cancels; the cleanup it starts (Cancel on every
            # back-end, then waiting for the pumps) must not be cut short.
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, lambda: None)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, cancel_once)
        bus = await connect(args.address)
        try:
            return await work(bus, await list_backends(bus, args.id_list))
        finally:
            bus.disconnect()
            await bus.wait_for_disconnect()

    try:
        return asyncio.run(run())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


class _progress_display:  # noqa: N801 - used as a context manager
    """A one-line progress report on stderr, only when stderr is a terminal."""

    def __init__(self, verb: str, progress: Progress) -> None:
        self._verb = verb
        self._progress = progress
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        if sys.stderr.isatty():
            self._task = asyncio.ensure_future(self._show())

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            print(file=sys.stderr)

    async def _show(self) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            done = sum(self._progress.done.values())
            expected = sum(self._progress.expected.values())
            rate = done / max(time.monotonic() - started, 1e-6)
            of = f" of {_size(expected)} ({100 * done / expected:.0f}%)" if expected else ""
            print(f"\r{self._verb} {self._progress.backends} back-end(s): {_size(done)}{of}, {_size(int(rate))}/s  ",
                  end="", file=sys.stderr, flush=True)


# inspect --------------------------------------------------------------------


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list and verify the back-end states in a saved file",
        description="List each back-end stream in a saved file and verify it by decoding it completely.",
    )
    p.add_argument("file", help="a file written by 'dbus-vmstate2 save'")
    p.add_argument("--json", action="store_true", help="print JSON for programs instead of a table")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the index of a saved file and whether each stream verifies.

    Returns:
        0 if every stream verifies, 3 otherwise.

    Raises:
        StreamError: the file itself (header, index, segments) is corrupt.
        OSError: the file cannot be read.
    """
    with SaveFileReader(args.file) as reader:
        errors = verify_streams(reader)
        rows = [_row(info, err) for info, err in zip(reader.streams, errors, strict=True)]
    if args.json:
        doc = {"file": args.file, "verified": not any(errors), "streams": rows}
        print(json.dumps(doc, indent=2))
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


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _print_columns(lines: list[list[str]]) -> None:
    """Print rows in aligned columns; the last column runs free."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1])


def _print_table(rows: list[dict]) -> None:
    head = ["ID", "VERSION", "COMPRESSION", "RECORDS", "RAW", "STORED", "RATIO", "VERIFIED"]
    lines = [head]
    for r in rows:
        comp = r["compression"] + (f"-{r['level']}" if r["compression"] != "none" else "")
        ok = "yes" if r["verified"] else f"NO: {r['error']}"
        lines.append([r["id"], str(r["format_version"]), comp, str(r["records"]), _size(r["raw_bytes"]),
                      _size(r["stored_bytes"]), f"{r['ratio']:.2f}", ok])  # fmt: skip
    _print_columns(lines)
    if not rows:
        print("(no back-ends in this file)")
