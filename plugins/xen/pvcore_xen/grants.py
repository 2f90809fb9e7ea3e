"""The memory and notification primitives: grant-addressed guest memory, event channels.

A page a guest granted this domain is addressed as a *grant DMA address*:
``(grant_ref << 12) | page offset`` with bit 63 (``XEN_GRANT_DMA_ADDR_OFF``)
set, the form Linux's xen-grant-dma-ops uses. :class:`GrantMemory` is a core
:class:`~pvcore.ring.memory.GuestMemory` over that address space: the PV
front doors reach their ring pages through it (:func:`grant_address` of the
ref the frontend published); it maps a page through the host (gntdev) the
first time it is touched and keeps it mapped until :meth:`GrantMemory.close`. Consecutive refs are
consecutive pages, so a buffer may cross pages as it crosses regions. A ref
the guest never granted to this domain is a
:class:`~pvcore.ring.memory.GuestMemoryError`, which fails that device only.

A ring of several pages (blkif's ``ring-ref0..N``) names refs in no
particular order, yet its entries run across page boundaries:
:meth:`GrantMemory.map_ring` maps them back to back in one gntdev mapping
and places it below the grant addresses (bit 63 clear), where no grant
address can collide with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs

from pvcore.ring.memory import GuestMemory, GuestMemoryError, MemoryRegion
from pvcore_xen.host import PAGE_SIZE, GrantPage, XenHost

log = logging.getLogger("pvcore.xen")

XEN_GRANT_DMA_ADDR_OFF = 1 << 63
"""Bit 63 marks a DMA address as a grant address (Linux ``XEN_GRANT_DMA_ADDR_OFF``)."""

PAGE_SHIFT = 12
MAX_GRANT_REF = 0xFFFFFFFF


def grant_address(ref: int, offset: int = 0) -> int:
    """The DMA address of byte ``offset`` of the page granted as ``ref``."""
    return XEN_GRANT_DMA_ADDR_OFF | (ref << PAGE_SHIFT) | offset


@attrs.frozen
class GrantLayout:
    """The ``layout`` of ``pvcore_map_memory`` on Xen: the pages domain ``domid`` grants, reached through ``host``."""

    domid: int
    host: XenHost


@attrs.frozen
class EventChannelSpec:
    """The ``channel`` of ``pvcore_open_notifier`` on Xen: port ``port`` that domain ``domid`` allocated for us."""

    domid: int
    port: int


class GrantMemory(GuestMemory):
    """Guest memory of domain ``domid`` as grant DMA addresses, mapped lazily a page at a time.

    A page the guest granted read-only is mapped read-only, and writing it is
    a :class:`GuestMemoryError` like any other bad access.
    """

    def __init__(self, domid: int, host: XenHost) -> None:
        super().__init__()
        self.domid = domid
        self.host = host
        self._pages: dict[int, tuple[GrantPage, MemoryRegion]] = {}
        self._rings: list[tuple[GrantPage, MemoryRegion]] = []

    def __repr__(self) -> str:
        return f"GrantMemory(dom{self.domid}, {len(self._pages)} pages mapped)"

    @property
    def size(self) -> int:
        """Bytes currently mapped."""
        return len(self._pages) * PAGE_SIZE + sum(region.size for _, region in self._rings)

    def map_ring(self, refs: Sequence[int]) -> int:
        """Map the pages granted as ``refs`` writable, back to back; the address of the first.

        One host call maps them all (one ``IOCTL_GNTDEV_MAP_GRANT_REF``); a
        ref that is not granted writable to this domain is a
        :class:`GuestMemoryError`. The mapping lasts until :meth:`close`.
        """
        try:
            page = self.host.map_grants(self.domid, refs, writable=True)
        except OSError as exc:
            raise GuestMemoryError(f"dom{self.domid}: ring grant refs {list(refs)} cannot be mapped: {exc}") from None
        address = sum(region.size for _, region in self._rings)
        region = MemoryRegion(address, memoryview(page.buffer))
        self._rings.append((page, region))
        super().__init__([ring for _, ring in self._rings])
        return address

    def _region_at(self, addr: int) -> MemoryRegion | None:
        if not addr & XEN_GRANT_DMA_ADDR_OFF:
            ring = super()._region_at(addr)
            if ring is None:
                raise GuestMemoryError(f"dom{self.domid}: address {addr:#x} is not a grant address (bit 63 clear) nor in a ring")
            return ring
        ref = (addr & ~XEN_GRANT_DMA_ADDR_OFF) >> PAGE_SHIFT
        if ref > MAX_GRANT_REF:
            raise GuestMemoryError(f"dom{self.domid}: address {addr:#x} names grant ref {ref:#x}, beyond 32 bits")
        entry = self._pages.get(ref)
        if entry is None:
            entry = self._pages[ref] = self._map(ref)
        return entry[1]

    def _map(self, ref: int) -> tuple[GrantPage, MemoryRegion]:
        readonly = False
        try:
            page = self.host.map_grants(self.domid, [ref], writable=True)
        except OSError:
            readonly = True
            try:
                page = self.host.map_grants(self.domid, [ref], writable=False)
            except OSError as exc:
                raise GuestMemoryError(f"dom{self.domid}: grant ref {ref} cannot be mapped: {exc}") from None
        return page, MemoryRegion(grant_address(ref), memoryview(page.buffer), readonly=readonly)

    def close(self) -> None:
        """Unmap every mapped page (a page still viewed elsewhere is unmapped when that view goes)."""
        pages, self._pages, rings, self._rings = self._pages, {}, self._rings, []
        super().__init__()
        for page, region in [*pages.values(), *rings]:
            try:
                region.view.release()
                page.close()
            except BufferError:
                log.debug("dom%d: a grant page is still in use; it is unmapped when released", self.domid)
