"""The reference driver: the guest (driver) side of a VIRTIO 1.x split virtqueue.

Tests, benchmarks, the Python vhost-user frontend
(:mod:`pvcore.testing.vhost_user_frontend`) and the xen simulator drive
pvcore's device side with this module instead of a real guest kernel. It is a
test peer: nothing that serves a guest imports it. It follows what Linux's ``virtio_ring.c`` does, step by step:

* :class:`GuestRam` is guest RAM in a memfd, so it can be handed to another
  process (vhost-user SET_MEM_TABLE) and mapped there; its
  :attr:`GuestRam.memory` is the :class:`~pvcore.ring.memory.GuestMemory` the
  device side uses in-process.
* :class:`DriverQueue` lays out the three rings, posts chains (direct or through
  an indirect table), decides whether a kick is needed (``avail_event`` with
  EVENT_IDX, the used ring's NO_NOTIFY flag without), and collects used
  elements, re-arming ``used_event`` as it goes.

The driver is also a checker of the device: a used element that names a head
the driver never posted, or claims more bytes written than the chain could
hold, raises :class:`DeviceProtocolError` rather than being believed.

Low-level helpers (:meth:`DriverQueue.write_descriptor`,
:meth:`DriverQueue.post_head`, :meth:`DriverQueue.set_avail_idx`) let hostile
tests write rings no correct driver would.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Sequence

import attrs

from pvcore.ring.barrier import full_barrier, write_barrier
from pvcore.ring.fdmemory import sealed_memfd
from pvcore.ring.memory import GuestMemory, MemoryRegion
from pvcore.ring.virtqueue import (
    DESCRIPTOR_SIZE,
    MAX_INDIRECT_DESCRIPTORS,
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    need_event,
    ring_sizes,
)

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class DriverError(Exception):
    """The driver was asked to do something it cannot (queue full, bad argument)."""


class QueueFullError(DriverError):
    """No free descriptors are left for the chain being added."""


class GuestRamFullError(DriverError, MemoryError):
    """Guest RAM has no free block large enough for an allocation."""


class DeviceProtocolError(Exception):
    """The device broke the ring protocol (bogus used element or used index)."""


@attrs.frozen
class UsedBuffer:
    """A chain the device has returned: its head, the bytes written and their contents."""

    head: int
    written: int
    data: bytes


class GuestRam:
    """Guest RAM backed by a memfd, with a first-fit allocator for rings and buffers.

    ``fd`` can be passed to another process (it maps the same pages);
    ``memory`` is a :class:`GuestMemory` of one region at ``guest_addr`` whose
    ``user_addr`` is this process's mapping address, so vhost-user address
    translation can be exercised. Like QEMU's ``memory-backend-memfd`` (whose
    ``seal=on`` is the default) the memfd is sealed against shrinking and
    growing; ``sealed=False`` leaves it unsealed, as a hostile frontend would.
    """

    def __init__(self, size: int, guest_addr: int = 0, *, sealed: bool = True) -> None:
        if size <= 0:
            raise DriverError(f"guest RAM size {size} must be positive")
        self.size = size
        self.guest_addr = guest_addr
        if sealed:
            self.fd = sealed_memfd("pvcore-guest-ram", size)
        else:
            self.fd = os.memfd_create("pvcore-guest-ram", os.MFD_CLOEXEC)
        try:
            if not sealed:
                os.ftruncate(self.fd, size)
            self._mmap = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        anchor = ctypes.c_char.from_buffer(self._mmap)
        self.user_addr = ctypes.addressof(anchor)
        del anchor
        self._view = memoryview(self._mmap)
        self.memory = GuestMemory([MemoryRegion(guest_addr, self._view, user_addr=self.user_addr)])
        self._free: list[tuple[int, int]] = [(guest_addr, size)]
        self._allocated: dict[int, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"GuestRam({self.size:#x} at {self.guest_addr:#x}, fd={self.fd})"

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def user_address(self, guest_addr: int) -> int:
        """This process's address of guest address ``guest_addr`` (vhost-user ring addresses)."""
        if not self.guest_addr <= guest_addr < self.guest_addr + self.size:
            raise DriverError(f"guest address {guest_addr:#x} is not in this RAM")
        return self.user_addr + guest_addr - self.guest_addr

    @property
    def free_bytes(self) -> int:
        """Bytes not currently allocated (possibly fragmented)."""
        return sum(length for _, length in self._free)

    def alloc(self, n: int, align: int = 16) -> int:
        """Allocate ``n`` bytes aligned to ``align`` (a power of two); return the guest address.

        A zero-byte request still gets a distinct one-byte block, so every
        allocation has an address of its own to :meth:`free`.
        """
        if n < 0:
            raise DriverError(f"cannot allocate {n} bytes")
        if align < 1 or align & (align - 1):
            raise DriverError(f"alignment {align} is not a power of two")
        want = max(n, 1)
        for i, (start, length) in enumerate(self._free):
            addr = (start + align - 1) & ~(align - 1)
            end = addr + want
            if end > start + length:
                continue
            pieces = [(start, addr - start), (end, start + length - end)]
            self._free[i : i + 1] = [(s, l) for s, l in pieces if l > 0]
            self._allocated[addr] = (addr, want)
            return addr
        raise GuestRamFullError(
            f"guest RAM full: no free block of {want} bytes aligned to {align} "
            f"({self.free_bytes} of {self.size} bytes free)"
        )

    def free(self, addr: int) -> None:
        """Return a block from :meth:`alloc` to the free list."""
        try:
            start, length = self._allocated.pop(addr)
        except KeyError:
            raise DriverError(f"guest address {addr:#x} was not allocated (or was freed already)") from None
        blocks = sorted([*self._free, (start, length)])
        merged: list[tuple[int, int]] = []
        for block_start, block_len in blocks:
            if merged and merged[-1][0] + merged[-1][1] == block_start:
                merged[-1] = (merged[-1][0], merged[-1][1] + block_len)
            else:
                merged.append((block_start, block_len))
        self._free = merged

    def close(self) -> None:
        """Unmap the RAM and close the memfd (idempotent).

        If another object still holds a view into the RAM, the mapping stays
        until that view is released; the memfd is closed regardless.
        """
        if self.fd < 0:
            return
        try:
            self._view.release()
            self._mmap.close()
        except BufferError:
            pass  # views exported elsewhere keep the mapping alive until they go
        os.close(self.fd)
        self.fd = -1


@attrs.define
class _PostedChain:
    """What the driver remembers about a chain it made available."""

    descriptors: list[int]
    buffers: list[int]
    writable: list[tuple[int, int]]
    indirect_table: int | None = None

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)


class DriverQueue:
    """The driver side of one split virtqueue living in a :class:`GuestRam`.

    ``start_index`` sets the initial available and used indexes (both sides
    must agree on it): for wrap-around tests and for queues resumed at a base.
    Only the thread that owns the queue may call its methods.
    """

    def __init__(
        self,
        ram: GuestRam,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        start_index: int = 0,
    ) -> None:
        if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise DriverError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.ram = ram
        self.memory = ram.memory
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        desc_len, avail_len, used_len = ring_sizes(size)
        self.desc_addr = ram.alloc(desc_len, 16)
        self.avail_addr = ram.alloc(avail_len, 2)
        self.used_addr = ram.alloc(used_len, 4)
        self.memory.fill(self.desc_addr, desc_len)
        self.memory.fill(self.avail_addr, avail_len)
        self.memory.fill(self.used_addr, used_len)
        self._used_event_addr = self.avail_addr + 4 + 2 * size
        self._avail_event_addr = self.used_addr + 4 + 8 * size
        start_index &= 0xFFFF
        self.avail_idx = start_index
        self.last_used_idx = start_index
        self._kicked_avail = start_index
        self.memory.write_u16(self.avail_addr + 2, start_index)
        self.memory.write_u16(self.used_addr + 2, start_index)
        if event_idx:
            self.memory.write_u16(self._used_event_addr, start_index)
        self._free_descriptors = list(range(size - 1, -1, -1))
        self._posted: dict[int, _PostedChain] = {}
        self._deferred_until: int | None = None

    def __repr__(self) -> str:
        return (
            f"DriverQueue(size={self.size}, avail={self.avail_idx}, last_used={self.last_used_idx}, "
            f"outstanding={len(self._posted)})"
        )

    @property
    def outstanding(self) -> int:
        """Chains made available through :meth:`add` and not yet returned."""
        return len(self._posted)

    @property
    def free_descriptors(self) -> int:
        """Descriptors of the table not used by an outstanding chain."""
        return len(self._free_descriptors)

    def add(self, readable: Sequence[bytes], writable: Sequence[int], *, indirect: bool = False) -> int:
        """Make one chain available; return its head descriptor index.

        Each item of ``readable`` is copied into a fresh buffer the device may
        read; each length in ``writable`` becomes a fresh buffer the device may
        write. With ``indirect`` the chain is built in an indirect table and
        takes one descriptor of the queue.
        """
        count = len(readable) + len(writable)
        if count == 0:
            raise DriverError("a chain needs at least one buffer")
        if any(length < 0 for length in writable):
            raise DriverError(f"negative writable length in {list(writable)}")
        if indirect and not self.indirect:
            raise DriverError("indirect chain asked for but INDIRECT_DESC was not negotiated")
        if indirect and count > MAX_INDIRECT_DESCRIPTORS:
            raise DriverError(f"indirect chain of {count} buffers (limit {MAX_INDIRECT_DESCRIPTORS})")
        needed = 1 if indirect else count
        if needed > len(self._free_descriptors):
            raise QueueFullError(
                f"queue full: chain needs {needed} descriptors, {len(self._free_descriptors)} of {self.size} free"
            )
        posted = _PostedChain(descriptors=[], buffers=[], writable=[])
        entries: list[tuple[int, int, int]] = []
        try:
            for data in readable:
                addr = self.ram.alloc(len(data))
                posted.buffers.append(addr)
                self.memory.write(addr, data)
                entries.append((addr, len(data), 0))
            for length in writable:
                addr = self.ram.alloc(length)
                posted.buffers.append(addr)
                posted.writable.append((addr, length))
                entries.append((addr, length, VIRTQ_DESC_F_WRITE))
            if indirect:
                posted.indirect_table = self.ram.alloc(DESCRIPTOR_SIZE * count, 16)
        except GuestRamFullError:
            for addr in posted.buffers:
                self.ram.free(addr)
            raise
        if indirect:
            assert posted.indirect_table is not None
            table = bytearray()
            for i, (addr, length, flags) in enumerate(entries):
                last = i == count - 1
                table += _DESC.pack(addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1)
            self.memory.write(posted.indirect_table, table)
            head = self._free_descriptors.pop()
            posted.descriptors.append(head)
            self.write_descriptor(head, posted.indirect_table, len(table), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            indexes = [self._free_descriptors.pop() for _ in range(count)]
            posted.descriptors.extend(indexes)
            for i, (addr, length, flags) in enumerate(entries):
                last = i == count - 1
                self.write_descriptor(
                    indexes[i], addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else indexes[i + 1]
                )
            head = indexes[0]
        self._posted[head] = posted
        self.post_head(head)
        return head

    def kick_needed(self) -> bool:
        """Whether the device wants a kick for the chains added since the last kick.

        Like Linux's ``virtqueue_kick_prepare``: a full barrier (our avail index
        store before the load of the device's suppression state), then
        ``avail_event`` with EVENT_IDX, else the used ring's NO_NOTIFY flag.
        Calling it records that the driver has (or has not) kicked for them.
        """
        full_barrier()
        old, new = self._kicked_avail, self.avail_idx
        self._kicked_avail = new
        if old == new:
            return False
        if self.event_idx:
            return need_event(self.memory.read_u16(self._avail_event_addr), new, old)
        return not self.memory.read_u16(self.used_addr) & VIRTQ_USED_F_NO_NOTIFY

    def used_idx(self) -> int:
        """The device's current used index."""
        return self.memory.read_u16(self.used_addr + 2)

    def has_used(self) -> bool:
        """Whether the device has published used elements :meth:`used` has not collected."""
        return self.used_idx() != self.last_used_idx

    def used(self) -> list[UsedBuffer]:
        """Collect every newly used chain, checking it, and free its buffers.

        With EVENT_IDX, ``used_event`` is then set to the last seen used index
        (interrupt on the next completion) unless :meth:`defer_interrupts`
        asked for a later one that has not been reached yet.
        """
        used_idx = self.used_idx()
        new = (used_idx - self.last_used_idx) & 0xFFFF
        if new > len(self._posted):
            raise DeviceProtocolError(
                f"used index moved from {self.last_used_idx} to {used_idx} "
                f"but only {len(self._posted)} chains are outstanding"
            )
        full_barrier()
        collected: list[UsedBuffer] = []
        for _ in range(new):
            slot = self.used_addr + 4 + 8 * (self.last_used_idx % self.size)
            head, written = _USED_ELEM.unpack(self.memory.read(slot, 8))
            posted = self._posted.get(head)
            if posted is None:
                raise DeviceProtocolError(
                    f"used element {self.last_used_idx} names head {head}, which is not outstanding"
                )
            if written > posted.writable_len:
                raise DeviceProtocolError(
                    f"used element for head {head} claims {written} bytes written, "
                    f"chain has {posted.writable_len} writable"
                )
            del self._posted[head]
            collected.append(UsedBuffer(head, written, self._read_written(posted.writable, written)))
            self._release(posted)
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        if self.event_idx:
            self._arm_used_event()
        return collected

    def _read_written(self, writable: list[tuple[int, int]], written: int) -> bytes:
        parts: list[bytes] = []
        remaining = written
        for addr, length in writable:
            if remaining <= 0:
                break
            take = min(length, remaining)
            parts.append(self.memory.read(addr, take))
            remaining -= take
        return b"".join(parts)

    def _release(self, posted: _PostedChain) -> None:
        for addr in posted.buffers:
            self.ram.free(addr)
        if posted.indirect_table is not None:
            self.ram.free(posted.indirect_table)
        self._free_descriptors.extend(reversed(posted.descriptors))

    def _arm_used_event(self) -> None:
        if self._deferred_until is not None:
            remaining = (self._deferred_until - self.last_used_idx) & 0xFFFF
            if 0 < remaining <= self.size:
                return
            self._deferred_until = None
        self.memory.write_u16(self._used_event_addr, self.last_used_idx)

    def defer_interrupts(self, n: int) -> None:
        """With EVENT_IDX: ask to be interrupted only once ``n`` more chains are used."""
        if not self.event_idx:
            raise DriverError("defer_interrupts needs EVENT_IDX")
        if not 1 <= n <= self.size:
            raise DriverError(f"cannot defer interrupts by {n} (queue size {self.size})")
        self._deferred_until = (self.last_used_idx + n) & 0xFFFF
        self.memory.write_u16(self._used_event_addr, (self._deferred_until - 1) & 0xFFFF)

    def set_no_interrupt(self, suppress: bool) -> None:
        """Set or clear VIRTQ_AVAIL_F_NO_INTERRUPT (without EVENT_IDX, where the flag is allowed)."""
        if self.event_idx:
            raise DriverError("with EVENT_IDX the driver must keep avail flags 0; use defer_interrupts")
        self.memory.write_u16(self.avail_addr, VIRTQ_AVAIL_F_NO_INTERRUPT if suppress else 0)

    def write_descriptor(self, index: int, addr: int, length: int, flags: int, next_index: int) -> None:
        """Write raw descriptor ``index`` of the queue's table (no checks on the values)."""
        if not 0 <= index < self.size:
            raise DriverError(f"descriptor index {index} outside the table of {self.size}")
        self.memory.write(
            self.desc_addr + DESCRIPTOR_SIZE * index,
            _DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF, next_index & 0xFFFF),
        )

    def post_head(self, head: int) -> None:
        """Put ``head`` (any u16) in the next avail slot, then publish the avail index.

        Heads posted this way without :meth:`add` are not tracked: if the
        device returns one, :meth:`used` reports it as a protocol error.
        """
        slot = self.avail_addr + 4 + 2 * (self.avail_idx % self.size)
        self.memory.write_u16(slot, head)
        write_barrier()
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write the avail index directly (e.g. to jump it by more than the queue size)."""
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)
