"""A SIMULATED Xen host: grant tables over memfd guest RAM, event channels over eventfds.

:class:`SimulatedXenHost` implements :class:`~pvcore_xen.host.XenHost` for the
backend domain; each :class:`SimulatedDomain` is a guest's side: its RAM (a
memfd), the grants it hands out, and the event channels it allocates. Checks
follow Xen's: a page is mappable only through a ref its domain granted to the
mapping domain, read-only grants cannot be mapped writable, a port must have
been allocated for the binding domain and is bound at most once.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os

import attrs

from pvcore_xen.host import PAGE_SIZE


@attrs.define
class _Grant:
    frame: int
    to_domid: int
    readonly: bool


class SimulatedGrantPage:
    """A guest page mapped by the simulated host (a ``mmap`` of the guest's memfd)."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer

    def close(self) -> None:
        """Unmap the page."""
        self.buffer.close()


class SimulatedEventChannel:
    """One end of a simulated interdomain channel: reads one eventfd, signals the other."""

    def __init__(self, local_port: int, incoming: int, outgoing: int) -> None:
        self.local_port = local_port
        self._incoming = incoming
        self._outgoing = outgoing

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
        """Nothing to release per end: the channel's eventfds belong to the simulated domain."""


@attrs.define(eq=False)
class _Channel:
    remote_domid: int
    to_backend: int
    to_guest: int
    bound: bool = False


class SimulatedDomain:
    """A simulated guest domain: memfd RAM, a grant table and event-channel ports."""

    def __init__(self, domid: int, memory_size: int) -> None:
        if memory_size <= 0 or memory_size % PAGE_SIZE:
            raise ValueError(f"simulated domain {domid}: memory size {memory_size} is not a positive number of pages")
        self.domid = domid
        self.memory_size = memory_size
        self.memory_fd = os.memfd_create(f"simulated-xen-dom{domid}", os.MFD_CLOEXEC)
        os.ftruncate(self.memory_fd, memory_size)
        self.memory = mmap.mmap(self.memory_fd, memory_size)
        self._grants: dict[int, _Grant] = {}
        self._refs = itertools.count(8)
        self._channels: dict[int, _Channel] = {}
        self._ports = itertools.count(1)

    def __repr__(self) -> str:
        return f"SimulatedDomain({self.domid}, {self.memory_size} bytes)"

    def grant(self, frame: int, to_domid: int, readonly: bool = False) -> int:
        """Grant page ``frame`` of this domain's RAM to ``to_domid``; return the grant ref."""
        if not 0 <= frame < self.memory_size // PAGE_SIZE:
            raise ValueError(f"simulated domain {self.domid}: frame {frame} is outside its memory")
        ref = next(self._refs)
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
        return SimulatedEventChannel(port, channel.to_backend, channel.to_guest)

    def close(self) -> None:
        """Release the domain's memory and event channels."""
        self.memory.close()
        os.close(self.memory_fd)
        for channel in self._channels.values():
            os.close(channel.to_backend)
            os.close(channel.to_guest)
        self._channels.clear()


class SimulatedXenHost:
    """The SIMULATED host seen from backend domain ``backend_domid`` (a :class:`~pvcore_xen.host.XenHost`)."""

    def __init__(self, backend_domid: int = 0) -> None:
        self.backend_domid = backend_domid
        self.domains: dict[int, SimulatedDomain] = {}

    def add_domain(self, domid: int, memory_size: int = 16 * PAGE_SIZE) -> SimulatedDomain:
        """Create simulated guest ``domid`` with ``memory_size`` bytes of RAM."""
        if domid in self.domains or domid == self.backend_domid:
            raise ValueError(f"simulated domain {domid} already exists")
        domain = SimulatedDomain(domid, memory_size)
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

    def map_grant(self, domid: int, ref: int, writable: bool = True) -> SimulatedGrantPage:
        """Map the page guest ``domid`` granted the backend as ``ref``."""
        domain = self._domain(domid)
        frame = domain.granted_frame(ref, self.backend_domid, writable)
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return SimulatedGrantPage(mmap.mmap(domain.memory_fd, PAGE_SIZE, access=access, offset=frame * PAGE_SIZE))

    def close(self) -> None:
        """Release every simulated domain."""
        for domain in self.domains.values():
            domain.close()
        self.domains.clear()
