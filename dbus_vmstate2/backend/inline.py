"""VMState1's inline blob: the whole state as one stream in one D-Bus message.

QEMU treats what ``Save()`` returns as opaque bytes and hands them back to
``Load()`` on the destination.  We put a complete dbus-vmstate2 stream there
(header, records, trailer; see docs/stream-format.md), so that a back-end
migrated by stock QEMU still gets the Id check, the integrity check and the
versioning of VMState2, and its load callable receives the very records its
source saved.  QEMU allows at most 1 MiB per back-end: the limit applies to
the encoded (compressed) blob, and is checked while encoding, so an oversized
state is refused after at most 1 MiB of output, never held whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..errors import LimitExceeded, StreamLimitExceeded
from ..names import VMSTATE1_SIZE_LIMIT
from ..stream import NEED_DATA, Compression, Record, StreamDecoder, StreamEncoder
from .records import BytesLike, nbytes

INLINE_RAW_LIMIT = 64 << 20
"""The most state one inline blob may carry once decompressed.  A 1 MiB blob
of zstd records could otherwise expand to many GiB held at once, since an
inline Load verifies the whole blob before handing anything over."""

log = logging.getLogger(__name__)


def encode_inline(
    backend_id: str, records: Iterable[BytesLike], compression: Compression = Compression.ZSTD
) -> bytes:
    """Encode ``records`` as one stream of at most ``VMSTATE1_SIZE_LIMIT`` bytes.

    Raises:
        LimitExceeded: the encoded stream would exceed QEMU's 1 MiB.
    """
    encoder = StreamEncoder(backend_id, compression=compression)
    blob = bytearray()

    def append(chunks: list) -> None:
        for chunk in chunks:
            blob.extend(chunk)
        if len(blob) > VMSTATE1_SIZE_LIMIT:
            raise LimitExceeded(
                f"the state of back-end {backend_id!r} encodes to more than "
                f"{VMSTATE1_SIZE_LIMIT} bytes, QEMU's dbus-vmstate limit for one "
                "back-end: migrate it through org.qemu.VMState2 (dbus-vmstate2 save/load) instead"
            )

    append(encoder.start())
    raw = 0
    for record in records:
        raw += nbytes(record)
        if raw > INLINE_RAW_LIMIT:
            raise LimitExceeded(
                f"the state of back-end {backend_id!r} is over {INLINE_RAW_LIMIT} bytes, the most one "
                "VMState1 blob may carry: migrate it through org.qemu.VMState2 (dbus-vmstate2 save/load) instead"
            )
        append(encoder.record(record))
    append(encoder.finish())
    return bytes(blob)


def decode_inline(backend_id: str, blob: bytes) -> list[memoryview]:
    """Verify ``blob`` completely and return its record payloads.

    Raises:
        LimitExceeded: the blob is over 1 MiB (QEMU would never send it), or
            it decompresses to more than ``INLINE_RAW_LIMIT``.
        StreamError: a subclass naming what is wrong (bad magic, wrong Id,
            truncated, corrupt, ...); nothing has been handed to the daemon.
    """
    if len(blob) > VMSTATE1_SIZE_LIMIT:
        raise LimitExceeded(
            f"a VMState1 blob is at most {VMSTATE1_SIZE_LIMIT} bytes, got {len(blob)}"
        )
    decoder = StreamDecoder(backend_id)
    decoder.feed(blob)
    decoder.feed_eof()
    payloads: list[memoryview] = []
    raw = 0
    while (event := decoder.next_event()) is not NEED_DATA:
        if isinstance(event, Record):
            raw += event.raw_size
            if raw > INLINE_RAW_LIMIT:
                raise StreamLimitExceeded(f"the blob carries over {INLINE_RAW_LIMIT} bytes of state, the inline limit")
            assert event.payload is not None  # payloads=True
            payloads.append(event.payload)
    return payloads
