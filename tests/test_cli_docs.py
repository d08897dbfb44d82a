"""The man page and the shell completions: made from the parser that --help
prints, naming every subcommand, and the copies kept in the project (which
packages install) up to date."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import pytest

from dbus_vmstate2.cli import build_parser

from .conftest import ROOT

GENERATOR = ROOT / "scripts" / "cli_docs.py"
MAN_PAGE = "docs/dbus-vmstate2.1"
BASH = "packaging/completions/bash/dbus-vmstate2"
ZSH = "packaging/completions/zsh/_dbus-vmstate2"


def subcommands() -> list[str]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-docs")
    done = subprocess.run([sys.executable, str(GENERATOR), "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def test_the_kept_copies_are_what_the_parser_makes(generated):
    for name in (MAN_PAGE, BASH, ZSH):
        assert (ROOT / name).read_text() == (generated / name).read_text(), f"{name} is stale: run .venv/bin/python scripts/cli_docs.py"


def test_the_man_page_documents_every_subcommand_and_option(generated):
    page = (generated / MAN_PAGE).read_text()
    assert page.startswith('.TH DBUS\\-VMSTATE2 "1"')
    assert subcommands() == ["list", "status", "save", "load", "cancel", "reset", "resume", "inspect", "migrate", "incoming"]
    for command in subcommands():
        assert f".SH COMMAND \\fI\\,'dbus\\-vmstate2 {command}'" in page
    for option in ("--downtime-limit", "--id-list", "--no-verify", "--wait", "--version", "--tls-creds", "--accept-timeout"):
        assert option.replace("-", "\\-") in page
    assert "Exit codes: 0 ok" in page


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff (Debian's groff-base, which man needs) is not installed")
def test_the_man_page_renders_without_warnings(generated):
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(generated / MAN_PAGE)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


def complete(script: str, *words: str) -> list[str]:
    """What bash offers for the last of ``words`` with the completion script loaded."""
    quoted = " ".join(f"'{w}'" for w in words)
    program = f"""source '{script}'
COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}
_shtab_dbus_vmstate2 dbus-vmstate2 "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completes_every_subcommand_and_their_options(generated):
    script = str(generated / BASH)
    assert complete(script, "dbus-vmstate2", "") == subcommands()
    assert complete(script, "dbus-vmstate2", "save", "--comp") == ["--compression"]
    assert complete(script, "dbus-vmstate2", "save", "--compression", "") == ["zstd", "none"]
    assert "--no-verify" in complete(script, "dbus-vmstate2", "load", "--")


def test_zsh_completion_names_every_subcommand(generated):
    script = (generated / ZSH).read_text()
    assert script.startswith("#compdef dbus-vmstate2")
    for command in subcommands():
        assert f"\n    {command}:'" in script
