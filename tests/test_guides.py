"""The guides' commands, run as written.

In docs/guide-*.md, a fenced block right after ``<!-- test -->`` is a shell
block to run, and one right after ``<!-- test: write FILE -->`` is written
to FILE first (the daemon and the client code the guide then runs).  Each
guide's blocks run in order, in one bash (``set -euo pipefail``) in a
fresh directory, with:

- ``ADDR``: a private bus of its own (and ``DEST_ADDR``, another, for the
  destination host of a migration);
- ``python`` and ``dbus-vmstate2`` from this test run's environment first
  on ``PATH``;
- no session bus and no ``NOTIFY_SOCKET``, so that a command that forgets
  ``--address`` fails instead of finding some other bus.

Whatever a guide leaves running is killed at the end (its process group).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from dbus_vmstate2.privatebus import PrivateBus

from .conftest import ROOT

GUIDES = ["guide-daemon-author.md", "guide-vmm-integrator.md", "guide-operator.md"]
BLOCK = re.compile(
    r"^(?P<indent> *)<!-- test(?P<write>: write (?P<file>[\w.-]+))? -->\n(?P=indent)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```$",
    re.MULTILINE | re.DOTALL,
)
"""A marked block, at the top level or indented in a list item."""


@dataclass(frozen=True)
class Block:
    line: int
    body: str
    write_to: str | None


def blocks(text: str) -> list[Block]:
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 2  # the fence's line
        if match["write"] is None and match["lang"] != "sh":
            raise AssertionError(f"line {line}: only ```sh blocks can be run")
        body = textwrap.dedent(match["body"]) if match["indent"] else match["body"]
        found.append(Block(line, body, match["file"]))
    return found


def script(guide: str, found: list[Block]) -> str:
    """One bash script: each block in order, announced on stderr."""
    parts = ["set -euo pipefail"]
    for n, block in enumerate(found):
        parts.append(f"echo '### {guide} line {block.line}' >&2")
        if block.write_to is not None:
            parts.append(f"cat > {block.write_to} <<'GUIDE_BLOCK_{n}'\n{block.body}GUIDE_BLOCK_{n}")
        else:
            parts.append(block.body)
    return "\n".join(parts) + "\n"


def test_every_guide_has_blocks_to_run():
    for guide in GUIDES:
        found = blocks((ROOT / "docs" / guide).read_text())
        assert any(b.write_to is None for b in found), guide
    with pytest.raises(AssertionError, match="only ```sh blocks"):
        blocks("<!-- test -->\n```python\nprint()\n```\n")
    [indented] = blocks("1. Run:\n\n   <!-- test -->\n   ```sh\n   echo one\n     two\n   ```\n")
    assert (indented.line, indented.body, indented.write_to) == (4, "echo one\n  two\n", None)


@pytest.mark.parametrize("guide", GUIDES)
def test_the_guides_commands_run_as_written(guide, tmp_path):
    found = blocks((ROOT / "docs" / guide).read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("DBUS_SESSION_BUS_ADDRESS", "NOTIFY_SOCKET", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    work = tmp_path / "work"
    work.mkdir()
    with PrivateBus() as bus, PrivateBus() as dest:
        env |= {"ADDR": bus.address, "DEST_ADDR": dest.address}
        process = subprocess.Popen(["bash", "-c", script(guide, found)], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        try:
            out, err = process.communicate(timeout=600)
        finally:
            try:
                os.killpg(process.pid, signal.SIGTERM)  # what the guide left running
            except ProcessLookupError:
                pass
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, f"{guide}: exit {process.returncode}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-6000:]}"
