"""The VIRTIO 1.x split virtqueue, device side.

Layout (all little-endian, VIRTIO 1.x section 2.7):

* descriptor table: ``size`` x {u64 addr, u32 len, u16 flags, u16 next}
* available ring:   u16 flags, u16 idx, u16 ring[size], u16 used_event
* used ring:        u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event

The ring lives in guest memory and the guest may change any of it at any time,
so nothing read from it is trusted: :meth:`Virtqueue.pop` checks every index,
flag, address and length before it hands a :class:`DescriptorChain` to a device,
and raises :class:`VirtqueueError` for a ring that breaks the rules. That error
means the device needs a reset (VIRTIO_CONFIG_S_NEEDS_RESET): the caller stops
this device and nothing else. Only where the three rings lie is checked once,
when the queue starts or its memory is replaced; a ring that one memory region
holds is then accessed through one view of it.

Ordering: used elements are written, then :func:`~pvcore.ring.barrier.write_barrier`,
then the used index; the index store and the later read of ``used_event`` (or of
the avail flags) are separated by :func:`~pvcore.ring.barrier.full_barrier`, as
are the store of ``avail_event`` and the re-read of the avail index when kicks
are re-enabled. See :mod:`pvcore.ring.barrier` for what each costs per
architecture.

Inflight tracking (see :mod:`pvcore.ring.inflight`): given a region, the queue
records each head it takes and each batch it publishes there, and at start
resumes from what a previous back end left: the heads it had in flight are
taken again (oldest first) before any new chain.
"""

from __future__ import annotations

import struct
import sys
from typing import TYPE_CHECKING

import attrs

from pvcore.ring.barrier import full_barrier, read_barrier, write_barrier
from pvcore.ring.memory import GuestMemory, GuestMemoryError

if TYPE_CHECKING:
    from pvcore.ring.dirtylog import DirtyLog
    from pvcore.ring.inflight import InflightQueue

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
MAX_INDIRECT_DESCRIPTORS = 1024
MAX_CHAIN_BYTES = 1 << 32
DESCRIPTOR_SIZE = 16

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
"""A native 16-bit view of the used ring stores the ring's little-endian fields only on such a host."""


class VirtqueueError(Exception):
    """The guest broke the ring protocol; the device needs a reset."""


@attrs.frozen
class DescriptorChain:
    """One request: the head index and its validated guest buffers.

    ``readable`` buffers (device reads, driver wrote) all come before the
    ``writable`` ones; each is an ``(address, length)`` pair that has been
    checked to lie inside guest memory.
    """

    head: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]

    @property
    def readable_len(self) -> int:
        """Total bytes the device may read."""
        return sum(length for _, length in self.readable)

    @property
    def writable_len(self) -> int:
        """Total bytes the device may write."""
        return sum(length for _, length in self.writable)


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes taken by the descriptor table, available ring and used ring of a queue."""
    return DESCRIPTOR_SIZE * size, 6 + 2 * size, 6 + 8 * size


def need_event(event: int, new: int, old: int) -> bool:
    """VIRTIO's vring_need_event: has ``event`` been crossed moving ``old`` -> ``new``?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class Virtqueue:
    """Device-side view of one split virtqueue in guest memory."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        next_avail: int = 0,
        next_used: int | None = None,
        inflight: InflightQueue | None = None,
    ) -> None:
        if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise VirtqueueError(
                f"ring addresses misaligned: desc {desc_addr:#x} (16), avail {avail_addr:#x} (2), "
                f"used {used_addr:#x} (4)"
            )
        desc_len, avail_len, used_len = ring_sizes(size)
        try:
            memory.check(desc_addr, desc_len)
            memory.check(avail_addr, avail_len)
            memory.check(used_addr, used_len, write=True)
        except GuestMemoryError as exc:
            raise VirtqueueError(f"ring outside guest memory: {exc}") from None
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = next_avail & 0xFFFF
        self.next_used = memory.read_u16(used_addr + 2) if next_used is None else next_used & 0xFFFF
        self.signalled_used = self.next_used
        self._published = self.next_used
        self.dirty_log: DirtyLog | None = None
        """While a migration logs dirty pages: the log every used-ring write is marked in."""
        self.log_used_addr = used_addr
        """Guest-physical address the used ring's writes are logged at (vhost-user's log_guest_addr)."""
        self.inflight = inflight
        self._batch: list[int] = []
        self.resubmit: list[int] = []
        """Heads a previous back end had in flight, taken again (in this order) before new chains."""
        if inflight is not None:
            recovered = inflight.recover(self.next_used)
            if recovered is not None:
                self.resubmit = recovered
                self.next_avail = (self.next_used + len(recovered)) & 0xFFFF

    @property
    def memory(self) -> GuestMemory:
        """The guest memory the rings and buffers live in."""
        return self._memory

    @memory.setter
    def memory(self, memory: GuestMemory) -> None:
        """Install (or replace) the guest memory, and with it the views of the three rings.

        A ring that one memory region holds whole (every vhost-user guest's)
        is read and written through one view of it, checked once here; a ring
        across regions (grant-mapped pages) goes through ``memory`` each time.
        The views keep their mapping alive: a transport installs the new
        memory before it closes the old one, or detaches the queue first.
        """
        desc_len, avail_len, used_len = ring_sizes(self.size)
        self._memory = memory
        self._desc = memory.contiguous(self.desc_addr, desc_len)
        self._avail = memory.contiguous(self.avail_addr, avail_len)
        self._used = memory.contiguous(self.used_addr, used_len, write=True)
        self._used_u16 = self._used.cast("H") if self._used is not None and _LITTLE_ENDIAN_HOST else None

    def _avail_u16(self, offset: int) -> int:
        if self._avail is not None:
            return _U16.unpack_from(self._avail, offset)[0]
        return self._memory.read_u16(self.avail_addr + offset)

    def _put_used(self, fmt: struct.Struct, offset: int, values: tuple[int, ...]) -> None:
        """Store into the used ring without a moment the driver could see anything but the old or new value.

        Never ``struct.pack_into``: it zeroes its destination before it
        writes, so a driver reading ``used->idx`` at that moment sees 0 (a
        Linux guest then takes stale used elements for new ones). A 16-bit
        field is one 16-bit store through a typed view of the ring; anything
        else is copied in from packed bytes.
        """
        if self._used_u16 is not None and fmt is _U16:
            self._used_u16[offset >> 1] = values[0]  # one 16-bit store, compiled or not (see virtqueue.pxd)
        elif self._used is not None:
            self._used[offset : offset + fmt.size] = fmt.pack(*values)
        else:
            self._memory.write(self.used_addr + offset, fmt.pack(*values))
        if self.dirty_log is not None:
            self.dirty_log.mark(self.log_used_addr + offset, fmt.size)

    def avail_idx(self) -> int:
        """The driver's current available index."""
        return self._avail_u16(2)

    def pending(self) -> int:
        """How many chains the driver has made available that we have not popped.

        Raises :class:`VirtqueueError` if the driver moved its index by more than
        the queue size.
        """
        pending = (self._avail_u16(2) - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"avail index jumped by {pending} (queue size {self.size}, last seen {self.next_avail})"
            )
        if self.resubmit:
            return pending + len(self.resubmit)
        return pending

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, validated; None if there is none."""
        if not self.pending():
            return None
        return self.take()

    def take(self) -> DescriptorChain:
        """Take the next available chain, validated, when :meth:`pending` has said there is one.

        For a caller that takes what :meth:`pending` counted without asking
        again each time; anything else should :meth:`pop`.
        """
        if self.resubmit:
            return self._walk(self.resubmit.pop(0))
        read_barrier()
        head = self._avail_u16(4 + 2 * (self.next_avail % self.size))
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        chain = self._walk(head)
        if self.inflight is not None:
            self.inflight.taken(head)
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise VirtqueueError(f"head index {head} out of range (queue size {self.size})")
        memory = self._memory
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        table, table_view, table_len, index = self.desc_addr, self._desc, self.size, head
        indirect = False
        seen = 0
        total = 0
        while True:
            seen += 1
            if seen > table_len:
                where = "indirect table" if indirect else "queue"
                raise VirtqueueError(f"chain at head {head} loops or is longer than its {where} ({table_len})")
            if table_view is not None:
                addr, length, flags, nxt = _DESC.unpack_from(table_view, DESCRIPTOR_SIZE * index)
            else:
                addr, length, flags, nxt = _DESC.unpack(memory.read(table + DESCRIPTOR_SIZE * index, DESCRIPTOR_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(f"indirect descriptor at head {head} but INDIRECT_DESC not negotiated")
                if indirect:
                    raise VirtqueueError(f"indirect table inside an indirect table at head {head}")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"descriptor at head {head} sets both INDIRECT and NEXT")
                if length == 0 or length % DESCRIPTOR_SIZE:
                    raise VirtqueueError(f"indirect table of {length} bytes at head {head} (need a multiple of 16)")
                count = length // DESCRIPTOR_SIZE
                if count > MAX_INDIRECT_DESCRIPTORS:
                    raise VirtqueueError(f"indirect table of {count} descriptors (limit {MAX_INDIRECT_DESCRIPTORS})")
                try:
                    memory.check(addr, length)
                except GuestMemoryError as exc:
                    raise VirtqueueError(f"indirect table at head {head}: {exc}") from None
                table, table_view, table_len = addr, memory.contiguous(addr, length), count
                index, indirect, seen = 0, True, 0
                continue
            write = bool(flags & VIRTQ_DESC_F_WRITE)
            try:
                memory.check(addr, length, write=write)
            except GuestMemoryError as exc:
                raise VirtqueueError(f"descriptor {index} of head {head}: {exc}") from None
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"chain at head {head} is longer than 4 GiB")
            if write:
                writable.append((addr, length))
            elif writable:
                raise VirtqueueError(f"readable descriptor after a writable one in chain at head {head}")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                raise VirtqueueError(f"next index {nxt} out of range ({table_len}) in chain at head {head}")
            index = nxt
        return DescriptorChain(head, tuple(readable), tuple(writable))

    def push_used(self, head: int, written: int) -> None:
        """Write a used element; it becomes visible to the driver at :meth:`publish`."""
        self._put_used(_USED_ELEM, 4 + 8 * (self.next_used % self.size), (head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        if self.inflight is not None:
            self._batch.append(head)

    def unpublished(self) -> int:
        """How many used elements were pushed that :meth:`publish` has not yet made visible."""
        return (self.next_used - self._published) & 0xFFFF

    def publish(self) -> bool:
        """Make pushed used elements visible; True if there was anything new."""
        if self.next_used == self._published:
            return False
        batch = self._batch
        if self.inflight is not None and batch:
            self.inflight.batch_publishing(batch)
        write_barrier()
        self._put_used(_U16, 2, (self.next_used,))
        self._published = self.next_used
        if self.inflight is not None and batch:
            self.inflight.batch_published(batch, self.next_used)
            self._batch = []
        return True

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was published since the last one.

        Honours VIRTQ_AVAIL_F_NO_INTERRUPT, or ``used_event`` with EVENT_IDX.
        Calling it records that the driver has been told (or chose not to be).
        """
        full_barrier()
        old, new = self.signalled_used, self._published
        self.signalled_used = new
        if old == new:
            return False
        if self.event_idx:
            return need_event(self._avail_u16(4 + 2 * self.size), new, old)
        return not self._avail_u16(0) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_kicks(self) -> None:
        """Ask the driver not to kick (we are going to poll the ring anyway)."""
        if not self.event_idx:
            self._put_used(_U16, 0, (VIRTQ_USED_F_NO_NOTIFY,))

    def enable_kicks(self) -> bool:
        """Ask the driver to kick for the next chain; True if chains arrived meanwhile."""
        if self.event_idx:
            self._put_used(_U16, 4 + 8 * self.size, (self.next_avail,))
        else:
            self._put_used(_U16, 0, (0,))
        full_barrier()
        return self.pending() > 0
