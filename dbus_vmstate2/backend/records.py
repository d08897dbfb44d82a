"""What a daemon's save callable may return, turned into records for the stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeAlias

from ..errors import LimitExceeded
from ..stream import MAX_RECORD_SIZE

BytesLike: TypeAlias = bytes | bytearray | memoryview
SaveResult: TypeAlias = BytesLike | Iterable[BytesLike]

BLOB_RECORD_SIZE = 1 << 20
"""A state returned as one bytes object is sent as records of this size."""


def nbytes(data: BytesLike) -> int:
    """The size in bytes of any bytes-like object (a memoryview may have wide items)."""
    return data.nbytes if isinstance(data, memoryview) else len(data)


def iter_records(state: SaveResult) -> Iterator[BytesLike]:
    """Yield the records of ``state``, a save callable's result.

    One bytes-like object is the whole state: it is cut into records of
    :data:`BLOB_RECORD_SIZE` (memoryview slices, no copy), so a load callable
    gets it back with ``b"".join(records)``.  Any other iterable yields the
    daemon's own records, passed on as they are.

    Raises:
        TypeError: the result (or one of its records) is not bytes-like.
        LimitExceeded: a record is larger than ``MAX_RECORD_SIZE``.
    """
    if isinstance(state, bytes | bytearray | memoryview):
        view = memoryview(state).cast("B")
        for start in range(0, len(view), BLOB_RECORD_SIZE):
            yield view[start : start + BLOB_RECORD_SIZE]
        return
    if isinstance(state, str) or not isinstance(state, Iterable):
        raise TypeError(f"save must return bytes or an iterable of bytes, not {type(state).__name__}")
    for number, record in enumerate(state):
        if not isinstance(record, bytes | bytearray | memoryview):
            raise TypeError(f"record {number} from save is {type(record).__name__}, not bytes")
        size = nbytes(record)
        if size > MAX_RECORD_SIZE:
            raise LimitExceeded(
                f"record {number} from save is {size} bytes, over the {MAX_RECORD_SIZE}-byte "
                "record limit: yield smaller records"
            )
        yield record
