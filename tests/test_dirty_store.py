"""DirtyStore: the iterative-migration store, tested without a bus, with real threads."""

from __future__ import annotations

import os
import random
import threading
import time
import tracemalloc
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbus_vmstate2.backend import dirty
from dbus_vmstate2.backend.daemon import Daemon, Pending, PreCopyDaemon
from dbus_vmstate2.stream import MAX_RECORD_SIZE, Compression, Record, RecordType, decode_stream, encode_stream

DirtyStore = dirty.DirtyStore
entry_size = dirty.entry_size

# -- helpers --------------------------------------------------------------------------


class Stream:
    """The records a source yields, as a destination's load would get them."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def add(self, kind: RecordType, payload: bytes) -> None:
        view = memoryview(payload).toreadonly()
        self.records.append(Record(len(self.records), kind, view, len(payload), len(payload)))

    def extend(self, kind: RecordType, payloads: Iterable[bytes]) -> list[bytes]:
        added = list(payloads)
        for payload in added:
            self.add(kind, payload)
        return added

    def end_of_initial(self) -> None:
        self.add(RecordType.END_OF_INITIAL, b"")

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


def saved(store: DirtyStore) -> Stream:
    stream = Stream()
    stream.extend(RecordType.DATA, store.save())
    return stream


def loaded(stream: Iterable[Record]) -> DirtyStore:
    dest = DirtyStore()
    dest.load(iter(stream))
    return dest


def content_size(store: DirtyStore) -> int:
    return sum(entry_size(k, v) for k, v in store.items())


def sample_store(record_size: int = 1000) -> DirtyStore:
    rng = random.Random(1)
    store = DirtyStore(record_size=record_size)
    for n in range(200):
        store.put(b"k%04d" % n, rng.randbytes(rng.randrange(0, 300)))
    store.put(b"", b"the empty key")
    store.put(b"empty value", b"")
    store.put(b"large", rng.randbytes(5 * record_size))
    return store


class Writer(threading.Thread):
    """Keeps putting and deleting random keys until stopped (blocked by quiesce like any writer)."""

    def __init__(self, store: DirtyStore, keys: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.store, self.keys, self.rng = store, keys, random.Random(seed)
        self.stop = threading.Event()
        self.writes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            key = b"w%03d" % self.rng.randrange(self.keys)
            if self.rng.random() < 0.2:
                self.store.delete(key)
            else:
                self.store.put(key, self.rng.randbytes(self.rng.randrange(1, 600)))
            self.writes += 1
            if self.writes % 16 == 0:
                time.sleep(0.0005)  # let the reader in too


# -- the contract and the daemon's API ------------------------------------------------


def test_it_is_a_daemon_and_a_precopy_daemon():
    store = DirtyStore()
    assert isinstance(store, Daemon)
    assert isinstance(store, PreCopyDaemon)


def test_the_daemons_api():
    store = DirtyStore({b"a": b"1"})
    store.put(bytearray(b"b"), memoryview(b"22"))
    store.update([(b"c", b"333"), (b"a", b"4444")])
    assert store[b"b"] == b"22" and type(store[b"b"]) is bytes
    assert store.get(b"a") == b"4444" and store.get(b"zz") is None and store.get(b"zz", b"d") == b"d"
    assert len(store) == 3 and b"c" in store and b"zz" not in store and "c" not in store
    assert sorted(store) == [b"a", b"b", b"c"]
    assert dict(store.items()) == {b"a": b"4444", b"b": b"22", b"c": b"333"}
    assert store.total_bytes == content_size(store) == 3 * 7 + 3 + 4 + 2 + 3
    assert store.delete(b"b") is True and store.delete(b"b") is False
    assert store.total_bytes == content_size(store)
    with pytest.raises(KeyError):
        store[b"b"]
    assert store.pending() == Pending(0, 0, store.total_bytes)


def test_a_store_copies_another():
    source = sample_store()
    assert DirtyStore(source).digest() == source.digest()


def test_iteration_is_a_snapshot():
    store = DirtyStore({b"%d" % n: b"v" for n in range(10)})
    for key in store:
        store.delete(key)
        store.put(key + b"'", b"w")
    assert len(store) == 10


def test_digest_depends_on_the_content_only():
    one = DirtyStore([(b"a", b"1"), (b"b", b"2")])
    other = DirtyStore([(b"b", b"2"), (b"a", b"1")])
    assert one.digest() == other.digest() and len(one.digest()) == 32
    # Unambiguous: moving a byte from a key to its value changes it.
    assert DirtyStore({b"ab": b"c"}).digest() != DirtyStore({b"a": b"bc"}).digest()
    other.put(b"a", b"x")
    assert one.digest() != other.digest()


def test_keys_and_values_are_bytes():
    store = DirtyStore()
    with pytest.raises(TypeError, match="encode a str key"):
        store.put("inode", b"v")
    with pytest.raises(TypeError):
        store.put(b"k", "v")
    with pytest.raises(TypeError):
        store.delete(42)


def test_a_value_too_large_for_a_record_is_refused_at_put():
    store = DirtyStore()
    key = b"k" * 10
    biggest = dirty.max_value_size(key)
    assert biggest == MAX_RECORD_SIZE - 7 - 10
    with pytest.raises(ValueError, match="would not fit in one"):
        store.put(key, bytes(biggest + 1))
    with pytest.raises(ValueError, match="at most 65535"):
        store.put(bytes(dirty.MAX_KEY_SIZE + 1), b"")
    with pytest.raises(ValueError):
        store.update([(b"ok", b"1"), (key, bytes(biggest + 1))])
    assert len(store) == 0, "update is all or nothing"
    store.put(key, bytes(biggest))
    [record] = store.save()
    assert len(record) == MAX_RECORD_SIZE


def test_record_size_must_fit_the_stream():
    for bad in (0, MAX_RECORD_SIZE + 1):
        with pytest.raises(ValueError):
            DirtyStore(record_size=bad)


# -- one-shot save and load -----------------------------------------------------------


def test_save_and_load_round_trip():
    source = sample_store()
    dest = loaded(saved(source))
    assert dest.digest() == source.digest()
    assert dict(dest.items()) == dict(source.items())
    assert dest.total_bytes == source.total_bytes


def test_save_through_a_real_stream_round_trip():
    source = sample_store()
    data = encode_stream("store", [(RecordType.DATA, r) for r in source.save()], Compression.ZSTD)
    dest = loaded(decode_stream(data, "store").records)
    assert dest.digest() == source.digest()


def test_save_records_are_packed_bounded_and_add_up():
    source = sample_store(record_size=1000)
    records = list(source.save())
    assert sum(map(len, records)) == source.total_bytes
    large = entry_size(b"large", source[b"large"])
    assert large in map(len, records), "a large entry travels alone"
    assert all(len(r) <= 1000 for r in records if len(r) != large)
    # Packed: each record but the last has no room for the next entry.
    assert len(records) < 1 + (source.total_bytes - large) // (1000 - 300 - 12) + 2


def test_save_is_a_snapshot_taken_at_the_call():
    source = sample_store()
    expected = source.digest()
    records = source.save()
    source.put(b"k0000", b"changed")
    source.delete(b"k0001")
    source.put(b"new", b"key")
    stream = Stream()
    stream.extend(RecordType.DATA, records)
    assert loaded(stream).digest() == expected


def test_an_empty_store_saves_no_records():
    assert list(DirtyStore().save()) == []
    assert len(loaded(Stream())) == 0


def test_load_replaces_the_whole_content():
    dest = DirtyStore({b"old": b"gone after the load", b"k0000": b"replaced"})
    source = sample_store()
    dest.load(iter(saved(source)))
    assert dest.digest() == source.digest() and b"old" not in dest


def test_a_failing_load_leaves_the_store_untouched():
    dest = sample_store()
    before = dest.digest()

    def breaks() -> Iterator[Record]:
        yield from saved(DirtyStore({b"k0000": b"x", b"other": b"y"}))
        raise ConnectionError("the stream broke")

    with pytest.raises(ConnectionError):
        dest.load(breaks())
    assert dest.digest() == before


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x01\x00\x01\x00", "fewer than the 7-byte entry header"),
        (b"\x03\x00\x00\x00\x00\x00\x00", "unknown op 3"),
        (b"\x00\x00\x00\x00\x00\x00\x00", "unknown op 0"),
        (b"\x02\x00\x01\x00\x00\x00\x01kv", "DELETE with a 1-byte value"),
        (b"\x01\x00\x01\x00\x00\x00\x05kval", "need 6 bytes, the payload has 4 left"),
        (dirty.encode_entries([(b"k", b"v")]) + b"\x01", "offset 9"),
    ],
)
def test_a_malformed_payload_is_a_clear_value_error_and_changes_nothing(payload, message):
    dest = sample_store()
    before = dest.digest()
    stream = saved(DirtyStore({b"a": b"b"}))
    stream.add(RecordType.DIRTY, payload)
    with pytest.raises(ValueError, match=message) as caught:
        dest.load(iter(stream))
    assert "record 1 (DIRTY)" in str(caught.value)
    assert dest.digest() == before


def test_encode_and_decode_entries_are_inverse():
    entries = [(b"k", b"v"), (b"", b""), (b"gone", None), (b"\xff" * 300, bytes(70000))]
    payload = dirty.encode_entries(entries)
    assert list(dirty.decode_entries(payload)) == entries
    assert len(payload) == sum(entry_size(k, v) for k, v in entries)
    assert payload[:11] == bytes.fromhex("01 0001 00000001") + b"kv" + b"\x01\x00"


# -- iterative pre-copy -----------------------------------------------------------------


def iterative(source: DirtyStore, rounds: int, between=lambda: None) -> tuple[Stream, bytes]:
    """Migrate ``source`` iteratively: initial, ``rounds`` rounds, quiesce, a final round.

    Returns the stream and the source's digest at quiesce; ``between`` runs
    after every record pulled.  The source is left quiesced.
    """
    stream = Stream()
    source.precopy_start()
    try:
        for record in source.initial_records():
            stream.add(RecordType.DATA, record)
            between()
        stream.end_of_initial()
        for _ in range(rounds):
            for record in source.dirty_records():
                stream.add(RecordType.DIRTY, record)
                between()
        source.quiesce()
        at_quiesce = source.digest()
        stream.extend(RecordType.DIRTY, source.dirty_records())
        assert source.pending().dirty_bytes == 0
    finally:
        source.precopy_end()
    return stream, at_quiesce


def test_iterative_round_trip_while_another_thread_keeps_writing():
    source = DirtyStore(record_size=2000)
    for n in range(300):
        source.put(b"w%03d" % n, bytes([n % 256]) * 500)
    writer = Writer(source, keys=400, seed=3)
    writer.start()
    try:
        time.sleep(0.01)
        writes_before = writer.writes
        stream, at_quiesce = iterative(source, rounds=5, between=lambda: time.sleep(0.001))
        writes_at_quiesce = writer.writes
        time.sleep(0.05)
        # (the writer may count the write it finished just before the quiesce)
        assert writer.writes <= writes_at_quiesce + 1, "a write went through while quiesced"
        assert source.digest() == at_quiesce
    finally:
        source.resume()
        writer.stop.set()
        writer.join()
    assert writes_at_quiesce - writes_before > 50, "the writer hardly ran during the pre-copy"
    assert any(r.type is RecordType.DIRTY for r in stream)
    assert loaded(stream).digest() == at_quiesce


def test_deletes_propagate_wherever_they_happen():
    source = DirtyStore({b"%02d" % n: b"v%d" % n for n in range(40)}, record_size=64)
    stream = Stream()
    source.precopy_start()
    initial = source.initial_records()
    stream.add(RecordType.DATA, next(initial))  # the first keys went
    sent = {k for k, _ in dirty.decode_entries(stream.records[0].payload)}
    gone_after_sent = sorted(sent)[0]
    gone_before_sent = b"39"
    assert gone_before_sent not in sent
    source.delete(gone_after_sent)
    source.delete(gone_before_sent)
    stream.extend(RecordType.DATA, initial)
    stream.end_of_initial()
    source.delete(b"20")  # after the initial data
    source.put(b"new", b"1")
    source.delete(b"new")  # never reached the destination: a harmless tombstone
    stream.extend(RecordType.DIRTY, source.dirty_records())
    source.quiesce()
    stream.extend(RecordType.DIRTY, source.dirty_records())
    source.precopy_end()
    dest = loaded(stream)
    assert dest.digest() == source.digest()
    for key in (gone_after_sent, gone_before_sent, b"20", b"new"):
        assert key not in dest


def test_a_key_changed_before_it_is_reached_goes_once_with_its_new_value():
    source = DirtyStore({b"a": b"1", b"b": b"2"}, record_size=8)
    source.precopy_start()
    initial = source.initial_records()
    first = list(dirty.decode_entries(next(initial)))
    assert first == [(b"a", b"1")]
    source.put(b"b", b"new")
    source.put(b"a", b"again")
    assert list(dirty.decode_entries(next(initial))) == [(b"b", b"new")]
    assert list(initial) == []
    assert [e for r in source.dirty_records() for e in dirty.decode_entries(r)] == [(b"a", b"again")]
    assert list(source.dirty_records()) == []
    source.precopy_end()


def test_pending_falls_to_zero_as_data_goes_and_tracks_writes():
    source = DirtyStore({b"%03d" % n: bytes(100) for n in range(100)}, record_size=1000)
    total = source.total_bytes
    assert total == 100 * (7 + 3 + 100)
    assert source.pending() == Pending(0, 0, total)
    source.precopy_start()
    assert source.pending() == Pending(total, 0, total)
    seen = []
    initial = source.initial_records()
    sent = 0
    for record in initial:
        sent += len(record)
        seen.append(source.pending().initial_bytes)
        assert source.pending().initial_bytes == total - sent
        if len(seen) == 2:
            # A key not yet sent changes size: the initial data counts it, nothing is dirty.
            source.put(b"099", bytes(150))
            total += 50
            assert source.pending() == Pending(total - sent, 0, total)
    assert seen[-1] == 0 and seen == sorted(seen, reverse=True)
    assert source.pending() == Pending(0, 0, total)
    source.put(b"000", bytes(10))  # sent: dirty at its new size
    source.put(b"new", bytes(20))
    source.delete(b"001")  # a tombstone
    dirty_now = entry_size(b"000", bytes(10)) + entry_size(b"new", bytes(20)) + entry_size(b"001", None)
    total = source.total_bytes
    assert source.pending() == Pending(0, dirty_now, total)
    source.put(b"000", bytes(30))  # again: counted once, at its current size
    dirty_now += 20
    assert source.pending() == Pending(0, dirty_now, source.total_bytes)
    round_bytes = sum(map(len, source.dirty_records()))
    assert round_bytes == dirty_now
    assert source.pending() == Pending(0, 0, source.total_bytes)
    source.precopy_end()
    source.put(b"000", b"untracked")
    assert source.pending() == Pending(0, 0, source.total_bytes)


def test_a_stop_copy_before_the_initial_data_is_done_sends_the_rest_in_the_last_round():
    source = DirtyStore({b"%03d" % n: b"x" * 50 for n in range(100)}, record_size=200)
    stream = Stream()
    source.precopy_start()
    initial = source.initial_records()
    stream.add(RecordType.DATA, next(initial))
    source.put(b"000", b"changed after it went")
    source.put(b"050", b"changed before it went")
    source.quiesce()
    left = source.pending()
    assert left.initial_bytes > 0
    final = stream.extend(RecordType.DIRTY, source.dirty_records())
    assert sum(map(len, final)) == left.initial_bytes + left.dirty_bytes
    assert list(initial) == [], "the abandoned initial records have nothing left"
    source.precopy_end()
    assert loaded(stream).digest() == source.digest()


def test_precopy_end_stops_tracking_and_the_generators():
    source = sample_store()
    source.precopy_start()
    initial = source.initial_records()
    next(initial)
    source.put(b"k0000", b"dirty")
    source.precopy_end()
    assert source.pending() == Pending(0, 0, source.total_bytes)
    with pytest.raises(RuntimeError, match="pre-copy ended"):
        next(initial)
    with pytest.raises(RuntimeError, match="precopy_start"):
        source.dirty_records()
    with pytest.raises(RuntimeError, match="precopy_start"):
        source.initial_records()
    source.precopy_end()  # harmless again


def test_a_new_precopy_starts_afresh():
    source = sample_store()
    source.precopy_start()
    list(source.initial_records())
    source.put(b"k0000", b"dirty")
    source.precopy_start()  # the earlier stream is over: a new one starts from scratch
    assert source.pending() == Pending(source.total_bytes, 0, source.total_bytes)
    stream, at_quiesce = iterative(source, rounds=1)
    assert loaded(stream).digest() == at_quiesce == source.digest()


def test_a_load_is_refused_during_a_precopy():
    source = sample_store()
    source.precopy_start()
    with pytest.raises(RuntimeError, match="pre-copy"):
        source.load(iter(saved(DirtyStore())))
    source.precopy_end()


# -- quiesce ---------------------------------------------------------------------------


def test_quiesce_blocks_writers_until_resume():
    store = DirtyStore({b"k": b"before"})
    store.quiesce()
    store.quiesce()  # repeating it does nothing
    assert store.quiesced
    done = threading.Event()

    def write() -> None:
        store.put(b"k", b"after")
        store.delete(b"other")
        done.set()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    assert not done.wait(0.2), "a writer went through while quiesced"
    assert store[b"k"] == b"before"
    assert list(store.save()), "reading and saving go on while quiesced"
    store.resume()
    assert done.wait(5)
    thread.join()
    assert store[b"k"] == b"after" and not store.quiesced


def test_a_write_with_a_timeout_gives_up_while_quiesced():
    store = DirtyStore({b"k": b"v"})
    store.quiesce()
    with pytest.raises(TimeoutError):
        store.put(b"k", b"w", timeout=0.05)
    with pytest.raises(TimeoutError):
        store.delete(b"k", timeout=0.05)
    with pytest.raises(TimeoutError):
        store.update({b"k": b"w"}, timeout=0.05)
    assert store[b"k"] == b"v"
    store.resume()
    store.put(b"k", b"w", timeout=0.05)
    assert store[b"k"] == b"w"


def test_quiesce_waits_for_a_write_in_progress():
    # A write holds the store's lock from its check to its end: while a
    # writer is inside (simulated by holding the lock), quiesce cannot return.
    store = DirtyStore()
    returned = threading.Event()
    with store._cond:
        thread = threading.Thread(target=lambda: (store.quiesce(), returned.set()), daemon=True)
        thread.start()
        assert not returned.wait(0.1)
    assert returned.wait(5)
    thread.join()


# -- bounded memory ----------------------------------------------------------------------


RECORD = 64 << 10


@pytest.mark.parametrize("kind", ["save", "initial", "dirty"])
def test_a_round_over_many_keys_holds_about_one_record(kind):
    keys = 20_000
    source = DirtyStore(record_size=RECORD)
    for n in range(keys):
        source.put(b"key%06d" % n, random.randbytes(500))  # 10 MB of state
    if kind != "save":
        source.precopy_start()
    if kind == "dirty":
        list(source.initial_records())
        for n in range(keys):
            source.put(b"key%06d" % n, random.randbytes(500))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        records = {"save": source.save, "initial": source.initial_records, "dirty": source.dirty_records}[kind]()
        count = 0
        for record in records:
            assert len(record) <= RECORD
            count += 1
            del record
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        source.precopy_end()
    assert count >= keys * 500 // RECORD
    # References (a save's snapshot: a dict copy and its sorted keys, about
    # 45 bytes a key; a round's keys, 8) and a few records, never the 10 MB.
    assert peak < 4 * RECORD + (50 if kind == "save" else 10) * keys, f"a {kind} round peaked at {peak} bytes"


# -- property: any sequence of operations and rounds migrates exactly ---------------------

KEYS = st.binary(max_size=3)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), KEYS, st.binary(max_size=40)),
        st.tuples(st.just("delete"), KEYS),
        st.tuples(st.just("pull")),
        st.tuples(st.just("round")),
    ),
    max_size=80,
)


@settings(max_examples=int(os.environ.get("DIRTY_STORE_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.dictionaries(KEYS, st.binary(max_size=40), max_size=20),
    ops=OPS,
    record_size=st.integers(1, 120),
    drain=st.booleans(),
)
def test_any_interleaving_of_writes_and_rounds_migrates_the_state_at_quiesce(initial, ops, record_size, drain):
    source = DirtyStore(initial, record_size=record_size)
    model = dict(initial)
    stream = Stream()
    source.precopy_start()
    records, kind = source.initial_records(), RecordType.DATA
    for op, *args in ops:
        if op == "put":
            source.put(args[0], args[1])
            model[args[0]] = args[1]
        elif op == "delete":
            assert source.delete(args[0]) == (args[0] in model)
            model.pop(args[0], None)
        elif op == "pull":
            record = next(records, None)
            if record is not None:
                stream.add(kind, record)
            else:
                if kind is RecordType.DATA:
                    stream.end_of_initial()
                records, kind = source.dirty_records(), RecordType.DIRTY
        else:  # a stop-copy or a new round cuts the current records short
            records, kind = source.dirty_records(), RecordType.DIRTY
        pending = source.pending()
        assert pending.total_bytes == source.total_bytes == sum(entry_size(k, v) for k, v in model.items())
        assert pending.initial_bytes >= 0 and pending.dirty_bytes >= 0
    source.quiesce()
    if drain:  # the library may go on with the records it was reading, or leave them
        stream.extend(kind, records)
    stream.extend(RecordType.DIRTY, source.dirty_records())
    assert source.pending() == Pending(0, 0, source.total_bytes)
    source.precopy_end()
    assert dict(source.items()) == model
    dest = loaded(stream)
    assert dest.digest() == source.digest()
    assert dict(dest.items()) == model
