"""The blkif request and response formats of Xen's ``io/blkif.h`` (the ring itself is :mod:`pvcore_xen.ring`).

The frontend grants one page (``ring-ref``) holding a shared ring of
112-byte entries; each entry is a request from the frontend and, once the
backend took it, the slot of a response.

Only the native x86_64 layout is spoken (the ``x86_64-abi`` protocol of
Linux on x86_64)::

    request    op u8, nr_segments u8, handle u16, pad u32, id u64, sector u64,
               11 x {gref u32, first_sect u8, last_sect u8, pad u16}
    discard    op u8, flag u8, handle u16, pad u32, id u64, sector u64, nr_sectors u64
    indirect   op u8, indirect_op u8, nr_segments u16, pad u32, id u64, sector u64,
               handle u16, pad u16, 8 x indirect gref u32
    response   id u64, op u8, pad u8, status s16, pad u32

The backend decodes a private copy of each entry (the frontend may rewrite
the slot at any time); :func:`parse_request` rejects what the layout itself
forbids (too many segments, sectors outside a page) as a
:class:`RequestError`, which fails that request only.
"""

from __future__ import annotations

import struct
import attrs

from pvcore_xen.host import PAGE_SIZE

SLOT_SIZE = 112
"""``sizeof(union blkif_sring_entry)`` on x86_64: the request is the largest member."""

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

MAX_SEGMENTS = 11
"""``BLKIF_MAX_SEGMENTS_PER_REQUEST``: segments of a direct request."""
MAX_INDIRECT_PAGES = 8
"""``BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST``: indirect grefs an indirect request holds."""
SEGMENTS_PER_INDIRECT_PAGE = PAGE_SIZE // 8
SECTOR_SIZE = 512
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE
BLKIF_DISCARD_SECURE = 1

_HEADER = struct.Struct("<BBH4xQQ")
_SEGMENT = struct.Struct("<IBB2x")
_DISCARD_TAIL = struct.Struct("<Q")
_INDIRECT = struct.Struct("<BBH4xQQH2x8I")
_RESPONSE = struct.Struct("<QBxh4x")

assert _RESPONSE.size == 16 and _INDIRECT.size == 60 and _HEADER.size + MAX_SEGMENTS * _SEGMENT.size == SLOT_SIZE


class RequestError(Exception):
    """One request is malformed (that request fails); ``status`` is the blkif status to answer."""

    def __init__(self, message: str, status: int = BLKIF_RSP_ERROR) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class Segment:
    """One page of a transfer: grant ``ref``, sectors ``first``..``last`` of it (inclusive)."""

    ref: int
    first: int
    last: int

    @property
    def offset(self) -> int:
        """Byte offset in the page."""
        return self.first * SECTOR_SIZE

    @property
    def length(self) -> int:
        """Bytes of the segment."""
        return (self.last - self.first + 1) * SECTOR_SIZE


@attrs.frozen
class Request:
    """One request as copied from the ring (fields of the other kinds are zero)."""

    operation: int
    id: int
    sector: int
    handle: int = 0
    segments: tuple[Segment, ...] = ()
    nr_sectors: int = 0
    discard_flag: int = 0
    indirect_op: int = 0
    indirect_segments: int = 0
    indirect_refs: tuple[int, ...] = ()


def parse_segments(raw: bytes | memoryview, count: int) -> tuple[Segment, ...]:
    """``count`` ``blkif_request_segment``\\ s from ``raw``; a sector outside the page is a :class:`RequestError`."""
    segments = []
    for index in range(count):
        ref, first, last = _SEGMENT.unpack_from(raw, index * _SEGMENT.size)
        if not first <= last < SECTORS_PER_PAGE:
            raise RequestError(f"segment {index}: sectors {first}..{last} are not within one page")
        segments.append(Segment(ref, first, last))
    return tuple(segments)


def parse_request(raw: bytes) -> Request:
    """Decode one request slot (``raw`` is a private copy of it)."""
    operation, byte1, word, request_id, sector = _HEADER.unpack_from(raw)
    if operation == BLKIF_OP_DISCARD:
        (nr_sectors,) = _DISCARD_TAIL.unpack_from(raw, _HEADER.size)
        return Request(operation, request_id, sector, handle=word, nr_sectors=nr_sectors, discard_flag=byte1)
    if operation == BLKIF_OP_INDIRECT:
        _, indirect_op, count, _, _, handle, *refs = _INDIRECT.unpack_from(raw)
        return Request(
            operation, request_id, sector, handle=handle, indirect_op=indirect_op, indirect_segments=count,
            indirect_refs=tuple(refs),
        )
    if operation not in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
        return Request(operation, request_id, sector)
    if byte1 > MAX_SEGMENTS:
        raise RequestError(f"{byte1} segments, at most {MAX_SEGMENTS}")
    return Request(operation, request_id, sector, handle=word, segments=parse_segments(raw[_HEADER.size:], byte1))


def response_operation(operation: int, indirect_op: int) -> int:
    """The ``operation`` a response carries: an indirect request is answered as its ``indirect_op`` (blkfront checks)."""
    return indirect_op if operation == BLKIF_OP_INDIRECT else operation


def pack_response(request_id: int, operation: int, status: int) -> bytes:
    """One ``blkif_response``."""
    return _RESPONSE.pack(request_id, operation, status)
