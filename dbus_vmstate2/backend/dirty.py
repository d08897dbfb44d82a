"""A ready-made daemon state for iterative migration: keys to bytes values.

:class:`DirtyStore` implements :class:`~.daemon.Daemon` and
:class:`~.daemon.PreCopyDaemon`.  A daemon keeps (part of) its state in it,
changes it with :meth:`~DirtyStore.put` and :meth:`~DirtyStore.delete` from
any thread, and hands the store to the back-end: the store tracks what
changed while a pre-copy runs and turns its content into records.

Keys and values are ``bytes``.  Keys are bytes rather than ``str`` because
the state is binary and the wire carries bytes; a daemon with text keys
encodes them (``"inode/42".encode()``).  Any bytes-like key or value is
accepted and stored as ``bytes``.  A key is 0 to :data:`MAX_KEY_SIZE` bytes;
a value is at most what fits with its key in one record (``MAX_RECORD_SIZE``,
16 MiB, less the entry's header and key: :func:`max_value_size`).

Theory of operation.  Every value is an immutable ``bytes`` object, so a
consistent snapshot is a shallow copy of the dict, taken under the lock in
time proportional to the number of keys, never to their size.  While a
pre-copy runs, each key is in at most one of two sets: *unsent* (the initial
data not yet yielded; the keys when tracking started) or *dirty* (changed
since it was last yielded, or since tracking started if it was not among the
initial keys).  A write to an unsent key leaves it unsent (the initial
records will carry its newest value); a write to any other key marks it
dirty.  A key leaves its set at the moment its record is built, under the
lock, with the value it has at that moment: a key written again after that
is dirty again and goes in a later round, so at quiesce every change is
either already yielded or in the dirty set, and the last round sends it.
Records are built one at a time, as the library pulls them, so a round's
memory is about one record beyond the references to the values; the key
lists a round walks cost 8 bytes a key (a one-shot save's snapshot about 50).

Record payload format (the daemon's own business; docs/stream-format.md §3
treats payloads as opaque).  A DIRTY record's payload, and by default a DATA
record's too, is a sequence of entries, back to back, nothing before or
after::

    offset  size  field
    0       1     op: 1 = PUT, 2 = DELETE (a tombstone)
    1       2     key length, unsigned big-endian (0..65535)
    3       4     value length, unsigned big-endian (0 for DELETE)
    7       k     the key
    7+k     v     the value (PUT only)

A record holds at least one entry; entries are packed until the next would
take the record past ``record_size`` (default 1 MiB), so an entry larger than
``record_size`` travels alone in its record, up to the 16 MiB record limit.
The initial data (a one-shot save's records, and the pre-copy's DATA
records) goes in ascending key order.  Byte counts are exact counts of record
bytes: an entry's size is 7 + key + value (7 + key for a tombstone);
:attr:`~DirtyStore.total_bytes` and the initial bytes of :meth:`~DirtyStore.
pending` count the keys' DATA sizes (their entries' by default), so a
one-shot save's records add up to exactly ``total_bytes``.
END_OF_INITIAL records carry no payload.  A load applies the entries of
every DATA and DIRTY record in stream order to an empty state (a stream
always carries the whole state: its initial data is every key), the last
entry for a key winning; a DELETE of a key that is not there does nothing.

A subclass may lay out its DATA records differently (memstate sends its
memory image as it is, so that a one-shot save is the raw state that
QEMU's VMState1 and older readers expect): it overrides :meth:`~DirtyStore.
data_size`, :meth:`~DirtyStore.encode_data` and :meth:`~DirtyStore.
data_decoder` together.  DIRTY records are always entries.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..stream import MAX_RECORD_SIZE, Record, RecordType
from .daemon import Pending
from .records import BytesLike

__all__ = [
    "DELETE",
    "ENTRY_HEADER_SIZE",
    "MAX_KEY_SIZE",
    "PUT",
    "RECORD_SIZE",
    "DataDecoder",
    "DirtyStore",
    "Entry",
    "EntryDecoder",
    "decode_entries",
    "encode_entries",
    "entry_size",
    "max_value_size",
]

PUT = 1
"""Entry op: set the key to the value."""
DELETE = 2
"""Entry op: remove the key (a tombstone; no value)."""

_HEADER = struct.Struct(">BHI")
ENTRY_HEADER_SIZE = _HEADER.size
"""Bytes before an entry's key: op, key length, value length."""
MAX_KEY_SIZE = 0xFFFF
"""The longest key, in bytes (its length is a 16-bit field)."""
RECORD_SIZE = 1 << 20
"""The default record size: entries are packed up to this many bytes."""

Entry = tuple[bytes, bytes | None]
"""A key and its value, or None for a DELETE."""


def entry_size(key: bytes, value: bytes | None) -> int:
    """The encoded size of the entry for ``key``: a PUT of ``value``, or a tombstone if None."""
    return ENTRY_HEADER_SIZE + len(key) + (0 if value is None else len(value))


def max_value_size(key: bytes) -> int:
    """The largest value :meth:`DirtyStore.put` accepts for ``key`` (its entry fills a record)."""
    return MAX_RECORD_SIZE - ENTRY_HEADER_SIZE - len(key)


def encode_entries(entries: Iterable[Entry]) -> bytes:
    """One record payload: each ``(key, value)`` as a PUT, or as a DELETE if value is None.

    The values are copied once, into the payload (``b"".join``).
    """
    parts: list[bytes] = []
    for key, value in entries:
        if value is None:
            parts += (_HEADER.pack(DELETE, len(key), 0), key)
        else:
            parts += (_HEADER.pack(PUT, len(key), len(value)), key, value)
    return b"".join(parts)


def decode_entries(payload: BytesLike) -> Iterator[Entry]:
    """The entries of one record payload, in order: ``(key, value)``, value None for a DELETE.

    Keys and values are copied out of ``payload`` (a record's payload is only
    valid during the load call).

    Raises:
        ValueError: the payload is not a sequence of well-formed entries.
    """
    view = memoryview(payload).cast("B")
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < ENTRY_HEADER_SIZE:
            raise ValueError(
                f"entry at offset {offset}: {end - offset} bytes left, "
                f"fewer than the {ENTRY_HEADER_SIZE}-byte entry header"
            )
        op, key_size, value_size = _HEADER.unpack_from(view, offset)
        if op not in (PUT, DELETE):
            raise ValueError(f"entry at offset {offset}: unknown op {op} (expected {PUT} PUT or {DELETE} DELETE)")
        if op == DELETE and value_size:
            raise ValueError(f"entry at offset {offset}: DELETE with a {value_size}-byte value, expected none")
        start = offset + ENTRY_HEADER_SIZE
        stop = start + key_size + value_size
        if stop > end:
            raise ValueError(
                f"entry at offset {offset}: its key and value need {key_size + value_size} bytes, "
                f"the payload has {end - start} left"
            )
        key = bytes(view[start : start + key_size])
        yield key, (bytes(view[start + key_size : stop]) if op == PUT else None)
        offset = stop


class DataDecoder(Protocol):
    """Turns the DATA payloads of one load into entries (see :meth:`DirtyStore.data_decoder`)."""

    def feed(self, payload: memoryview) -> Iterable[Entry]:
        """The entries of one DATA payload (copied out: the payload is valid only during the load).

        Raises:
            ValueError: the payload is malformed.
        """
        ...

    def close(self) -> Iterable[Entry]:
        """What is left once the DATA records are over: called at the first
        record of another type, or at the stream's end, whichever comes
        first.  A DATA record may still follow (a layout may refuse it).

        Raises:
            ValueError: the DATA records ended in a state they cannot end in.
        """
        ...


class EntryDecoder:
    """The default :class:`DataDecoder`: DATA payloads are entries, like DIRTY ones."""

    def feed(self, payload: memoryview) -> Iterator[Entry]:
        return decode_entries(payload)

    def close(self) -> tuple[()]:
        return ()


@dataclass(eq=False)
class _Tracking:
    """What one pre-copy tracks (see the module's theory of operation)."""

    unsent: dict[bytes, None]
    """Initial keys not yet yielded, in the order they go (a dict as an ordered set)."""
    initial_bytes: int
    """The current entry sizes of the unsent keys."""
    dirty: dict[bytes, None] = field(default_factory=dict)
    """Keys changed since they were last yielded (or since tracking started)."""
    dirty_bytes: int = 0
    """The current entry sizes of the dirty keys (a tombstone's for a deleted key)."""


class DirtyStore:
    """A thread-safe map of bytes keys to bytes values that migrates iteratively.

    Args:
        items: the initial content (a mapping, another store, or ``(key, value)`` pairs).
        record_size: entries are packed into records of up to this many
            bytes (an entry larger than that goes alone in its record).

    Raises:
        ValueError: ``record_size`` is not between 1 and ``MAX_RECORD_SIZE``,
            or an item is refused as :meth:`put` refuses it.

    The daemon's API (:meth:`put`, :meth:`delete`, :meth:`update`,
    :meth:`get`, ``[]``, ``len``, ``in``, iteration, :meth:`items`,
    :meth:`digest`, :attr:`total_bytes`) may be called from any thread.
    Writes block while the store is quiesced (:meth:`quiesce` to
    :meth:`resume`): do not write from the event loop that serves the bus (it
    would stall the Resume that unblocks it); write from the daemon's own
    threads, or pass a timeout.

    The contract's methods (:meth:`save`, :meth:`load` and the
    :class:`~.daemon.PreCopyDaemon` ones) are called by the back-end library
    from its worker threads; they are safe from any other thread too.
    """

    def __init__(
        self,
        items: Mapping[BytesLike, BytesLike] | DirtyStore | Iterable[tuple[BytesLike, BytesLike]] = (),
        *,
        record_size: int = RECORD_SIZE,
    ) -> None:
        if not 0 < record_size <= MAX_RECORD_SIZE:
            raise ValueError(f"record_size {record_size} is not between 1 and {MAX_RECORD_SIZE}")
        self.record_size = record_size
        self._cond = threading.Condition(threading.Lock())
        self._data: dict[bytes, bytes] = {}
        self._total = 0
        self._tracking: _Tracking | None = None
        self._quiesced = False
        self.update(items)

    # -- the daemon's API -------------------------------------------------------------

    def put(self, key: BytesLike, value: BytesLike, *, timeout: float | None = None) -> None:
        """Set ``key`` to ``value`` (any thread).

        Blocks while the store is quiesced.

        Raises:
            TypeError: the key or value is not bytes-like (encode a str key).
            ValueError: the key is over :data:`MAX_KEY_SIZE` bytes, or the
                value over :func:`max_value_size` (its entry could not fit in
                a record): nothing changes.
            TimeoutError: still quiesced after ``timeout`` seconds: nothing changes.
        """
        key, value = _as_key(key), _as_value(value)
        _check_entry(key, value)
        with self._cond:
            self._wait_writable(timeout)
            self._set(key, value)

    def delete(self, key: BytesLike, *, timeout: float | None = None) -> bool:
        """Remove ``key`` (any thread); return whether it was there.

        Blocks while the store is quiesced.  Deleting a missing key changes
        nothing (and is not a change to migrate).

        Raises:
            TypeError: the key is not bytes-like.
            TimeoutError: still quiesced after ``timeout`` seconds: nothing changes.
        """
        key = _as_key(key)
        with self._cond:
            self._wait_writable(timeout)
            if key not in self._data:
                return False
            self._set(key, None)
            return True

    def update(
        self,
        items: Mapping[BytesLike, BytesLike] | DirtyStore | Iterable[tuple[BytesLike, BytesLike]],
        *,
        timeout: float | None = None,
    ) -> None:
        """Put several keys at once (any thread): a snapshot has all of them or none.

        Every item is checked before any is applied.  Blocks while quiesced.

        Raises:
            TypeError, ValueError, TimeoutError: as :meth:`put`; nothing changes.
        """
        pairs = items.items() if isinstance(items, Mapping | DirtyStore) else items
        checked = []
        for key, value in pairs:
            key, value = _as_key(key), _as_value(value)
            _check_entry(key, value)
            checked.append((key, value))
        if not checked:
            return
        with self._cond:
            self._wait_writable(timeout)
            for key, value in checked:
                self._set(key, value)

    def get(self, key: BytesLike, default: bytes | None = None) -> bytes | None:
        """The value of ``key``, or ``default`` (any thread)."""
        with self._cond:
            return self._data.get(_as_key(key), default)

    def __getitem__(self, key: BytesLike) -> bytes:
        with self._cond:
            return self._data[_as_key(key)]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes | bytearray | memoryview):
            return False
        with self._cond:
            return _as_key(key) in self._data

    def __len__(self) -> int:
        with self._cond:
            return len(self._data)

    def __iter__(self) -> Iterator[bytes]:
        """The keys, as a snapshot taken now (later changes do not disturb the iteration)."""
        with self._cond:
            return iter(list(self._data))

    def items(self) -> list[tuple[bytes, bytes]]:
        """A snapshot of the content as ``(key, value)`` pairs, cheap (references, not copies)."""
        with self._cond:
            return list(self._data.items())

    def digest(self) -> bytes:
        """The SHA-256 of the whole content (any thread): equal contents, equal digests.

        It hashes a snapshot, outside the lock, as PUT entries (the payload
        format above) in ascending key order: unambiguous, and independent
        of the order the keys were written in and of the DATA layout.
        """
        with self._cond:
            snapshot = dict(self._data)
        sha = hashlib.sha256()
        for key in sorted(snapshot):
            value = snapshot[key]
            sha.update(_HEADER.pack(PUT, len(key), len(value)))
            sha.update(key)
            sha.update(value)
        return sha.digest()

    @property
    def total_bytes(self) -> int:
        """The size of the whole content in DATA records: what a one-shot save writes."""
        with self._cond:
            return self._total

    @property
    def quiesced(self) -> bool:
        """True between :meth:`quiesce` and :meth:`resume`: writes block."""
        with self._cond:
            return self._quiesced

    # -- the layout of DATA records: a subclass overrides the three together ----------

    def data_size(self, key: bytes, value: bytes) -> int:
        """The bytes ``key`` takes in a DATA record (by default, its entry's size).

        Called under the store's lock: keep it cheap and pure.  The sizes of
        the entries :meth:`encode_data` gets add up to the length of its result.
        """
        return entry_size(key, value)

    def encode_data(self, entries: list[tuple[bytes, bytes]]) -> bytes:
        """One DATA record's payload (by default, PUT entries).

        ``entries`` are in ascending key order, after the previous DATA
        record's (a key deleted before it was reached is left out); their
        data sizes add up to at most ``record_size``, unless there is only one.
        """
        return encode_entries(entries)

    def data_decoder(self) -> DataDecoder:
        """A new decoder of DATA payloads, for one load (by default, entries)."""
        return EntryDecoder()

    # -- Daemon -----------------------------------------------------------------------

    def save(self) -> Iterator[bytes]:
        """The whole content for a one-shot save: DATA record payloads, in key order.

        The snapshot is taken now, under the lock (a shallow copy of the
        dict); the records are built from it one at a time as they are
        pulled, so writers go on meanwhile.  A value replaced during the
        save stays alive until its record is built.  Called by the library
        in a worker thread.
        """
        with self._cond:
            snapshot = dict(self._data)
        return self._snapshot_records(snapshot)

    def _snapshot_records(self, snapshot: dict[bytes, bytes]) -> Iterator[bytes]:
        keys = sorted(snapshot)
        position = 0
        while position < len(keys):
            batch: list[tuple[bytes, bytes]] = []
            size = 0
            while position < len(keys) and size < self.record_size:
                key = keys[position]
                grown = size + self.data_size(key, snapshot[key])
                if batch and grown > self.record_size:
                    break
                batch.append((key, snapshot.pop(key)))  # the snapshot lets go of what is sent
                size = grown
                position += 1
            yield self.encode_data(batch)

    def load(self, records: Iterator[Record]) -> None:
        """Stage the content the records carry, then replace the live content with it.

        Called by the library in a worker thread.  DATA and DIRTY records
        are applied in order to a new, empty content (a stream carries the
        whole state); the live content is replaced, under the lock, only
        once the iterator has ended.  If it raises, or a payload is
        malformed, the live content is untouched.  Writes made during the
        load are lost when it commits.

        Raises:
            ValueError: a malformed payload, or a record type this store does
                not know (the exception the iterator raised otherwise).
            RuntimeError: a pre-copy is running on this store.
        """
        with self._cond:
            if self._tracking is not None:
                raise RuntimeError("load while a pre-copy of this store runs")
        staged: dict[bytes, bytes] = {}
        data, data_open = self.data_decoder(), True
        for record in records:
            try:
                if record.type is not RecordType.DATA and data_open:
                    _stage(staged, data.close())
                    data_open = False
                if record.type is RecordType.END_OF_INITIAL:
                    continue  # a marker; the decoder has checked that it is empty
                if record.type not in (RecordType.DATA, RecordType.DIRTY):
                    raise ValueError(f"type {record.type!r} is not one a DirtyStore writes")
                if record.payload is None:
                    raise ValueError("no payload (a skimming decoder cannot feed a load)")
                entries = data.feed(record.payload) if record.type is RecordType.DATA else decode_entries(record.payload)
                _stage(staged, entries)
            except ValueError as exc:
                raise ValueError(f"record {record.seq} ({record.type.name}): {exc}") from None
        if data_open:
            try:
                _stage(staged, data.close())
            except ValueError as exc:
                raise ValueError(f"at the end of the stream: {exc}") from None
        total = sum(self.data_size(key, value) for key, value in staged.items())
        with self._cond:
            self._data, self._total = staged, total

    # -- PreCopyDaemon ----------------------------------------------------------------

    def precopy_start(self) -> None:
        """Start tracking changes; the current keys become the initial data.

        Called by the library's worker thread.  Starting again discards the
        tracking of any earlier pre-copy (its stream is over).
        """
        with self._cond:
            self._tracking = _Tracking(unsent=dict.fromkeys(self._data), initial_bytes=self._total)

    def initial_records(self) -> Iterator[bytes]:
        """The initial data as DATA record payloads, in key order, built as they are pulled.

        Each key goes with its value at the moment its record is built; a
        key changed before it is reached goes once, with its newest value; a
        key changed after it went, or added, is dirty.  Called once, after
        :meth:`precopy_start`, by the library's worker thread.

        Raises:
            RuntimeError: no pre-copy was started (on a later pull: the
                pre-copy ended while this was being consumed).
        """
        with self._cond:
            tracking = self._require_tracking()
            keys = list(tracking.unsent)
        keys.sort()
        return self._tracked_records(tracking, keys, initial=True)

    def dirty_records(self) -> Iterator[bytes]:
        """One round: everything changed since it was last yielded, as DIRTY record payloads.

        The round's keys are the dirty keys now; each goes with its value at
        the moment its record is built (a deleted key as a tombstone) and
        leaves the dirty set then.  What changes after that is in the next
        round.  If initial data is still unsent (a stop-copy cut the initial
        records short), it joins this round, and the initial records end.
        Called by the library's worker thread, after the initial records,
        once per round.

        Raises:
            RuntimeError: no pre-copy was started.
        """
        with self._cond:
            tracking = self._require_tracking()
            if tracking.unsent:
                tracking.dirty.update(tracking.unsent)
                tracking.dirty_bytes += sum(entry_size(key, self._data[key]) for key in tracking.unsent)
                tracking.unsent, tracking.initial_bytes = {}, 0
            keys = list(tracking.dirty)
        return self._tracked_records(tracking, keys, initial=False)

    def pending(self) -> Pending:
        """Exact counts of the record bytes left (any thread, O(1)).

        ``initial_bytes``: the unsent initial data; ``dirty_bytes``: the
        changed data not yet yielded again; ``total_bytes``: the whole
        content (:attr:`total_bytes`).  Outside a pre-copy the first two are 0.
        """
        with self._cond:
            tracking = self._tracking
            if tracking is None:
                return Pending(total_bytes=self._total)
            return Pending(tracking.initial_bytes, tracking.dirty_bytes, self._total)

    def quiesce(self) -> None:
        """Stop the content from changing: writers block until :meth:`resume`.

        Returns once no write is in progress (a write runs entirely under
        the lock this takes).  Reading, saving and the pending rounds go
        on.  Called by the library's worker thread; repeating it does nothing.
        """
        with self._cond:
            self._quiesced = True

    def resume(self) -> None:
        """Let writers change the content again, waking those that wait (any thread)."""
        with self._cond:
            self._quiesced = False
            self._cond.notify_all()

    def precopy_end(self) -> None:
        """Stop tracking and free the tracked sets, whatever the outcome (does not resume).

        Called by the library's worker thread; without a pre-copy it does nothing.
        """
        with self._cond:
            self._tracking = None

    # -- internals --------------------------------------------------------------------

    def _require_tracking(self) -> _Tracking:
        if self._tracking is None:
            raise RuntimeError("no pre-copy is running on this store: call precopy_start() first")
        return self._tracking

    def _wait_writable(self, timeout: float | None) -> None:
        """With the lock held: wait until not quiesced."""
        if not self._cond.wait_for(lambda: not self._quiesced, timeout):
            raise TimeoutError(f"the store stayed quiesced for {timeout} s: nothing was written")

    def _set(self, key: bytes, value: bytes | None) -> None:
        """With the lock held and writable: set ``key`` (delete if None) and track it."""
        old = self._data.get(key)
        if old is not None:
            self._total -= self.data_size(key, old)
        if value is None:
            self._data.pop(key, None)
        else:
            self._data[key] = value
            self._total += self.data_size(key, value)
        tracking = self._tracking
        if tracking is None:
            return
        if key in tracking.unsent:  # then ``old`` is its value: unsent keys are live keys
            tracking.initial_bytes -= self.data_size(key, old)
            if value is None:
                del tracking.unsent[key]  # never sent: the destination never needs to hear of it
            else:
                tracking.initial_bytes += self.data_size(key, value)
        elif key in tracking.dirty:
            tracking.dirty_bytes += entry_size(key, value) - entry_size(key, old)
        else:
            tracking.dirty[key] = None
            tracking.dirty_bytes += entry_size(key, value)

    def _tracked_records(self, tracking: _Tracking, keys: list[bytes], *, initial: bool) -> Iterator[bytes]:
        """Yield records of ``keys``, each key taken out of its set when its record is built."""
        size_of, encode = (self.data_size, self.encode_data) if initial else (entry_size, encode_entries)
        position = 0
        while True:
            with self._cond:
                if self._tracking is not tracking:
                    raise RuntimeError("the pre-copy ended while its records were being read")
                pending = tracking.unsent if initial else tracking.dirty
                batch, position, size = self._take(pending, keys, position, size_of)
                if initial:
                    tracking.initial_bytes -= size
                else:
                    tracking.dirty_bytes -= size
            if not batch:
                return
            yield encode(batch)

    def _take(
        self, pending: dict[bytes, None], keys: list[bytes], position: int, size_of: Callable[[bytes, bytes | None], int]
    ) -> tuple[list[Entry], int, int]:
        """With the lock held: take the next record's entries out of ``pending``.

        Returns the entries (key, current value or None), the position in
        ``keys`` to go on from, and the entries' size.
        """
        batch: list[Entry] = []
        size = 0
        while position < len(keys) and size < self.record_size:
            key = keys[position]
            if key in pending:  # else deleted while unsent, or a stop-copy's round took it
                value = self._data.get(key)
                grown = size + size_of(key, value)
                if batch and grown > self.record_size:
                    break
                del pending[key]
                batch.append((key, value))
                size = grown
            position += 1
        return batch, position, size


def _stage(staged: dict[bytes, bytes], entries: Iterable[Entry]) -> None:
    for key, value in entries:
        if value is None:
            staged.pop(key, None)
        else:
            staged[key] = value


def _as_key(key: object) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, bytearray | memoryview):
        return bytes(key)
    hint = " (encode a str key, e.g. key.encode())" if isinstance(key, str) else ""
    raise TypeError(f"a DirtyStore key is bytes, not {type(key).__name__}{hint}")


def _as_value(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a DirtyStore value is bytes, not {type(value).__name__}")


def _check_entry(key: bytes, value: bytes) -> None:
    if len(key) > MAX_KEY_SIZE:
        raise ValueError(f"key of {len(key)} bytes: a key is at most {MAX_KEY_SIZE} bytes")
    if len(value) > max_value_size(key):
        raise ValueError(
            f"value of {len(value)} bytes for key {key[:40]!r}: its entry would not fit in one "
            f"{MAX_RECORD_SIZE}-byte record (at most {max_value_size(key)} bytes with this key): "
            "split it over several keys"
        )
