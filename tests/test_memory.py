"""GuestMemory: bounds checks, region spans, read-only regions, translation; GuestRam's allocator."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvcore.ring.memory import ADDRESS_LIMIT, GuestMemory, GuestMemoryError, MemoryRegion, gather, scatter
from pvcore.testing.driver import DriverError, GuestRam, GuestRamFullError

REGION_A = 0x1000
REGION_B = 0x2000  # directly after A: a buffer may span the two
REGION_C = 0x8000  # after a gap
SIZE = 0x1000


def make_memory() -> GuestMemory:
    """Three regions: A and B adjacent, C after a hole; each filled with its own pattern."""
    regions = [
        MemoryRegion(REGION_A, memoryview(bytearray(b"A" * SIZE)), user_addr=0x7F0000001000),
        MemoryRegion(REGION_B, memoryview(bytearray(b"B" * SIZE)), user_addr=0x7F0000100000),
        MemoryRegion(REGION_C, memoryview(bytearray(b"C" * SIZE)), user_addr=0x7F0000200000),
    ]
    return GuestMemory(regions)


def inside(memory: GuestMemory, addr: int, length: int) -> bool:
    """Reference answer: is every byte of the range in some region?"""
    if addr < 0 or length < 0 or addr + length > ADDRESS_LIMIT:
        return False
    return all(any(r.guest_addr <= a < r.end for r in memory.regions) for a in range(addr, addr + length))


addresses = st.one_of(
    st.integers(min_value=0, max_value=0xA000),
    st.integers(min_value=-(2**64), max_value=-1),
    st.integers(min_value=ADDRESS_LIMIT - 0x100, max_value=ADDRESS_LIMIT + 0x100),
    st.sampled_from([REGION_A - 1, REGION_B - 1, REGION_B + SIZE - 1, REGION_C - 1, REGION_C + SIZE]),
)
lengths = st.one_of(st.integers(min_value=0, max_value=0x2100), st.integers(min_value=-5, max_value=-1))


@settings(max_examples=200, deadline=None)
@given(addr=addresses, length=lengths)
def test_every_access_is_checked(addr: int, length: int) -> None:
    memory = make_memory()
    ok = length < 0x3000 and inside(memory, addr, length)
    operations = [
        lambda: memory.read(addr, length),
        lambda: memory.views(addr, length),
        lambda: memory.check(addr, length, write=True),
        lambda: memory.fill(addr, length, 0x5A),
        lambda: memory.write(addr, b"\x01" * max(length, 0)) if length >= 0 else memory.views(addr, length),
    ]
    for operation in operations:
        if ok:
            operation()
        else:
            with pytest.raises(GuestMemoryError):
                operation()
    if ok:
        assert memory.read(addr, length) == b"\x01" * length


@settings(max_examples=100, deadline=None)
@given(addr=addresses)
def test_fixed_width_accessors_are_checked(addr: int) -> None:
    memory = make_memory()
    for width, read, write in (
        (2, memory.read_u16, memory.write_u16),
        (4, memory.read_u32, memory.write_u32),
        (8, memory.read_u64, memory.write_u64),
    ):
        if inside(memory, addr, width):
            write(addr, 0x0102030405060708)
            assert read(addr) == 0x0102030405060708 & ((1 << (8 * width)) - 1)
        else:
            with pytest.raises(GuestMemoryError):
                read(addr)
            with pytest.raises(GuestMemoryError):
                write(addr, 1)


def test_range_spanning_two_adjacent_regions() -> None:
    memory = make_memory()
    pieces = memory.views(REGION_B - 3, 5)
    assert [bytes(p) for p in pieces] == [b"AAA", b"BB"]
    memory.write(REGION_B - 2, b"xyzw")
    assert memory.read(REGION_B - 4, 8) == b"AAxyzwBB"
    assert memory.read_u32(REGION_B - 2) == int.from_bytes(b"xyzw", "little")
    with pytest.raises(GuestMemoryError, match="spans two regions"):
        memory.view(REGION_B - 1, 2)
    assert bytes(memory.view(REGION_B + 2, 2)) == b"BB"


def test_range_across_a_hole_is_refused() -> None:
    memory = make_memory()
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        memory.read(REGION_B + SIZE - 1, 2)
    assert memory.read(REGION_C, 1) == b"C"


def test_gather_and_scatter_across_regions() -> None:
    memory = make_memory()
    buffers = [(REGION_B - 2, 4), (REGION_C, 3)]
    assert scatter(memory, buffers, b"0123456789") == 7
    assert gather(memory, buffers) == b"0123456"
    assert scatter(memory, buffers, b"ab") == 2
    assert gather(memory, buffers) == b"ab23456"
    with pytest.raises(GuestMemoryError):
        scatter(memory, [(REGION_C + SIZE - 1, 4)], b"wxyz")


def test_readonly_region_refuses_writes_but_reads() -> None:
    memory = GuestMemory([MemoryRegion(0, memoryview(bytearray(16)), readonly=True)])
    assert memory.read(0, 16) == bytes(16)
    for write in (
        lambda: memory.write(0, b"x"),
        lambda: memory.write_u16(4, 1),
        lambda: memory.fill(0, 4),
        lambda: memory.views(0, 1, write=True),
    ):
        with pytest.raises(GuestMemoryError, match="read-only"):
            write()
    assert memory.read(0, 16) == bytes(16)


def test_write_spanning_into_a_readonly_region_changes_nothing_read_only() -> None:
    memory = GuestMemory(
        [
            MemoryRegion(0, memoryview(bytearray(8))),
            MemoryRegion(8, memoryview(bytearray(8)), readonly=True),
        ]
    )
    with pytest.raises(GuestMemoryError, match="read-only"):
        memory.write(6, b"abcd")
    assert memory.read(8, 8) == bytes(8)


@pytest.mark.parametrize(
    ("first", "second"),
    [((0, 16), (8, 16)), ((0, 16), (0, 4)), ((8, 4), (0, 16)), ((0, 16), (15, 1))],
)
def test_overlapping_regions_are_rejected(first: tuple[int, int], second: tuple[int, int]) -> None:
    regions = [MemoryRegion(addr, memoryview(bytearray(size))) for addr, size in (first, second)]
    with pytest.raises(GuestMemoryError, match="overlap"):
        GuestMemory(regions)


def test_touching_regions_are_accepted() -> None:
    memory = GuestMemory([MemoryRegion(16, memoryview(bytearray(16))), MemoryRegion(0, memoryview(bytearray(16)))])
    assert [r.guest_addr for r in memory.regions] == [0, 16]
    assert memory.size == 32


def test_region_wrapping_the_address_space_is_rejected() -> None:
    with pytest.raises(GuestMemoryError, match="wraps"):
        MemoryRegion(ADDRESS_LIMIT - 8, memoryview(bytearray(16)))


def test_user_to_guest() -> None:
    memory = make_memory()
    assert memory.user_to_guest(0x7F0000001000) == REGION_A
    assert memory.user_to_guest(0x7F0000100010, 16) == REGION_B + 0x10
    assert memory.user_to_guest(0x7F0000200000 + SIZE - 4, 4) == REGION_C + SIZE - 4
    for user_addr, length in ((0x7F0000200000 + SIZE - 4, 5), (0x7F0000000FFF, 2), (0, 1), (0x7F0000300000, 1)):
        with pytest.raises(GuestMemoryError, match="no memory region"):
            memory.user_to_guest(user_addr, length)


def test_guest_ram_is_a_shared_memfd_mapping() -> None:
    with GuestRam(1 << 16, guest_addr=0x10000) as ram:
        assert ram.size == 1 << 16
        (region,) = ram.memory.regions
        assert (region.guest_addr, region.size, region.user_addr) == (0x10000, 1 << 16, ram.user_addr)
        ram.memory.write(0x10000 + 100, b"hello")
        other = mmap.mmap(ram.fd, ram.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert other[100:105] == b"hello"
        other.close()
        assert ram.memory.user_to_guest(ram.user_addr + 100, 5) == 0x10000 + 100
        assert ram.user_address(0x10000 + 100) == ram.user_addr + 100
        with pytest.raises(DriverError, match="not in this RAM"):
            ram.user_address(0x20000)
        with pytest.raises(GuestMemoryError):
            ram.memory.read(0x10000 - 1, 2)
        fd = ram.fd
    assert ram.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=3000), st.sampled_from([1, 2, 8, 16, 64, 4096]), st.booleans()),
        max_size=40,
    )
)
def test_allocator_never_hands_out_overlapping_blocks(steps: list[tuple[int, int, bool]]) -> None:
    with GuestRam(1 << 14, guest_addr=0x3000) as ram:
        live: dict[int, int] = {}
        for n, align, free_one in steps:
            if free_one and live:
                addr = next(iter(live))
                ram.free(addr)
                del live[addr]
                continue
            try:
                addr = ram.alloc(n, align)
            except GuestRamFullError:
                continue
            assert addr % align == 0
            ram.memory.check(addr, n)
            for other, other_len in live.items():
                assert addr + max(n, 1) <= other or other + other_len <= addr
            live[addr] = max(n, 1)
        for addr in list(live):
            ram.free(addr)
        assert ram.free_bytes == ram.size
        assert ram.alloc(ram.size, 1) == 0x3000


def test_allocator_errors_are_clear() -> None:
    with GuestRam(4096) as ram:
        addr = ram.alloc(4000)
        with pytest.raises(MemoryError, match="guest RAM full"):
            ram.alloc(200)
        with pytest.raises(DriverError, match="not allocated"):
            ram.free(addr + 1)
        ram.free(addr)
        with pytest.raises(DriverError, match="freed already"):
            ram.free(addr)
        with pytest.raises(DriverError, match="power of two"):
            ram.alloc(8, align=3)


def test_guest_ram_closes_while_a_view_is_still_held() -> None:
    ram = GuestRam(4096)
    ram.memory.write(8, b"kept")
    held = ram.memory.view(8, 4)
    ram.close()
    assert ram.fd == -1
    assert bytes(held) == b"kept"  # the mapping lives as long as the view
    held.release()
    ram.close()
