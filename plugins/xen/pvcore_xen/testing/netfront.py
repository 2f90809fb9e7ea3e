"""A SIMULATED xen-netfront: a guest's side of ``io/netif.h``, for tests.

Like Linux's netfront it grants a tx and an rx ring page (``io/ring.h``
layout, indexes starting at 0, event indexes at 1), allocates one event
channel, publishes ``tx-ring-ref``, ``rx-ring-ref``, ``event-channel``,
``request-rx-copy``, ``feature-rx-notify`` and ``feature-sg`` and goes
straight from Initialising to Connected when the backend is in InitWait.
Frames go out from granted pages (:meth:`SimulatedNetFrontend.send`), receive
buffers are granted pages posted as rx requests (:meth:`post_rx`); raw
requests (:meth:`post_tx`) let hostile tests write what netfront never would.
It talks to no hypervisor.
"""

from __future__ import annotations

import mmap
import struct
import time

from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.netif import (
    NETRXF_MORE_DATA,
    NETTXF_MORE_DATA,
    RX_REQUEST,
    RX_RESPONSE,
    TX_REQUEST,
    TX_RESPONSE,
)
from pvcore_xen.ring import HEADER_SIZE, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD, U32, ring_size
from pvcore_xen.testing.frontend import RECHECK_INTERVAL, SimulatedFrontend, wait_readable
from pvcore_xen.testing.host import DMA_FIRST_REF
from pvcore_xen.xenbus import XenbusState

_U32 = struct.Struct("<I")


class FrontRing:
    """The frontend's half of one shared ring in ``pages`` consecutive pages of the simulated domain's memory."""

    def __init__(self, memory: mmap.mmap, offset: int, entry_size: int, pages: int = 1) -> None:
        self.memory = memory
        self.offset = offset
        self.entry_size = entry_size
        self.size = ring_size(entry_size, pages)
        memory[offset : offset + pages * PAGE_SIZE] = bytes(pages * PAGE_SIZE)
        for index, value in ((REQ_EVENT, 1), (RSP_EVENT, 1)):
            self.put(index, value)
        self.req_prod = self.rsp_cons = 0

    def get(self, index: int) -> int:
        """A header index."""
        return _U32.unpack_from(self.memory, self.offset + index)[0]

    def put(self, index: int, value: int) -> None:
        """Write a header index."""
        _U32.pack_into(self.memory, self.offset + index, value & U32)

    def write(self, entry: bytes) -> None:
        """Write the next request (not yet published)."""
        at = self.offset + HEADER_SIZE + (self.req_prod & (self.size - 1)) * self.entry_size
        self.memory[at : at + len(entry)] = entry
        self.req_prod = (self.req_prod + 1) & U32

    def push(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: publish, and whether the backend wants a notification."""
        old = self.get(REQ_PROD)
        self.put(REQ_PROD, self.req_prod)
        event = self.get(REQ_EVENT)
        return (self.req_prod - event) & U32 < (self.req_prod - old) & U32

    def responses(self, size: int) -> list[bytes]:
        """Every published response not taken yet; asks to be notified of the next one."""
        taken = []
        while True:
            while self.rsp_cons != self.get(RSP_PROD):
                at = self.offset + HEADER_SIZE + (self.rsp_cons & (self.size - 1)) * self.entry_size
                taken.append(bytes(self.memory[at : at + size]))
                self.rsp_cons = (self.rsp_cons + 1) & U32
            self.put(RSP_EVENT, self.rsp_cons + 1)
            if self.rsp_cons == self.get(RSP_PROD):
                return taken


class SimulatedNetFrontend(SimulatedFrontend):
    """A SIMULATED xen-netfront with one queue and one event channel."""

    kind = "vif"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        ram, memory = self.domain.ram, self.domain.memory
        self.pages = [ram.alloc(PAGE_SIZE, PAGE_SIZE) for _ in range(2)]
        self.tx_ref, self.rx_ref = (self.ref(page) for page in self.pages)
        self.tx = FrontRing(memory, self.offset(self.pages[0]), TX_REQUEST.size)
        self.rx = FrontRing(memory, self.offset(self.pages[1]), RX_REQUEST.size)
        self.port = self.domain.alloc_unbound(self.backend_domid)
        self.channel = self.domain.event_channel(self.port)
        self.buffers: dict[int, int] = {}
        """rx request id -> the page posted with it."""
        self.tx_done: list[tuple[int, int]] = []
        self.received: list[tuple[int, int, int, int]] = []

    def ref(self, addr: int) -> int:
        """The grant ref of the page at DMA address ``addr``."""
        return DMA_FIRST_REF + self.domain.ram.frame(addr)

    def offset(self, addr: int) -> int:
        """Where DMA address ``addr`` is in the domain's memory."""
        return addr - self.domain.ram.guest_addr

    async def publish(self, *, sg: bool = True, overrides: dict[str, str] | None = None) -> None:
        """Wait for InitWait, check ``feature-rx-copy``, publish the rings and features, go Connected."""
        await self.wait_backend(XenbusState.INIT_WAIT)
        assert await self.client.read(f"{self.backend_path}/feature-rx-copy") == b"1"
        nodes = {
            "tx-ring-ref": str(self.tx_ref), "rx-ring-ref": str(self.rx_ref), "event-channel": str(self.port),
            "request-rx-copy": "1", "feature-rx-notify": "1", "feature-sg": "1" if sg else "0", **(overrides or {}),
        }
        for node, value in nodes.items():
            await self.client.write(f"{self.path}/{node}", value)
        await self.set_state(XenbusState.CONNECTED)

    async def connect(self, **options: object) -> None:
        """:meth:`publish` and wait for the backend's Connected."""
        await self.publish(**options)  # type: ignore[arg-type]
        await self.wait_backend(XenbusState.CONNECTED)

    def post_tx(self, requests: list[tuple[int, int, int, int, int]], *, push: bool = True) -> None:
        """Write raw ``netif_tx_request`` s (gref, offset, flags, id, size) and publish them."""
        for request in requests:
            self.tx.write(TX_REQUEST.pack(*request))
        if push and self.tx.push():
            self.channel.signal()

    def send(self, frame: bytes, *, first_id: int = 0, flags: int = 0) -> int:
        """Transmit ``frame`` from granted pages, a page per slot; return the number of slots."""
        chunks = [frame[at : at + PAGE_SIZE] for at in range(0, len(frame), PAGE_SIZE)] or [b""]
        requests = []
        for index, chunk in enumerate(chunks):
            page = self.domain.ram.alloc(PAGE_SIZE, PAGE_SIZE)
            at = self.offset(page)
            self.domain.memory[at : at + len(chunk)] = chunk
            more = NETTXF_MORE_DATA if index < len(chunks) - 1 else 0
            requests.append((self.ref(page), 0, flags * (index == 0) | more, first_id + index, len(frame) if index == 0 else len(chunk)))
        self.post_tx(requests)
        return len(requests)

    def post_rx(self, count: int, *, first_id: int = 0, gref: int | None = None) -> None:
        """Post ``count`` receive requests, each a fresh granted page (or ``gref`` for every one)."""
        for index in range(count):
            page = self.domain.ram.alloc(PAGE_SIZE, PAGE_SIZE)
            self.buffers[first_id + index] = page
            self.rx.write(RX_REQUEST.pack(first_id + index, self.ref(page) if gref is None else gref))
        if self.rx.push():
            self.channel.signal()

    async def _wait(self, done: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():  # type: ignore[operator]
            self.channel.consume()
            self.tx_done += [TX_RESPONSE.unpack(entry) for entry in self.tx.responses(TX_RESPONSE.size)]
            self.received += [RX_RESPONSE.unpack(entry) for entry in self.rx.responses(RX_RESPONSE.size)]
            if done():  # type: ignore[operator]
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"dom{self.domain.domid} vif {self.devid}: {what}")
            await wait_readable(self.channel.fileno(), RECHECK_INTERVAL)

    async def wait_tx(self, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Wait for ``count`` tx responses (id, status); return them in order."""
        await self._wait(lambda: len(self.tx_done) >= count, f"{len(self.tx_done)} of {count} tx responses", timeout)
        done, self.tx_done = self.tx_done[:count], self.tx_done[count:]
        return done

    async def receive(self, timeout: float = 5.0) -> bytes | int:
        """The next received frame, reassembled from its slots; a negative status if it failed."""

        def complete() -> bool:
            return any(not flags & NETRXF_MORE_DATA for _, _, flags, _ in self.received)

        await self._wait(complete, "no frame received", timeout)
        frame = bytearray()
        while True:
            request_id, offset, flags, status = self.received.pop(0)
            if status < 0:
                return status
            at = self.offset(self.buffers.pop(request_id)) + offset
            frame += self.domain.memory[at : at + status]
            if not flags & NETRXF_MORE_DATA:
                return bytes(frame)
