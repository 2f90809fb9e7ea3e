"""The backend half of a Xen shared ring against indexes a hostile frontend writes (pvcore_xen.ring)."""

from __future__ import annotations

import struct

import pytest
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.ring import REQ_EVENT, REQ_PROD, BackRing, RingError

from pvcore.ring.memory import GuestMemory, MemoryRegion

ENTRY = 112  # a blkif request's size: 32 entries in a page


def ring() -> tuple[BackRing, bytearray]:
    page = bytearray(PAGE_SIZE)
    return BackRing(GuestMemory([MemoryRegion(0, memoryview(page))]), 0, ENTRY, "test"), page


def set_u32(page: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<I", page, offset, value & 0xFFFFFFFF)


def test_a_request_producer_moved_back_behind_the_requests_taken_fails_the_ring() -> None:
    back, page = ring()
    set_u32(page, REQ_PROD, 3)
    for _ in range(back.unconsumed()):
        back.take()  # three requests in flight, none answered yet
    set_u32(page, REQ_PROD, 1)
    with pytest.raises(RingError, match="went back behind the requests taken"):
        back.unconsumed()
    set_u32(page, REQ_PROD, -1)
    with pytest.raises(RingError, match="more than 32 ahead"):
        back.unconsumed()


def test_a_full_ring_with_requests_in_flight_counts_only_what_was_published() -> None:
    back, page = ring()
    set_u32(page, REQ_PROD, 32)
    assert back.unconsumed() == 32
    for _ in range(5):
        back.take()
    assert back.unconsumed() == 27
    set_u32(page, REQ_PROD, 33)  # one more than the ring holds while none is answered
    with pytest.raises(RingError):
        back.unconsumed()


def test_final_check_asks_for_the_request_it_needs_not_the_next_one() -> None:
    back, page = ring()
    set_u32(page, REQ_PROD, 1)
    assert back.final_check(need=2) == 1
    assert struct.unpack_from("<I", page, REQ_EVENT)[0] == 2  # the frontend signals when the second is posted
    assert back.final_check() == 1
    set_u32(page, REQ_EVENT, 0)
    back.take()
    assert back.final_check() == 0
    assert struct.unpack_from("<I", page, REQ_EVENT)[0] == 2
