"""The Xen PV block front door (``io/blkif.h``): a blkfront served by the core's block engine.

Handshake: at InitWait the backend publishes what blkfront reads —
``sectors``, ``info`` (``VDISK_READONLY``), ``sector-size``,
``physical-sector-size``, ``feature-flush-cache``, ``feature-barrier``,
``feature-discard`` (with ``discard-granularity``, ``discard-alignment``,
``discard-secure`` 0), ``feature-max-indirect-segments``,
``max-ring-page-order`` (:data:`MAX_RING_PAGE_ORDER`) and
``multi-queue-max-queues`` (:data:`MAX_QUEUES`); not ``feature-persistent``.
The frontend answers with ``protocol`` (``x86_64-abi``, the only layout
spoken), optionally ``ring-page-order`` and ``multi-queue-num-queues``, and
per ring — in its own directory for one queue, in ``queue-N/`` for several —
``event-channel`` and either ``ring-ref`` (no order given: one page) or
``ring-ref0`` .. ``ring-ref{2**order - 1}``, read as Linux's blkback reads
them. Each ring's pages are mapped back to back in one gntdev mapping
(:meth:`~pvcore_xen.grants.GrantMemory.map_ring`); every queue is served by
the same block engine, with its own request ids. An order or a queue count
above what was offered, 0 queues, a missing or non-numeric ref or port, a
page named twice, a ref that cannot be mapped writable or a port that cannot
be bound fails the device; so does another ABI.

Requests (:mod:`pvcore_xen.blkif`) are copied out of the ring
(:mod:`pvcore_xen.ring`) and checked before any I/O; data moves by grant
copy (``IOCTL_GNTDEV_GRANT_COPY``) between the guest's pages and a private
buffer that the block engine reads into or writes from: only the ring pages are
mapped. READ and WRITE take 1..11 segments (sectors within one page each);
INDIRECT READ/WRITE take up to :data:`MAX_INDIRECT_SEGMENTS` segments from
indirect pages; FLUSH_DISKCACHE is the engine's flush barrier (``fdatasync``
after every earlier request), followed by the write of its segments if it has
any; WRITE_BARRIER is a flush, then the write with FUA; DISCARD is the
engine's discard (secure discard is not offered). A malformed request (a bad
segment count or sector, a grant that cannot be copied, a range past the
disk's end, an id still in flight, an unknown operation) is answered with
``BLKIF_RSP_ERROR`` or ``BLKIF_RSP_EOPNOTSUPP`` and counted; ring indexes that
overrun the ring fail the device.

With ``attach`` the backend writes the device's xenstore nodes itself
(:mod:`pvcore_xen.toolstack`) under ``backend/pvcore-vbd``, which blkback
does not watch; otherwise it serves ``backend/vbd/<domid>/<devid>`` as the
toolstack wrote it (only where blkback is not loaded).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

import attrs

from pvcore.devices.block.backend import BlockBackend, BlockOp, BlockRequest, BlockResult, BlockStatus
from pvcore.ring.memory import GuestMemoryError
from pvcore_xen import blkif
from pvcore_xen.blkif import Request, RequestError, Segment
from pvcore_xen.grants import GrantMemory, grant_address
from pvcore_xen.host import GNTST_OKAY, PAGE_SIZE, EventChannel, GrantCopy
from pvcore_xen.ring import RSP_PROD, BackRing, RingError
from pvcore_xen.xenbus import XenbusBackend, XenDeviceError, read_number, require_number
from pvcore_xen.xenstore import XenstoreClient

log = logging.getLogger("pvcore.xen")

PVCORE_KIND = "pvcore-vbd"
"""The backend type of the disks pvcore attaches itself (blkback watches ``vbd`` only)."""
MAX_INDIRECT_SEGMENTS = 256
"""``feature-max-indirect-segments``: 1 MiB per request, one indirect page."""
MAX_RING_PAGE_ORDER = 2
"""``max-ring-page-order``: rings of up to 4 pages, 128 requests each (a one-page ring holds 32).

Linux's blkback offers order 4 (512 requests), but it maps the guest's data
pages; pvcore copies each request into a private buffer of up to 1 MiB that
lives until the answer, so the ring size is also how much dom0 memory one
queue of a guest can hold: 128 MiB at order 2.
"""
MAX_QUEUES = 2
"""``multi-queue-max-queues``: one event loop serves every queue, so more rings
only spare the guest's vCPUs each other's ring lock; two keep a guest's
worst case (:data:`MAX_QUEUES` x 128 requests x 1 MiB) at 256 MiB per disk."""
VDISK_READONLY = 4
NATIVE_PROTOCOL = "x86_64-abi"
MAX_GRANT_REF = 0xFFFFFFFF
DRAIN_TIMEOUT = 30.0
_ID = struct.Struct("<Q")


@attrs.define(eq=False)
class _Queue:
    """One ring and its event channel: the whole disk, or ``queue-N`` of a multi-queue frontend."""

    ring: BackRing
    channel: EventChannel
    in_flight: set[int] = attrs.Factory(set)
    """Ids taken from this ring and not yet answered (blkfront numbers each ring's requests on its own)."""


class XenBlockBackend(XenbusBackend):
    """Serves one blkfront (``device/vbd/<devid>``) from a :class:`BlockBackend`."""

    kind = "vbd"
    """The toolstack's disks (what ``pvcore probe`` lists); ``attach`` makes it :data:`PVCORE_KIND`."""
    attach_kind = PVCORE_KIND
    protocol = "blkif"

    def __init__(self, engine: BlockBackend, **where: Any) -> None:
        super().__init__(**where)
        self.engine = engine
        self.memory: GrantMemory | None = None
        self.queues: list[_Queue] = []
        """The connected rings, one per queue the frontend asked for (none while disconnected)."""
        self.rejected = 0
        """Requests answered with an error before any I/O (malformed or uncopyable)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._broken = False

    def toolstack_nodes(self) -> tuple[dict[str, str], dict[str, str]]:
        """What ``xl block-attach`` writes besides the common nodes: the access mode and the virtual device."""
        return (
            {"mode": "r" if self.engine.readonly else "w", "device-type": "disk"},
            {"virtual-device": str(self.devid), "device-type": "disk"},
        )

    async def announce(self, client: XenstoreClient) -> None:
        """Publish the disk's size and the features this backend serves."""
        writable = not self.engine.readonly
        nodes = {
            "sectors": str(self.engine.size // blkif.SECTOR_SIZE),
            "info": str(0 if writable else VDISK_READONLY),
            "sector-size": str(blkif.SECTOR_SIZE),
            "physical-sector-size": str(blkif.SECTOR_SIZE),
            "feature-flush-cache": "1",
            "feature-barrier": "1",
            "feature-discard": "1" if writable else "0",
            "discard-granularity": str(PAGE_SIZE),
            "discard-alignment": "0",
            "discard-secure": "0",
            "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
            "max-ring-page-order": str(MAX_RING_PAGE_ORDER),
            "multi-queue-max-queues": str(MAX_QUEUES),
        }
        for node, value in nodes.items():
            await client.write(f"{self.backend_path}/{node}", value)

    async def connect(self, client: XenstoreClient, *, resume: bool = False) -> None:
        """Check the frontend's choices, map each queue's ring, bind its channel, serve what is waiting.

        Each ring carries on from the ``rsp_prod`` in its page: 0 on a fresh
        ring; on a pick-up, requests the previous backend took but never
        answered are taken again.
        """
        front = self.frontend_path
        try:
            protocol = (await client.read(f"{front}/protocol")).decode("ascii", "replace")
        except OSError:
            protocol = NATIVE_PROTOCOL
        if protocol != NATIVE_PROTOCOL:
            raise XenDeviceError(f"{front}/protocol is {protocol[:32]!r}: only {NATIVE_PROTOCOL} is served")
        order = await read_number(client, f"{front}/ring-page-order", limit=MAX_RING_PAGE_ORDER)
        queues = await read_number(client, f"{front}/multi-queue-num-queues", limit=MAX_QUEUES)
        if queues == 0:
            raise XenDeviceError(f"{front}/multi-queue-num-queues is 0")
        names = ["ring-ref"] if order is None else [f"ring-ref{page}" for page in range(1 << order)]
        places = [front] if queues in (None, 1) else [f"{front}/queue-{index}" for index in range(queues)]
        plan = []
        for place in places:
            refs = [await require_number(client, f"{place}/{name}", limit=MAX_GRANT_REF) for name in names]
            plan.append((refs, await require_number(client, f"{place}/event-channel", limit=MAX_GRANT_REF)))
        every_ref = [ref for refs, _ in plan for ref in refs]
        if len(set(every_ref)) != len(every_ref):
            raise XenDeviceError(f"{front}: the ring refs {every_ref} name a page twice")
        self.memory = self.map_memory()
        try:
            for index, (refs, port) in enumerate(plan):
                base = self.memory.map_ring(refs)
                name = "blkif" if len(plan) == 1 else f"blkif queue-{index}"
                ring = BackRing(self.memory, base, blkif.SLOT_SIZE, name, start=self.memory.read_u32(base + RSP_PROD),
                                pages=len(refs))
                self.queues.append(_Queue(ring, self.open_channel(port, f"vbd {name}")))
        except (GuestMemoryError, XenDeviceError) as exc:
            await self.disconnect()
            raise XenDeviceError(str(exc)) from None
        self._broken = False
        for queue in self.queues:
            asyncio.get_running_loop().add_reader(queue.channel.fileno(), self._on_event, queue)
            self._service(queue)
            if resume:
                queue.channel.signal()
        log.info("%s: dom%d vbd %d %s, %d bytes, %d queue(s) of %d-page rings", self.name, self.domid, self.devid,
                 "picked up" if resume else "connected", self.engine.size, len(plan), len(names))

    async def disconnect(self) -> None:
        """Let in-flight requests finish, then unbind the channels and unmap the rings."""
        for queue in self.queues:
            asyncio.get_running_loop().remove_reader(queue.channel.fileno())
        try:
            await asyncio.wait_for(self._idle.wait(), DRAIN_TIMEOUT)
        except TimeoutError:
            log.error("%s: %d requests still in flight after %.0f s; their answers are dropped",
                      self.name, sum(len(queue.in_flight) for queue in self.queues), DRAIN_TIMEOUT)
        queues, self.queues = self.queues, []
        for queue in queues:
            queue.channel.close()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self._idle.set()

    def _on_event(self, queue: _Queue) -> None:
        queue.channel.consume()
        self._service(queue)

    def _service(self, queue: _Queue) -> None:
        """Take every published request of ``queue``; fail the device if the ring's indexes are impossible."""
        if self._broken or queue not in self.queues:
            return
        try:
            for _ in range(4):  # then give the loop back; the rest is taken on the next pass
                waiting = queue.ring.final_check()
                if not waiting:
                    return
                for _ in range(waiting):
                    self._start(queue, queue.ring.take())
            asyncio.get_running_loop().call_soon(self._service, queue)
        except (GuestMemoryError, RingError) as exc:
            self._broken = True
            self.fail(str(exc))

    def _start(self, queue: _Queue, raw: bytes) -> None:
        """Check one request and hand it to the engine, or answer it at once."""
        operation, request_id = blkif.response_operation(raw[0], raw[1]), _ID.unpack_from(raw, 8)[0]
        if request_id in queue.in_flight:
            self._reject(queue, request_id, operation, f"id {request_id:#x} is still in flight")
            return
        try:
            request = blkif.parse_request(raw)
            work = self._plan(queue, request)
        except RequestError as exc:
            self._reject(queue, request_id, operation, str(exc), exc.status)
            return
        queue.in_flight.add(request_id)
        self._idle.clear()
        work()

    def _plan(self, queue: _Queue, request: Request) -> Callable[[], None]:
        """What doing ``request`` means, or :class:`RequestError` if it cannot be done."""
        op = request.operation
        if op in (blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE):
            return self._transfer_plan(queue, request, op, request.segments, flush=False)
        if op in (blkif.BLKIF_OP_FLUSH_DISKCACHE, blkif.BLKIF_OP_WRITE_BARRIER):
            if not request.segments:
                return lambda: self._submit(queue, request, BlockRequest(BlockOp.FLUSH), None)
            return self._transfer_plan(queue, request, blkif.BLKIF_OP_WRITE, request.segments, flush=True,
                                       fua=op == blkif.BLKIF_OP_WRITE_BARRIER)
        if op == blkif.BLKIF_OP_DISCARD:
            if request.discard_flag & blkif.BLKIF_DISCARD_SECURE:
                raise RequestError("secure discard is not offered", blkif.BLKIF_RSP_EOPNOTSUPP)
            discard = BlockRequest(BlockOp.DISCARD, request.sector * blkif.SECTOR_SIZE,
                                   request.nr_sectors * blkif.SECTOR_SIZE)
            return lambda: self._submit(queue, request, discard, None)
        if op == blkif.BLKIF_OP_INDIRECT:
            if request.indirect_op not in (blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE):
                raise RequestError(f"indirect operation {request.indirect_op} is not a read or write")
            return self._transfer_plan(queue, request, request.indirect_op, self._indirect_segments(request),
                                       flush=False)
        raise RequestError(f"operation {op} is not served", blkif.BLKIF_RSP_EOPNOTSUPP)

    def _indirect_segments(self, request: Request) -> tuple[Segment, ...]:
        count = request.indirect_segments
        if not 1 <= count <= MAX_INDIRECT_SEGMENTS:
            raise RequestError(f"{count} indirect segments, 1..{MAX_INDIRECT_SEGMENTS} are served")
        pages = -(-count // blkif.SEGMENTS_PER_INDIRECT_PAGE)
        sizes = [min(count - page * blkif.SEGMENTS_PER_INDIRECT_PAGE, blkif.SEGMENTS_PER_INDIRECT_PAGE) * 8
                 for page in range(pages)]
        pieces = [GrantCopy(self.domid, ref, 0, size) for ref, size in zip(request.indirect_refs, sizes)]
        table = bytearray(sum(sizes))
        if not self._copy(pieces, table, to_guest=False):
            raise RequestError("an indirect page cannot be copied")
        return blkif.parse_segments(table, count)

    def _transfer_plan(self, queue: _Queue, request: Request, op: int, segments: tuple[Segment, ...], *, flush: bool,
                       fua: bool = False) -> Callable[[], None]:
        if not segments:
            raise RequestError("a read or write without segments")
        pieces = [GrantCopy(self.domid, segment.ref, segment.offset, segment.length) for segment in segments]
        buffer = bytearray(sum(piece.length for piece in pieces))
        offset = request.sector * blkif.SECTOR_SIZE
        if op == blkif.BLKIF_OP_WRITE:
            if self.engine.readonly:
                raise RequestError("write to a read-only disk")
            if not self._copy(pieces, buffer, to_guest=False):
                raise RequestError("a segment's grant cannot be copied from")
            transfer = BlockRequest(BlockOp.WRITE, offset, len(buffer), [memoryview(buffer)], fua=fua)
        else:
            transfer = BlockRequest(BlockOp.READ, offset, len(buffer), [memoryview(buffer)])

        def then(result: BlockResult) -> int:
            if result.ok and op == blkif.BLKIF_OP_READ:
                if not self._copy(pieces, buffer, to_guest=True):
                    log.warning("%s: read id %#x: a segment's grant cannot be copied to", self.name, request.id)
                    return blkif.BLKIF_RSP_ERROR
            return _status(result)

        if not flush:
            return lambda: self._submit(queue, request, transfer, then)

        def after_flush(result: BlockResult) -> int | None:
            if not result.ok:
                return _status(result)
            self._submit(queue, request, transfer, then)
            return None

        return lambda: self._submit(queue, request, BlockRequest(BlockOp.FLUSH), after_flush)

    def _copy(self, pieces: list[GrantCopy], buffer: bytearray, *, to_guest: bool) -> bool:
        """Grant-copy ``pieces``; False if any piece (or the whole call) failed."""
        try:
            statuses = self.host.grant_copy(pieces, buffer, to_guest=to_guest)
        except (OSError, ValueError) as exc:
            log.warning("%s: grant copy of %d pieces failed: %s", self.name, len(pieces), exc)
            return False
        return all(status == GNTST_OKAY for status in statuses)

    def _submit(self, queue: _Queue, request: Request, block: BlockRequest,
                then: Callable[[BlockResult], int | None] | None) -> None:
        """Run ``block`` on the engine; answer ``request`` with what ``then`` makes of the result (None: not yet)."""

        def done(result: BlockResult) -> None:
            if queue not in self.queues:  # answered after its connection went: its grants are not ours now
                log.warning("%s: id %#x finished after its ring was disconnected; not answered", self.name, request.id)
                return
            status = then(result) if then is not None else _status(result)
            if block.op is BlockOp.FLUSH:
                log.debug("%s: flush for id %#x: %s", self.name, request.id, result.status.value)
            if status is not None:
                self._answer(queue, request.id, blkif.response_operation(request.operation, request.indirect_op), status)

        if block.op in (BlockOp.READ, BlockOp.WRITE) and self.engine.serve_now(block):
            done(BlockResult(BlockStatus.OK, block.length))
        else:
            self.engine.submit(block, done)

    def _reject(self, queue: _Queue, request_id: int, operation: int, reason: str,
                status: int = blkif.BLKIF_RSP_ERROR) -> None:
        self.rejected += 1
        log.warning("%s: dom%d request id %#x (operation %d) refused: %s", self.name, self.domid, request_id, operation, reason)
        self._respond(queue, request_id, operation, status)

    def _answer(self, queue: _Queue, request_id: int, operation: int, status: int) -> None:
        queue.in_flight.discard(request_id)
        if not any(live.in_flight for live in self.queues):
            self._idle.set()
        self._respond(queue, request_id, operation, status)

    def _respond(self, queue: _Queue, request_id: int, operation: int, status: int) -> None:
        """Publish one response on ``queue`` (if it is still connected) and notify as the ring asks."""
        if queue not in self.queues or self._broken:
            return
        try:
            queue.ring.respond(blkif.pack_response(request_id, operation, status))
            if queue.ring.push():
                queue.channel.signal()
        except (GuestMemoryError, RingError) as exc:
            self._broken = True
            self.fail(str(exc))


def _status(result: BlockResult) -> int:
    if result.ok:
        return blkif.BLKIF_RSP_OKAY
    return blkif.BLKIF_RSP_EOPNOTSUPP if result.status is BlockStatus.UNSUPPORTED else blkif.BLKIF_RSP_ERROR
