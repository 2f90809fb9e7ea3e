"""A SIMULATED xen-blkfront: a guest's side of ``io/blkif.h``, for tests.

Like Linux's blkfront it grants its ring pages (``io/ring.h`` layout: one
page, or ``2**order`` with ``order``), allocates an event channel per queue,
waits for the backend's InitWait, publishes ``ring-ref`` (or
``ring-page-order`` and ``ring-ref0..N``), ``event-channel`` — under
``queue-N/`` and with ``multi-queue-num-queues`` for several queues — and
``protocol``, and goes Initialised, then Connected once the backend is. Reads and writes go through granted data pages
(:meth:`SimulatedBlkFrontend.read`, :meth:`write`, :meth:`flush`); raw
requests (:meth:`post`) let hostile tests write what blkfront never would. It
talks to no hypervisor.
"""

from __future__ import annotations

import struct
import time

from pvcore_xen import blkif
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.testing.frontend import RECHECK_INTERVAL, SimulatedFrontend, wait_readable
from pvcore_xen.testing.host import DMA_FIRST_REF
from pvcore_xen.testing.netfront import FrontRing
from pvcore_xen.xenbus import XenbusState

_RESPONSE = struct.Struct("<QBxh4x")
_HEADER = struct.Struct("<BBH4xQQ")
_SEGMENT = struct.Struct("<IBB2x")
_DISCARD = struct.Struct("<BBH4xQQQ")
_INDIRECT = struct.Struct("<BBH4xQQH2x8I")


def direct_request(operation: int, request_id: int, sector: int, segments: list[tuple[int, int, int]], *,
                   count: int | None = None) -> bytes:
    """A read/write/flush/barrier slot; ``count`` overrides ``nr_segments`` (hostile tests)."""
    body = b"".join(_SEGMENT.pack(*segment) for segment in segments)
    slot = _HEADER.pack(operation, len(segments) if count is None else count, 0, request_id, sector) + body
    return slot.ljust(blkif.SLOT_SIZE, b"\0")


def discard_request(request_id: int, sector: int, nr_sectors: int, flag: int = 0) -> bytes:
    """A discard slot."""
    return _DISCARD.pack(blkif.BLKIF_OP_DISCARD, flag, 0, request_id, sector, nr_sectors).ljust(blkif.SLOT_SIZE, b"\0")


def indirect_request(indirect_op: int, request_id: int, sector: int, count: int, refs: list[int]) -> bytes:
    """An indirect read/write slot naming ``count`` segments in the pages ``refs``."""
    padded = (refs + [0] * blkif.MAX_INDIRECT_PAGES)[: blkif.MAX_INDIRECT_PAGES]
    return _INDIRECT.pack(blkif.BLKIF_OP_INDIRECT, indirect_op, count, request_id, sector, 0, *padded).ljust(
        blkif.SLOT_SIZE, b"\0"
    )


class SimulatedBlkFrontend(SimulatedFrontend):
    """A SIMULATED xen-blkfront: ``queues`` rings of one page, or of ``2**order`` pages.

    ``ring``, ``channel`` and ``port`` are queue 0's; ``rings``, ``channels``
    and ``ports`` hold every queue's.
    """

    kind = "vbd"

    def __init__(self, *args: object, backend_kind: str = "vbd", order: int | None = None, queues: int = 1,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if backend_kind != self.kind:
            self.backend_path = self.backend_path.replace("/backend/vbd/", f"/backend/{backend_kind}/")
        self.order = order
        self.queues = queues
        pages = 1 << (order or 0)
        self.ring_pages = [self.domain.ram.alloc(pages * PAGE_SIZE, PAGE_SIZE) for _ in range(queues)]
        self.rings = [FrontRing(self.domain.memory, self.offset(page), blkif.SLOT_SIZE, pages) for page in self.ring_pages]
        self.ports = [self.domain.alloc_unbound(self.backend_domid) for _ in range(queues)]
        self.channels = [self.domain.event_channel(port) for port in self.ports]
        self.page, self.ring, self.port, self.channel = self.ring_pages[0], self.rings[0], self.ports[0], self.channels[0]
        self.responses: list[dict[int, tuple[int, int]]] = [{} for _ in range(queues)]
        """Per queue: request id -> (operation, status) of every response not yet collected."""

    def ring_nodes(self) -> dict[str, str]:
        """The nodes Linux's blkfront writes for its rings (``talk_to_blkback``)."""
        pages = 1 << (self.order or 0)
        nodes = {} if self.order is None else {"ring-page-order": str(self.order)}
        if self.queues > 1:
            nodes["multi-queue-num-queues"] = str(self.queues)
        for queue, page in enumerate(self.ring_pages):
            where = f"queue-{queue}/" if self.queues > 1 else ""
            if self.order is None:
                nodes[f"{where}ring-ref"] = str(self.ref(page))
            for index in range(pages if self.order is not None else 0):
                nodes[f"{where}ring-ref{index}"] = str(self.ref(page + index * PAGE_SIZE))
            nodes[f"{where}event-channel"] = str(self.ports[queue])
        return nodes

    def ref(self, addr: int) -> int:
        """The grant ref of the page at DMA address ``addr``."""
        return DMA_FIRST_REF + self.domain.ram.frame(addr)

    def offset(self, addr: int) -> int:
        """Where DMA address ``addr`` is in the domain's memory."""
        return addr - self.domain.ram.guest_addr

    async def connect(self, overrides: dict[str, str] | None = None) -> None:
        """Publish the ring at InitWait, go Initialised, wait for Connected, go Connected."""
        await self.wait_backend(XenbusState.INIT_WAIT)
        nodes = {**self.ring_nodes(), "protocol": "x86_64-abi", **(overrides or {})}
        for node, value in nodes.items():
            await self.client.write(f"{self.path}/{node}", value)
        await self.set_state(XenbusState.INITIALISED)
        await self.wait_backend(XenbusState.CONNECTED, XenbusState.CLOSING)
        await self.set_state(XenbusState.CONNECTED)

    async def node(self, name: str) -> str:
        """A backend node's value."""
        return (await self.client.read(f"{self.backend_path}/{name}")).decode()

    def post(self, *slots: bytes, queue: int = 0) -> None:
        """Write raw request slots on ``queue``'s ring and publish them."""
        for slot in slots:
            self.rings[queue].write(slot)
        if self.rings[queue].push():
            self.channels[queue].signal()

    async def wait(self, request_id: int, timeout: float = 5.0, queue: int = 0) -> int:
        """The status of the response to ``request_id`` on ``queue``."""
        return (await self.wait_response(request_id, timeout, queue))[1]

    async def wait_response(self, request_id: int, timeout: float = 5.0, queue: int = 0) -> tuple[int, int]:
        """The (operation, status) of the response to ``request_id`` on ``queue``."""
        deadline = time.monotonic() + timeout
        responses, channel = self.responses[queue], self.channels[queue]
        while request_id not in responses:
            channel.consume()
            for entry in self.rings[queue].responses(_RESPONSE.size):
                response_id, operation, status = _RESPONSE.unpack(entry)
                responses[response_id] = (operation, status)
            if request_id in responses:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"dom{self.domain.domid} vbd {self.devid}: no response to id {request_id:#x} on queue {queue}")
            await wait_readable(channel.fileno(), RECHECK_INTERVAL)
        return responses.pop(request_id)

    def buffer(self, pages: int = 1) -> int:
        """Allocate and grant ``pages`` data pages; the DMA address of the first."""
        return self.domain.ram.alloc(pages * PAGE_SIZE, PAGE_SIZE)

    def segments(self, addr: int, length: int) -> list[tuple[int, int, int]]:
        """Whole-page segments covering ``length`` bytes (a multiple of 512) from page-aligned ``addr``."""
        result = []
        for start in range(0, length, PAGE_SIZE):
            sectors = min(PAGE_SIZE, length - start) // blkif.SECTOR_SIZE
            result.append((self.ref(addr + start), 0, sectors - 1))
        return result

    async def write(self, request_id: int, sector: int, data: bytes, operation: int = blkif.BLKIF_OP_WRITE, *,
                    queue: int = 0) -> int:
        """Write ``data`` (at most 11 pages) at ``sector`` through ``queue``; the response's status."""
        addr = self.buffer(-(-len(data) // PAGE_SIZE))
        at = self.offset(addr)
        self.domain.memory[at : at + len(data)] = data
        self.post(direct_request(operation, request_id, sector, self.segments(addr, len(data))), queue=queue)
        return await self.wait(request_id, queue=queue)

    async def read(self, request_id: int, sector: int, length: int, *, queue: int = 0) -> tuple[int, bytes]:
        """Read ``length`` bytes at ``sector`` through ``queue``: (status, data)."""
        addr = self.buffer(-(-length // PAGE_SIZE))
        self.post(direct_request(blkif.BLKIF_OP_READ, request_id, sector, self.segments(addr, length)), queue=queue)
        status = await self.wait(request_id, queue=queue)
        at = self.offset(addr)
        return status, bytes(self.domain.memory[at : at + length])

    async def flush(self, request_id: int) -> int:
        """An empty FLUSH_DISKCACHE; the response's status."""
        self.post(direct_request(blkif.BLKIF_OP_FLUSH_DISKCACHE, request_id, 0, []))
        return await self.wait(request_id)
