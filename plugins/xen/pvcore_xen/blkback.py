"""The Xen PV block front door (``io/blkif.h``): a blkfront served by the core's block engine.

Handshake: at InitWait the backend publishes what blkfront reads —
``sectors``, ``info`` (``VDISK_READONLY``), ``sector-size``,
``physical-sector-size``, ``feature-flush-cache``, ``feature-barrier``,
``feature-discard`` (with ``discard-granularity``, ``discard-alignment``,
``discard-secure`` 0) and ``feature-max-indirect-segments``. It offers one
queue and a one-page ring (no ``max-ring-page-order``,
``multi-queue-max-queues`` or ``feature-persistent``), so the frontend
answers with ``ring-ref``, ``event-channel`` and ``protocol``
(``x86_64-abi``, the only layout spoken); a frontend that asks for more
pages, more queues or another ABI fails the device.

Requests (:mod:`pvcore_xen.blkif`) are copied out of the ring
(:mod:`pvcore_xen.ring`) and checked before any I/O; data moves by grant
copy (``IOCTL_GNTDEV_GRANT_COPY``) between the guest's pages and a private
buffer that the block engine reads into or writes from: only the ring page is
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
VDISK_READONLY = 4
NATIVE_PROTOCOL = "x86_64-abi"
MAX_GRANT_REF = 0xFFFFFFFF
DRAIN_TIMEOUT = 30.0
_ID = struct.Struct("<Q")


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
        self.channel: EventChannel | None = None
        self.ring: BackRing | None = None
        self.rejected = 0
        """Requests answered with an error before any I/O (malformed or uncopyable)."""
        self._in_flight: set[int] = set()
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
        }
        for node, value in nodes.items():
            await client.write(f"{self.backend_path}/{node}", value)

    async def connect(self, client: XenstoreClient, *, resume: bool = False) -> None:
        """Check the frontend's choices, map the ring, bind the channel, serve what is waiting.

        The ring carries on from the ``rsp_prod`` in the page: 0 on a fresh
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
        if await read_number(client, f"{front}/ring-page-order", limit=16) not in (None, 0):
            raise XenDeviceError(f"{front}/ring-page-order: this backend offers a one-page ring")
        if await read_number(client, f"{front}/multi-queue-num-queues", limit=0xFFFF) not in (None, 1):
            raise XenDeviceError(f"{front}/multi-queue-num-queues: this backend offers one queue")
        ref = await require_number(client, f"{front}/ring-ref", limit=MAX_GRANT_REF)
        port = await require_number(client, f"{front}/event-channel", limit=MAX_GRANT_REF)
        self.memory = self.map_memory()
        try:
            base = grant_address(ref)
            self.ring = BackRing(self.memory, base, blkif.SLOT_SIZE, "blkif", start=self.memory.read_u32(base + RSP_PROD))
            self.channel = self.open_channel(port, "vbd")
        except (GuestMemoryError, XenDeviceError) as exc:
            await self.disconnect()
            raise XenDeviceError(str(exc)) from None
        self._broken = False
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._on_event)
        self._service()
        if resume and self.channel is not None:
            self.channel.signal()
        log.info("%s: dom%d vbd %d %s, %d bytes", self.name, self.domid, self.devid,
                 "picked up" if resume else "connected", self.engine.size)

    async def disconnect(self) -> None:
        """Let in-flight requests finish, then unbind the channel and unmap the ring."""
        if self.channel is not None:
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        try:
            await asyncio.wait_for(self._idle.wait(), DRAIN_TIMEOUT)
        except TimeoutError:
            log.error("%s: %d requests still in flight after %.0f s; their answers are dropped",
                      self.name, len(self._in_flight), DRAIN_TIMEOUT)
        self.ring = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self._in_flight.clear()
        self._idle.set()

    def _on_event(self) -> None:
        if self.channel is not None:
            self.channel.consume()
            self._service()

    def _service(self) -> None:
        """Take every published request; fail the device if the ring's indexes are impossible."""
        ring = self.ring
        if ring is None or self._broken:
            return
        try:
            for _ in range(4):  # then give the loop back; the rest is taken on the next pass
                waiting = ring.final_check()
                if not waiting:
                    return
                for _ in range(waiting):
                    self._start(ring.take())
            asyncio.get_running_loop().call_soon(self._service)
        except (GuestMemoryError, RingError) as exc:
            self._broken = True
            self.fail(str(exc))

    def _start(self, raw: bytes) -> None:
        """Check one request and hand it to the engine, or answer it at once."""
        operation, request_id = blkif.response_operation(raw[0], raw[1]), _ID.unpack_from(raw, 8)[0]
        if request_id in self._in_flight:
            self._reject(request_id, operation, f"id {request_id:#x} is still in flight")
            return
        try:
            request = blkif.parse_request(raw)
            work = self._plan(request)
        except RequestError as exc:
            self._reject(request_id, operation, str(exc), exc.status)
            return
        self._in_flight.add(request_id)
        self._idle.clear()
        work()

    def _plan(self, request: Request) -> Callable[[], None]:
        """What doing ``request`` means, or :class:`RequestError` if it cannot be done."""
        op = request.operation
        if op in (blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE):
            return self._transfer_plan(request, op, request.segments, flush=False)
        if op in (blkif.BLKIF_OP_FLUSH_DISKCACHE, blkif.BLKIF_OP_WRITE_BARRIER):
            if not request.segments:
                return lambda: self._submit(request, BlockRequest(BlockOp.FLUSH), None)
            return self._transfer_plan(request, blkif.BLKIF_OP_WRITE, request.segments, flush=True,
                                       fua=op == blkif.BLKIF_OP_WRITE_BARRIER)
        if op == blkif.BLKIF_OP_DISCARD:
            if request.discard_flag & blkif.BLKIF_DISCARD_SECURE:
                raise RequestError("secure discard is not offered", blkif.BLKIF_RSP_EOPNOTSUPP)
            discard = BlockRequest(BlockOp.DISCARD, request.sector * blkif.SECTOR_SIZE,
                                   request.nr_sectors * blkif.SECTOR_SIZE)
            return lambda: self._submit(request, discard, None)
        if op == blkif.BLKIF_OP_INDIRECT:
            if request.indirect_op not in (blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE):
                raise RequestError(f"indirect operation {request.indirect_op} is not a read or write")
            return self._transfer_plan(request, request.indirect_op, self._indirect_segments(request), flush=False)
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

    def _transfer_plan(self, request: Request, op: int, segments: tuple[Segment, ...], *, flush: bool,
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
            return lambda: self._submit(request, transfer, then)

        def after_flush(result: BlockResult) -> int | None:
            if not result.ok:
                return _status(result)
            self._submit(request, transfer, then)
            return None

        return lambda: self._submit(request, BlockRequest(BlockOp.FLUSH), after_flush)

    def _copy(self, pieces: list[GrantCopy], buffer: bytearray, *, to_guest: bool) -> bool:
        """Grant-copy ``pieces``; False if any piece (or the whole call) failed."""
        try:
            statuses = self.host.grant_copy(pieces, buffer, to_guest=to_guest)
        except (OSError, ValueError) as exc:
            log.warning("%s: grant copy of %d pieces failed: %s", self.name, len(pieces), exc)
            return False
        return all(status == GNTST_OKAY for status in statuses)

    def _submit(self, request: Request, block: BlockRequest, then: Callable[[BlockResult], int | None] | None) -> None:
        """Run ``block`` on the engine; answer ``request`` with what ``then`` makes of the result (None: not yet)."""
        ring = self.ring

        def done(result: BlockResult) -> None:
            if ring is None or ring is not self.ring:  # answered after its connection went: its grants are not ours now
                log.warning("%s: id %#x finished after its ring was disconnected; not answered", self.name, request.id)
                return
            status = then(result) if then is not None else _status(result)
            if block.op is BlockOp.FLUSH:
                log.debug("%s: flush for id %#x: %s", self.name, request.id, result.status.value)
            if status is not None:
                self._answer(ring, request.id, blkif.response_operation(request.operation, request.indirect_op), status)

        if block.op in (BlockOp.READ, BlockOp.WRITE) and self.engine.serve_now(block):
            done(BlockResult(BlockStatus.OK, block.length))
        else:
            self.engine.submit(block, done)

    def _reject(self, request_id: int, operation: int, reason: str, status: int = blkif.BLKIF_RSP_ERROR) -> None:
        self.rejected += 1
        log.warning("%s: dom%d request id %#x (operation %d) refused: %s", self.name, self.domid, request_id, operation, reason)
        self._respond(self.ring, request_id, operation, status)

    def _answer(self, ring: BackRing | None, request_id: int, operation: int, status: int) -> None:
        self._in_flight.discard(request_id)
        if not self._in_flight:
            self._idle.set()
        self._respond(ring, request_id, operation, status)

    def _respond(self, ring: BackRing | None, request_id: int, operation: int, status: int) -> None:
        """Publish one response on ``ring`` (if it is still the connected one) and notify as the ring asks."""
        if ring is None or ring is not self.ring or self._broken or self.channel is None:
            return
        try:
            ring.respond(blkif.pack_response(request_id, operation, status))
            if ring.push():
                self.channel.signal()
        except (GuestMemoryError, RingError) as exc:
            self._broken = True
            self.fail(str(exc))


def _status(result: BlockResult) -> int:
    if result.ok:
        return blkif.BLKIF_RSP_OKAY
    return blkif.BLKIF_RSP_EOPNOTSUPP if result.status is BlockStatus.UNSUPPORTED else blkif.BLKIF_RSP_ERROR
