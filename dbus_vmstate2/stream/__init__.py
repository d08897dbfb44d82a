"""The stream wire format and the saved-file container: pure code, no I/O.

See docs/stream-format.md for the byte-level specification.  Nothing in this
package opens files, sockets or pipes, or imports asyncio or os: bytes go in
and events (or chunks to write) come out.
"""

from ._events import NEED_DATA, Event, Record, StreamEnd, StreamHeader
from ._format import (
    FORMAT_VERSION,
    MAX_HEADER_SIZE,
    MAX_ID_SIZE,
    MAX_RECORD_SIZE,
    WINDOW_LOG_MAX,
    Compression,
    RecordType,
)
from .decoder import CompressedRecord, DecodedStream, StreamDecoder, decode_stream
from .encoder import StreamEncoder, encode_stream

__all__ = [
    "FORMAT_VERSION",
    "MAX_HEADER_SIZE",
    "MAX_ID_SIZE",
    "MAX_RECORD_SIZE",
    "NEED_DATA",
    "WINDOW_LOG_MAX",
    "Compression",
    "CompressedRecord",
    "DecodedStream",
    "Event",
    "Record",
    "RecordType",
    "StreamDecoder",
    "StreamEncoder",
    "StreamEnd",
    "StreamHeader",
    "decode_stream",
    "encode_stream",
]
