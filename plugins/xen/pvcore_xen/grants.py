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
"""

from __future__ import annotations

import logging

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

    def __repr__(self) -> str:
        return f"GrantMemory(dom{self.domid}, {len(self._pages)} pages mapped)"

    @property
    def size(self) -> int:
        """Bytes currently mapped."""
        return len(self._pages) * PAGE_SIZE

    def _region_at(self, addr: int) -> MemoryRegion:
        if not addr & XEN_GRANT_DMA_ADDR_OFF:
            raise GuestMemoryError(f"dom{self.domid}: address {addr:#x} is not a grant address (bit 63 clear)")
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
            page = self.host.map_grant(self.domid, ref, writable=True)
        except OSError:
            readonly = True
            try:
                page = self.host.map_grant(self.domid, ref, writable=False)
            except OSError as exc:
                raise GuestMemoryError(f"dom{self.domid}: grant ref {ref} cannot be mapped: {exc}") from None
        return page, MemoryRegion(grant_address(ref), memoryview(page.buffer), readonly=readonly)

    def close(self) -> None:
        """Unmap every mapped page (a page still viewed elsewhere is unmapped when that view goes)."""
        pages, self._pages = self._pages, {}
        for page, region in pages.values():
            try:
                region.view.release()
                page.close()
            except BufferError:
                log.debug("dom%d: a grant page is still in use; it is unmapped when released", self.domid)
