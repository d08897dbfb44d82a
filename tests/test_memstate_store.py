"""memstate's daemon on its DirtyStore: the memory layout, iterative migration
with the dirtier running, the report; no bus, real threads."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbus_vmstate2.backend.daemon import Pending, PreCopyDaemon
from dbus_vmstate2.backend.dirty import decode_entries, encode_entries, entry_size
from dbus_vmstate2.examples.memstate import (
    BLOCK_SIZE,
    Dirtier,
    MemState,
    block_key,
    build_parser,
    deterministic_blocks,
    deterministic_state,
    file_blocks,
)
from dbus_vmstate2.stream import Record, RecordType

SIZE = 3 * BLOCK_SIZE + 12345

# SHA-256 of deterministic_state(size, seed) as memstate made it before it
# kept its memory in blocks: the bytes must not change.
KNOWN = {
    (300 << 10, 7): "97946dd9ebfac2ca",
    ((3 << 20) + 5, 5): "795b0c8b23f8f983",
    (70 << 20, 9): "4b8742fb34e46e83",
}


class Stream(list):
    """Records as a load gets them, numbered in order."""

    def add(self, kind: RecordType, payloads: Iterable[bytes]) -> Stream:
        for payload in payloads:
            self.append(Record(len(self), kind, memoryview(payload).toreadonly(), len(payload), len(payload)))
        return self


def stream(*parts: tuple[RecordType, Iterable[bytes]]) -> Stream:
    """Records from (type, payloads) parts in order."""
    records = Stream()
    for kind, payloads in parts:
        records.add(kind, payloads)
    return records


@pytest.fixture
def report_file(tmp_path):
    """Open report files as memstate does (append), closed at the end of the test."""
    opened = []

    def open_report(name: str):
        opened.append((tmp_path / name).open("a"))
        return opened[-1]

    yield open_report
    for file in opened:
        file.close()


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("size", "seed"), list(KNOWN))
def test_the_deterministic_bytes_are_those_memstate_always_made(size, seed):
    state = deterministic_state(size, seed)
    assert sha(state).startswith(KNOWN[size, seed])
    blocks = list(deterministic_blocks(size, seed))
    assert b"".join(blocks) == state
    assert all(len(b) == BLOCK_SIZE for b in blocks[:-1]) and 0 < len(blocks[-1]) <= BLOCK_SIZE


def test_memory_in_blocks_keyed_in_memory_order():
    memory = MemState(deterministic_blocks(SIZE, 5))
    assert isinstance(memory, PreCopyDaemon)
    assert len(memory) == 4 and sorted(memory) == [block_key(n) for n in range(4)]
    assert block_key(1) < block_key(256)
    assert b"".join(memory.blocks()) == deterministic_state(SIZE, 5)
    assert memory.memory_digest() == (sha(deterministic_state(SIZE, 5)), SIZE)
    assert memory.total_bytes == memory.pending().total_bytes == SIZE


def test_a_state_file_is_read_block_by_block(tmp_path):
    path = tmp_path / "state"
    path.write_bytes(deterministic_state(SIZE, 2))
    memory = MemState(file_blocks(path))
    assert [len(b) for b in memory.blocks()] == [BLOCK_SIZE] * 3 + [12345]
    assert b"".join(memory.blocks()) == path.read_bytes()
    (tmp_path / "empty").write_bytes(b"")
    assert len(MemState(file_blocks(tmp_path / "empty"))) == 0


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


@pytest.mark.slow
def test_the_state_is_held_once_at_start_up(memstate, tmp_path):
    # What users copy must not hold its state twice while making it: its peak
    # is its state, plus the deterministic bytes' 64 MiB pool, beyond an empty memstate's.
    size = 256 << 20
    path = tmp_path / "state"
    with path.open("wb") as file:
        for block in deterministic_blocks(size, 3):
            file.write(block)
    empty = peak_rss(memstate("empty").process.pid)
    for args in (["--state-file", str(path)], ["--size", str(size), "--seed", "3"]):
        peak = peak_rss(memstate(args[0].strip("-"), *args).process.pid)
        assert peak - empty < size + (80 << 20), f"memstate {args[0]} peaked {(peak - empty) >> 20} MiB above an empty one"
    path.unlink()


def test_only_the_last_block_may_be_short():
    with pytest.raises(ValueError, match="only the last block"):
        MemState([b"x" * 10, b"y" * 10])


def test_a_one_shot_save_is_the_raw_memory_without_a_copy():
    memory = MemState(deterministic_blocks(SIZE, 5))
    records = list(memory.save())
    assert b"".join(records) == deterministic_state(SIZE, 5)
    assert [len(r) for r in records] == [BLOCK_SIZE] * 3 + [12345]  # as the library cut the old blob
    assert all(record is block for record, block in zip(records, memory.blocks(), strict=True))


@pytest.mark.parametrize("cut", [BLOCK_SIZE, 40000, SIZE, 1 << 24])
def test_a_raw_image_loads_however_it_was_cut(cut, tmp_path, report_file):
    state = bytes(deterministic_state(SIZE, 4))
    dest = MemState(save_loaded=tmp_path / "loaded", report=report_file("report"))
    dest.load(iter(stream((RecordType.DATA, [state[i : i + cut] for i in range(0, len(state), cut)]))))
    assert b"".join(dest.blocks()) == state == (tmp_path / "loaded").read_bytes()
    assert [len(b) for b in dest.blocks()] == [BLOCK_SIZE] * 3 + [12345]
    assert json.loads((tmp_path / "report").read_text()) == {"event": "loaded", "digest": sha(state), "bytes": SIZE}


def test_a_load_keeps_whole_bytes_payloads_and_copies_views_of_buffers_that_may_be_reused():
    # The load contract (backend/daemon.py): a payload viewing a whole bytes
    # object may be kept as that object; any other is copied before load returns.
    state = bytes(deterministic_state(SIZE, 6))
    whole = [state[i : i + BLOCK_SIZE] for i in range(0, SIZE, BLOCK_SIZE)]
    reused = bytearray(state)
    dest = MemState()
    dest.load(iter(stream((RecordType.DATA, whole))))
    assert all(kept is sent for kept, sent in zip(dest.blocks(), whole, strict=True))
    dest.load(Record(n, RecordType.DATA, memoryview(reused)[i : i + 40000].toreadonly(), 40000, 40000)
              for n, i in enumerate(range(0, SIZE, 40000)) if SIZE - i >= 40000)
    reused[:] = bytes(len(reused))  # the library reusing its buffer after the load
    assert b"".join(dest.blocks()) == state[: SIZE // 40000 * 40000]


def test_an_empty_raw_state_loads_as_no_memory(tmp_path):
    dest = MemState(deterministic_blocks(100, 1), save_loaded=tmp_path / "loaded")
    dest.load(iter(stream((RecordType.DATA, [b""]))))
    assert len(dest) == 0 and (tmp_path / "loaded").read_bytes() == b""


def test_memory_data_after_the_dirty_records_is_refused_and_changes_nothing():
    dest = MemState(deterministic_blocks(1000, 1))
    before = dest.memory_digest()
    source = MemState(deterministic_blocks(SIZE, 3))
    records = stream(
        (RecordType.DATA, source.save()),  # records 0 to 3
        (RecordType.END_OF_INITIAL, [b""]),
        (RecordType.DIRTY, [encode_entries([(block_key(0), b"x" * BLOCK_SIZE)])]),
        (RecordType.DATA, [b"late"]),
    )
    with pytest.raises(ValueError, match=r"record 6 \(DATA\): memory data after"):
        dest.load(iter(records))
    assert dest.memory_digest() == before


def test_dirty_records_are_entries_of_whole_blocks():
    memory = MemState(deterministic_blocks(SIZE, 5))
    memory.precopy_start()
    list(memory.initial_records())
    memory.rewrite(3, b"z" * 12345)
    with pytest.raises(ValueError, match="not 5"):
        memory.rewrite(3, b"short")
    assert memory.pending() == Pending(0, entry_size(block_key(3), b"z" * 12345), SIZE)
    [record] = memory.dirty_records()
    assert list(decode_entries(record)) == [(block_key(3), b"z" * 12345)]
    memory.precopy_end()


def test_iterative_migration_with_the_dirtier_running(tmp_path, report_file):
    report = tmp_path / "report"
    source = MemState(deterministic_blocks(8 * BLOCK_SIZE + 100, 6), report=report_file("report"))
    dirtier = Dirtier(source, rate=40 << 20, seed=1)
    dirtier.start()
    try:
        records = Stream()
        source.precopy_start()
        for record in source.initial_records():
            records.add(RecordType.DATA, [record])
            time.sleep(0.02)
        records.add(RecordType.END_OF_INITIAL, [b""])
        for _ in range(3):
            time.sleep(0.05)
            records.add(RecordType.DIRTY, source.dirty_records())
        source.quiesce()
        records.add(RecordType.DIRTY, source.dirty_records())
        source.precopy_end()
        rewritten = dirtier.rewritten
        time.sleep(0.1)
        assert dirtier.rewritten <= rewritten + BLOCK_SIZE, "the dirtier went on while quiesced"
        frozen = source.memory_digest()
    finally:
        source.resume()
        dirtier.stop()
        dirtier.join(5)
    assert rewritten > 2 * BLOCK_SIZE, "the dirtier hardly ran"
    assert any(r.type is RecordType.DIRTY for r in records)
    dest_report = tmp_path / "dest-report"
    dest = MemState(save_loaded=tmp_path / "loaded", report=report_file("dest-report"))
    dest.load(iter(records))
    [quiesced] = [json.loads(line) for line in report.read_text().splitlines()]
    [loaded] = [json.loads(line) for line in dest_report.read_text().splitlines()]
    assert quiesced == {"event": "quiesced", "digest": frozen[0], "bytes": frozen[1]}
    assert loaded == {"event": "loaded", "digest": frozen[0], "bytes": 8 * BLOCK_SIZE + 100}
    assert sha((tmp_path / "loaded").read_bytes()) == frozen[0]
    assert frozen[0] != sha(deterministic_state(8 * BLOCK_SIZE + 100, 6)), "nothing changed?"


def test_the_dirtier_keeps_to_its_rate_and_to_the_block_sizes():
    memory = MemState(deterministic_blocks(4 * BLOCK_SIZE + 7, 1))
    dirtier = Dirtier(memory, rate=4 << 20, seed=2)
    started = time.monotonic()
    dirtier.start()
    time.sleep(0.5)
    dirtier.stop()
    dirtier.join(5)
    elapsed = time.monotonic() - started
    assert BLOCK_SIZE <= dirtier.rewritten <= elapsed * (4 << 20) + BLOCK_SIZE
    assert [len(b) for b in memory.blocks()] == [BLOCK_SIZE] * 4 + [7]


def test_the_options():
    args = build_parser().parse_args(["--id", "m", "--size", "2M", "--dirty-rate", "512K", "--report", "r.jsonl"])
    assert (args.size, args.dirty_rate, str(args.report)) == (2 << 20, 512 << 10, "r.jsonl")
    assert build_parser().parse_args(["--id", "m"]).dirty_rate == 0


@settings(max_examples=60, deadline=None)
@given(
    blocks=st.integers(0, 3),
    tail=st.integers(0, 100),
    ops=st.lists(st.one_of(st.tuples(st.just("rewrite"), st.integers(0, 3), st.integers(0, 255)), st.just(("pull",)), st.just(("round",))), max_size=30),
)
def test_any_interleaving_of_rewrites_and_rounds_migrates_the_memory(blocks, tail, ops):
    size = blocks * BLOCK_SIZE + tail
    source = MemState(deterministic_blocks(size, 1))
    records = Stream()
    source.precopy_start()
    current, kind = source.initial_records(), RecordType.DATA
    for op, *args in ops:
        if op == "rewrite" and len(source):
            number = args[0] % len(source)
            source.rewrite(number, bytes([args[1]]) * len(source[block_key(number)]))
        elif op == "pull":
            record = next(current, None)
            if record is not None:
                records.add(kind, [record])
            else:
                if kind is RecordType.DATA:
                    records.add(RecordType.END_OF_INITIAL, [b""])
                current, kind = source.dirty_records(), RecordType.DIRTY
        elif op == "round":
            current, kind = source.dirty_records(), RecordType.DIRTY
    source.quiesce()
    records.add(kind, current).add(RecordType.DIRTY, source.dirty_records())
    source.precopy_end()
    dest = MemState()
    dest.load(iter(records))
    assert dest.memory_digest() == source.memory_digest()
    assert dest.digest() == source.digest()
