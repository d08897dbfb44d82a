"""The README's main job stays true: the demo runs and verifies."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_demo_passes():
    result = subprocess.run(
        [sys.executable, "-m", "dbus_vmstate2.demo"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refused: LimitExceeded" in result.stdout  # the VMState1 wall, shown
    assert result.stdout.count("verified, sha256") == 3
    assert result.stdout.rstrip().endswith("demo passed")
