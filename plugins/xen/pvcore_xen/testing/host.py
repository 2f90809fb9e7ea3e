"""A SIMULATED Xen host: grant tables over memfd guest RAM, event channels over eventfds.

:class:`SimulatedXenHost` implements :class:`~pvcore_xen.host.XenHost` for the
backend domain; each :class:`SimulatedDomain` is a guest's side: its RAM (a
memfd), the grants it hands out, and the event channels it allocates. Checks
follow Xen's: a page is mappable only through a ref its domain granted to the
mapping domain, read-only grants cannot be mapped writable, a port must have
been allocated for the binding domain and is bound at most once.

A domain's RAM is a :class:`GrantedRam`: the core reference driver's
:class:`~pvcore.testing.driver.GuestRam` whose addresses are grant DMA addresses
(as Linux's xen-grant-dma hands them to virtio) and whose allocator grants
the pages of each block to the backend domain while it is allocated. Frame
``f`` is always granted as ref :data:`DMA_FIRST_REF` + ``f``.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
from collections.abc import Callable, Sequence

import attrs

from pvcore.testing.driver import GuestRam
from pvcore_xen.grants import grant_address
from pvcore_xen.host import GNTST_GENERAL_ERROR, GNTST_OKAY, PAGE_SIZE, GrantCopy

DMA_FIRST_REF = 0x10000
"""The grant ref of frame 0 in a :class:`GrantedRam` (refs below it are handed out one by one)."""


@attrs.define
class _Grant:
    frame: int
    to_domid: int
    readonly: bool


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value


class SimulatedGrantPage:
    """Guest pages mapped by the simulated host, back to back as gntdev maps them.

    Each page is a ``MAP_SHARED | MAP_FIXED`` mapping of its frame of the
    guest's memfd, placed in one reserved range, so frames in any order (or
    one frame twice) are seen contiguously and stay the guest's memory.
    """

    def __init__(self, memory_fd: int, frames: Sequence[int], writable: bool) -> None:
        self.length = len(frames) * PAGE_SIZE
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.address = _libc.mmap(None, self.length, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if self.address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "simulated grant map: cannot reserve the range")
        for index, frame in enumerate(frames):
            placed = _libc.mmap(self.address + index * PAGE_SIZE, PAGE_SIZE, prot, mmap.MAP_SHARED | _MAP_FIXED,
                                memory_fd, frame * PAGE_SIZE)
            if placed in (None, _MAP_FAILED):
                _libc.munmap(self.address, self.length)
                raise OSError(ctypes.get_errno(), f"simulated grant map: cannot map frame {frame}")
        view = memoryview((ctypes.c_char * self.length).from_address(self.address)).cast("B")
        self.buffer = view if writable else view.toreadonly()

    def close(self) -> None:
        """Unmap the pages."""
        if self.address:
            self.buffer.release()
            _libc.munmap(self.address, self.length)
            self.address = 0


class SimulatedEventChannel:
    """One end of a simulated interdomain channel: reads one eventfd, signals the other.

    ``on_close`` runs when this end is closed: the backend's end unbinds the
    channel, as Xen leaves the guest's port unbound for a new backend to bind.
    """

    def __init__(self, local_port: int, incoming: int, outgoing: int, on_close: Callable[[], None] | None = None) -> None:
        self.local_port = local_port
        self._incoming = incoming
        self._outgoing = outgoing
        self._on_close = on_close

    def __repr__(self) -> str:
        return f"SimulatedEventChannel(port {self.local_port})"

    def fileno(self) -> int:
        """The eventfd the other end signals."""
        return self._incoming

    def consume(self) -> int:
        """Read and reset the incoming eventfd."""
        try:
            return os.eventfd_read(self._incoming)
        except BlockingIOError:
            return 0

    def signal(self) -> None:
        """Signal the other end."""
        os.eventfd_write(self._outgoing, 1)

    def close(self) -> None:
        """Unbind (the backend's end); the channel's eventfds belong to the simulated domain."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


@attrs.define(eq=False)
class _Channel:
    remote_domid: int
    to_backend: int
    to_guest: int
    bound: bool = False


class GrantedRam(GuestRam):
    """A simulated domain's RAM, addressed by grant DMA address; allocated pages are granted to ``to_domid``."""

    def __init__(self, domain: SimulatedDomain, size: int, to_domid: int) -> None:
        super().__init__(size, guest_addr=grant_address(DMA_FIRST_REF))
        self.domain = domain
        self.to_domid = to_domid
        self._blocks: dict[int, range] = {}
        self._users: dict[int, int] = {}

    def frame(self, addr: int) -> int:
        """The domain frame holding DMA address ``addr``."""
        return (addr - self.guest_addr) // PAGE_SIZE

    def alloc(self, n: int, align: int = 16) -> int:
        """Allocate as :class:`GuestRam` does, then grant every page the block touches."""
        addr = super().alloc(n, align)
        frames = range(self.frame(addr), self.frame(addr + max(n, 1) - 1) + 1)
        self._blocks[addr] = frames
        for frame in frames:
            self._users[frame] = self._users.get(frame, 0) + 1
            if self._users[frame] == 1:
                self.domain.grant(frame, self.to_domid, ref=DMA_FIRST_REF + frame)
        return addr

    def free(self, addr: int) -> None:
        """Free as :class:`GuestRam` does, then end the grants of pages no block uses any more."""
        super().free(addr)
        for frame in self._blocks.pop(addr):
            self._users[frame] -= 1
            if not self._users[frame]:
                del self._users[frame]
                self.domain.revoke(DMA_FIRST_REF + frame)


class SimulatedDomain:
    """A simulated guest domain: memfd RAM, a grant table and event-channel ports."""

    def __init__(self, domid: int, memory_size: int, backend_domid: int = 0) -> None:
        if memory_size <= 0 or memory_size % PAGE_SIZE:
            raise ValueError(f"simulated domain {domid}: memory size {memory_size} is not a positive number of pages")
        self.domid = domid
        self.memory_size = memory_size
        self.ram = GrantedRam(self, memory_size, backend_domid)
        self.memory_fd = self.ram.fd
        self.memory = mmap.mmap(self.memory_fd, memory_size)
        self._grants: dict[int, _Grant] = {}
        self._refs = itertools.count(8)
        self._channels: dict[int, _Channel] = {}
        self._ports = itertools.count(1)

    def __repr__(self) -> str:
        return f"SimulatedDomain({self.domid}, {self.memory_size} bytes)"

    def grant(self, frame: int, to_domid: int, readonly: bool = False, ref: int | None = None) -> int:
        """Grant page ``frame`` of this domain's RAM to ``to_domid`` (as ``ref``, or the next free one); return the ref."""
        if not 0 <= frame < self.memory_size // PAGE_SIZE:
            raise ValueError(f"simulated domain {self.domid}: frame {frame} is outside its memory")
        if ref is None:
            ref = next(self._refs)
        if ref in self._grants:
            raise ValueError(f"simulated domain {self.domid}: grant ref {ref} is in use")
        self._grants[ref] = _Grant(frame, to_domid, readonly)
        return ref

    def revoke(self, ref: int) -> None:
        """End grant ``ref``."""
        del self._grants[ref]

    def granted_frame(self, ref: int, to_domid: int, writable: bool) -> int:
        """The frame behind ``ref`` if it is granted to ``to_domid`` with that access; else ``OSError``."""
        grant = self._grants.get(ref)
        if grant is None or grant.to_domid != to_domid:
            raise OSError(errno.EINVAL, f"domain {self.domid} grant ref {ref}: not granted to domain {to_domid}")
        if writable and grant.readonly:
            raise OSError(errno.EPERM, f"domain {self.domid} grant ref {ref}: granted read-only")
        return grant.frame

    def alloc_unbound(self, remote_domid: int) -> int:
        """Allocate a port that ``remote_domid`` may bind (``EVTCHNOP_alloc_unbound``); return it."""
        port = next(self._ports)
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        self._channels[port] = _Channel(remote_domid, os.eventfd(0, flags), os.eventfd(0, flags))
        return port

    def event_channel(self, port: int) -> SimulatedEventChannel:
        """This domain's end of ``port``."""
        channel = self._channels[port]
        return SimulatedEventChannel(port, channel.to_guest, channel.to_backend)

    def bind(self, port: int, remote_domid: int) -> SimulatedEventChannel:
        """The remote end of ``port``, for ``remote_domid`` (``OSError`` if not its port or already bound)."""
        channel = self._channels.get(port)
        if channel is None or channel.remote_domid != remote_domid:
            raise OSError(errno.EINVAL, f"domain {self.domid} event channel {port}: not allocated for domain {remote_domid}")
        if channel.bound:
            raise OSError(errno.EBUSY, f"domain {self.domid} event channel {port}: already bound")
        channel.bound = True

        def unbind() -> None:
            channel.bound = False

        return SimulatedEventChannel(port, channel.to_backend, channel.to_guest, unbind)

    def backend_exited(self) -> None:
        """The backend's process died: Xen closes its ports, so every channel is unbound again."""
        for channel in self._channels.values():
            channel.bound = False

    def close(self) -> None:
        """Release the domain's memory and event channels."""
        self.memory.close()
        self.ram.close()
        for channel in self._channels.values():
            os.close(channel.to_backend)
            os.close(channel.to_guest)
        self._channels.clear()


class SimulatedXenHost:
    """The SIMULATED host seen from backend domain ``backend_domid`` (a :class:`~pvcore_xen.host.XenHost`)."""

    def __init__(self, backend_domid: int = 0) -> None:
        self.backend_domid = backend_domid
        self.domains: dict[int, SimulatedDomain] = {}
        self.copies = 0
        """Grant copy operations done (one per :meth:`grant_copy` call, as one hypercall batches its pieces)."""

    def add_domain(self, domid: int, memory_size: int = 16 * PAGE_SIZE) -> SimulatedDomain:
        """Create simulated guest ``domid`` with ``memory_size`` bytes of RAM."""
        if domid in self.domains or domid == self.backend_domid:
            raise ValueError(f"simulated domain {domid} already exists")
        domain = SimulatedDomain(domid, memory_size, self.backend_domid)
        self.domains[domid] = domain
        return domain

    def _domain(self, domid: int) -> SimulatedDomain:
        domain = self.domains.get(domid)
        if domain is None:
            raise OSError(errno.ESRCH, f"no simulated domain {domid}")
        return domain

    def bind_interdomain(self, domid: int, remote_port: int) -> SimulatedEventChannel:
        """Bind the port guest ``domid`` allocated for the backend."""
        return self._domain(domid).bind(remote_port, self.backend_domid)

    def map_grants(self, domid: int, refs: Sequence[int], writable: bool = True) -> SimulatedGrantPage:
        """Map the pages guest ``domid`` granted the backend as ``refs``, back to back."""
        domain = self._domain(domid)
        if not refs:
            raise OSError(errno.EINVAL, "no grant refs to map")
        frames = [domain.granted_frame(ref, self.backend_domid, writable) for ref in refs]
        return SimulatedGrantPage(domain.memory_fd, frames, writable)

    def grant_copy(self, pieces: Sequence[GrantCopy], buffer: bytearray, *, to_guest: bool) -> list[int]:
        """Copy as ``GNTTABOP_copy`` does: each piece checked on its own (grant, access, page bounds)."""
        statuses = []
        position = 0
        for piece in pieces:
            status = GNTST_GENERAL_ERROR
            if 0 <= piece.offset and 0 <= piece.length and piece.offset + piece.length <= PAGE_SIZE:
                try:
                    domain = self._domain(piece.domid)
                    frame = domain.granted_frame(piece.ref, self.backend_domid, writable=to_guest)
                except OSError:
                    frame = -1
                if frame >= 0:
                    start = frame * PAGE_SIZE + piece.offset
                    if to_guest:
                        domain.memory[start : start + piece.length] = buffer[position : position + piece.length]
                    else:
                        buffer[position : position + piece.length] = domain.memory[start : start + piece.length]
                    status = GNTST_OKAY
            statuses.append(status)
            position += piece.length
        self.copies += 1
        return statuses

    def backend_exited(self) -> None:
        """The backend's process died without closing anything (a crash): its event channels are unbound."""
        for domain in self.domains.values():
            domain.backend_exited()

    def close(self) -> None:
        """Release every simulated domain."""
        for domain in self.domains.values():
            domain.close()
        self.domains.clear()
