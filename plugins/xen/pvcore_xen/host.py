"""The OS-facing side of the xen plugin: event channels and grant mappings.

:class:`XenHost` is the small interface the rest of the plugin uses; it has
two implementations: :class:`LinuxXenHost` (``/dev/xen/evtchn`` and
``/dev/xen/gntdev`` of a Linux dom0 or driver domain, through the ioctls of
the kernel's ``include/uapi/xen/evtchn.h`` and ``gntdev.h``) and the
simulated host in :mod:`pvcore_xen.testing.host`.

An :class:`EventChannel` is also a core :class:`~pvcore.ring.notify.Notifier`:
on Xen the same interdomain channel carries the guest's kicks and the
backend's interrupts.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

PAGE_SIZE = 4096
"""Xen's grant granularity: one 4 KiB page per grant reference."""

_IOC_NONE = 0


def _ioc(kind: str, number: int, size: int) -> int:
    """Linux ``_IOC(_IOC_NONE, kind, number, size)`` (x86 and Arm encoding)."""
    return (_IOC_NONE << 30) | (size << 16) | (ord(kind) << 8) | number


_BIND_INTERDOMAIN = struct.Struct("=II")
"""``struct ioctl_evtchn_bind_interdomain``: remote_domain, remote_port."""
_PORT = struct.Struct("=I")
"""``struct ioctl_evtchn_notify`` / ``ioctl_evtchn_unbind`` (a port), and one ``evtchn_port_t`` read or written."""
_MAP_HEADER = struct.Struct("=IIQ")
"""``struct ioctl_gntdev_map_grant_ref`` up to its refs: count, pad, index (the kernel reads ``count`` refs after it)."""
_GRANT_REF = struct.Struct("=II")
"""``struct ioctl_gntdev_grant_ref``: domid, ref."""
_UNMAP_GRANT_REF = struct.Struct("=QII")
"""``struct ioctl_gntdev_unmap_grant_ref``: index, count, pad."""

IOCTL_EVTCHN_BIND_INTERDOMAIN = _ioc("E", 1, _BIND_INTERDOMAIN.size)
IOCTL_EVTCHN_UNBIND = _ioc("E", 3, _PORT.size)
IOCTL_EVTCHN_NOTIFY = _ioc("E", 4, _PORT.size)
IOCTL_GNTDEV_MAP_GRANT_REF = _ioc("G", 0, _MAP_HEADER.size + _GRANT_REF.size)
IOCTL_GNTDEV_UNMAP_GRANT_REF = _ioc("G", 1, _UNMAP_GRANT_REF.size)
_GRANT_COPY = struct.Struct("=I4xQ")
"""``struct ioctl_gntdev_grant_copy``: count, (padding), segments pointer."""
_COPY_FROM_GUEST = struct.Struct("=IHHQHHh2x")
"""``struct gntdev_grant_copy_segment`` from a grant: source ref, offset, domid; dest address; len, flags, status."""
_COPY_TO_GUEST = struct.Struct("=QIHHHHh2x")
"""``struct gntdev_grant_copy_segment`` into a grant: source address; dest ref, offset, domid; len, flags, status."""
IOCTL_GNTDEV_GRANT_COPY = _ioc("G", 8, _GRANT_COPY.size)
GNTCOPY_SOURCE_GREF = 1
GNTCOPY_DEST_GREF = 2
GNTST_OKAY = 0
GNTST_GENERAL_ERROR = -1


@attrs.frozen
class GrantCopy:
    """One piece of a grant copy: ``length`` bytes at ``offset`` of the page domain ``domid`` granted as ``ref``.

    ``offset + length`` must stay within the page (the host refuses a piece that crosses it).
    """

    domid: int
    ref: int
    offset: int
    length: int


@runtime_checkable
class EventChannel(Protocol):
    """One bound interdomain event channel, seen from the backend (a core Notifier)."""

    local_port: int

    def fileno(self) -> int:
        """A descriptor that polls readable when the guest signalled."""

    def consume(self) -> int:
        """Clear (and unmask) pending signals; return how many arrived."""

    def signal(self) -> None:
        """Notify the guest."""

    def close(self) -> None:
        """Unbind the channel and release its descriptor."""


@runtime_checkable
class GrantPage(Protocol):
    """Guest pages mapped through their grant references, back to back in one buffer."""

    buffer: mmap.mmap | memoryview

    def close(self) -> None:
        """Unmap the page."""


@runtime_checkable
class XenHost(Protocol):
    """What the plugin needs from the host: bind event channels and map grants."""

    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        """Bind to port ``remote_port`` that domain ``domid`` allocated for us (``OSError`` if it cannot)."""

    def map_grants(self, domid: int, refs: Sequence[int], writable: bool = True) -> GrantPage:
        """Map the pages domain ``domid`` granted us as ``refs``, in that order, as one buffer.

        ``OSError`` if any of them is not granted to us (with that access).
        """

    def grant_copy(self, pieces: Sequence[GrantCopy], buffer: bytearray, *, to_guest: bool) -> list[int]:
        """Copy between ``buffer`` (the pieces back to back) and granted pages, without mapping them.

        ``to_guest`` copies ``buffer`` into the pages, otherwise the pages into
        ``buffer``. Returns one Xen ``GNTST_*`` status per piece (0 is done);
        a piece that failed leaves its bytes undefined, the others are copied.
        """


class LinuxEventChannel:
    """An interdomain channel bound on its own ``/dev/xen/evtchn`` descriptor."""

    def __init__(self, path: str, domid: int, remote_port: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # a mutable buffer, so that ioctl returns the call's result (the local port), not the buffer
            request = bytearray(_BIND_INTERDOMAIN.pack(domid, remote_port))
            self.local_port = fcntl.ioctl(self.fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, request, True)
        except OSError as exc:
            os.close(self.fd)
            raise OSError(exc.errno, f"{path}: cannot bind event channel {remote_port} of domain {domid}: {exc.strerror}") from None
        self.domid = domid
        self.remote_port = remote_port

    def __repr__(self) -> str:
        return f"LinuxEventChannel(dom{self.domid}:{self.remote_port} -> local {self.local_port})"

    def fileno(self) -> int:
        """The evtchn descriptor (readable when a port fired)."""
        return self.fd

    def consume(self) -> int:
        """Read the fired ports and write them back, which unmasks them."""
        try:
            data = os.read(self.fd, 64 * _PORT.size)
        except BlockingIOError:
            return 0
        usable = len(data) - len(data) % _PORT.size
        if usable:
            os.write(self.fd, data[:usable])
        return usable // _PORT.size

    def signal(self) -> None:
        """``IOCTL_EVTCHN_NOTIFY`` on the local port."""
        fcntl.ioctl(self.fd, IOCTL_EVTCHN_NOTIFY, _PORT.pack(self.local_port))

    def close(self) -> None:
        """Unbind and close."""
        if self.fd < 0:
            return
        try:
            fcntl.ioctl(self.fd, IOCTL_EVTCHN_UNBIND, _PORT.pack(self.local_port))
        finally:
            os.close(self.fd)
            self.fd = -1


class LinuxGrantPage:
    """Pages mapped with one ``IOCTL_GNTDEV_MAP_GRANT_REF`` (``count`` refs) and one ``mmap`` of the gntdev descriptor."""

    def __init__(self, gntdev_fd: int, domid: int, refs: Sequence[int], writable: bool) -> None:
        request = bytearray(_MAP_HEADER.pack(len(refs), 0, 0) + b"".join(_GRANT_REF.pack(domid, ref) for ref in refs))
        fcntl.ioctl(gntdev_fd, IOCTL_GNTDEV_MAP_GRANT_REF, request, True)
        self.index = _MAP_HEADER.unpack_from(request)[2]
        self.count = len(refs)
        self.gntdev_fd = gntdev_fd
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self.buffer = mmap.mmap(gntdev_fd, self.count * PAGE_SIZE, mmap.MAP_SHARED, prot, offset=self.index)
        except OSError as exc:
            self._unmap_ioctl()
            raise OSError(exc.errno, f"grant refs {list(refs)} of domain {domid}: cannot map: {exc.strerror}") from None

    def _unmap_ioctl(self) -> None:
        fcntl.ioctl(self.gntdev_fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, _UNMAP_GRANT_REF.pack(self.index, self.count, 0))

    def close(self) -> None:
        """munmap, then release the grant mapping."""
        if not self.buffer.closed:
            self.buffer.close()
            self._unmap_ioctl()


class LinuxXenHost:
    """The real host: ``/dev/xen/evtchn`` and ``/dev/xen/gntdev`` of a Linux dom0 or driver domain."""

    def __init__(self, evtchn_path: str = "/dev/xen/evtchn", gntdev_path: str = "/dev/xen/gntdev") -> None:
        self.evtchn_path = evtchn_path
        self.gntdev_path = gntdev_path
        self._gntdev_fd: int | None = None

    def bind_interdomain(self, domid: int, remote_port: int) -> LinuxEventChannel:
        """Bind a channel on a new evtchn descriptor."""
        return LinuxEventChannel(self.evtchn_path, domid, remote_port)

    def map_grants(self, domid: int, refs: Sequence[int], writable: bool = True) -> LinuxGrantPage:
        """Map granted pages through gntdev, contiguously."""
        if self._gntdev_fd is None:
            self._gntdev_fd = os.open(self.gntdev_path, os.O_RDWR | os.O_CLOEXEC)
        return LinuxGrantPage(self._gntdev_fd, domid, refs, writable)

    def grant_copy(self, pieces: Sequence[GrantCopy], buffer: bytearray, *, to_guest: bool) -> list[int]:
        """``IOCTL_GNTDEV_GRANT_COPY``: the hypervisor copies, checking every grant."""
        if self._gntdev_fd is None:
            self._gntdev_fd = os.open(self.gntdev_path, os.O_RDWR | os.O_CLOEXEC)
        if sum(piece.length for piece in pieces) > len(buffer):
            raise ValueError(f"grant copy of {sum(piece.length for piece in pieces)} bytes into a {len(buffer)}-byte buffer")
        local = (ctypes.c_char * max(len(buffer), 1)).from_buffer(buffer) if buffer else None
        base = ctypes.addressof(local) if local is not None else 0
        layout = _COPY_TO_GUEST if to_guest else _COPY_FROM_GUEST
        segments = ctypes.create_string_buffer(layout.size * len(pieces))
        position = 0
        for index, piece in enumerate(pieces):
            foreign = (piece.ref, piece.offset, piece.domid)
            if to_guest:
                fields = (base + position, *foreign, piece.length, GNTCOPY_DEST_GREF, 0)
            else:
                fields = (*foreign, base + position, piece.length, GNTCOPY_SOURCE_GREF, 0)
            layout.pack_into(segments, index * layout.size, *fields)
            position += piece.length
        fcntl.ioctl(self._gntdev_fd, IOCTL_GNTDEV_GRANT_COPY, _GRANT_COPY.pack(len(pieces), ctypes.addressof(segments)))
        del local
        return [layout.unpack_from(segments, index * layout.size)[6] for index in range(len(pieces))]

    def close(self) -> None:
        """Close the gntdev descriptor (mapped pages must be closed first)."""
        if self._gntdev_fd is not None:
            os.close(self._gntdev_fd)
            self._gntdev_fd = None
