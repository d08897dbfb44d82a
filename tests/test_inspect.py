"""`dbus-vmstate2 inspect`: table, JSON, verification and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dbus_vmstate2.cli import EXIT_CORRUPT, EXIT_OK, EXIT_USAGE, main
from dbus_vmstate2.stream import Compression, encode_stream
from dbus_vmstate2.vmm.savefile import SaveFileWriter

STATE = b"".join(b'{"ino": %d, "handle": "%032x"}\n' % (i, i * 7919) for i in range(2000))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "vm.state"
    with SaveFileWriter(path) as w:
        for backend_id, compression in (("virtiofsd-0", Compression.ZSTD), ("slirp", Compression.NONE)):
            n = w.open_stream(backend_id)
            w.write(n, encode_stream(backend_id, [STATE[:40000], STATE[40000:]], compression))
            w.close_stream(n)
    return path


def test_table(saved, capsys):
    assert main(["inspect", str(saved)]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "VERSION", "COMPRESSION", "RECORDS", "RAW", "STORED", "RATIO", "VERIFIED"]
    assert lines[1].split()[:4] == ["virtiofsd-0", "1", "zstd-1", "2"] and lines[1].endswith("yes")
    assert lines[2].split()[:4] == ["slirp", "1", "none", "2"] and lines[2].endswith("yes")


def test_json(saved, capsys):
    assert main(["inspect", "--json", str(saved)]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True
    z, n = doc["streams"]
    assert z["id"] == "virtiofsd-0" and z["compression"] == "zstd" and z["level"] == 1
    assert z["records"] == 2 and z["raw_bytes"] == len(STATE) and z["ratio"] > 2
    assert z["format_version"] == 1 and z["verified"] is True and z["error"] is None
    assert n["compression"] == "none" and n["stored_bytes"] > n["raw_bytes"]


def test_a_corrupt_stream_fails_verification(saved, capsys):
    data = bytearray(saved.read_bytes())
    data[data.index(STATE[100:140])] ^= 1  # a payload byte of the uncompressed stream
    saved.write_bytes(data)
    assert main(["inspect", "--json", str(saved)]) == EXIT_CORRUPT
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is False
    assert [s["verified"] for s in doc["streams"]] == [True, False]
    assert doc["streams"][1]["error"].startswith("Corrupt: record 0: payload CRC")
    assert main(["inspect", str(saved)]) == EXIT_CORRUPT
    assert "NO: Corrupt" in capsys.readouterr().out


def test_a_corrupt_file_exits_3(saved, capsys):
    saved.write_bytes(saved.read_bytes()[:-1])
    assert main(["inspect", str(saved)]) == EXIT_CORRUPT
    assert "no footer" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main([]) == EXIT_USAGE
    assert main(["inspect"]) == EXIT_USAGE
    assert main(["frobnicate"]) == EXIT_USAGE
    assert main(["inspect", str(tmp_path / "missing")]) == EXIT_USAGE
    assert "No such file" in capsys.readouterr().err
    assert main(["--help"]) == EXIT_OK


def test_python_dash_m(saved):
    out = subprocess.run([sys.executable, "-m", "dbus_vmstate2", "inspect", "--json", str(saved)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "error"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["verified"] is True
