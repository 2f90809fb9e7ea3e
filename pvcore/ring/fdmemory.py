"""Guest memory shared as file descriptors: map an :class:`~pvcore.contract.FdMemoryLayout`.

Any transport whose frontend hands over guest RAM as file descriptors
(vhost-user's SET_MEM_TABLE, vfio-user's DMA regions) turns its table into an
:class:`~pvcore.contract.FdMemoryLayout` and calls :func:`map_fd_layout`. Each
region's fd is mapped ``MAP_SHARED`` from its offset; the result is an
:class:`FdGuestMemory`, a :class:`~pvcore.ring.memory.GuestMemory` that also
knows how to unmap itself.

The layout comes from the frontend and is not trusted: sizes, offsets and
addresses are checked, a region must lie inside its file (touching a page
past the end of a file raises SIGBUS), and neither the guest ranges nor the
frontend's user ranges may overlap.

A file that shrinks *after* it was mapped would make the next access to the
lost pages raise SIGBUS, which no Python code can catch: it would kill the
daemon and every guest it serves. So every region must be a regular file
sealed against shrinking (``F_SEAL_SHRINK``, see ``memfd_create(2)``); seals
can never be removed, so a sealed file stays at least as long as it was when
it was checked. QEMU's ``memory-backend-memfd`` seals its memfd this way by
default (``seal=on``), and so does libvirt's ``<source type='memfd'/>``. A
region that is not sealed (an unsealed memfd, a ``memory-backend-file`` on
/dev/shm or hugetlbfs) is refused with :class:`UnsealedMemoryError`, which
costs only that frontend its connection.

The region fds stay the caller's: they are duplicated by the mapping and may
(and should) be closed once :func:`map_fd_layout` returns.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import mmap
import os
import stat

from pvcore.contract import FdMemoryLayout, FdRegion
from pvcore.ring.memory import ADDRESS_LIMIT, GuestMemory, MemoryRegion

log = logging.getLogger("pvcore.ring")

MAX_REGION_SIZE = 1 << 48
"""Largest single region accepted (256 TiB): anything bigger is a corrupt table."""


class UnsealedMemoryError(ValueError):
    """A memory region's file is not sealed against shrinking, so a shrink could fault the daemon."""


class FdGuestMemory(GuestMemory):
    """Guest memory made of ``mmap`` ed fd regions; :meth:`close` unmaps them.

    After :meth:`close` the object holds no regions, so every access raises
    :class:`~pvcore.ring.memory.GuestMemoryError` instead of touching freed
    pages. A mapping still referenced by a view someone else holds (a request
    in flight) is unmapped when that view goes away.
    """

    def __init__(self, regions: list[MemoryRegion], mappings: list[mmap.mmap]) -> None:
        super().__init__(regions)
        self._mappings = mappings

    def close(self) -> None:
        """Unmap every region (idempotent)."""
        regions, mappings = self.regions, self._mappings
        super().__init__(())
        self._mappings = []
        for region in regions:
            region.view.release()
        for mapping in mappings:
            try:
                mapping.close()
            except BufferError:
                log.debug("guest memory mapping still in use; it is unmapped when released")

    def __enter__(self) -> FdGuestMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _describe(index: int, region: FdRegion) -> str:
    return f"memory region {index} (guest {region.guest_addr:#x}+{region.size:#x}, fd {region.fd})"


GUEST_RAM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""The seals QEMU's ``memory-backend-memfd`` puts on guest RAM (``seal=on``)."""


def sealed_memfd(name: str, size: int) -> int:
    """A new memfd of ``size`` bytes sealed with :data:`GUEST_RAM_SEALS`, as QEMU makes guest RAM."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, GUEST_RAM_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_region(index: int, region: FdRegion) -> None:
    where = _describe(index, region)
    if not 0 < region.size <= MAX_REGION_SIZE:
        raise ValueError(f"{where}: size {region.size:#x} is not in 1..{MAX_REGION_SIZE:#x}")
    if region.offset < 0 or region.offset + region.size > 1 << 63:
        raise ValueError(f"{where}: mmap offset {region.offset:#x} is out of range")
    if region.guest_addr < 0 or region.guest_addr + region.size > ADDRESS_LIMIT:
        raise ValueError(f"{where}: guest range wraps the address space")
    if region.user_addr < 0 or region.user_addr + region.size > ADDRESS_LIMIT:
        raise ValueError(f"{where}: user address {region.user_addr:#x} wraps the address space")
    try:
        info = os.fstat(region.fd)
    except OSError as exc:
        raise ValueError(f"{where}: not an open file descriptor ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{where}: not a regular file (guest RAM is a memfd or a file)")
    _check_sealed(where, region.fd)
    info = os.fstat(region.fd)  # sealed now: this size can only grow, so it bounds the mapping safely
    if region.offset + region.size > info.st_size:
        raise ValueError(
            f"{where}: offset {region.offset:#x} + size {region.size:#x} runs past the end of the "
            f"file ({info.st_size:#x} bytes)"
        )


def _check_sealed(where: str, fd: int) -> None:
    """Refuse a file the frontend could still shrink under the mapping (see the module docstring)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a memfd or shmem file: it cannot be sealed at all
    if not seals & fcntl.F_SEAL_SHRINK:
        raise UnsealedMemoryError(
            f"{where}: the file is not sealed against shrinking (F_SEAL_SHRINK), so the frontend could "
            f"shrink it and fault the daemon; give the guest memory-backend-memfd (seal=on, the default) "
            f"or libvirt's <memoryBacking><source type='memfd'/>"
        )


def _check_disjoint(layout: FdMemoryLayout) -> None:
    indexed = list(enumerate(layout.regions))
    for kind, start in (("guest", lambda r: r.guest_addr), ("user", lambda r: r.user_addr)):
        ordered = sorted(indexed, key=lambda item: start(item[1]))
        for (i, before), (j, after) in itertools.pairwise(ordered):
            if start(before) + before.size > start(after):
                raise ValueError(
                    f"{_describe(i, before)} and {_describe(j, after)}: {kind} address ranges overlap"
                )


def map_fd_layout(layout: FdMemoryLayout) -> FdGuestMemory:
    """Map every region of ``layout`` shared and read-write; return the guest memory.

    Raises ``ValueError`` for a layout that breaks the rules and ``OSError``
    when the kernel refuses a mapping; both name the region. Nothing stays
    mapped when it fails.
    """
    for index, region in enumerate(layout.regions):
        _check_region(index, region)
    _check_disjoint(layout)
    granularity = mmap.ALLOCATIONGRANULARITY
    mappings: list[mmap.mmap] = []
    regions: list[MemoryRegion] = []
    try:
        for index, region in enumerate(layout.regions):
            start = region.offset - region.offset % granularity
            skip = region.offset - start
            try:
                mapping = mmap.mmap(
                    region.fd,
                    region.size + skip,
                    flags=mmap.MAP_SHARED,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=start,
                )
            except OSError as exc:
                raise OSError(exc.errno, f"{_describe(index, region)}: mmap failed: {exc.strerror}") from None
            except ValueError as exc:
                raise ValueError(f"{_describe(index, region)}: mmap refused: {exc}") from None
            mappings.append(mapping)
            view = memoryview(mapping)[skip : skip + region.size]
            regions.append(MemoryRegion(region.guest_addr, view, user_addr=region.user_addr))
        return FdGuestMemory(regions, mappings)
    except BaseException:
        for memory_region in regions:
            memory_region.view.release()
        for mapping in mappings:
            mapping.close()
        raise
