"""virtio-blk (VIRTIO 1.x section 5.2): the ring front door of the block engine.

Each chain is one request: a 16-byte header ``{le32 type, le32 ioprio, le64
sector}`` and any data the device reads in the readable buffers, then the
data the device writes and finally one status byte in the writable buffers.
Data moves between the backing store and guest memory directly (the views of
the chain's buffers go to ``preadv``/``pwritev``). Many requests are in flight
at once (as many as the queues hold); each completes through
``RunningQueue.complete`` on the loop, which batches the interrupts.

Every malformed request (short header, no status byte, a length that is not
a whole number of sectors, a range past the end, a write to a read-only disk,
a bad discard segment) ends with status IOERR, and an unknown type with
UNSUPP; the device goes on serving the next request. A chain without a status
byte cannot be answered and is returned with nothing written.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

import attrs

from pvcore.devices.block.backend import (
    SECTOR_SIZE,
    BlockBackend,
    BlockOp,
    BlockRequest,
    BlockResult,
    BlockStatus,
    CacheMode,
)
from pvcore.ring.memory import GuestMemory, GuestMemoryError, gather, scatter
from pvcore.ring.session import RunningQueue
from pvcore.ring.virtqueue import DescriptorChain
from pvcore.virtio import VIRTIO_ID_BLOCK, VirtioDevice, bit

log = logging.getLogger("pvcore.block")

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

MAX_QUEUES = 64
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEGMENTS = 32
DISCARD_SECTOR_ALIGNMENT = 8

REQUEST_HEADER = struct.Struct("<IIQ")
DISCARD_SEGMENT = struct.Struct("<QII")

CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
"""struct virtio_blk_config up to ``unused1`` (60 bytes), little-endian, no padding."""

CONFIG_LAYOUT: dict[str, tuple[int, int]] = {
    "capacity": (0, 8),
    "size_max": (8, 4),
    "seg_max": (12, 4),
    "geometry.cylinders": (16, 2),
    "geometry.heads": (18, 1),
    "geometry.sectors": (19, 1),
    "blk_size": (20, 4),
    "topology.physical_block_exp": (24, 1),
    "topology.alignment_offset": (25, 1),
    "topology.min_io_size": (26, 2),
    "topology.opt_io_size": (28, 4),
    "writeback": (32, 1),
    "unused0": (33, 1),
    "num_queues": (34, 2),
    "max_discard_sectors": (36, 4),
    "max_discard_seg": (40, 4),
    "discard_sector_alignment": (44, 4),
    "max_write_zeroes_sectors": (48, 4),
    "max_write_zeroes_seg": (52, 4),
    "write_zeroes_may_unmap": (56, 1),
    "unused1": (57, 3),
}
"""Offset and size of every field of the config space, as the VIRTIO spec lays it out."""

WRITEBACK_OFFSET = CONFIG_LAYOUT["writeback"][0]

Buffers = Sequence[tuple[int, int]]


class BadRequest(Exception):
    """A request the device answers with an error status instead of doing it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def split_buffers(buffers: Buffers, count: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split (address, length) buffers after their first ``count`` bytes."""
    front: list[tuple[int, int]] = []
    back: list[tuple[int, int]] = []
    for addr, length in buffers:
        if count >= length:
            front.append((addr, length))
            count -= length
        elif count > 0:
            front.append((addr, count))
            back.append((addr + count, length - count))
            count = 0
        else:
            back.append((addr, length))
    return [b for b in front if b[1]], [b for b in back if b[1]]


def status_of(result: BlockResult) -> int:
    """The virtio-blk status byte for a backend result."""
    if result.ok:
        return VIRTIO_BLK_S_OK
    if result.status is BlockStatus.UNSUPPORTED:
        return VIRTIO_BLK_S_UNSUPP
    return VIRTIO_BLK_S_IOERR


@attrs.define(eq=False)
class _InFlight:
    """One chain being served: where its status goes and what is still outstanding."""

    queue: RunningQueue
    chain: DescriptorChain
    generation: int
    status_addr: int
    pending: int = 0
    status: int = VIRTIO_BLK_S_OK


class VirtioBlock(VirtioDevice):
    """A virtio-blk device over a :class:`BlockBackend`.

    ``queues`` request queues (VIRTIO_BLK_F_MQ); ``serial`` is what GET_ID
    returns (up to 20 bytes). The backend's cache mode is the default; the
    driver may switch it through the ``writeback`` config byte when
    VIRTIO_BLK_F_CONFIG_WCE is negotiated, and a driver that cannot flush gets
    writethrough.
    """

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, backend: BlockBackend, *, name: str = "block", queues: int = 1, serial: bytes = b"") -> None:
        if not 1 <= queues <= MAX_QUEUES:
            raise ValueError(f"{name}: queues={queues} must be between 1 and {MAX_QUEUES}")
        if len(serial) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"{name}: serial is {len(serial)} bytes, at most {VIRTIO_BLK_ID_BYTES} fit")
        self.backend = backend
        self.name = name
        self.queues = queues
        self.serial = serial
        self.default_cache = backend.cache
        self.negotiated = 0
        self._generation = 0

    def __repr__(self) -> str:
        return f"VirtioBlock({self.name!r}, {self.backend!r}, queues={self.queues})"

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors (a partial last sector is not exposed)."""
        return self.backend.size // SECTOR_SIZE

    def num_queues(self) -> int:
        """The number of request queues."""
        return self.queues

    def features(self) -> int:
        """SEG_MAX, BLK_SIZE, FLUSH, CONFIG_WCE, MQ; DISCARD and WRITE_ZEROES when writable, else RO."""
        offered = (
            bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ)
        )
        if self.backend.readonly:
            return offered | bit(VIRTIO_BLK_F_RO)
        return offered | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)

    def config(self) -> bytes:
        """struct virtio_blk_config (see :data:`CONFIG_LAYOUT`)."""
        return CONFIG.pack(
            self.capacity,
            0,
            self.max_queue_size - 2,
            0,
            0,
            0,
            SECTOR_SIZE,
            0,
            0,
            1,
            0,
            1 if self.backend.cache is CacheMode.WRITEBACK else 0,
            0,
            self.queues,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            DISCARD_SECTOR_ALIGNMENT,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            1,
        )

    def write_config(self, offset: int, data: bytes) -> None:
        """Only ``writeback`` is writable: 1 selects writeback, 0 writethrough (with CONFIG_WCE)."""
        if not offset <= WRITEBACK_OFFSET < offset + len(data):
            log.debug("%s: config write at %d+%d ignored (read-only field)", self.name, offset, len(data))
            return
        if not self.negotiated & bit(VIRTIO_BLK_F_CONFIG_WCE):
            log.warning("%s: writeback config written without CONFIG_WCE; ignored", self.name)
            return
        value = data[WRITEBACK_OFFSET - offset]
        if value > 1:
            log.warning("%s: writeback config value %d is neither 0 nor 1; ignored", self.name, value)
            return
        self.backend.cache = CacheMode.WRITEBACK if value else CacheMode.WRITETHROUGH
        log.info("%s: driver switched the cache to %s", self.name, self.backend.cache.value)

    def activate(self, features: int) -> None:
        """Remember the features; without FLUSH every write must be durable, so writethrough."""
        self.negotiated = features
        self.backend.cache = self.default_cache if features & bit(VIRTIO_BLK_F_FLUSH) else CacheMode.WRITETHROUGH

    def reset(self) -> None:
        """Forget the session: late completions of old requests are dropped, the cache mode restored."""
        self._generation += 1
        self.negotiated = 0
        self.backend.cache = self.default_cache

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        """Serve one request chain: at once when the backend can, else when it completes."""
        writable = chain.writable
        if writable and writable[-1][1] == 1:  # the usual layout: the status byte alone in the last buffer
            status_addr, data = writable[-1][0], writable[:-1]
        else:
            status_addr = next((addr + length - 1 for addr, length in reversed(writable) if length), None)
            if status_addr is None:
                log.warning("%s: request at head %d has no status byte; returned unanswered", self.name, chain.head)
                queue.complete(chain, 0)
                return
            data = split_buffers(writable, chain.writable_len - 1)[0]
        try:
            self._start(queue, chain, status_addr, data)
        except BadRequest as exc:
            log.debug("%s: request at head %d refused: %s", self.name, chain.head, exc)
            self._answer(queue, chain, status_addr, exc.status)
        except GuestMemoryError as exc:
            log.warning("%s: request at head %d: %s", self.name, chain.head, exc)
            self._answer(queue, chain, status_addr, VIRTIO_BLK_S_IOERR)

    def _start(self, queue: RunningQueue, chain: DescriptorChain, status_addr: int, data: Buffers) -> None:
        """Parse the header and start the request; ``data`` is the writable part before the status byte."""
        readable = chain.readable
        memory = queue.memory
        if readable and readable[0][1] == REQUEST_HEADER.size:  # the usual layout: the header alone first
            header, payload = memory.read(*readable[0]), readable[1:]
        else:
            header_buffers, payload = split_buffers(readable, REQUEST_HEADER.size)
            header = b"".join(memory.read(addr, length) for addr, length in header_buffers)
        if len(header) < REQUEST_HEADER.size:
            raise BadRequest(VIRTIO_BLK_S_IOERR, f"header is {len(header)} bytes, need {REQUEST_HEADER.size}")
        kind, priority, sector = REQUEST_HEADER.unpack(header)
        if kind == VIRTIO_BLK_T_IN or kind == VIRTIO_BLK_T_OUT:
            if kind == VIRTIO_BLK_T_IN:
                op, buffers = BlockOp.READ, data
            else:
                self._refuse_if_readonly("write")
                op, buffers = BlockOp.WRITE, payload
            offset, length = self._data_range(sector, buffers)
            into_guest = op is BlockOp.READ
            views = [view for addr, size in buffers for view in memory.views(addr, size, write=into_guest)]
            backend_request = BlockRequest(op, offset, length, views, priority)
            if self.backend.serve_now(backend_request):
                self._answer(queue, chain, status_addr, VIRTIO_BLK_S_OK)
            else:
                self._submit(_InFlight(queue, chain, self._generation, status_addr), backend_request)
        elif kind == VIRTIO_BLK_T_FLUSH:
            request = _InFlight(queue, chain, self._generation, status_addr)
            self._submit(request, BlockRequest(BlockOp.FLUSH, priority=priority))
        elif kind == VIRTIO_BLK_T_GET_ID:
            scatter(memory, data, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
            self._answer(queue, chain, status_addr, VIRTIO_BLK_S_OK)
        elif kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self._refuse_if_readonly("discard" if kind == VIRTIO_BLK_T_DISCARD else "write-zeroes")
            request = _InFlight(queue, chain, self._generation, status_addr)
            for backend_request in self._segments(kind, payload, priority, memory):
                self._submit(request, backend_request)
        else:
            raise BadRequest(VIRTIO_BLK_S_UNSUPP, f"request type {kind} is not supported")

    def _refuse_if_readonly(self, what: str) -> None:
        if self.backend.readonly:
            raise BadRequest(VIRTIO_BLK_S_IOERR, f"{what} on a read-only disk")

    def _data_range(self, sector: int, buffers: Buffers) -> tuple[int, int]:
        length = sum(size for _, size in buffers)
        if length % SECTOR_SIZE:
            raise BadRequest(VIRTIO_BLK_S_IOERR, f"data length {length} is not a multiple of {SECTOR_SIZE}")
        self._check_range(sector, length // SECTOR_SIZE)
        return sector * SECTOR_SIZE, length

    def _check_range(self, sector: int, sectors: int) -> None:
        if sector + sectors > self.capacity:
            raise BadRequest(
                VIRTIO_BLK_S_IOERR, f"sectors {sector}+{sectors} end past the disk ({self.capacity} sectors)"
            )

    def _segments(self, kind: int, payload: Buffers, priority: int, memory: GuestMemory) -> list[BlockRequest]:
        """Parse and check every discard / write-zeroes segment before any is started.

        The segment list's length is the guest's to choose (a chain may describe
        gigabytes), so it is checked against :data:`MAX_DISCARD_SEGMENTS` before
        a byte of it is read.
        """
        size = sum(length for _, length in payload)
        if not size or size % DISCARD_SEGMENT.size:
            raise BadRequest(VIRTIO_BLK_S_IOERR, f"segment list of {size} bytes (need a multiple of 16)")
        count = size // DISCARD_SEGMENT.size
        if count > MAX_DISCARD_SEGMENTS:
            raise BadRequest(VIRTIO_BLK_S_IOERR, f"{count} segments, at most {MAX_DISCARD_SEGMENTS}")
        raw = gather(memory, payload)
        requests = []
        for sector, sectors, flags in DISCARD_SEGMENT.iter_unpack(raw):
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise BadRequest(VIRTIO_BLK_S_IOERR, f"unknown segment flags {flags:#x}")
            unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            if kind == VIRTIO_BLK_T_DISCARD and unmap:
                raise BadRequest(VIRTIO_BLK_S_UNSUPP, "discard with the unmap flag")
            if sectors > MAX_DISCARD_SECTORS:
                raise BadRequest(VIRTIO_BLK_S_IOERR, f"segment of {sectors} sectors, at most {MAX_DISCARD_SECTORS}")
            self._check_range(sector, sectors)
            op = BlockOp.DISCARD if kind == VIRTIO_BLK_T_DISCARD else BlockOp.WRITE_ZEROES
            requests.append(
                BlockRequest(op, sector * SECTOR_SIZE, sectors * SECTOR_SIZE, priority=priority, may_unmap=unmap)
            )
        return requests

    def _submit(self, request: _InFlight, backend_request: BlockRequest) -> None:
        request.pending += 1

        def done(result: BlockResult) -> None:
            if not result.ok:
                log.debug("%s: %s failed: %s", self.name, backend_request.op.value, result.message)
                request.status = max(request.status, status_of(result))
            request.pending -= 1
            if request.pending == 0 and request.generation == self._generation:
                self._answer(request.queue, request.chain, request.status_addr, request.status)

        self.backend.submit(backend_request, done)

    def _answer(self, queue: RunningQueue, chain: DescriptorChain, status_addr: int, status: int) -> None:
        """Write the status byte and return the chain (late answers after a reset are dropped by the caller)."""
        try:
            queue.memory.write_u8(status_addr, status)
        except GuestMemoryError as exc:
            queue.session.fail(f"{self.name}: status byte of head {chain.head}: {exc}")
            return
        queue.complete(chain, chain.writable_len)
