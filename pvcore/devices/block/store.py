"""Backing stores: where a block device's bytes live.

A store does the blocking I/O; :class:`~pvcore.devices.block.backend.BlockBackend`
calls it from its worker threads only. :class:`RawFileStore` is a raw image file
(or a host block device): reads and writes go straight between the file and the
caller's buffers with ``preadv``/``pwritev`` (for a guest, those buffers are
views of guest memory, so no byte is copied in Python), or, for a stream door
answering a read, from the page cache into a pipe with ``splice``
(:meth:`RawFileStore.splice_to`), so that the bytes reach the socket without
ever being copied.

Its extent map (:meth:`RawFileStore.extents`: which ranges are data and
which are holes, from ``SEEK_DATA``/``SEEK_HOLE``, see
:mod:`~pvcore.devices.block.extents`) lets a stream door skip holes.

Discard punches a hole and write-zeroes zeroes a range with Linux ``fallocate``
(through libc, because :func:`os.posix_fallocate` only allocates); where the
file system cannot, both fall back to writing zeros, so a discarded or zeroed
range always reads back as zeros.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Callable, Sequence

from pvcore.devices.block.extents import Extent, map_extents

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
ZERO_CHUNK = 1 << 20

_FALLOCATE_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int

MEMORY_FILE_SYSTEMS = frozenset({0x01021994, 0x858458F6})
"""``statfs`` ``f_type`` of tmpfs (``TMPFS_MAGIC``) and ramfs (``RAMFS_MAGIC``): no disk behind the page cache."""


def memory_backed(fd: int) -> bool:
    """Whether ``fd``'s file lives on tmpfs or ramfs (``fstatfs(2)``), where a read never waits for a disk.

    Such file systems refuse ``RWF_NOWAIT`` reads (``EOPNOTSUPP``, Linux 6.1
    to 6.18 at least) although their pages are the storage; only a page the
    host swapped out makes a read wait.
    """
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux; f_type comes first
    if _fstatfs(fd, buffer) != 0:
        return False
    return ctypes.c_ulong.from_buffer(buffer).value & 0xFFFFFFFF in MEMORY_FILE_SYSTEMS


class DirtyPageGauge:
    """Whether the host's dirty page cache is far below where the kernel starts throttling writers.

    Linux makes a buffered writer sleep (``balance_dirty_pages``) only once
    Dirty + Writeback memory passes the midpoint between the background and
    the foreground dirty thresholds; below the background threshold a write
    into the page cache never waits for writeback. The gauge says "low" while
    Dirty + Writeback is under ``fraction`` of the background threshold
    (``vm.dirty_background_bytes``, or ``vm.dirty_background_ratio`` percent
    of free plus file-cache memory, as the kernel counts it). It reads
    ``/proc`` at most once per ``interval`` seconds; anything it cannot read
    makes it say "not low".
    """

    def __init__(
        self,
        *,
        interval: float = 0.1,
        fraction: float = 0.5,
        proc: str = "/proc",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.fraction = fraction
        self.proc = proc
        self.clock = clock
        self._checked_at = -float("inf")
        self._low = False

    def low(self) -> bool:
        """Whether a buffered write now is far from being throttled (cached for ``interval``)."""
        now = self.clock()
        if now - self._checked_at >= self.interval:
            self._checked_at = now
            self._low = self._measure()
        return self._low

    def _measure(self) -> bool:
        try:
            with open(f"{self.proc}/meminfo", "rb") as meminfo:
                fields = dict(line.split(b":", 1) for line in meminfo.read().splitlines() if b":" in line)
            kib = {name: int(fields[name.encode()].split()[0]) for name in
                   ("Dirty", "Writeback", "MemFree", "Active(file)", "Inactive(file)")}
            with open(f"{self.proc}/sys/vm/dirty_background_bytes", "rb") as setting:
                background = int(setting.read())
            if not background:
                with open(f"{self.proc}/sys/vm/dirty_background_ratio", "rb") as setting:
                    ratio = int(setting.read())
                dirtyable = (kib["MemFree"] + kib["Active(file)"] + kib["Inactive(file)"]) * 1024
                background = dirtyable * ratio // 100
        except (OSError, ValueError, KeyError, IndexError):
            return False
        return (kib["Dirty"] + kib["Writeback"]) * 1024 < self.fraction * background


HOST_DIRTY_PAGES = DirtyPageGauge()
"""The gauge every store shares by default (the page cache is the host's, not a file's)."""


class StoreError(Exception):
    """A backing store could not be opened or used; the message names the file."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux ``fallocate(2)``; raises :class:`OSError` on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _advance(buffers: list[memoryview], done: int) -> list[memoryview]:
    """The part of ``buffers`` left after the first ``done`` bytes."""
    index = 0
    while index < len(buffers) and done >= len(buffers[index]):
        done -= len(buffers[index])
        index += 1
    rest = buffers[index:]
    if rest and done:
        rest[0] = rest[0][done:]
    return rest


class RawFileStore:
    """A raw image file or block device opened for I/O.

    ``size`` is the byte length at open time. Every method blocks and is meant
    to run on an I/O thread; each may raise :class:`OSError`.
    """

    def __init__(self, path: str, *, readonly: bool = False, dirty_pages: DirtyPageGauge = HOST_DIRTY_PAGES) -> None:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise StoreError(f"path={path}: no such file") from None
        except PermissionError:
            hint = "" if readonly else "; use readonly=on or fix its permissions"
            raise StoreError(f"path={path}: permission denied{hint}") from None
        except IsADirectoryError:
            raise StoreError(f"path={path}: is a directory, not an image file") from None
        except OSError as exc:
            raise StoreError(f"path={path}: cannot open: {exc.strerror}") from None
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(self.fd)
            raise StoreError(f"path={path}: cannot find its size: {exc.strerror}") from None
        self.path = path
        self.readonly = readonly
        self._dsync_writes = True
        self._nowait = {False: hasattr(os, "RWF_NOWAIT"), True: hasattr(os, "RWF_NOWAIT")}
        self._dirty_pages = dirty_pages
        self._memory_backed = memory_backed(self.fd)
        self._punch_hole = True
        self._zero_range = True
        self._sync_error: str | None = None

    def __repr__(self) -> str:
        return f"RawFileStore({self.path!r}, size={self.size}, readonly={self.readonly})"

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill ``buffers`` from ``offset``; returns the bytes read (short only at end of file)."""
        pending = [b for b in buffers if len(b)]
        total = 0
        while pending:
            count = os.preadv(self.fd, pending[:IOV_MAX], offset + total)
            if count == 0:
                break
            total += count
            pending = _advance(pending, count)
        return total

    def splice_to(self, pipe: int, offset: int, length: int) -> int:
        """Move ``length`` bytes from ``offset`` into the pipe whose write end is ``pipe``; returns the bytes moved.

        Short only at end of file. A plain :class:`RawFileStore` splices
        (``splice(2)``: the pipe takes references to the page-cache pages, no
        byte is copied); a subclass is read with its own :meth:`readv` and
        the bytes written into the pipe, so what it serves stays its own. The
        pipe must have room for the whole range (a full pipe raises
        :class:`BlockingIOError`).
        """
        if type(self) is not RawFileStore:
            buffer = bytearray(length)
            done = self.readv((memoryview(buffer),), offset)
            view = memoryview(buffer)[:done]
            while view:
                view = view[os.write(pipe, view):]
            return done
        total = 0
        while total < length:
            count = os.splice(self.fd, pipe, length - total, offset_src=offset + total)
            if count == 0:
                break
            total += count
        return total

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The data and hole extents of ``offset``..+``length`` (see :func:`~pvcore.devices.block.extents.map_extents`).

        A plain :class:`RawFileStore` maps its file; a subclass, which may
        serve other bytes than the file's, reports the range as one data
        extent (always a safe answer), as :meth:`splice_to` copies for it.
        """
        if type(self) is not RawFileStore:
            return [Extent(offset, length, False)]
        return map_extents(self.fd, offset, length)

    def transfer_nowait(self, buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
        """Do a whole read or (non-durable) write at once if it needs no waiting.

        Uses ``RWF_NOWAIT``: the kernel does the transfer only if it can without
        blocking (the data is in the page cache); a read from tmpfs or ramfs,
        which refuse ``RWF_NOWAIT``, is a plain read (:func:`memory_backed`). Where the kernel or file
        system refuses buffered ``RWF_NOWAIT`` writes (``EOPNOTSUPP``, as ext4
        does on some kernels), a write of whole pages is done as a plain buffered write
        while the host's dirty memory is far below the throttling threshold
        (:class:`DirtyPageGauge`): it overwrites page-cache pages without reading
        any, so it only copies, though the file system may still briefly wait
        (e.g. for its journal to update the file's times). Returns True if every
        byte moved; False means nothing is known to have moved for certain and
        the caller must do the transfer the ordinary way (it is idempotent).
        """
        views = [b for b in buffers if len(b)]
        if not views or len(views) > IOV_MAX:
            return False
        wanted = sum(map(len, views))
        if not write and self._memory_backed:  # tmpfs refuses RWF_NOWAIT, yet its reads never wait for a disk
            try:
                return os.preadv(self.fd, views, offset) == wanted
            except OSError:
                return False
        if not self._nowait[write]:
            if not (write and offset % PAGE_SIZE == 0 and wanted % PAGE_SIZE == 0 and self._dirty_pages.low()):
                return False
            try:
                return os.pwritev(self.fd, views, offset) == wanted
            except OSError:
                return False
        try:
            if write:
                count = os.pwritev(self.fd, views, offset, os.RWF_NOWAIT)
            else:
                count = os.preadv(self.fd, views, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait[write] = False  # e.g. buffered NOWAIT writes on this filesystem
            return False
        return count == wanted

    def writev(self, buffers: Sequence[memoryview], offset: int, *, durable: bool = False) -> int:
        """Write ``buffers`` at ``offset``; with ``durable`` the data is on stable storage on return."""
        pending = [b for b in buffers if len(b)]
        total = 0
        dsync = durable and self._dsync_writes
        while pending:
            try:
                count = os.pwritev(self.fd, pending[:IOV_MAX], offset + total, os.RWF_DSYNC if dsync else 0)
            except OSError as exc:
                if dsync and exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._dsync_writes = dsync = False
                    continue
                raise
            if count == 0:
                raise OSError(errno.EIO, f"write at {offset + total} made no progress")
            total += count
            pending = _advance(pending, count)
        if durable and not dsync:
            self.sync()
        return total

    def sync(self) -> None:
        """Make every completed write durable (``fdatasync``).

        Once an ``fdatasync`` has failed, every later one fails too (as in
        QEMU's file-posix): the kernel may have dropped the dirty state of the
        pages whose write-back failed, so a later success would claim writes
        durable that may be lost. Reopening the device clears it.
        """
        if self._sync_error is not None:
            raise OSError(errno.EIO, f"an earlier fdatasync failed ({self._sync_error}); writes acknowledged "
                          "before it may be lost, so no flush can succeed until the device is reopened")
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self._sync_error = exc.strerror or str(exc)
            raise

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeros afterwards."""
        if self._punch_hole and length:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _FALLOCATE_UNSUPPORTED:
                    raise
                self._punch_hole = False
        self._write_zeros(offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Zero a range, deallocating it if ``may_unmap`` and the file system can."""
        if may_unmap and self._punch_hole:
            self.discard(offset, length)
            return
        if self._zero_range and length:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _FALLOCATE_UNSUPPORTED:
                    raise
                self._zero_range = False
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            count = os.pwrite(self.fd, zeros[: end - offset], offset)
            if count == 0:
                raise OSError(errno.EIO, f"write at {offset} made no progress")
            offset += count

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
