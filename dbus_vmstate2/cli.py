"""``dbus-vmstate2``: argument parsing, output and exit codes only.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its
arguments and sets ``func`` to a ``cmd_<name>(args) -> int`` handler; the
handlers raise our typed errors and :func:`main` turns them into exit codes
in exactly one place (:func:`exit_code_for`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import StreamError, VMStateError
from .stream import NEED_DATA, StreamDecoder, StreamEnd
from .stream.container import StreamInfo
from .vmm.savefile import SaveFileReader

EXIT_OK = 0
EXIT_BACKEND_FAILED = 1
EXIT_USAGE = 2
EXIT_CORRUPT = 3

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
        description="Save, load, migrate and inspect the device state of D-Bus VMState back-ends.",
        epilog="Exit codes: 0 ok, 1 a back-end failed, 2 usage error, 3 corrupt or mismatched stream or file.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    except Exception as exc:
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"dbus-vmstate2 {args.command}: {exc}", file=sys.stderr)
        return code


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


def verify_streams(reader: SaveFileReader) -> list[str | None]:
    """Decode every stream of ``reader`` fully; return an error message per stream (None if fine).

    Raises:
        StreamError: the container itself is corrupt.
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
        pump(n, data)
    for n, info in enumerate(reader.streams):
        pump(n, None)
        end, head = ends[n], decoders[n].header
        if errors[n] is None and end is not None and head is not None:
            found = (head.version, head.compression, head.level, end.records, end.raw_bytes, end.wire_bytes, end.digest)
            want = (info.version, info.compression, info.level, info.records, info.raw_bytes,
                    info.stream_bytes, info.digest)  # fmt: skip
            if found != want:
                errors[n] = f"Corrupt: the index does not match the stream ({want} vs {found})"
    return errors


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


def _print_table(rows: list[dict]) -> None:
    head = ["ID", "VERSION", "COMPRESSION", "RECORDS", "RAW", "STORED", "RATIO", "VERIFIED"]
    lines = [head]
    for r in rows:
        comp = r["compression"] + (f"-{r['level']}" if r["compression"] != "none" else "")
        ok = "yes" if r["verified"] else f"NO: {r['error']}"
        lines.append([r["id"], str(r["format_version"]), comp, str(r["records"]), _size(r["raw_bytes"]),
                      _size(r["stored_bytes"]), f"{r['ratio']:.2f}", ok])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1])
    if not rows:
        print("(no back-ends in this file)")
