"""The device-side split virtqueue, driven by the reference driver.

Valid chains must round-trip exactly; hostile rings must produce nothing but
VirtqueueError (or no chain) and never an access outside guest memory; the
EVENT_IDX arithmetic must hold across index wrap-around.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pvcore.ring.memory import GuestMemory, MemoryRegion, gather, scatter
from pvcore.ring.virtqueue import (
    MAX_INDIRECT_DESCRIPTORS,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
    need_event,
)
from pvcore.testing.driver import DeviceProtocolError, DriverError, DriverQueue, GuestRam, QueueFullError

RAM_SIZE = 0x10000
NEIGHBOUR = 0x10000  # a plain region right after the driver's RAM
NEIGHBOUR_SIZE = 0x1000
READONLY = 0x20000  # a read-only region after a hole
READONLY_SIZE = 0x1000
MEMORY_END = READONLY + READONLY_SIZE


class TrackingMemory(GuestMemory):
    """GuestMemory that records every access it grants and asserts the range lies inside regions."""

    def __init__(self, regions: tuple[MemoryRegion, ...]) -> None:
        super().__init__(regions)
        self.accesses: list[tuple[int, int, bool]] = []

    def _covered(self, addr: int, length: int, write: bool) -> bool:
        cursor, end = addr, addr + length
        while cursor < end:
            region = next((r for r in self.regions if r.guest_addr <= cursor < r.end), None)
            if region is None or (write and region.readonly):
                return False
            cursor = region.end
        return True

    def _span(self, addr: int, length: int, write: bool) -> tuple[memoryview, int] | None:
        span = super()._span(addr, length, write)
        if span is not None:
            assert self._covered(addr, length, write), f"access {addr:#x}+{length:#x} escapes guest memory"
            assert span[1] + length <= len(span[0])
            self.accesses.append((addr, length, write))
        return span

    def views(self, addr: int, length: int, *, write: bool = False) -> list[memoryview]:
        pieces = super().views(addr, length, write=write)
        assert self._covered(addr, length, write), f"access {addr:#x}+{length:#x} escapes guest memory"
        assert sum(len(p) for p in pieces) == length
        self.accesses.append((addr, length, write))
        return pieces



class Ring:
    """A reference driver queue and a device Virtqueue over the same (tracked) memory."""

    def __init__(self, ram: GuestRam, size: int, *, event_idx: bool, indirect: bool, start_index: int = 0) -> None:
        self.ram = ram
        self.driver = DriverQueue(ram, size, event_idx=event_idx, indirect=indirect, start_index=start_index)
        neighbour = MemoryRegion(NEIGHBOUR, memoryview(bytearray(NEIGHBOUR_SIZE)))
        readonly = MemoryRegion(READONLY, memoryview(bytearray(READONLY_SIZE)), readonly=True)
        self.memory = TrackingMemory((*ram.memory.regions, neighbour, readonly))
        self.vq = Virtqueue(
            self.memory,
            size,
            self.driver.desc_addr,
            self.driver.avail_addr,
            self.driver.used_addr,
            event_idx=event_idx,
            indirect=indirect,
            next_avail=start_index,
        )

    def snapshot(self) -> bytes:
        """Every byte of guest memory, to show an operation changed nothing."""
        return b"".join(bytes(region.view) for region in self.memory.regions)

    def complete(self, chain: DescriptorChain, data: bytes) -> None:
        """Device side: write ``data`` into the chain and push it used (not yet published)."""
        written = scatter(self.memory, chain.writable, data)
        self.vq.push_used(chain.head, written)


@contextlib.contextmanager
def ring(size: int = 8, *, event_idx: bool = False, indirect: bool = True, start_index: int = 0) -> Iterator[Ring]:
    """A fresh :class:`Ring` whose RAM is closed afterwards."""
    with GuestRam(RAM_SIZE) as ram:
        yield Ring(ram, size, event_idx=event_idx, indirect=indirect, start_index=start_index)


# ---------------------------------------------------------------- valid chains

chain_specs = st.tuples(
    st.lists(st.binary(min_size=0, max_size=48), max_size=5),
    st.lists(st.integers(min_value=0, max_value=48), max_size=5),
    st.booleans(),
).filter(lambda spec: spec[0] or spec[1])


@settings(max_examples=150, deadline=None)
@given(
    size=st.sampled_from([4, 8, 16]),
    event_idx=st.booleans(),
    rounds=st.lists(st.lists(chain_specs, min_size=1, max_size=6), min_size=1, max_size=4),
    start_index=st.sampled_from([0, 0xFFFD]),
)
def test_valid_chains_round_trip(
    size: int, event_idx: bool, rounds: list[list[tuple[list[bytes], list[int], bool]]], start_index: int
) -> None:
    with ring(size, event_idx=event_idx, start_index=start_index) as r:
        for specs in rounds:
            posted: dict[int, tuple[list[bytes], list[int]]] = {}
            for readable, writable, indirect in specs:
                try:
                    head = r.driver.add(readable, writable, indirect=indirect)
                except QueueFullError:
                    needed = 1 if indirect else len(readable) + len(writable)
                    assert needed > r.driver.free_descriptors
                    continue
                posted[head] = (readable, writable)
            expected_replies: dict[int, bytes] = {}
            for head, (readable, writable) in posted.items():
                chain = r.vq.pop()
                assert chain is not None and chain.head == head
                assert [length for _, length in chain.readable] == [len(data) for data in readable]
                assert [length for _, length in chain.writable] == writable
                assert gather(r.memory, chain.readable) == b"".join(readable)
                reply = bytes((head + i) & 0xFF for i in range(chain.writable_len))
                expected_replies[head] = reply
                r.complete(chain, reply)
            assert r.vq.pop() is None
            r.vq.publish()
            used = r.driver.used()
            assert [u.head for u in used] == list(posted)
            for u in used:
                assert u.written == len(expected_replies[u.head])
                assert u.data == expected_replies[u.head]
            assert r.driver.outstanding == 0
            assert r.driver.free_descriptors == size


def test_pop_changes_no_guest_memory() -> None:
    with ring(8) as r:
        r.driver.add([b"abc"], [4])
        r.driver.add([b"x", b"y"], [1, 2], indirect=True)
        before = r.snapshot()
        r.memory.accesses.clear()
        assert r.vq.pop() is not None and r.vq.pop() is not None and r.vq.pop() is None
        assert len(r.memory.accesses) >= 8
        assert r.snapshot() == before


def test_chain_may_span_adjacent_regions_and_use_zero_length_buffers() -> None:
    with ring(8) as r:
        r.driver.write_descriptor(0, NEIGHBOUR - 4, 8, VIRTQ_DESC_F_NEXT, 1)
        r.driver.write_descriptor(1, NEIGHBOUR + 16, 0, VIRTQ_DESC_F_WRITE, 0)
        r.driver.post_head(0)
        chain = r.vq.pop()
        assert chain == DescriptorChain(0, ((NEIGHBOUR - 4, 8),), ((NEIGHBOUR + 16, 0),))


def test_driver_refuses_full_queue_and_unnegotiated_indirect() -> None:
    with ring(4, indirect=False) as r:
        with pytest.raises(DriverError, match="INDIRECT_DESC"):
            r.driver.add([b"a"], [], indirect=True)
        r.driver.add([b"a", b"b", b"c"], [])
        with pytest.raises(QueueFullError, match="needs 2 descriptors, 1 of 4 free"):
            r.driver.add([b"a"], [1])
        with pytest.raises(DriverError, match="at least one buffer"):
            r.driver.add([], [])


# ------------------------------------------------------------ hostile rings

valid_addresses = st.integers(min_value=0x8000, max_value=0xF000)  # free driver RAM
desc_addresses = st.one_of(
    valid_addresses,
    valid_addresses,
    st.integers(min_value=0, max_value=MEMORY_END + 0x100),
    st.sampled_from([NEIGHBOUR - 8, NEIGHBOUR + NEIGHBOUR_SIZE - 8, READONLY - 8, READONLY + READONLY_SIZE - 8]),
    st.integers(min_value=2**64 - 0x100, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
)
desc_lengths = st.one_of(
    st.integers(min_value=0, max_value=64),
    st.integers(min_value=0, max_value=64),
    st.sampled_from([16, 32, 48, 17, 0x1000, 0x10000, 0xFFFFFFFF]),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
)
descriptors = st.tuples(
    desc_addresses,
    desc_lengths,
    st.one_of(
        st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE]),
        st.integers(min_value=0, max_value=7),
        st.integers(min_value=0, max_value=0xFFFF),
    ),
    st.integers(min_value=0, max_value=12),
)


@settings(max_examples=200, deadline=None)
@given(
    indirect=st.booleans(),
    table=st.lists(descriptors, min_size=8, max_size=8),
    indirect_table=st.lists(descriptors, min_size=1, max_size=6),
    indirect_slots=st.lists(st.integers(min_value=0, max_value=7), max_size=3),
    heads=st.lists(st.integers(min_value=0, max_value=10), min_size=1, max_size=10),
    avail_idx=st.one_of(
        st.integers(min_value=0, max_value=10),
        st.integers(min_value=0, max_value=10),
        st.integers(min_value=0, max_value=0xFFFF),
    ),
)
def test_hostile_rings_only_raise_virtqueue_error(
    indirect: bool,
    table: list[tuple[int, int, int, int]],
    indirect_table: list[tuple[int, int, int, int]],
    indirect_slots: list[int],
    heads: list[int],
    avail_idx: int,
) -> None:
    with ring(8, indirect=indirect) as r:
        table_addr = r.ram.alloc(16 * len(indirect_table))
        r.memory.write(table_addr, b"".join(struct.pack("<QIHH", *d) for d in indirect_table))
        for index, desc in enumerate(table):
            r.driver.write_descriptor(index, *desc)
        for slot in indirect_slots:
            flags = VIRTQ_DESC_F_INDIRECT | (table[slot][2] & VIRTQ_DESC_F_WRITE)
            r.driver.write_descriptor(slot, table_addr, 16 * len(indirect_table), flags, 0)
        for head in heads:
            r.driver.post_head(head)
        r.driver.set_avail_idx(avail_idx)
        before = r.snapshot()
        for _ in range(10):
            try:
                chain = r.vq.pop()
            except VirtqueueError as exc:
                event(re.sub(r"0x[0-9a-f]+|\d+", "N", f"rejected: {exc}")[:50])
                break
            if chain is None:
                break
            event("accepted a chain")
            for addr, length in chain.readable:
                r.memory.check(addr, length)
            for addr, length in chain.writable:
                r.memory.check(addr, length, write=True)
            assert len(chain.readable) + len(chain.writable) <= 8 + len(indirect_table)
        assert r.snapshot() == before


def post_chain(r: Ring, *descriptors: tuple[int, int, int, int], head: int = 0) -> None:
    """Write descriptors 0..n-1 of the queue's table and post ``head``."""
    for index, desc in enumerate(descriptors):
        r.driver.write_descriptor(index, *desc)
    r.driver.post_head(head)


def write_table(r: Ring, *descriptors: tuple[int, int, int, int]) -> int:
    """Put an indirect table in guest RAM; return its address."""
    addr = r.ram.alloc(16 * max(len(descriptors), 1))
    r.memory.write(addr, b"".join(struct.pack("<QIHH", *d) for d in descriptors))
    return addr


def buffer(r: Ring, length: int = 16) -> int:
    """A valid buffer in guest RAM."""
    return r.ram.alloc(length)


def assert_rejected(r: Ring, match: str) -> None:
    before = r.snapshot()
    with pytest.raises(VirtqueueError, match=match):
        r.vq.pop()
    assert r.snapshot() == before


def test_chain_that_loops() -> None:
    with ring(8) as r:
        a, b = buffer(r), buffer(r)
        post_chain(r, (a, 16, VIRTQ_DESC_F_NEXT, 1), (b, 16, VIRTQ_DESC_F_NEXT, 0))
        assert_rejected(r, "loops or is longer than its queue")


def test_descriptor_pointing_at_itself() -> None:
    with ring(8) as r:
        post_chain(r, (buffer(r), 16, VIRTQ_DESC_F_NEXT, 0))
        assert_rejected(r, "loops")


def test_chain_longer_than_queue() -> None:
    with ring(4) as r:
        bufs = [buffer(r) for _ in range(4)]
        post_chain(r, *[(bufs[i], 16, VIRTQ_DESC_F_NEXT, (i + 1) % 4) for i in range(4)])
        assert_rejected(r, "longer than its queue \\(4\\)")


def test_indirect_chain_longer_than_its_table() -> None:
    with ring(8) as r:
        table = write_table(r, (buffer(r), 16, VIRTQ_DESC_F_NEXT, 1), (buffer(r), 16, VIRTQ_DESC_F_NEXT, 0))
        post_chain(r, (table, 32, VIRTQ_DESC_F_INDIRECT, 0))
        assert_rejected(r, "longer than its indirect table \\(2\\)")


@pytest.mark.parametrize(
    ("addr", "length", "flags"),
    [
        (RAM_SIZE + NEIGHBOUR_SIZE, 1, 0),  # just past the neighbour region: in the hole
        (RAM_SIZE + NEIGHBOUR_SIZE - 8, 16, 0),  # straddles the end into the hole
        (READONLY + READONLY_SIZE - 1, 2, 0),  # past the last region
        (0, 0xFFFFFFFF, 0),  # far longer than memory
        (2**64 - 8, 16, 0),  # wraps the address space
        (READONLY, 16, VIRTQ_DESC_F_WRITE),  # writable buffer in read-only memory
    ],
)
def test_buffer_outside_memory(addr: int, length: int, flags: int) -> None:
    with ring(8) as r:
        post_chain(r, (addr, length, flags, 0))
        assert_rejected(r, "descriptor 0 of head 0")


def test_indirect_table_outside_memory() -> None:
    with ring(8) as r:
        post_chain(r, (MEMORY_END - 16, 32, VIRTQ_DESC_F_INDIRECT, 0))
        assert_rejected(r, "indirect table at head 0")


def test_buffer_in_indirect_table_outside_memory() -> None:
    with ring(8) as r:
        table = write_table(r, (buffer(r), 16, VIRTQ_DESC_F_NEXT, 1), (MEMORY_END, 16, VIRTQ_DESC_F_WRITE, 0))
        post_chain(r, (table, 32, VIRTQ_DESC_F_INDIRECT, 0))
        assert_rejected(r, "descriptor 1 of head 0")


def test_readable_after_writable() -> None:
    with ring(8) as r:
        post_chain(r, (buffer(r), 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (buffer(r), 16, 0, 0))
        assert_rejected(r, "readable descriptor after a writable one")


def test_readable_after_writable_in_indirect_table() -> None:
    with ring(8) as r:
        table = write_table(r, (buffer(r), 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (buffer(r), 16, 0, 0))
        post_chain(r, (table, 32, VIRTQ_DESC_F_INDIRECT, 0))
        assert_rejected(r, "readable descriptor after a writable one")


def test_indirect_inside_indirect() -> None:
    with ring(8) as r:
        inner = write_table(r, (buffer(r), 16, 0, 0))
        outer = write_table(r, (inner, 16, VIRTQ_DESC_F_INDIRECT, 0))
        post_chain(r, (outer, 16, VIRTQ_DESC_F_INDIRECT, 0))
        assert_rejected(r, "indirect table inside an indirect table")


@pytest.mark.parametrize("length", [0, 8, 17, 31])
def test_indirect_table_of_bad_length(length: int) -> None:
    with ring(8) as r:
        table = write_table(r, (buffer(r), 16, 0, 0), (buffer(r), 16, 0, 0))
        post_chain(r, (table, length, VIRTQ_DESC_F_INDIRECT, 0))
        assert_rejected(r, f"indirect table of {length} bytes")


def test_indirect_table_too_many_descriptors() -> None:
    with ring(8) as r:
        count = MAX_INDIRECT_DESCRIPTORS + 1
        table = r.ram.alloc(16 * count)
        post_chain(r, (table, 16 * count, VIRTQ_DESC_F_INDIRECT, 0))
        assert_rejected(r, f"indirect table of {count} descriptors")


def test_indirect_with_next() -> None:
    with ring(8) as r:
        table = write_table(r, (buffer(r), 16, 0, 0))
        post_chain(r, (table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1), (buffer(r), 16, 0, 0))
        assert_rejected(r, "both INDIRECT and NEXT")


def test_indirect_not_negotiated() -> None:
    with ring(8, indirect=False) as r:
        table = write_table(r, (buffer(r), 16, 0, 0))
        post_chain(r, (table, 16, VIRTQ_DESC_F_INDIRECT, 0))
        assert_rejected(r, "INDIRECT_DESC not negotiated")


@pytest.mark.parametrize("head", [8, 9, 0xFFFF])
def test_head_index_out_of_range(head: int) -> None:
    with ring(8) as r:
        r.driver.post_head(head)
        assert_rejected(r, f"head index {head} out of range")


@pytest.mark.parametrize("next_index", [8, 0xFFFF])
def test_next_index_out_of_range(next_index: int) -> None:
    with ring(8) as r:
        post_chain(r, (buffer(r), 16, VIRTQ_DESC_F_NEXT, next_index))
        assert_rejected(r, f"next index {next_index} out of range \\(8\\)")


def test_next_index_out_of_range_in_indirect_table() -> None:
    with ring(8) as r:
        table = write_table(r, (buffer(r), 16, VIRTQ_DESC_F_NEXT, 2), (buffer(r), 16, 0, 0))
        post_chain(r, (table, 32, VIRTQ_DESC_F_INDIRECT, 0))
        assert_rejected(r, "next index 2 out of range \\(2\\)")


@pytest.mark.parametrize("jump", [9, 100, 0xFFFF])
def test_avail_idx_jump_larger_than_queue(jump: int) -> None:
    with ring(8) as r:
        r.driver.set_avail_idx(jump)
        with pytest.raises(VirtqueueError, match=f"avail index jumped by {jump}"):
            r.vq.pending()
        assert_rejected(r, "avail index jumped")


def test_avail_idx_jump_of_exactly_queue_size_is_allowed() -> None:
    with ring(8) as r:
        for _ in range(8):
            r.driver.add([b"x"], [])
        assert r.vq.pending() == 8
        assert [r.vq.pop() is not None for _ in range(8)] == [True] * 8


def test_rings_outside_memory_or_misaligned_are_refused() -> None:
    with ring(8) as r:
        d = r.driver
        with pytest.raises(VirtqueueError, match="misaligned"):
            Virtqueue(r.memory, 8, d.desc_addr + 8, d.avail_addr, d.used_addr)
        with pytest.raises(VirtqueueError, match="outside guest memory"):
            Virtqueue(r.memory, 8, d.desc_addr, d.avail_addr, MEMORY_END - 16)
        with pytest.raises(VirtqueueError, match="outside guest memory"):
            Virtqueue(r.memory, 8, d.desc_addr, d.avail_addr, READONLY)
        with pytest.raises(VirtqueueError, match="power of two"):
            Virtqueue(r.memory, 6, d.desc_addr, d.avail_addr, d.used_addr)


# ----------------------------------------------------- the driver checks the device


def test_driver_rejects_bogus_used_elements() -> None:
    with ring(8) as r:
        head = r.driver.add([b"x"], [4])
        chain = r.vq.pop()
        assert chain is not None
        r.vq.push_used(head + 1, 0)
        r.vq.publish()
        with pytest.raises(DeviceProtocolError, match="not outstanding"):
            r.driver.used()
    with ring(8) as r:
        head = r.driver.add([b"x"], [4, 4])
        r.vq.pop()
        r.vq.push_used(head, 9)
        r.vq.publish()
        with pytest.raises(DeviceProtocolError, match="claims 9 bytes written, chain has 8"):
            r.driver.used()
    with ring(8) as r:
        r.driver.add([b"x"], [4])
        r.memory.write_u16(r.driver.used_addr + 2, 2)
        with pytest.raises(DeviceProtocolError, match="only 1 chains are outstanding"):
            r.driver.used()


# --------------------------------------------------------------- EVENT_IDX


def crossed(event: int, new: int, old: int) -> bool:
    """Reference: is ``event`` one of the indexes old, old+1, ..., new-1 (mod 2^16)?"""
    return (event - old) % 65536 < (new - old) % 65536


@settings(max_examples=200, deadline=None)
@given(
    old=st.integers(min_value=0, max_value=0xFFFF),
    step=st.integers(min_value=0, max_value=0x8000),
    event=st.integers(min_value=0, max_value=0xFFFF),
)
def test_need_event_matches_crossing_definition(old: int, step: int, event: int) -> None:
    new = (old + step) & 0xFFFF
    assert need_event(event, new, old) == crossed(event, new, old)
    assert need_event((old + step - 1) & 0xFFFF, new, old) == (step > 0)


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),
        (1, 1, 0, False),
        (0, 0, 0, False),
        (0xFFFF, 0, 0xFFFF, True),  # crossing 65535 -> 0
        (0xFFFF, 2, 0xFFFE, True),
        (0, 2, 0xFFFE, True),
        (1, 2, 0xFFFE, True),
        (2, 2, 0xFFFE, False),
        (0xFFFD, 2, 0xFFFE, False),  # already behind old
    ],
)
def test_need_event_wrap_around(event: int, new: int, old: int, expected: bool) -> None:
    assert need_event(event, new, old) is expected


def test_needs_interrupt_honours_used_event() -> None:
    with ring(8, event_idx=True) as r:
        heads = [r.driver.add([b"q"], [1]) for _ in range(4)]
        chains = [r.vq.pop() for _ in heads]
        r.driver.defer_interrupts(3)
        assert r.memory.read_u16(r.driver.avail_addr + 4 + 2 * 8) == 2
        for chain, wanted in zip(chains[:3], [False, False, True]):
            assert chain is not None
            r.complete(chain, b"r")
            assert r.vq.publish()
            assert r.vq.needs_interrupt() is wanted
        assert r.vq.needs_interrupt() is False  # nothing new since
        assert [u.head for u in r.driver.used()] == heads[:3]
        assert r.memory.read_u16(r.driver.avail_addr + 4 + 2 * 8) == 3  # re-armed: next completion
        assert chains[3] is not None
        r.complete(chains[3], b"r")
        r.vq.publish()
        assert r.vq.needs_interrupt() is True


def test_no_new_interrupt_until_driver_consumes() -> None:
    with ring(8, event_idx=True) as r:
        for _ in range(3):
            r.driver.add([], [1])
        chains = [r.vq.pop() for _ in range(3)]
        results = []
        for chain in chains:
            assert chain is not None
            r.complete(chain, b"z")
            r.vq.publish()
            results.append(r.vq.needs_interrupt())
        assert results == [True, False, False]
        assert len(r.driver.used()) == 3


def test_deferred_interrupts_survive_partial_consumption() -> None:
    with ring(8, event_idx=True) as r:
        for _ in range(4):
            r.driver.add([], [1])
        chains = [r.vq.pop() for _ in range(4)]
        r.driver.defer_interrupts(4)
        r.complete(chains[0], b"a")
        r.vq.publish()
        assert r.vq.needs_interrupt() is False
        assert len(r.driver.used()) == 1  # must not re-arm used_event for the next completion
        for chain, wanted in zip(chains[1:], [False, False, True]):
            r.complete(chain, b"a")
            r.vq.publish()
            assert r.vq.needs_interrupt() is wanted
        assert len(r.driver.used()) == 3


def test_needs_interrupt_honours_no_interrupt_flag() -> None:
    with ring(8, event_idx=False) as r:
        for _ in range(2):
            r.driver.add([b"q"], [1])
        first, second = r.vq.pop(), r.vq.pop()
        r.driver.set_no_interrupt(True)
        r.complete(first, b"1")
        r.vq.publish()
        assert r.vq.needs_interrupt() is False
        r.driver.set_no_interrupt(False)
        r.complete(second, b"2")
        r.vq.publish()
        assert r.vq.needs_interrupt() is True
        assert [u.data for u in r.driver.used()] == [b"1", b"2"]
    with ring(8, event_idx=True) as r:
        with pytest.raises(DriverError, match="EVENT_IDX"):
            r.driver.set_no_interrupt(True)


def test_enable_kicks_writes_avail_event_and_reports_pending() -> None:
    with ring(8, event_idx=True) as r:
        avail_event_addr = r.driver.used_addr + 4 + 8 * 8
        r.driver.add([b"a"], [])
        assert r.driver.kick_needed() is True  # avail_event 0 crossed
        assert r.driver.kick_needed() is False  # nothing added since the last kick
        r.vq.disable_kicks()
        assert r.vq.pop() is not None
        assert r.vq.enable_kicks() is False
        assert r.memory.read_u16(avail_event_addr) == 1 == r.vq.next_avail
        r.driver.add([b"b"], [])
        assert r.driver.kick_needed() is True
        r.driver.add([b"c"], [])
        assert r.driver.kick_needed() is False  # the device has not re-armed avail_event
        assert r.vq.enable_kicks() is True  # and it learns that two chains wait
        assert r.memory.read_u16(avail_event_addr) == 1
        assert r.vq.pending() == 2


def test_kicks_without_event_idx_follow_no_notify() -> None:
    with ring(8, event_idx=False) as r:
        r.vq.disable_kicks()
        r.driver.add([b"a"], [])
        assert r.driver.kick_needed() is False
        assert r.vq.enable_kicks() is True
        r.driver.add([b"b"], [])
        assert r.driver.kick_needed() is True


@pytest.mark.parametrize("event_idx", [True, False])
def test_index_wrap_around_at_65535(event_idx: bool) -> None:
    with ring(8, event_idx=event_idx, start_index=0xFFFA) as r:
        assert r.vq.next_used == 0xFFFA
        assert r.vq.enable_kicks() is False  # what a session does when it starts a queue
        seen_avail = []
        for batch in range(6):
            heads = [r.driver.add([bytes([batch, i])], [2]) for i in range(3)]
            assert r.driver.kick_needed() is True
            r.vq.disable_kicks()
            chains = []
            while (chain := r.vq.pop()) is not None:
                chains.append(chain)
            assert not r.vq.enable_kicks()
            assert [c.head for c in chains] == heads
            for chain in chains:
                r.complete(chain, gather(r.memory, chain.readable)[::-1])
            assert r.vq.publish()
            assert r.vq.needs_interrupt() is True
            used = r.driver.used()
            assert [u.data for u in used] == [bytes([i, batch]) for i in range(3)]
            seen_avail.append(r.vq.next_avail)
        assert seen_avail == [(0xFFFA + 3 * (n + 1)) & 0xFFFF for n in range(6)]
        assert r.driver.last_used_idx == r.vq.next_used == 0x000C


READER = """
import mmap, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
view = mmap.mmap(fd, int(sys.argv[2]), prot=mmap.PROT_READ)
offset, seconds, values = int(sys.argv[3]), float(sys.argv[4]), (0x1111, 0x2222)
u16 = struct.Struct("<H")
reads = odd = 0
print("ready", flush=True)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for _ in range(1000):
        if u16.unpack_from(view, offset)[0] not in values:
            odd += 1
    reads += 1000
print(reads, odd)
"""


def test_a_driver_never_sees_the_used_index_half_written() -> None:
    """A driver in another process reads used->idx while the device publishes: only old or new values.

    ``struct.pack_into`` zeroes its destination before it writes, so with it
    a reader saw 0 thousands of times a second (a Linux guest then takes stale
    used elements for new ones); a 16-bit field must be one 16-bit store.
    """
    with GuestRam(1 << 16) as ram:
        driver = DriverQueue(ram, 8, start_index=0x1111)
        vq = Virtqueue(ram.memory, 8, driver.desc_addr, driver.avail_addr, driver.used_addr, next_avail=0x1111)
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, f"/proc/{os.getpid()}/fd/{ram.fd}", str(ram.size),
             str(driver.used_addr + 2), "1.5"],
            stdout=subprocess.PIPE, text=True,
        )
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        writes = 0
        while reader.poll() is None:
            for _ in range(1000):
                vq.next_used = 0x2222 if vq.next_used == 0x1111 else 0x1111
                vq.publish()
            writes += 1000
        reads, odd = map(int, reader.stdout.read().split())
    print(f"{writes} used index stores, {reads} reads by the driver process, {odd} neither the old nor the new value")
    assert writes and reads
    assert odd == 0
