"""Make the man page and the shell completions of ``dbus-vmstate2`` from the
parser its ``--help`` prints (``dbus_vmstate2.cli.build_parser``).

    .venv/bin/python scripts/cli_docs.py           # rewrite the files below
    .venv/bin/python scripts/cli_docs.py --check   # exit 1 if one is out of date
    .venv/bin/python scripts/cli_docs.py --output DIR   # write them under DIR instead

It needs the ``docs`` extra (argparse-manpage, shtab).  The files are kept in
the repository, as docs/states.md is, so that building a package needs
neither tool nor the project's runtime dependencies: a distribution installs
them as they are (packaging/debian/).  tests/test_cli_docs.py checks that
they match the parser.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dbus_vmstate2.cli import build_parser  # noqa: E402

MAN_PAGE = Path("docs/dbus-vmstate2.1")
BASH = Path("packaging/completions/bash/dbus-vmstate2")
ZSH = Path("packaging/completions/zsh/_dbus-vmstate2")
FILES = (MAN_PAGE, BASH, ZSH)

SEE_ALSO = r""".BR busctl (1),
.BR dbus-daemon (1),
.BR qemu-system-x86_64 (1)
.PP
The guides, in the project's docs/ (installed in /usr/share/doc/dbus-vmstate2/):
guide-operator.md (busctl recipes, what each error means),
guide-vmm-integrator.md (the sequence beside QEMU's migration, the JSON output),
guide-daemon-author.md (writing a back-end)."""


def version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise SystemExit("no version in pyproject.toml")
    return match.group(1)


def release_date(project_version: str) -> str:
    """The date of this version in CHANGELOG.md, or "unreleased": a fixed
    date, so that the page is the same whenever it is made."""
    match = re.search(rf"^## {re.escape(project_version)} \(([^)]+)\)", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    return match.group(1) if match else "unreleased"


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)


def man_page(parser: argparse.ArgumentParser) -> str:
    from argparse_manpage.manpage import Manpage

    v = version()
    page = Manpage(parser, _data={
        "project_name": "dbus-vmstate2", "version": v, "date": release_date(v),
        "manual_title": "dbus-vmstate2 manual", "manual_section": 1,
        "description": "save, load and inspect the device state of D-Bus VMState back-ends",
    })  # fmt: skip
    page.add_section("see also", "=", SEE_ALSO)
    return str(page)


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    for action in _actions(parser):
        if action.dest == "file" and not action.option_strings:
            action.complete = shtab.FILE  # type: ignore[attr-defined] - shtab's hook
    return shtab.complete(parser, shell=shell)


def generate() -> dict[Path, str]:
    """Each file's content, made from a fresh parser each."""
    # argparse wraps to the terminal's width: unwrapped, man fills the lines
    # itself, and the files do not depend on who made them where.
    os.environ["COLUMNS"] = "10000"
    return {
        MAN_PAGE: man_page(build_parser()),
        BASH: completion(build_parser(), "bash"),
        ZSH: completion(build_parser(), "zsh"),
    }


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--check", action="store_true", help="exit 1 if a file differs from what the parser makes")
    cli.add_argument("--output", type=Path, default=ROOT, metavar="DIR", help="write under DIR (default: the project)")
    args = cli.parse_args(argv)
    stale = []
    for path, text in generate().items():
        target = args.output / path
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(str(path))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run: .venv/bin/python scripts/cli_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
