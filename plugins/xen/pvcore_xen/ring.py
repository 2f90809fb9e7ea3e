"""The backend's half of a Xen shared ring (``io/ring.h``), in one granted page or several back to back.

The ring starts with four free-running 32-bit indexes — ``req_prod``,
``req_event``, ``rsp_prod``, ``rsp_event`` — and 48 bytes of padding; the
entries follow at byte 64, as many as fit in its pages, rounded down to a
power of two (``__RING_SIZE``; an entry may straddle two pages).
An entry is the union of a protocol's request and response, so a response
goes into the slot of the request it answers. The frontend produces requests
and consumes responses; the backend keeps its own request consumer and
response producer and never believes the page: a ``req_prod`` more than a
ring ahead of the responses it has had is a :class:`RingError`, which fails
the device.

Notification follows the event-index rules of ``io/ring.h``: after pushing
responses the backend signals only if the frontend's ``rsp_event`` lies in
the range just published (``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``), and when
it runs out of requests it sets ``req_event`` to one past its consumer and
looks again (``RING_FINAL_CHECK_FOR_REQUESTS``), so a request posted meanwhile
is never missed.
"""

from __future__ import annotations

from pvcore.ring.barrier import full_barrier, read_barrier, write_barrier
from pvcore.ring.memory import GuestMemory
from pvcore_xen.host import PAGE_SIZE

REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 4, 8, 12
HEADER_SIZE = 64
U32 = 0xFFFFFFFF


class RingError(Exception):
    """The frontend's indexes are impossible; the message says how."""


def ring_size(entry_size: int, pages: int = 1) -> int:
    """``__RING_SIZE``: the entries of ``entry_size`` bytes that fit in ``pages`` pages, rounded down to a power of two."""
    count = (pages * PAGE_SIZE - HEADER_SIZE) // entry_size
    return 1 << (count.bit_length() - 1)


class BackRing:
    """One shared ring seen from the backend: requests in, responses out.

    ``base`` is the guest address of the ring's ``pages`` contiguous pages
    in ``memory``; ``start`` is the index to carry on from (the ``rsp_prod``
    in the page, for a pick-up).
    """

    def __init__(self, memory: GuestMemory, base: int, entry_size: int, name: str, *, start: int = 0,
                 pages: int = 1) -> None:
        memory.check(base, pages * PAGE_SIZE, write=True)
        self.memory = memory
        self.base = base
        self.entry_size = entry_size
        self.size = ring_size(entry_size, pages)
        self.name = name
        self.req_cons = self.rsp_prod = start & U32

    def __repr__(self) -> str:
        return f"BackRing({self.name}, {self.size} entries, req_cons {self.req_cons}, rsp_prod {self.rsp_prod})"

    def slot(self, index: int) -> int:
        """The guest address of the entry for free-running index ``index``."""
        return self.base + HEADER_SIZE + (index & (self.size - 1)) * self.entry_size

    def unconsumed(self) -> int:
        """Requests published and not yet taken; :class:`RingError` if the frontend overran the ring."""
        req_prod = self.memory.read_u32(self.base + REQ_PROD)
        read_barrier()
        outstanding = (req_prod - self.rsp_prod) & U32
        if outstanding > self.size:
            raise RingError(
                f"{self.name} ring: request producer {req_prod:#x} is more than {self.size} ahead of the responses ({self.rsp_prod:#x})"
            )
        waiting = (req_prod - self.req_cons) & U32
        if waiting > outstanding:
            raise RingError(
                f"{self.name} ring: request producer {req_prod:#x} went back behind the requests taken ({self.req_cons:#x})"
            )
        return waiting

    def take(self) -> bytes:
        """The next request's entry (the caller checked :meth:`unconsumed`)."""
        entry = self.memory.read(self.slot(self.req_cons), self.entry_size)
        self.req_cons = (self.req_cons + 1) & U32
        return entry

    def respond(self, entry: bytes) -> None:
        """Write the next response (not yet visible to the frontend)."""
        if self.rsp_prod == self.req_cons:
            raise RingError(f"{self.name} ring: a response without a request")
        self.memory.write(self.slot(self.rsp_prod), entry)
        self.rsp_prod = (self.rsp_prod + 1) & U32

    def push(self) -> bool:
        """Publish the responses written; True if the frontend asked to be notified of them."""
        old = self.memory.read_u32(self.base + RSP_PROD)
        write_barrier()
        self.memory.write_u32(self.base + RSP_PROD, self.rsp_prod)
        full_barrier()
        event = self.memory.read_u32(self.base + RSP_EVENT)
        return (self.rsp_prod - event) & U32 < (self.rsp_prod - old) & U32

    def final_check(self, need: int = 1) -> int:
        """Unless ``need`` requests wait, ask to be notified when they do, then count them again (see the module).

        ``need`` above 1 is for a response that takes several requests (a netif
        frame over several pages): the frontend is asked to signal once the
        ``need``-th is posted, not the next one, which may already be there.
        """
        waiting = self.unconsumed()
        if waiting >= need:
            return waiting
        self.memory.write_u32(self.base + REQ_EVENT, (self.req_cons + need) & U32)
        full_barrier()
        return self.unconsumed()
