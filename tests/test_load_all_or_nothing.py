"""A load is all or nothing across back-ends (the two-phase load): a damaged
stream in any one of them leaves every back-end with the state it had, and
the file is read once."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from dbus_vmstate2.backend import Backend
from dbus_vmstate2.cli import EXIT_CORRUPT, main
from dbus_vmstate2.errors import Corrupt
from dbus_vmstate2.stream.container import FILE_HEADER_SIZE, SEGMENT_HEADER_SIZE, parse_segment_header
from dbus_vmstate2.vmm import Progress, list_backends, load_from_file, save_to_file
from dbus_vmstate2.vmm.savefile import SaveFileReader

from .test_vmm import SIZES, cli, start_sources

def segments_of(path: Path) -> list[tuple[int, int, int]]:
    """(stream number, data offset, data length) of every segment, in file order."""
    with SaveFileReader(path) as reader:
        end = reader._index_offset
        count = len(reader.streams)
    found, pos = [], FILE_HEADER_SIZE
    with path.open("rb") as file:
        while pos < end:
            file.seek(pos)
            stream, length = parse_segment_header(file.read(SEGMENT_HEADER_SIZE), count)
            found.append((stream, pos + SEGMENT_HEADER_SIZE, length))
            pos += SEGMENT_HEADER_SIZE + length
    return found


def stream_number(path: Path, backend_id: str) -> int:
    with SaveFileReader(path) as reader:
        return reader.find(backend_id)


@pytest.mark.parametrize("damaged", list(SIZES))
def test_a_damaged_stream_in_any_one_backend_leaves_every_backend_as_it_was(bus_address, memstate, tmp_path, capsys, damaged):
    sources = start_sources(memstate)
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image), "--compression", "zstd") == 0
    for source in sources.values():
        source.stop()
    # The damage is in the damaged stream's last segment, near its end: the
    # other back-ends have verified theirs (and wait, staged) by then.
    number = stream_number(image, damaged)
    _, offset, length = [s for s in segments_of(image) if s[0] == number][-1]
    data = bytearray(image.read_bytes())
    data[offset + length - 40] ^= 0x01
    image.write_bytes(data)
    for n, backend_id in enumerate(SIZES):
        memstate(backend_id, "--size", "64K", "--seed", str(100 + n), "--save-loaded", str(tmp_path / f"{backend_id}.loaded"))
    capsys.readouterr()
    assert cli(bus_address, "load", str(image)) == EXIT_CORRUPT
    err = capsys.readouterr().err
    assert f"back-end {damaged!r}" in err, err
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".loaded"]  # no back-end applied anything
    again = tmp_path / "again.vmstate"
    assert cli(bus_address, "save", str(again)) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(again)]) == 0
    streams = json.loads(capsys.readouterr().out)["streams"]
    assert {s["id"]: s["raw_bytes"] for s in streams} == dict.fromkeys(SIZES, 64 << 10)


def test_a_good_file_loads_every_backend_reading_it_once(bus_address, memstate, tmp_path, capsys):
    sources = start_sources(memstate)
    image = tmp_path / "vm.vmstate"
    assert cli(bus_address, "save", str(image)) == 0
    for source in sources.values():
        source.stop()
    dests = {i: memstate(i, "--save-loaded", str(tmp_path / f"{i}.loaded")) for i in SIZES}
    capsys.readouterr()
    assert cli(bus_address, "load", str(image), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert {b["id"] for b in doc["backends"]} == set(SIZES)
    for backend_id, size in SIZES.items():
        assert (tmp_path / f"{backend_id}.loaded").stat().st_size == size
    del dests


class OldBackend(Backend):
    """A back-end as an older version served it: no two-phase load."""

    def capabilities(self):
        caps = super().capabilities()
        del caps["two-phase-load"]
        return caps


async def test_with_a_backend_without_two_phase_loads_the_file_is_verified_first(bus_address, client, tmp_path):
    state = {"kept": b"old" * 1000}

    def load(records) -> None:
        state["kept"] = b"".join(bytes(r.payload) for r in records)

    async with OldBackend("old", lambda: [b"new" * 1000], load, address=bus_address):
        infos = await list_backends(client)
        image = tmp_path / "vm.vmstate"
        await save_to_file(client, infos, image)
        data = bytearray(image.read_bytes())
        _, offset, length = max(segments_of(image), key=lambda s: s[2])
        data[offset + length // 2] ^= 0x01
        image.write_bytes(data)
        progress = Progress()
        with pytest.raises(Corrupt, match="does not verify, nothing was loaded"):
            await load_from_file(client, infos, image, progress)
        assert progress.phase == "verifying" and state["kept"] == b"old" * 1000
        os.unlink(image)


@pytest.fixture
async def two_files(bus_address, client, tmp_path):
    """Two back-ends, a file of their states (3 MiB and 64 KiB, random), and what each loads."""
    states = {"big": os.urandom(3 << 20), "small": os.urandom(64 << 10)}
    loaded: dict[str, bytes] = {}

    def backend(backend_id: str) -> Backend:
        def load(records) -> None:
            loaded[backend_id] = b"".join(records)

        return Backend(backend_id, lambda: states[backend_id], load, address=bus_address)

    async with backend("big"), backend("small"):
        infos = await list_backends(client)
        image = tmp_path / "vm.vmstate"
        await save_to_file(client, infos, image)
        yield infos, image, states, loaded


async def test_the_vmm_moves_the_streams_without_reading_them(client, two_files, monkeypatch):
    """The streams go from the file to the back-ends' pipes by splice(2): the
    VMM itself reads only the file's header, index and segment headers."""
    infos, image, states, loaded = two_files
    read = []
    original = SaveFileReader._read

    def counted(self, offset, size, buffer=None):
        read.append(size)
        return original(self, offset, size, buffer)

    monkeypatch.setattr(SaveFileReader, "_read", counted)
    await load_from_file(client, infos, image)
    assert loaded == states
    assert sum(read) < 4096, f"the VMM read {sum(read)} bytes of a {image.stat().st_size}-byte file"


async def test_a_file_system_without_splice_loads_by_copying(client, two_files, monkeypatch):
    infos, image, states, loaded = two_files

    def no_splice(*args, **kwargs):
        raise OSError(errno.EINVAL, "splice not supported here")

    monkeypatch.setattr(os, "splice", no_splice)
    await load_from_file(client, infos, image)
    assert loaded == states
