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


def test_an_index_entry_of_no_stream_bytes_is_a_named_error_not_a_crash(saved, capsys):
    """Issue 11, defect 1: stream_bytes 0 with raw_bytes > 0 was a ZeroDivisionError (exit 1)."""
    import dataclasses

    from dbus_vmstate2.vmm.savefile import SaveFileReader

    from .test_container import rewrite_index

    with SaveFileReader(saved) as r:
        infos = r.streams
    rewrite_index(saved, [dataclasses.replace(infos[0], stream_bytes=0), infos[1]])
    assert main(["inspect", str(saved)]) == EXIT_CORRUPT
    err = capsys.readouterr().err
    assert err.startswith("dbus-vmstate2 inspect: Malformed: index entry 0 ('virtiofsd-0') cannot describe a stream")
    assert "Traceback" not in err
    assert main(["inspect", "--json", str(saved)]) == EXIT_CORRUPT
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["type"] == "Malformed" and doc["error"]["dbus_name"] == "org.qemu.VMState2.Error.Format"


@pytest.mark.parametrize("damage, words", [
    (lambda d: d[:-1], "Truncated: no footer: expected the end magic 564d3246454e440a in the last 8 bytes, found "),
    (lambda d: b"GIF89a" + d[6:], "BadMagic: not a dbus-vmstate2 saved file: expected magic 89564d32460d0a1a"),
    (lambda d: d[:12] + bytes([d[12] ^ 1]) + d[13:], "Corrupt: file header CRC"),
])  # fmt: skip
def test_a_damaged_file_names_the_error_class_and_says_what_was_expected(saved, capsys, damage, words):
    saved.write_bytes(damage(saved.read_bytes()))
    assert main(["inspect", str(saved)]) == EXIT_CORRUPT
    err = capsys.readouterr().err
    assert err.startswith(f"dbus-vmstate2 inspect: {words}"), err


FUZZ_EXAMPLES = int(os.environ.get("VMSTATE2_FUZZ_EXAMPLES", "300"))


def test_fuzz_inspect_exits_0_or_3_and_never_crashes(tmp_path_factory):
    """Any bytes, however damaged: a table and 0, or a named error and 3; never a traceback."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dbus_vmstate2.vmm.savefile import SaveFileWriter

    base = tmp_path_factory.mktemp("fuzz")
    good = base / "good.vmstate"
    with SaveFileWriter(good) as w:
        for backend_id, compression in (("a", Compression.ZSTD), ("b", Compression.NONE)):
            n = w.open_stream(backend_id)
            data = encode_stream(backend_id, [STATE[:300], STATE[300:500]], compression)
            w.write(n, data[:60])
            w.write(n, data[60:])
            w.close_stream(n)
    seed = good.read_bytes()
    target = base / "fuzzed.vmstate"

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        edits=st.lists(st.tuples(st.integers(0, len(seed)), st.sampled_from("xdi"), st.binary(min_size=1, max_size=8)),
                       min_size=1, max_size=4),  # fmt: skip
        as_json=st.booleans(),
    )
    def run(edits, as_json):
        tried.append(as_json)
        data = bytearray(seed)
        for pos, op, blob in edits:
            pos %= len(data) + 1
            if op == "x":
                data[pos : pos + len(blob)] = bytes(a ^ b for a, b in zip(data[pos : pos + len(blob)], blob))
            elif op == "d":
                del data[pos : pos + len(blob)]
            else:
                data[pos:pos] = blob
        target.write_bytes(bytes(data))
        assert main(["inspect", *(["--json"] if as_json else []), str(target)]) in (EXIT_OK, EXIT_CORRUPT)

    tried: list[bool] = []
    run()
    print(f"inspected {len(tried)} damaged files")  # a long run's figure (pytest -s shows it)
