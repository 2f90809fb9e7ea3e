"""Inflight tracking: which requests a back end took from a split ring and has not yet answered.

A back end that dies (``kill -9``, a crash, an upgrade gone wrong) loses the
requests it had taken from the available ring and not yet put on the used
ring. The front end cannot tell which those are: the avail index says what
was offered and the used index how many were answered, but completions come
back out of order (several I/O threads), so "the first ``used`` of the
offered ones" is wrong. Inflight tracking keeps the answer in shared memory
that outlives the back end's process: the front end holds it and hands it to
the next back end (vhost-user's ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``:
GET_INFLIGHT_FD to get it made, SET_INFLIGHT_FD to hand it back).

The layout is the split-ring one vhost-user.rst gives, one region per queue,
each :func:`queue_region_size` bytes (64-byte aligned)::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    desc_num x { u8 inflight; u8 padding[5]; u16 next; u64 counter; }

What the back end does (the ring engine, :class:`~pvcore.ring.virtqueue.Virtqueue`,
does it; devices know nothing of it):

* taking head ``h``: ``desc[h].counter`` = the next number, then ``inflight = 1``;
* publishing a batch of used elements: link the batch's heads through ``next``
  and set ``last_batch_head`` to its first, *then* store the used index, *then*
  clear each head's ``inflight`` and store the new ``used_idx`` here.

A new back end (:meth:`InflightQueue.recover`) compares ``used_idx`` here with
the used index in the ring: if they differ, the last batch reached the guest
but its flags were not cleared, and the difference says how many heads of the
``last_batch_head`` list to clear. What is still in flight then is every head
with ``inflight`` set, resubmitted oldest ``counter`` first, and the ring
resumes taking new requests at ``used index + in flight`` (every taken head
was either answered or is in flight).

The region is the front end's memory and is not trusted: its file must be
sealed against shrinking (as guest RAM must), its size must hold every queue,
and every head, count and link read from it is checked; a region that breaks
the rules is an :class:`InflightError`, which fails that device only.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct

from pvcore.ring.fdmemory import _check_sealed
from pvcore.ring.memory import GuestMemoryError

INFLIGHT_VERSION = 1
HEADER = struct.Struct("<QHHHH")
"""features, version, desc_num, last_batch_head, used_idx."""
DESC_STATE = struct.Struct("<B5xHQ")
"""inflight, padding, next, counter."""
ALIGNMENT = 64
MAX_QUEUES = 64
MAX_QUEUE_SIZE = 32768

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_INFLIGHT_AT = 0
_NEXT_AT = 6
_COUNTER_AT = 8
_LAST_BATCH_HEAD_AT = 12
_USED_IDX_AT = 14


def _store(view: memoryview, offset: int, fmt: struct.Struct, value: int) -> None:
    """Copy one packed field in: never ``struct.pack_into``, which zeroes the field first, so a back end
    killed at that moment would leave a 0 the next one takes for a count."""
    view[offset : offset + fmt.size] = fmt.pack(value)


class InflightError(GuestMemoryError):
    """An inflight region that cannot be used or trusted; the message says why."""


def queue_region_size(queue_size: int) -> int:
    """Bytes one queue's region takes for a ring of ``queue_size`` descriptors (64-byte aligned)."""
    raw = HEADER.size + DESC_STATE.size * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class InflightQueue:
    """One queue's region: the ring engine records here what it took and what it answered."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self._view = view
        self.queue_size = queue_size
        self._counter = 1

    def _desc_offset(self, head: int) -> int:
        return HEADER.size + DESC_STATE.size * head

    def taken(self, head: int) -> None:
        """Head ``head`` was taken from the available ring (the caller checked it is in range)."""
        offset = self._desc_offset(head)
        _store(self._view, offset + _COUNTER_AT, _U64, self._counter)
        self._counter += 1
        _store(self._view, offset + _INFLIGHT_AT, _U8, 1)

    def batch_publishing(self, heads: list[int]) -> None:
        """Before the used index moves past ``heads``: record them as the last batch."""
        view = self._view
        for head, following in zip(heads, heads[1:]):
            _store(view, self._desc_offset(head) + _NEXT_AT, _U16, following)
        _store(view, _LAST_BATCH_HEAD_AT, _U16, heads[0])

    def batch_published(self, heads: list[int], used_idx: int) -> None:
        """The used index moved to ``used_idx`` past ``heads``: they are no longer in flight."""
        view = self._view
        for head in heads:
            _store(view, self._desc_offset(head) + _INFLIGHT_AT, _U8, 0)
        _store(view, _USED_IDX_AT, _U16, used_idx)

    def recover(self, used_idx: int) -> list[int] | None:
        """Start a ring whose used index is ``used_idx``: the heads to resubmit, oldest first.

        None if the region is fresh (no back end ever used it): it is set up
        for this ring and nothing is in flight. Raises :class:`InflightError`
        for a region that does not describe this ring or breaks the layout.
        """
        view, size = self._view, self.queue_size
        _features, version, desc_num, last_batch_head, region_used = HEADER.unpack_from(view, 0)
        if version == 0:
            view[: HEADER.size] = HEADER.pack(0, INFLIGHT_VERSION, size, 0, used_idx)
            return None
        if version != INFLIGHT_VERSION:
            raise InflightError(f"inflight region version {version} (only {INFLIGHT_VERSION} is known)")
        if desc_num != size:
            raise InflightError(f"inflight region for {desc_num} descriptors, the ring has {size}")
        unpublished = (used_idx - region_used) & 0xFFFF
        if unpublished > size:
            raise InflightError(
                f"used index {used_idx} is {unpublished} past the region's {region_used} (queue size {size})"
            )
        head = last_batch_head
        for _ in range(unpublished):  # the last batch reached the guest; its flags were not yet cleared
            if head >= size:
                raise InflightError(f"last batch links to head {head} (queue size {size})")
            offset = self._desc_offset(head)
            _store(view, offset + _INFLIGHT_AT, _U8, 0)
            head = _U16.unpack_from(view, offset + _NEXT_AT)[0]
        _store(view, _USED_IDX_AT, _U16, used_idx)
        pending: list[tuple[int, int]] = []
        for index in range(size):
            flag, _next, counter = DESC_STATE.unpack_from(view, self._desc_offset(index))
            if flag > 1:
                raise InflightError(f"head {index}: inflight flag {flag} is neither 0 nor 1")
            if flag:
                pending.append((counter, index))
        pending.sort()
        if pending:
            self._counter = pending[-1][0] + 1
        return [index for _counter, index in pending]


class InflightArea:
    """The inflight regions of every queue of one device, mapped from a shared fd.

    Made fresh by :meth:`create` (vhost-user's GET_INFLIGHT_FD: the back end
    allocates, the front end keeps the fd) or mapped from a front end's fd by
    :meth:`open` (SET_INFLIGHT_FD, after a back-end restart).
    """

    def __init__(self, mapping: mmap.mmap, offset: int, size: int, num_queues: int, queue_size: int) -> None:
        self._mapping = mapping
        self._view: memoryview | None = memoryview(mapping)[offset : offset + size]
        self.size = size
        self.num_queues = num_queues
        self.queue_size = queue_size

    @staticmethod
    def _check_shape(num_queues: int, queue_size: int) -> int:
        if not 1 <= num_queues <= MAX_QUEUES:
            raise InflightError(f"inflight region for {num_queues} queues (allowed 1..{MAX_QUEUES})")
        if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise InflightError(f"inflight queue size {queue_size} is not a power of two up to {MAX_QUEUE_SIZE}")
        return num_queues * queue_region_size(queue_size)

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> tuple[InflightArea, int]:
        """A zeroed area in a new sealed memfd; returns it and the fd to hand to the front end."""
        size = cls._check_shape(num_queues, queue_size)
        fd = os.memfd_create("pvcore-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(mapping, 0, size, num_queues, queue_size), fd

    @classmethod
    def open(cls, fd: int, *, size: int, offset: int, num_queues: int, queue_size: int) -> InflightArea:
        """Map ``size`` bytes of ``fd`` from ``offset`` (the fd stays the caller's); check it holds every queue."""
        needed = cls._check_shape(num_queues, queue_size)
        if size < needed:
            raise InflightError(f"inflight region of {size:#x} bytes cannot hold {num_queues} x {queue_size} ({needed:#x})")
        if size > needed:
            raise InflightError(f"inflight region of {size:#x} bytes, {num_queues} x {queue_size} take {needed:#x}")
        if offset % mmap.PAGESIZE:
            raise InflightError(f"inflight region offset {offset:#x} is not at a page boundary")
        try:
            info = os.fstat(fd)
        except OSError as exc:
            raise InflightError(f"inflight fd is not open ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise InflightError("inflight fd is not a regular file")
        try:
            _check_sealed("inflight region", fd)
        except ValueError as exc:
            raise InflightError(str(exc)) from None
        if offset + size > os.fstat(fd).st_size:
            raise InflightError(f"inflight region {offset:#x}+{size:#x} runs past the end of its file")
        mapping = mmap.mmap(fd, offset + size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(mapping, offset, size, num_queues, queue_size)

    def queue(self, index: int, ring_size: int) -> InflightQueue:
        """Queue ``index``'s region for a ring of ``ring_size`` descriptors."""
        if self._view is None:
            raise InflightError("inflight region is closed")
        if not 0 <= index < self.num_queues:
            raise InflightError(f"queue {index} has no inflight region ({self.num_queues} queues)")
        if ring_size > self.queue_size:
            raise InflightError(f"queue {index}: ring of {ring_size} descriptors, region for {self.queue_size}")
        start = index * queue_region_size(self.queue_size)
        return InflightQueue(self._view[start : start + queue_region_size(ring_size)], ring_size)

    def close(self) -> None:
        """Unmap the area (regions handed out keep it mapped until they go)."""
        view, self._view = self._view, None
        if view is not None:
            view.release()
            try:
                self._mapping.close()
            except BufferError:
                pass  # a running queue still holds its region; unmapped when that goes
