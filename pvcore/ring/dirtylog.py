"""The dirty-page log of a live migration: one bit per 4 KiB page of guest-physical memory.

While a guest migrates, its VMM copies guest RAM to the destination and then
copies again every page written since. Pages the VMM itself did not write
(a back end's reads into guest buffers, its used rings) it learns from a log
the back end keeps: a bitmap shared as a file descriptor (vhost-user's
SET_LOG_BASE with VHOST_USER_PROTOCOL_F_LOG_SHMFD), where bit ``n`` (byte
``n // 8``, bit ``n % 8``) stands for guest-physical page ``n``, that is
addresses ``[n * 4096, (n + 1) * 4096)``.

The VMM reads and clears the bitmap while the back end sets bits in it, so a
bit must be set with an atomic read-modify-write: a plain load/OR/store of a
byte could write back a byte the VMM had just cleared, losing the other bits
it held, and with them pages the destination would never receive. Python has
no atomic OR on shared memory, so, as :mod:`pvcore.ring.barrier` does for its
fence, a few bytes of machine code in an executable page are called through
ctypes: ``lock or byte [rdi], sil; ret`` on x86-64. Bytes whose eight pages
are all written are stored as 0xFF, which no concurrent clear can make wrong
(the VMM then sees them set either before or after its clear). Where no such
instruction is available (another architecture, or a kernel that refuses an
executable mapping) :data:`ATOMIC_OR_AVAILABLE` is False and a transport must
not offer logging at all.

The log comes from the front end and is not trusted: it must be a regular
file sealed against shrinking (as guest RAM must, see
:mod:`pvcore.ring.fdmemory`), its range must lie inside the file, and it must
be large enough for every guest address the back end may write; a mark past
its end raises :class:`DirtyLogError` (a :class:`GuestMemoryError`, so the
ring engine fails that device and nothing else).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import stat
from collections.abc import Callable, Sequence

from pvcore.ring.fdmemory import _check_sealed
from pvcore.ring.memory import GuestMemory, GuestMemoryError

PAGE_SHIFT = 12
LOG_PAGE_SIZE = 1 << PAGE_SHIFT
"""Every bit of the log covers this many bytes of guest-physical memory."""

MAX_LOG_SIZE = 1 << 36
"""Largest log accepted (64 GiB of bitmap covers 2 PiB of guest memory)."""

_OR_BYTE_CODE = {
    "x86_64": bytes([0xF0, 0x40, 0x08, 0x37, 0xC3]),  # lock or byte [rdi], sil; ret
    "amd64": bytes([0xF0, 0x40, 0x08, 0x37, 0xC3]),
}


class DirtyLogError(GuestMemoryError):
    """A write the log cannot record (past its end), or a log that breaks the rules."""


def _machine_or_byte() -> Callable[[int, int], None] | None:
    code = _OR_BYTE_CODE.get(platform.machine().lower())
    if code is None:
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None
    page.write(code)
    cell = ctypes.c_char.from_buffer(page)
    address = ctypes.addressof(cell)
    del cell
    function = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint)(address)  # keeps the GIL
    function._page = page  # keep the code alive as long as the function
    return function


atomic_or_byte = _machine_or_byte()
"""``atomic_or_byte(address, mask)``: one atomic OR of ``mask`` into the byte at ``address``."""

ATOMIC_OR_AVAILABLE = atomic_or_byte is not None
"""Whether this machine can mark the log atomically (transports offer logging only then)."""


def log_bytes_for(memory: GuestMemory) -> int:
    """How many bytes of log cover every page of ``memory``."""
    end = max((region.end for region in memory.regions), default=0)
    pages = (end + LOG_PAGE_SIZE - 1) >> PAGE_SHIFT
    return (pages + 7) // 8


class DirtyLog:
    """A mapped dirty-page bitmap; :meth:`mark` records guest writes in it."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        """Map ``size`` bytes of ``fd`` from ``offset`` (the fd stays the caller's)."""
        if atomic_or_byte is None:
            raise DirtyLogError(f"no atomic byte OR on {platform.machine()}: dirty logging is not available")
        if not 0 < size <= MAX_LOG_SIZE:
            raise DirtyLogError(f"log size {size:#x} is not in 1..{MAX_LOG_SIZE:#x}")
        if offset < 0 or offset > 1 << 62:
            raise DirtyLogError(f"log offset {offset:#x} is out of range")
        try:
            info = os.fstat(fd)
        except OSError as exc:
            raise DirtyLogError(f"log fd {fd}: not an open file descriptor ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise DirtyLogError(f"log fd {fd}: not a regular file (the log is a memfd)")
        try:
            _check_sealed(f"log fd {fd}", fd)
        except ValueError as exc:
            raise DirtyLogError(str(exc)) from None
        if offset + size > info.st_size:
            raise DirtyLogError(
                f"log offset {offset:#x} + size {size:#x} runs past the end of its file ({info.st_size:#x} bytes)"
            )
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            self._map = mmap.mmap(fd, size + offset - start, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError) as exc:
            raise DirtyLogError(f"log fd {fd}: mmap failed: {exc}") from None
        cell = ctypes.c_char.from_buffer(self._map)
        self._address = ctypes.addressof(cell) + offset - start
        del cell
        self._skip = offset - start
        self.size = size
        self.pages = size * 8
        self.marks = 0
        """How many writes were marked (for the log line when the log goes away)."""

    def __repr__(self) -> str:
        return f"DirtyLog({self.size:#x} bytes, {self.pages} pages)"

    def covers(self, addr: int, length: int) -> bool:
        """Whether every page of ``[addr, addr+length)`` has a bit in the log."""
        return addr >= 0 and length >= 0 and (addr + max(length, 1) - 1) >> PAGE_SHIFT < self.pages

    def check_covers(self, memory: GuestMemory) -> None:
        """Raise :class:`DirtyLogError` unless the log has a bit for every page of ``memory``."""
        needed = log_bytes_for(memory)
        if needed > self.size:
            raise DirtyLogError(
                f"log of {self.size:#x} bytes covers {self.pages * LOG_PAGE_SIZE:#x} bytes of guest memory, "
                f"but guest memory ends at {needed * 8 * LOG_PAGE_SIZE:#x} (needs {needed:#x} bytes of log)"
            )

    def mark(self, addr: int, length: int) -> None:
        """Set the bit of every page that ``[addr, addr+length)`` touches."""
        if length <= 0:
            return
        self.marks += 1
        first = addr >> PAGE_SHIFT
        last = (addr + length - 1) >> PAGE_SHIFT
        if first < 0 or last >= self.pages:
            raise DirtyLogError(
                f"guest write {addr:#x}+{length:#x} is past the dirty log's end "
                f"({self.pages * LOG_PAGE_SIZE:#x} bytes of guest memory)"
            )
        low, high = first >> 3, last >> 3
        base = self._address
        if low == high:
            atomic_or_byte(base + low, (0xFF << (first & 7)) & (0xFF >> (7 - (last & 7))))  # type: ignore[misc]
            return
        atomic_or_byte(base + low, (0xFF << (first & 7)) & 0xFF)  # type: ignore[misc]
        if high > low + 1:
            start = self._skip + low + 1
            self._map[start : self._skip + high] = b"\xff" * (high - low - 1)
        atomic_or_byte(base + high, 0xFF >> (7 - (last & 7)))  # type: ignore[misc]

    def mark_buffers(self, buffers: Sequence[tuple[int, int]], written: int) -> None:
        """Mark the first ``written`` bytes of (address, length) buffers, in order."""
        for addr, length in buffers:
            if written <= 0:
                return
            take = length if length < written else written
            self.mark(addr, take)
            written -= take

    def close(self) -> None:
        """Unmap the log (idempotent); later marks raise."""
        self.pages = 0
        self._map.close()
